"""How long loading a 2,000-token window takes as a session's history grows,
in a table of millions of messages, analysed and never analysed, on a
connection's first loads and in the steady state.

The window statement reads the session row's start bound once (a scalar
subquery) and then at most a constant number of candidates, newest first,
through the index on ``(session_id, cum_floor)`` (docs/window-plans.md):
loading a window should cost about the same for a session of 100 messages
as for one of a million, whatever the planner knows about the tables. This
script checks that on SQLite (a file in a temporary directory) and on
PostgreSQL (a fresh schema, dropped at the end) and prints one Markdown
table per backend, the plans, and the goals met or missed.

**What is in the database.** One session each of 100, 1,000, 2,000, 10,000,
100,000 and (``--scale full``) 1,000,000 messages, plus filler sessions of
1,000 messages (9,000 of them at full scale: 10,113,100 messages in the table;
900 by default: 1,011,100 in all, sizes up to 100,000). Counting ten million
messages with tiktoken would take hours, so one realistic block is counted
and the rest is copied from it on the server:

* the 2,000-message session is written with ``Store.append_turns`` (1,000
  human/ai turns of deterministic English-like text, about 5 to 60
  o200k_base tokens a message; its fill time is reported);
* every other session is ``INSERT ... SELECT``-ed from it: its message at
  position ``p`` is the block's message ``p % 2000``, with ``turn`` shifted by
  1,000 and ``cum_floor`` by the block's ``floor_total`` per whole block
  (``generate_series`` on PostgreSQL, a recursive CTE on SQLite), and its
  session row's ``next_position``, ``next_turn`` and ``floor_total`` set to
  match (sessions of 100 and 1,000 are the block's first messages). A
  message's counts depend on its own text only (README, "How the window is
  counted"), so every copied window is exact. Each session's rows are
  inserted in position order, session after session (a live table
  interleaves sessions' rows in its heap; that makes no difference to
  which index range is read);
* after filling, every measured session is checked in SQL (positions gapless
  and ``cum_floor`` the running sum of the floors before each message, to the
  session's ``floor_total``), and its window against the plain-Python
  reference: ``tokenmem.window.fit`` over the stored costs of its newest
  messages must give exactly ``store.window``'s rows and costs, and tiktoken
  must count the memory's rendered history within the limit, one older line
  more over it.

SQLite gets the same tables, filler included, at every scale (the fill is a
minute or two: there is no reason to test it on a smaller table).

**States.** Each backend is measured twice on the same data: first with
tables that were never analysed (PostgreSQL's autovacuum is off on them
while they are filled and measured), then after ``VACUUM ANALYZE`` (``ANALYZE``
on SQLite), as autovacuum leaves them in production. JIT keeps the server's
settings (``SHOW jit`` and ``jit_above_cost`` are printed).

**Measurements**, per session, ``max_token_limit=2000``, text mode:

* **steady state** — after a warm-up, ``--reps`` rounds, round-robin over the
  sessions and over three measurements (the starting point rotates each
  round), on one store: **load**, ``ConversationTokenBufferMemory.
  load_memory_variables({})`` end to end; **store.window**, the SQL and the
  Python around it; **bare**, the window's rows (positions first..last,
  known beforehand) fetched on a raw DBAPI connection with a plain ``SELECT
  role, content ... WHERE session_id = ? AND position BETWEEN ? AND ? ORDER
  BY position`` and committed, the floor any implementation pays;
* **fresh connection** — ``--fresh-reps`` times per session (sizes and the
  two kinds interleaved): a new ``Store`` (new engine, new pool) whose
  schema check has opened its one connection, untimed; then its first
  ``--fresh-loads`` loads, each timed. Beside it the bare query on a new
  psycopg / sqlite3 connection (connected untimed). psycopg prepares a
  statement on its sixth execution and PostgreSQL plans the first five
  executions of a prepared statement with their parameters before it may
  switch to a generic plan, so the table shows the first load, the median
  of loads 1-10 and of loads 11 on. Connecting is left out of both sides.

The tables show medians (of all repetitions' samples of that load number).
The plans of the statement for the largest session are printed: on
PostgreSQL ``EXPLAIN (ANALYZE, BUFFERS)`` of the prepared statement with
``plan_cache_mode`` forced to the custom and to the generic plan (as
tests/test_window_plans.py does), on SQLite ``EXPLAIN QUERY PLAN``.

Goals: on PostgreSQL (each state) the largest session's load within 1.5x
of the 2,000-message session's and within 2x of the bare query, in the
steady state and on a fresh connection (first load, loads 1-10, loads 11
on); on SQLite the largest session's load within 1.5x of the 2,000-message
one's (the same four).

Run from the repository root::

    .venv/bin/python benchmarks/window_load.py                # sizes to 10^5, 10^6 rows
    .venv/bin/python benchmarks/window_load.py --scale full   # to 10^6 in 10^7 rows
    .venv/bin/python benchmarks/window_load.py --scale quick --backend sqlite
    .venv/bin/python benchmarks/window_load.py --json /tmp/window_load.json

``--scale full`` took seven minutes on two cores (PostgreSQL's table is
about 3 GB, filled in three; SQLite's in under two); the default scale is
about a tenth of that. PostgreSQL comes from
``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from common import (
    BACKENDS,
    ENCODING,
    OWNER,
    TIMES,
    connect,
    database,
    driver_id,
    median_ms,
    range_sql,
    source_digest,
)
from sqlalchemy import Connection, Engine, text
from sqlalchemy.pool import PoolProxiedConnection
from window_sessions import BLOCK, FILLER, check_session, fill, log, session_name, table_rows

from tokenmem import ConversationTokenBufferMemory, Rule, Store, TokenCounter
from tokenmem.models import session_uuid
from tokenmem.window import Counts, fit, row_cap, window_select


@dataclass(frozen=True)
class Scale:
    sizes: tuple[int, ...]
    filler_sessions: int
    reps: int
    fresh_reps: int


SCALES = {
    "quick": Scale((100, 2_000, 10_000), 10, 50, 3),
    "default": Scale((100, 1_000, 2_000, 10_000, 100_000), 900, 300, 15),
    "full": Scale((100, 1_000, 2_000, 10_000, 100_000, 1_000_000), 9_000, 1_000, 40),
}
LIMIT = 2_000
RULE = Rule(limit=LIMIT)
FLAT_GOAL = 1.5  # the largest session's load, at most this many times the 2,000 one's
BARE_GOAL = 2.0  # ... and this many times the bare query's (PostgreSQL)
STATES = ("never analysed", "analysed")
MEASURES = ("load", "window", "bare")
FRESH_KINDS = ("load", "renewed", "bare")
SEEK_INDEX = "ix_tokenmem_messages_session_id_cum_floor"


def check_window(store: Store, size: int, counter: TokenCounter) -> list[Any]:
    """``store.window`` against ``fit`` over the stored costs of the newest
    messages, and the memory's history counted by tiktoken; returns the window."""
    name = session_name(size)
    sid = driver_id(store.dialect, session_uuid(OWNER, name))
    with store.engine.connect() as conn:
        newest = conn.execute(
            text(
                "SELECT position, role, content, text_tokens, newline_tokens, chat_tokens"
                " FROM tokenmem_messages WHERE session_id = :id"
                " ORDER BY position DESC LIMIT :n"
            ),
            {"id": sid, "n": LIMIT + 1},
        ).all()[::-1]
    prefix_tokens = RULE.prefix_tokens(counter)
    counts = [Counts(r.text_tokens, r.chat_tokens, r.newline_tokens) for r in newest]
    costs = [RULE.cost(r.role, c, prefix_tokens) for r, c in zip(newest, counts, strict=True)]
    start = fit(costs, RULE.budget(counts[-1]))
    if start == 0:
        raise RuntimeError(f"{name}: the reference needs more than {len(newest)} messages")
    window = store.window(name, RULE, counter)
    expected = [(r.position, cost) for r, cost in zip(newest[start:], costs[start:], strict=True)]
    if [(w.position, w.tokens) for w in window] != expected:
        raise RuntimeError(f"{name}: store.window is not the reference window")
    memory = ConversationTokenBufferMemory(
        store=store, session_id=name, max_token_limit=LIMIT, encoding=ENCODING
    )
    history = str(memory.load_memory_variables({})["history"])
    older = newest[start - 1]
    longer = f"{RULE.line_prefixes[older.role]}{older.content}\n{history}"
    if counter.count(history) > LIMIT or counter.count(longer) <= LIMIT:
        raise RuntimeError(f"{name}: the rendered window is not the longest that fits")
    return window


