"""The window on plain and on hash-partitioned tables (PostgreSQL).

Two fresh schemas get the same rows: ``--sessions`` sessions of
``--messages`` messages each (human/ai turns of English-like text), written
with ``Store.append_turns``. The second is then converted with
``Store.partition(--partitions)`` (timed: the cost of the migration path on
that much data) and both are ANALYZEd. Then, on each:

* **window**: ``Store.window_rows`` (``max_token_limit`` 2,000, text mode) of
  a random session, on a store that made its engine (tokenmem's fast path),
  timed ``--reps`` times, the layouts interleaved; medians and p99. The
  partitioned schema is measured twice: as it comes (psycopg prepares a
  statement run five times, and PostgreSQL may then plan it generically,
  pruning at executor start) and with ``plan_cache_mode=force_custom_plan``
  in the connection's options (pruned when planned);
* **plan**: ``EXPLAIN (ANALYZE, FORMAT JSON)`` of the statement the store
  sends for one session, with its own bound parameters: which relations of
  tokenmem_messages it scans, rows returned, and the server's planning and
  execution time (medians of 50);
* **generic plan**: the same statement prepared, under ``plan_cache_mode =
  force_generic_plan``: partitions scanned and "Subplans Removed";
* **owner-wide**: ``EXPLAIN`` of ``Store.count(owner=...)``'s statement —
  how many relations of tokenmem_messages it scans (all of them: it fans out).

Run from the repository root (about a minute with the defaults)::

    .venv/bin/python benchmarks/partition.py
    .venv/bin/python benchmarks/partition.py --sessions 100 --messages 200 --reps 100

PostgreSQL comes from ``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    ENCODING,
    database,
    median_ms,
    percentile_ms,
    sentence_text,
    source_digest,
    statements_sent,
)
from sqlalchemy import Engine, make_url, text

from tokenmem import Message, Rule, Store, TokenCounter
from tokenmem.engine import make_engine

LIMIT = 2_000
CUSTOM = "partitioned, plan_cache_mode=force_custom_plan"
SEED = 20_261_129


def turns(n: int, rng: random.Random) -> list[list[Message]]:
    out = []
    for i in range(0, n, 2):
        out.append([Message("human", sentence_text(rng, rng.randint(4, 40)))])
        if i + 1 < n:
            out[-1].append(Message("ai", sentence_text(rng, rng.randint(4, 40))))
    return out


def sent(url: str, call: Any, marker: str) -> tuple[str, Any]:
    """The statement (containing ``marker``) and parameters a store on an
    engine passed in sends for ``call(store)``: what the fast path runs too."""
    probe = Store(make_engine(url))
    try:
        with statements_sent(probe.engine) as seen:
            call(probe)
    finally:
        probe.close()
    for statement, parameters in seen:
        if marker in statement:
            return statement, parameters
    raise RuntimeError(f"no statement with {marker!r}: {[s for s, _ in seen]}")


def relations(plan: Any) -> list[str]:
    found: list[str] = []
    if isinstance(plan, dict):
        if str(plan.get("Relation Name", "")).startswith("tokenmem_messages"):
            found.append(plan["Relation Name"])
        for value in plan.values():
            found += relations(value)
    elif isinstance(plan, list):
        for value in plan:
            found += relations(value)
    return found


def index_names(plan: Any) -> set[str]:
    if isinstance(plan, dict):
        found = {plan["Index Name"]} if "Index Name" in plan else set()
        return found.union(*(index_names(v) for v in plan.values()))
    if isinstance(plan, list):
        return set().union(*(index_names(v) for v in plan))
    return set()


def explain(engine: Engine, statement: tuple[str, Any]) -> dict[str, Any]:
    sql, params = statement
    planning, execution = [], []
    with engine.connect() as conn:
        for _ in range(50):
            (plan,) = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).one()
            planning.append(plan[0]["Planning Time"])
            execution.append(plan[0]["Execution Time"])
        names: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        conn.exec_driver_sql("PREPARE w AS " + re.sub(r"%\((\w+)\)s", number, sql))
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        args = ", ".join(
            str(v) if isinstance(v, int) else "'" + str(v).replace("'", "''") + "'"
            for v in (params[n] for n in names)
        )
        (generic,) = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) EXECUTE w({args})").one()
        removed = re.findall(r'"Subplans Removed": (\d+)', json.dumps(generic))
    return {
        "scanned": sorted(set(relations(plan))),
        "rows": plan[0]["Plan"]["Actual Rows"],
        "cum_floor_index": any("cum_floor" in name for name in index_names(plan)),
        "planning_ms": sorted(planning)[len(planning) // 2],
        "execution_ms": sorted(execution)[len(execution) // 2],
        "generic_scanned": sorted(set(relations(generic))),
        "generic_subplans_removed": [int(r) for r in removed],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--messages", type=int, default=500, help="per session")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--reps", type=int, default=1_000)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw numbers here")
    args = parser.parse_args(argv)
    counter, rule = TokenCounter(ENCODING), Rule(limit=LIMIT)
    names = [f"s{i}" for i in range(args.sessions)]
    report: dict[str, Any] = {"source_digest": source_digest(), **vars(args), "json": None}
    with (
        database("postgresql", "bench_plain") as plain_url,
        database("postgresql", "bench_part") as part_url,
    ):
        stores = {"plain": Store(plain_url, upgrade=True), "partitioned": Store(part_url)}
        stores["partitioned"].upgrade()
        for label, store in list(stores.items()):
            rng = random.Random(SEED)
            t0 = time.perf_counter()
            for name in names:
                store.append_turns(name, turns(args.messages, rng), counter, batch_size=1_000)
            report[f"fill_{label}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report["layout"] = stores["partitioned"].partition(args.partitions)
        report["partition_s"] = time.perf_counter() - t0
        # psycopg prepares a statement run 5 times; PostgreSQL may then use a
        # generic plan, which prunes partitions only when the executor starts.
        custom = make_url(part_url)
        custom_url = custom.update_query_dict(
            {"options": custom.query["options"] + " -cplan_cache_mode=force_custom_plan"}
        ).render_as_string(hide_password=False)
        stores[CUSTOM] = Store(custom_url)
        urls = {"plain": plain_url, "partitioned": part_url, CUSTOM: custom_url}
        engines = {label: make_engine(url) for label, url in urls.items()}
        for engine in engines.values():
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))
        timings: dict[str, list[int]] = {label: [] for label in stores}
        rng = random.Random(SEED)
        for rep in range(args.reps + 20):
            name = rng.choice(names)
            order = list(stores.items())[:: 1 if rep % 2 else -1]
            for label, store in order:
                t0 = time.perf_counter_ns()
                rows = store.window_rows(name, rule, counter)
                elapsed = time.perf_counter_ns() - t0
                if rep >= 20:  # warm-up first
                    timings[label].append(elapsed)
            assert rows
        for label in stores:
            statement = sent(urls[label], lambda s: s.window_rows("s7", rule, counter), " OVER ")
            counting = sent(urls[label], lambda s: s.count(owner=""), "count(")
            with engines[label].connect() as conn:
                (plan,) = conn.exec_driver_sql(
                    "EXPLAIN (FORMAT JSON) " + counting[0], counting[1]
                ).one()
            report[label] = {
                "window_median_ms": median_ms(timings[label]),
                "window_p99_ms": percentile_ms(timings[label], 99),
                **explain(engines[label], statement),
                "count_owner_scanned": len(set(relations(plan))),
            }
        for store in stores.values():
            store.close()
        for engine in engines.values():
            engine.dispose()
    show(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def show(r: dict[str, Any]) -> None:
    total = r["sessions"] * r["messages"]
    print(
        f"# Window on plain vs {r['partitions']} hash partitions (PostgreSQL)\n\n"
        f"tokenmem sources {r['source_digest']}; {r['sessions']:,} sessions x "
        f"{r['messages']:,} messages = {total:,} messages per schema; fill "
        f"{r['fill_plain_s']:.1f} s / {r['fill_partitioned_s']:.1f} s; "
        f"Store.partition({r['partitions']}) of {total:,} messages: {r['partition_s']:.2f} s\n"
    )
    print(
        "| layout | window median (ms) | p99 (ms) | rows | messages relations scanned "
        "| cum_floor index | planning (ms) | execution (ms) "
        "| generic plan: scanned / subplans removed | count(owner) scans |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|---|---:|")
    for label in ("plain", "partitioned", CUSTOM):
        x = r[label]
        generic = f"{', '.join(x['generic_scanned'])} / {x['generic_subplans_removed'] or '-'}"
        print(
            f"| {label} | {x['window_median_ms']:.3f} | {x['window_p99_ms']:.3f} | {x['rows']} "
            f"| {', '.join(x['scanned'])} | {'yes' if x['cum_floor_index'] else 'no'} "
            f"| {x['planning_ms']:.3f} | {x['execution_ms']:.3f} "
            f"| {generic} | {x['count_owner_scanned']} |"
        )


if __name__ == "__main__":
    sys.exit(main())
