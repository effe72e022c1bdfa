"""How long loading a 2,000-token window takes as a session's history grows.

The window query seeks through the index on ``(session_id, cum_floor)`` to the
oldest message that could fit, so loading a window should cost about the same
for a session of 100 messages as for one of 100,000. This script checks that
on SQLite (a file in a temporary directory) and on PostgreSQL (a fresh schema,
dropped at the end), and prints one Markdown table per backend.

One session each of 100, 1,000, 2,000, 10,000 and 100,000 messages is filled
with ``Store.append_turns`` (human/ai turns of deterministic English-like text,
about 5 to 60 o200k_base tokens a message); the fill time is reported
separately. PostgreSQL is not ANALYZEd after the fill: the plan must not depend
on statistics. Then, per session, with ``max_token_limit=2000`` in text mode:

* **load**: ``ConversationTokenBufferMemory.load_memory_variables({})`` end to
  end (window query, rows to messages, the rendered string counted again);
* **store.window**: ``Store.window`` alone (the SQL and the Python around it);
* **bare SQL**: the same rows (positions first..last of the window) fetched with
  the raw DBAPI connection and a plain ``SELECT role, content ... WHERE
  session_id = ? AND position BETWEEN ? AND ? ORDER BY position``, committed
  like ``Store.window``'s transaction: the floor any implementation pays.

After a warm-up, each is timed ``--reps`` times with ``time.perf_counter_ns``,
round-robin over the sessions and the three measurements (the starting point
rotates every round) so that machine noise hits every size alike; the tables
show medians. The plan of the statement ``store.window`` sends for the largest
session is printed (``EXPLAIN``; ``EXPLAIN QUERY PLAN`` on SQLite; add
``--analyze`` for PostgreSQL's ``EXPLAIN ANALYZE``), with whether it seeks
through the ``cum_floor`` index.

Run from the repository root (the default is both backends, all sizes; about
a minute on two cores)::

    .venv/bin/python benchmarks/window_load.py
    .venv/bin/python benchmarks/window_load.py --quick --backend sqlite
    .venv/bin/python benchmarks/window_load.py --json /tmp/window_load.json

PostgreSQL comes from ``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BACKENDS,
    ENCODING,
    OWNER,
    TIMES,
    database,
    driver_id,
    median_ms,
    range_sql,
    sentence_text,
    source_digest,
    statements_sent,
)
from sqlalchemy import Engine, text
from sqlalchemy.pool import PoolProxiedConnection

from tokenmem import ConversationTokenBufferMemory, Message, Rule, Store, TokenCounter
from tokenmem.engine import make_engine
from tokenmem.models import session_uuid

SIZES = (100, 1_000, 2_000, 10_000, 100_000)
QUICK_SIZES = (100, 2_000, 10_000)
REPS, QUICK_REPS = 1_000, 50
LIMIT = 2_000
SEED = 20_241_129
GOAL = 1.5  # the largest session's load, at most this many times the 2,000 one's
SEEK_INDEX = "ix_tokenmem_messages_session_id_cum_floor"
MEASURES = ("load", "window", "bare")


def make_turns(messages: int, seed: int) -> list[list[Message]]:
    """``messages // 2`` deterministic human/ai turns (4 to 48 words a message)."""
    rng = random.Random(seed)
    return [
        [
            Message("human", sentence_text(rng, rng.randint(4, 48))),
            Message("ai", sentence_text(rng, rng.randint(4, 48))),
        ]
        for _ in range(messages // 2)
    ]


def session_name(size: int) -> str:
    return f"bench-{size}"


# --- databases -----------------------------------------------------------------


def fill(
    store: Store, sizes: Sequence[int], counter: TokenCounter, batch_size: int
) -> dict[int, float]:
    """Fill one session per size; return the seconds ``append_turns`` took for each
    (the text is generated beforehand, outside the timing)."""
    seconds = {}
    for size in sizes:
        turns = make_turns(size, SEED + size)
        t0 = time.perf_counter()
        written = store.append_turns(session_name(size), turns, counter, batch_size=batch_size)
        seconds[size] = time.perf_counter() - t0
        if written != size:
            raise RuntimeError(f"wrote {written} messages, expected {size}")
    return seconds


def token_profile(engine: Engine) -> tuple[int, float, int]:
    """(min, mean, max) of the stored messages' text tokens."""
    with engine.connect() as conn:
        lo, mean, hi = conn.execute(
            text(
                "SELECT MIN(text_tokens), AVG(text_tokens), MAX(text_tokens) FROM tokenmem_messages"
            )
        ).one()
    return int(lo), float(mean), int(hi)


def window_statement(url: str, name: str, rule: Rule, counter: TokenCounter) -> tuple[str, Any]:
    """The SQL and the driver-level parameters ``store.window`` sends for the
    session ``name``: whatever the store builds, it is this that gets explained.
    Asked of a store on an engine passed in, where every statement goes
    through ``Connection.execute`` and listeners see it (the measured store
    made its engine and runs the same compiled statement on the cursor)."""
    probe = Store(make_engine(url))
    try:
        with statements_sent(probe.engine) as sent:
            probe.window(name, rule, counter)
    finally:
        probe.close()
    for statement, parameters in sent:
        if "tokenmem_messages" in statement and " OVER " in statement.upper():
            return statement, parameters
    raise RuntimeError(f"store.window sent no window query: {[s for s, _ in sent]}")


def explain(engine: Engine, statement: tuple[str, Any], prefix: str) -> list[str]:
    """The plan the database shows for ``prefix`` (``EXPLAIN``, ``EXPLAIN QUERY
    PLAN``...) followed by the statement, run with its own parameters."""
    sql, parameters = statement
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"{prefix} {sql}", parameters).all()
    return [" | ".join(str(v) for v in row) if len(row) > 1 else str(row[0]) for row in rows]