# --- plans ---------------------------------------------------------------------


def pg_settings(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {
            name: str(conn.exec_driver_sql(f"SHOW {name}").scalar_one())
            for name in ("server_version", "jit", "jit_above_cost", "plan_cache_mode")
        } | {"jit available": str(conn.exec_driver_sql("SELECT pg_jit_available()").scalar_one())}


def pg_plan(engine: Engine, size: int, plan_cache_mode: str, counter: TokenCounter) -> list[str]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of the window statement prepared, as
    psycopg runs it from its sixth execution, with ``plan_cache_mode`` forced."""
    statement = window_select(RULE.mode, row_cap(RULE))
    sql = str(statement.compile(dialect=engine.dialect))
    names: list[str] = []

    def number(found: re.Match[str]) -> str:
        if found[1] not in names:
            names.append(found[1])
        return f"${names.index(found[1]) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", number, sql)
    params = RULE.params(
        session_uuid(OWNER, session_name(size)), ENCODING, RULE.prefix_tokens(counter)
    )
    literals = ", ".join(
        str(params[n]) if isinstance(params[n], int) else f"'{params[n]}'" for n in names
    )
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SET plan_cache_mode = {plan_cache_mode}")
        conn.exec_driver_sql(f"PREPARE tm_window AS {prepared}")
        rows = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE tm_window({literals})"
        ).all()
        conn.exec_driver_sql("DEALLOCATE tm_window")
        conn.rollback()
    return [str(row[0]) for row in rows]


def sqlite_plan(store: Store, size: int, counter: TokenCounter) -> list[str]:
    """``EXPLAIN QUERY PLAN`` as a tree, from its rows (id | parent | _ | detail)."""
    depth: dict[str, int] = {"0": -1}
    lines = []
    for line in store.explain_window(session_name(size), RULE, counter).splitlines():
        node, parent, _, detail = line.split(" | ", 3)
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + detail)
    return lines


# --- measuring -----------------------------------------------------------------


@dataclass
class Case:
    """One session under test: its window and its measurements."""

    size: int
    rows: int
    first: int
    last: int
    steady: dict[str, list[int]] = field(default_factory=lambda: {m: [] for m in MEASURES})
    # per kind, per repetition: the times of loads 1, 2, ... on a fresh connection
    fresh: dict[str, list[list[int]]] = field(default_factory=lambda: {k: [] for k in FRESH_KINDS})

    def steady_ms(self, measure: str) -> float:
        return median_ms(self.steady[measure])

    def fresh_ms(self, kind: str, first: int, last: int | None = None) -> float:
        """The median of loads ``first``..``last`` (1-based; ``last`` None: to the end)."""
        return median_ms([t for rep in self.fresh[kind] for t in rep[first - 1 : last]])


def bare_query(raw: Any, sql: str, params: tuple[Any, ...]) -> Sequence[Any]:
    cur = raw.cursor()
    try:
        cur.execute(sql, params)
        rows = cur.fetchall()
    finally:
        cur.close()
    raw.commit()
    return list(rows)


def measure_steady(
    store: Store, raw: PoolProxiedConnection, cases: list[Case], reps: int, warmup: int
) -> float:
    """Time every measurement of every case ``reps`` times, after ``warmup``
    untimed rounds, rotating which case and which measurement go first."""
    counter = TokenCounter(ENCODING)
    bare_sql = range_sql(store.dialect)
    runs: list[dict[str, Callable[[], object]]] = []
    for case in cases:
        name = session_name(case.size)
        memory = ConversationTokenBufferMemory(
            store=store, session_id=name, max_token_limit=LIMIT, encoding=ENCODING
        )
        params = (driver_id(store.dialect, session_uuid(OWNER, name)), case.first, case.last)
        runs.append(
            {
                "load": lambda memory=memory: memory.load_memory_variables({}),
                "window": lambda name=name: store.window(name, RULE, counter),
                "bare": lambda params=params: bare_query(raw, bare_sql, params),
            }
        )
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for r in range(warmup + reps):
        k = r % len(cases)
        for case, run in (
            list(zip(cases, runs, strict=True))[k:] + list(zip(cases, runs, strict=True))[:k]
        ):
            j = r % len(MEASURES)
            for m in MEASURES[j:] + MEASURES[:j]:
                fn = run[m]
                t0 = clock()
                fn()
                elapsed = clock() - t0
                if r >= warmup:
                    case.steady[m].append(elapsed)
    return time.perf_counter() - started


def fresh_load_times(url: str, case: Case, loads: int) -> list[int]:
    """A new store (engine, pool) whose schema check opened its connection;
    then ``loads`` loads of the case's session, each timed."""
    store = Store(url)
    try:
        store.check()  # connects, initialises the dialect, checks the schema: untimed
        memory = ConversationTokenBufferMemory(
            store=store,
            session_id=session_name(case.size),
            max_token_limit=LIMIT,
            encoding=ENCODING,
        )
        return timed_loads(memory, loads)
    finally:
        store.close()


def renewed_load_times(store: Store, case: Case, loads: int) -> list[int]:
    """A fresh connection on a store that has loaded before: its pool
    renewed (``dispose``) and the new connection opened, untimed; then
    ``loads`` loads, each timed. Unlike a new store, no statement is
    compiled for a new dialect: what is left is the connection's own first use."""
    store.close()
    with store.engine.connect():
        pass
    memory = ConversationTokenBufferMemory(
        store=store, session_id=session_name(case.size), max_token_limit=LIMIT, encoding=ENCODING
    )
    return timed_loads(memory, loads)


def timed_loads(memory: ConversationTokenBufferMemory, loads: int) -> list[int]:
    """``loads`` loads of ``memory``'s window, each timed (ns)."""
    clock, times = time.perf_counter_ns, []
    for _ in range(loads):
        t0 = clock()
        memory.load_memory_variables({})
        times.append(clock() - t0)
    return times


def fresh_bare_times(url: str, dialect: str, case: Case, loads: int) -> list[int]:
    """The bare query on a new DBAPI connection (connected untimed), ``loads`` times."""
    sql = range_sql(dialect)
    sid = driver_id(dialect, session_uuid(OWNER, session_name(case.size)))
    raw = connect(url)
    try:
        clock, times = time.perf_counter_ns, []
        for _ in range(loads):
            t0 = clock()
            bare_query(raw, sql, (sid, case.first, case.last))
            times.append(clock() - t0)
        return times
    finally:
        raw.close()


def measure_fresh(url: str, dialect: str, cases: list[Case], reps: int, loads: int) -> float:
    started = time.perf_counter()
    renewed = Store(url)
    try:
        renewed.check()
        for r in range(reps):
            k = r % len(cases)
            for case in cases[k:] + cases[:k]:
                j = r % len(FRESH_KINDS)
                for kind in FRESH_KINDS[j:] + FRESH_KINDS[:j]:
                    if kind == "load":
                        times = fresh_load_times(url, case, loads)
                    elif kind == "renewed":
                        times = renewed_load_times(renewed, case, loads)
                    else:
                        times = fresh_bare_times(url, dialect, case, loads)
                    case.fresh[kind].append(times)
    finally:
        renewed.close()
    return time.perf_counter() - started


# --- reporting -----------------------------------------------------------------


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}{TIMES}" if b else "n/a"