# --- measuring -----------------------------------------------------------------


@dataclass
class Case:
    """One session under test and its three measurements."""

    size: int
    rows: int
    first: int
    last: int
    run: dict[str, Callable[[], object]]
    samples: dict[str, list[int]] = field(default_factory=lambda: {m: [] for m in MEASURES})

    def median_ms(self, measure: str) -> float:
        return median_ms(self.samples[measure])


def make_cases(
    store: Store, raw: PoolProxiedConnection, sizes: Sequence[int], counter: TokenCounter
) -> list[Case]:
    """Learn each session's window from ``store.window`` and bind the three
    measurements to it; check that they all see the same window."""
    rule = Rule(limit=LIMIT)
    bare_sql = range_sql(store.dialect)
    cases = []
    for size in sizes:
        name = session_name(size)
        sid = session_uuid(OWNER, name)
        window = store.window(name, rule, counter)
        first, last = window[0].position, window[-1].position
        if last != size - 1 or [w.position for w in window] != list(range(first, last + 1)):
            raise RuntimeError(f"{name}: the window is not the newest run of messages")
        memory = ConversationTokenBufferMemory(
            store=store, session_id=name, max_token_limit=LIMIT, encoding=ENCODING
        )
        params = (driver_id(store.dialect, sid), first, last)

        def bare(params: tuple[Any, ...] = params) -> Sequence[Any]:
            cur = raw.cursor()
            try:
                cur.execute(bare_sql, params)
                rows = cur.fetchall()
            finally:
                cur.close()
            raw.commit()
            return rows

        def load(memory: ConversationTokenBufferMemory = memory) -> dict[str, Any]:
            return memory.load_memory_variables({})

        def window_only(name: str = name) -> object:
            return store.window(name, rule, counter)

        if [row[1] for row in bare()] != [w.message.content for w in window]:
            raise RuntimeError(f"{name}: the bare SQL read other rows than store.window")
        if not str(load()["history"]).endswith(window[-1].message.content):
            raise RuntimeError(f"{name}: the memory did not load the newest message")
        cases.append(
            Case(
                size, len(window), first, last, {"load": load, "window": window_only, "bare": bare}
            )
        )
    return cases


def measure(cases: list[Case], reps: int, warmup: int) -> None:
    """Time every measurement of every case ``reps`` times, after ``warmup``
    untimed rounds, rotating which case and which measurement go first."""
    clock = time.perf_counter_ns
    for r in range(warmup + reps):
        k = r % len(cases)
        for case in cases[k:] + cases[:k]:
            j = r % len(MEASURES)
            for m in MEASURES[j:] + MEASURES[:j]:
                fn = case.run[m]
                t0 = clock()
                fn()
                elapsed = clock() - t0
                if r >= warmup:
                    case.samples[m].append(elapsed)


# --- reporting -----------------------------------------------------------------


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}{TIMES}" if b else "n/a"


def table(cases: list[Case]) -> str:
    by_size = {c.size: c for c in cases}
    at_2000 = by_size[2_000].median_ms("load") if 2_000 in by_size else None
    at_100 = by_size[100].median_ms("load") if 100 in by_size else None
    lines = [
        "| history length | window rows | load median (ms) | store.window median (ms) "
        "| bare SQL median (ms) | load ÷ load@2,000 | load ÷ load@100 | load ÷ bare SQL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        load, window, bare = (c.median_ms(m) for m in MEASURES)
        lines.append(
            f"| {c.size:,} | {c.rows} | {load:.3f} | {window:.3f} | {bare:.3f} "
            f"| {ratio(load, at_2000)} | {ratio(load, at_100)} | {ratio(load, bare)} |"
        )
    return "\n".join(lines)


def goal_line(backend: str, cases: list[Case]) -> str:
    by_size = {c.size: c for c in cases}
    largest = max(by_size)
    if 2_000 not in by_size or largest <= 2_000:
        return f"Goal ({backend}): needs a 2,000-message session and a larger one."
    got = by_size[largest].median_ms("load") / by_size[2_000].median_ms("load")
    verdict = "met" if got <= GOAL else "NOT met"
    return (
        f"Goal ({backend}): {largest:,}-message load within {GOAL}{TIMES} of the 2,000-message "
        f"load: {got:.2f}{TIMES}: {verdict}."
    )


def run_backend(backend: str, args: argparse.Namespace, counter: TokenCounter) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {"backend": backend}
    with database(backend, "bench") as url:
        store = Store(url, upgrade=True)
        engine = store.engine
        fills = fill(store, args.sizes, counter, args.batch_size)
        lo, mean, hi = token_profile(engine)
        print(f"\n## {backend}\n")
        print(
            f"Filled in {sum(fills.values()):.1f} s "
            f"(append_turns, batch_size={args.batch_size} turns): "
            + ", ".join(f"{size:,}: {s:.2f} s" for size, s in fills.items())
            + f". Text tokens per message: min {lo}, mean {mean:.1f}, max {hi}."
        )
        largest = max(args.sizes)
        stmt = window_statement(url, session_name(largest), Rule(limit=LIMIT), counter)
        prefix = "EXPLAIN" if backend == "postgresql" else "EXPLAIN QUERY PLAN"
        plan = explain(engine, stmt, prefix)
        seeks = any(SEEK_INDEX in line for line in plan)
        print(f"\n{prefix} of the window query, {largest:,}-message session (no ANALYZE):\n")
        print("\n".join(f"    {line}" for line in plan))
        print(f"\nSeeks through {SEEK_INDEX}: {'yes' if seeks else 'NO'}.")
        report.update(fill_seconds=fills, text_tokens=[lo, mean, hi], plan=plan, seeks=seeks)
        if args.analyze and backend == "postgresql":
            analyzed = explain(engine, stmt, "EXPLAIN (ANALYZE, BUFFERS)")
            print(f"\nEXPLAIN (ANALYZE, BUFFERS), {largest:,}-message session:\n")
            print("\n".join(f"    {line}" for line in analyzed))
            report["plan_analyzed"] = analyzed

        raw = engine.raw_connection()
        try:
            cases = make_cases(store, raw, args.sizes, counter)
            t0 = time.perf_counter()
            measure(cases, args.reps, args.warmup)
            measured = time.perf_counter() - t0
        finally:
            raw.close()
            store.close()
    print(f"\nMedians of {args.reps} runs each ({measured:.1f} s of timing):\n")
    print(table(cases))
    print(f"\n{goal_line(backend, cases)}")
    report["cases"] = [
        {
            "size": c.size,
            "window_rows": c.rows,
            "first": c.first,
            "last": c.last,
            "median_ms": {m: c.median_ms(m) for m in MEASURES},
            "samples_ns": c.samples,
        }
        for c in cases
    ]
    report["seconds"] = time.perf_counter() - started
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="repeatable; default: both"
    )
    parser.add_argument("--quick", action="store_true", help="sizes 100, 2,000, 10,000; 50 reps")
    parser.add_argument("--reps", type=int, help=f"timed runs per measurement (default {REPS})")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="turns per append_turns transaction (default 500; 2,000 fills no faster)",
    )
    parser.add_argument(
        "--analyze", action="store_true", help="also print EXPLAIN ANALYZE (PostgreSQL)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw numbers here")
    args = parser.parse_args(argv)
    args.backends = args.backend or list(BACKENDS)
    args.sizes = QUICK_SIZES if args.quick else SIZES
    if args.reps is None:
        args.reps = QUICK_REPS if args.quick else REPS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    digest = source_digest()  # of the sources imported now, should they change meanwhile
    counter = TokenCounter(ENCODING)
    print(
        f"# Window load vs history length ({LIMIT:,}-token window, text mode, {ENCODING})\n\n"
        f"tokenmem sources {digest}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; sizes " + ", ".join(f"{s:,}" for s in args.sizes)
    )
    reports = [run_backend(backend, args, counter) for backend in args.backends]
    total = time.perf_counter() - started
    print(f"\nTotal run time: {total:.0f} s.")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"source_digest": digest, "total_seconds": total, "backends": reports},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