FRESH_SPANS = (("first load", 1, 1), ("loads 1-10", 1, 10), ("loads 11+", 11, None))


def figures(case: Case) -> dict[str, tuple[float, float]]:
    """(tokenmem, bare) medians in ms: steady state and the fresh-connection spans."""
    out = {"steady": (case.steady_ms("load"), case.steady_ms("bare"))}
    for label, first, last in FRESH_SPANS:
        out[label] = (case.fresh_ms("load", first, last), case.fresh_ms("bare", first, last))
    out["first load, pool renewed"] = (case.fresh_ms("renewed", 1, 1), case.fresh_ms("bare", 1, 1))
    return out


def table(results: dict[str, list[Case]]) -> str:
    lines = [
        "| tables | history | window rows | load (ms) | store.window (ms) | bare (ms) "
        "| load ÷ load@2,000 | load ÷ bare | 1st load, new store (ms) "
        "| 1st load, new pool (ms) | bare 1st (ms) | 1st ÷ 1st@2,000 | 1st ÷ bare 1st "
        "| loads 1-10 (ms) | loads 11+ (ms) | bare 1-10 / 11+ (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for state, cases in results.items():
        ref = {c.size: figures(c) for c in cases}.get(BLOCK)
        for c in cases:
            f = figures(c)
            load, bare = f["steady"]
            first, bare_first = f["first load"]
            lines.append(
                f"| {state} | {c.size:,} | {c.rows} | {load:.3f} | {c.steady_ms('window'):.3f} "
                f"| {bare:.3f} | {ratio(load, ref['steady'][0] if ref else None)} "
                f"| {ratio(load, bare)} | {first:.2f} "
                f"| {f['first load, pool renewed'][0]:.2f} | {bare_first:.2f} "
                f"| {ratio(first, ref['first load'][0] if ref else None)} "
                f"| {ratio(first, bare_first)} | {f['loads 1-10'][0]:.3f} "
                f"| {f['loads 11+'][0]:.3f} | {f['loads 1-10'][1]:.3f} / {f['loads 11+'][1]:.3f} |"
            )
    return "\n".join(lines)


def goals(backend: str, results: dict[str, list[Case]]) -> list[tuple[str, bool]]:
    """Each goal as (line, met)."""
    out = []
    for state, cases in results.items():
        by_size = {c.size: figures(c) for c in cases}
        largest = max(by_size)
        if BLOCK not in by_size or largest <= BLOCK:
            continue
        for label, (load, bare) in by_size[largest].items():
            flat = load / by_size[BLOCK][label][0]
            line = (
                f"{backend}, {state}, {label}: {largest:,} load ÷ {BLOCK:,} load "
                f"{flat:.2f}{TIMES} (goal {FLAT_GOAL}{TIMES})"
            )
            met = flat <= FLAT_GOAL
            if backend == "postgresql":
                line += f", ÷ bare {load / bare:.2f}{TIMES} (goal {BARE_GOAL}{TIMES})"
                met = met and load / bare <= BARE_GOAL
            out.append((line, met))
    return out


# --- a backend -----------------------------------------------------------------


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def analyse(engine: Engine, dialect: str) -> float:
    t0 = time.perf_counter()
    with autocommit(engine) as conn:
        if dialect == "postgresql":
            conn.exec_driver_sql("VACUUM ANALYZE tokenmem_messages")
            conn.exec_driver_sql("VACUUM ANALYZE tokenmem_sessions")
        else:
            conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - t0


def plans(backend: str, store: Store, size: int, counter: TokenCounter) -> dict[str, list[str]]:
    if backend == "sqlite":
        return {"EXPLAIN QUERY PLAN": sqlite_plan(store, size, counter)}
    return {
        f"EXPLAIN (ANALYZE, BUFFERS), prepared, {mode}": pg_plan(store.engine, size, mode, counter)
        for mode in ("force_custom_plan", "force_generic_plan")
    }


def run_state(
    backend: str, url: str, state: str, args: argparse.Namespace, counter: TokenCounter
) -> tuple[list[Case], dict[str, list[str]]]:
    store = Store(url)
    try:
        cases = []
        for size in args.scale.sizes:
            window = check_window(store, size, counter)
            cases.append(Case(size, len(window), window[0].position, window[-1].position))
        log(f"{state}: windows checked against the reference")
        shown = plans(backend, store, max(args.scale.sizes), counter)
        raw = store.engine.raw_connection()
        try:
            seconds = measure_steady(store, raw, cases, args.reps, args.warmup)
        finally:
            raw.close()
        log(f"{state}: steady state measured in {seconds:.0f} s")
    finally:
        store.close()
    seconds = measure_fresh(url, backend, cases, args.fresh_reps, args.fresh_loads)
    log(f"{state}: fresh connections measured in {seconds:.0f} s")
    return cases, shown


def run_backend(backend: str, args: argparse.Namespace, counter: TokenCounter) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {"backend": backend}
    print(f"\n## {backend}\n", flush=True)
    with database(backend, "bench") as url:
        store = Store(url, upgrade=True)
        engine = store.engine
        if backend == "postgresql":
            with engine.begin() as conn:
                for table_name in ("tokenmem_messages", "tokenmem_sessions"):
                    conn.exec_driver_sql(
                        f"ALTER TABLE {table_name} SET (autovacuum_enabled = false)"
                    )
            settings = pg_settings(engine)
            print(", ".join(f"{k}: {v}" for k, v in settings.items()) + ".\n")
            report["settings"] = settings
        else:
            with engine.connect() as conn:
                version = conn.exec_driver_sql("SELECT sqlite_version()").scalar_one()
            print(f"SQLite {version} (a file, WAL).\n")
            report["settings"] = {"sqlite_version": version}
        t0 = time.perf_counter()
        fills = fill(store, args.scale.sizes, args.scale.filler_sessions, counter)
        fill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        with engine.connect() as conn:
            for size in args.scale.sizes:
                check_session(conn, backend, size)
        check_seconds = time.perf_counter() - t0
        rows = table_rows(engine)
        store.close()
        print(
            f"Filled in {fill_seconds:.0f} s ("
            + ", ".join(f"{k}: {v:.1f} s" for k, v in fills.items())
            + f"): {rows:,} messages in the table. Sessions checked in SQL in "
            f"{check_seconds:.1f} s; windows checked against the reference in each state.",
            flush=True,
        )
        report.update(fill_seconds=fills, table_rows=rows)
        results: dict[str, list[Case]] = {}
        shown: dict[str, dict[str, list[str]]] = {}
        for state in STATES:
            if state == "analysed":
                seconds = analyse(engine, backend)
                what = "VACUUM ANALYZE" if backend == "postgresql" else "ANALYZE"
                print(f"\n{what} in {seconds:.0f} s.", flush=True)
            results[state], shown[state] = run_state(backend, url, state, args, counter)
            for title, lines in shown[state].items():
                print(f"\n{title} ({state}), {max(args.scale.sizes):,}-message session:\n")
                print("\n".join(f"    {line}" for line in lines))
                seeks = any(SEEK_INDEX in line for line in lines)
                print(f"\nSeeks through {SEEK_INDEX}: {'yes' if seeks else 'NO'}.", flush=True)
        engine.dispose()
    print(
        f"\nMedians: steady state {args.reps} rounds; fresh connections {args.fresh_reps} "
        f"per session and kind, {args.fresh_loads} loads each:\n"
    )
    print(table(results))
    met = goals(backend, results)
    print()
    for line, ok in met:
        print(f"- {line}: {'met' if ok else 'MISSED'}")
    report["goals"] = [{"goal": line, "met": ok} for line, ok in met]
    report["plans"] = shown
    report["states"] = {
        state: [
            {
                "size": c.size,
                "window_rows": c.rows,
                "first": c.first,
                "last": c.last,
                "figures_ms": figures(c),
                "steady_ns": c.steady,
                "fresh_ns": c.fresh,
            }
            for c in cases
        ]
        for state, cases in results.items()
    }
    report["seconds"] = time.perf_counter() - started
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="repeatable; default: both"
    )
    parser.add_argument(
        "--scale",
        choices=SCALES,
        default="default",
        help="full: sessions to 10^6 in 10^7 messages; default: to 10^5 in 10^6; quick",
    )
    parser.add_argument("--reps", type=int, help="steady-state rounds (default: the scale's)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steady-state rounds")
    parser.add_argument("--fresh-reps", type=int, help="fresh connections per session and kind")
    parser.add_argument("--fresh-loads", type=int, default=20, help="loads per fresh connection")
    parser.add_argument("--json", help="write the raw numbers to this file")
    args = parser.parse_args(argv)
    args.backends = args.backend or list(BACKENDS)
    args.scale_name = args.scale
    args.scale = SCALES[args.scale]
    args.reps = args.reps or args.scale.reps
    args.fresh_reps = args.fresh_reps or args.scale.fresh_reps
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    digest = source_digest()  # of the sources imported now, should they change meanwhile
    counter = TokenCounter(ENCODING)
    filler = args.scale.filler_sessions * FILLER
    print(
        f"# Window load vs history length ({LIMIT:,}-token window, text mode, {ENCODING})\n\n"
        f"tokenmem sources {digest}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; scale {args.scale_name}: sessions of "
        + ", ".join(f"{s:,}" for s in args.scale.sizes)
        + f" messages and {args.scale.filler_sessions:,} filler sessions of {FILLER:,} "
        f"({filler + sum(args.scale.sizes):,} messages)."
    )
    reports = [run_backend(backend, args, counter) for backend in args.backends]
    total = time.perf_counter() - started
    missed = sum(not g["met"] for r in reports for g in r["goals"])
    print(f"\nGoals missed: {missed}. Total run time: {total:.0f} s.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"source_digest": digest, "total_seconds": total, "backends": reports},
                out,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
