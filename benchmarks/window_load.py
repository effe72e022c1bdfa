"""How long loading a 2,000-token window takes as a session's history grows,
in a table of millions of messages, analysed and never analysed, on a
connection's first loads and in the steady state: for plain text sessions,
and for tool-heavy sessions of OpenAI chat messages with a pinned prompt.

The window statement reads the session row's start bound once (a scalar
subquery) and then at most a constant number of candidates, newest first,
through the index on ``(session_id, cum_floor)`` (docs/window-plans.md);
the pinned prompt by its positions; units and ``start_on`` are window
functions over those rows. Loading a window should cost about the same for a
session of 100 messages as for one of a million, whatever the planner knows
about the tables. This script checks that on SQLite (a file in a temporary
directory) and on PostgreSQL (a fresh schema, dropped at the end) and prints
Markdown tables per backend, the plans, and the goals met or missed.

**What is in the database** (``benchmarks/window_sessions.py``). Two
sessions of each size — 100, 1,000, 2,000, 10,000, 100,000 and (``--scale
full``) 1,000,000 messages — one of each shape, plus filler sessions of
1,000 text messages (9,000 of them at full scale: 11,226,206 messages in
the table; 900 by default, sizes up to 100,000):

* **text**: human/ai turns of deterministic English-like text, about 5 to
  60 o200k_base tokens a message;
* **tools**: a pinned system prompt (``system_message=``), then that many
  messages in turns of OpenAI chat messages — a user message, an assistant
  message calling one to three tools at once (content null), each tool's
  answer (JSON text), the assistant's reply: tool calls and their answers
  are units (``tokenmem_messages.unit``), the prompt is the session row's
  ``pinned_first``/``pinned_last``.

Counting ten million messages with tiktoken would take hours, so one block
of each shape is written by tokenmem and the rest is copied from it on the
server:

* the 2,000-message sessions are the blocks: the text one written with
  ``Store.append_turns``, the tool one as an application writes it — its
  memory's first load saves the system prompt, then one
  ``memory.save_messages`` call per turn (its turns end at 100, 1,000 and
  2,000 messages, so every session below ends a turn);
* every other session is ``INSERT ... SELECT``-ed from its block: after the
  block's head (the pinned prompt, copied once), its message ``k`` is the
  block's message ``k % 2000``, with ``position`` and ``unit`` shifted by
  2,000, ``turn`` by the block's turns and ``cum_floor`` by its floors per
  whole block (``generate_series`` on PostgreSQL, a recursive CTE on
  SQLite), and its session row's ``next_position``, ``next_turn``,
  ``floor_total`` and pinned range set to match (sessions of 100 and 1,000
  are the block's first messages). A message's counts depend on its own
  text only (README, "How the window is counted"), so every copied window
  is exact. Each session's rows are inserted in position order, session
  after session (a live table interleaves sessions' rows in its heap; that
  makes no difference to which index range is read);
* after filling, every measured session is checked in SQL (positions
  gapless, ``cum_floor`` the running sum of the floors before each message
  to the session's ``floor_total``; in a tool session the pinned prompt at
  position 0, every tool message and no other in the unit of an assistant
  message with tool calls), and the first 4,001 messages of a copied tool
  session must equal, column for column, what ``Store.append_turns`` writes
  from the same turns in a scratch database;
* in each state, every window measured is checked against the plain-Python
  reference: ``tokenmem.window.fit_units`` over the stored costs of the
  session's newest messages, in the budget its pinned prompt leaves, must
  give exactly ``store.window_rows``'s rows and costs; and the memory must
  load exactly those rows — rendered (text) or the dicts as saved
  (messages) — counted again by tiktoken within the limit, and one older
  unit more over it.

SQLite gets the same tables, filler included, at every scale (the fill is a
minute or two: there is no reason to test it on a smaller table).

**States.** Each backend is measured twice on the same data: first with
tables that were never analysed (PostgreSQL's autovacuum is off on them
while they are filled and measured), then after ``VACUUM ANALYZE`` (``ANALYZE``
on SQLite), as autovacuum leaves them in production. JIT keeps the server's
settings (``SHOW jit`` and ``jit_above_cost`` are printed).

**Windows**, ``max_token_limit=2000``: the text session's text window
(``load_memory_variables``); the tool session's in four ways — text, text
with ``start_on="human"``, messages (``memory.load_messages()``, counted
with the chat formula) and messages with ``start_on="human"`` — its memory
given the session's ``system_message``, as an application would.

**Measurements**, per session and window:

* **steady state** — after a warm-up, ``--reps`` rounds, round-robin over the
  windows and over their measurements (the starting point rotates each
  round), on one store: **load**, the memory's call end to end;
  **store.window** (text sessions) / **store.window_rows** (tool sessions),
  the statement and the Python around it; **bare**, the window's rows
  (positions known beforehand) fetched on a raw DBAPI connection with plain
  ``SELECT ... WHERE session_id = ? AND position BETWEEN ? AND ?`` (on a tool
  session the pinned prompt's range and the rest's, ``UNION ALL``, with the
  message dicts) and committed, the floor any implementation pays; on text
  sessions also **statement**, tokenmem's window statement alone on that
  connection, and **baseline**, the window statement of ``--baseline``
  (commit ebe9dbe, before issue 13 added units, the pinned prompt and
  ``start_on``: its ``tokenmem/window.py`` read with ``git show`` and run
  against today's tables), both as the bare driver runs them (compiled
  once, psycopg preparing them from their sixth execution), each checked
  first to return the window's rows;
* **fresh connection** — ``--fresh-reps`` times per window (sizes and
  kinds interleaved): a new ``Store`` (new engine, new pool) whose
  schema check has opened its one connection, untimed; then its first
  ``--fresh-loads`` loads, each timed; the same on a store whose pool was
  renewed. Beside them the bare query, and on text sessions the two
  statements, on a new psycopg / sqlite3 connection (connected untimed).
  psycopg prepares a statement on its sixth execution and PostgreSQL plans
  the first five executions of a prepared statement with their parameters
  before it may switch to a generic plan, so the tables show the first
  load, the median of loads 1-10 and of loads 11 on. Connecting is left out
  of every side.

The tables show medians (of all repetitions' samples of that load number).
The plans of the largest sessions' windows are printed: on PostgreSQL
``EXPLAIN (ANALYZE, BUFFERS)`` of the prepared statement with
``plan_cache_mode`` forced to the custom and to the generic plan (as
tests/test_window_plans.py does) in full for the text windows, and a line
for every window and for the baseline: whether every read of
``tokenmem_messages`` is an index range of at most the row cap, whether the
``cum_floor`` index is read newest first under the ``LIMIT``, cost, buffers
and times; on SQLite ``EXPLAIN QUERY PLAN``.

Goals: on PostgreSQL (each state, each window) the largest session's load
within 1.5x of the 2,000-message session's and within 2x of the bare query,
in the steady state and on a fresh connection (first load, loads 1-10,
loads 11 on); on SQLite the largest session's load within 1.5x of the
2,000-message one's (the same four). The statements' ratio has no goal: it
is reported.

Run from the repository root::

    .venv/bin/python benchmarks/window_load.py --scale quick  # to 10^4, a minute
    .venv/bin/python benchmarks/window_load.py                # to 10^5 in 10^6 rows
    .venv/bin/python benchmarks/window_load.py --scale full   # to 10^6 in 10^7 rows
    .venv/bin/python benchmarks/window_load.py --scale quick --backend sqlite
    .venv/bin/python benchmarks/window_load.py --json /tmp/window_load.json

Run times on two cores: docs/benchmarks.md. PostgreSQL comes from
``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BACKENDS,
    ENCODING,
    OWNER,
    TIMES,
    connect,
    database,
    driver_dialect,
    driver_id,
    median_ms,
    range_sql,
    source_digest,
)
from sqlalchemy import Connection, Engine, Executable, select
from sqlalchemy.engine import Row
from sqlalchemy.pool import PoolProxiedConnection
from window_sessions import (
    BLOCK,
    FILLER,
    SHAPES,
    SYSTEM_PROMPT,
    TEXT,
    TOOLS,
    Shape,
    check_copies,
    check_session,
    fill,
    log,
    table_rows,
)

from tokenmem import ConversationTokenBufferMemory, Message, Rule, Store, TokenCounter
from tokenmem.chat import as_openai
from tokenmem.models import MESSAGES, SESSIONS, session_uuid
from tokenmem.window import (
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    Counts,
    count_message,
    fit_units,
    row_cap,
    window_select,
)


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
# The window statement before issue 13 (units, the pinned prompt, start_on):
# timed beside today's on the text sessions.
BASELINE = "ebe9dbe"
FLAT_GOAL = 1.5  # the largest session's load, at most this many times the 2,000 one's
BARE_GOAL = 2.0  # ... and this many times the bare query's (PostgreSQL)
STATES = ("never analysed", "analysed")
SEEK_INDEX = "ix_tokenmem_messages_session_id_cum_floor"


@dataclass(frozen=True)
class Variant:
    """How a window is loaded: the memory's call, and the rule it counts by."""

    label: str
    rule: Rule

    def load(self, memory: ConversationTokenBufferMemory) -> object:
        if self.rule.mode == "messages":
            return memory.load_messages()
        return memory.load_memory_variables({})


VARIANTS = {
    TEXT: (Variant("text", RULE),),
    TOOLS: (
        Variant("text", RULE),
        Variant("text, start_on=human", Rule(LIMIT, start_on="human")),
        Variant("messages", Rule(LIMIT, mode="messages")),
        Variant("messages, start_on=human", Rule(LIMIT, mode="messages", start_on="human")),
    ),
}


@dataclass(frozen=True)
class Query:
    """SQL text and its parameters, for a bare DBAPI connection."""

    sql: str
    params: Any

    def run(self, raw: Any) -> list[Any]:
        cur = raw.cursor()
        try:
            cur.execute(self.sql, self.params)
            rows = cur.fetchall()
        finally:
            cur.close()
        raw.commit()
        return list(rows)


def statement_query(dialect: str, statement: Executable, params: dict[str, Any]) -> Query:
    """``statement`` as the bare driver runs it, with the values it binds itself."""
    compiled = statement.compile(dialect=driver_dialect(dialect))
    bound = {k: v for k, v in compiled.params.items() if v is not None}
    return Query(compiled.string, bound | params)


def baseline_window(commit: str) -> types.ModuleType:
    """``tokenmem/window.py`` as it was at ``commit``, read from git and run as
    a module of today's package (its relative imports find today's models,
    messages and tokens): its ``window_select`` is the baseline statement."""
    root = Path(__file__).resolve().parents[1]
    found = subprocess.run(
        ["git", "show", f"{commit}:tokenmem/window.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode:
        raise SystemExit(
            f"cannot read the baseline statement ({found.stderr.strip()}); "
            "--baseline none runs without it"
        )
    module = types.ModuleType(f"tokenmem.window_{commit}")
    module.__package__ = "tokenmem"
    sys.modules[module.__name__] = module  # (dataclasses look their module up)
    exec(compile(found.stdout, f"{commit}:tokenmem/window.py", "exec"), module.__dict__)
    return module


# --- the cases and their windows -------------------------------------------------


@dataclass
class Case:
    """One session loaded one way: its window and its measurements."""

    shape: Shape
    variant: Variant
    size: int
    rows: int = 0  # the window's rows, the pinned prompt's included
    first: int = 0  # the positions of the rest of the window
    last: int = 0
    pinned: tuple[int, int] = (-1, -1)
    # the bare connection's queries: "bare", and on a text session the statements
    queries: dict[str, Query] = field(default_factory=dict)
    steady: dict[str, list[int]] = field(default_factory=dict)
    # per kind, per repetition: the times of loads 1, 2, ... on a fresh connection
    fresh: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.shape.session(self.size)

    @property
    def label(self) -> str:
        return f"{self.shape.name} session, {self.variant.label}"

    @property
    def measures(self) -> tuple[str, ...]:
        return ("load", "window", *self.queries)

    @property
    def fresh_kinds(self) -> tuple[str, ...]:
        return ("load", "renewed", *self.queries)

    def memory(self, store: Store) -> ConversationTokenBufferMemory:
        return ConversationTokenBufferMemory(
            store=store,
            session_id=self.name,
            max_token_limit=LIMIT,
            encoding=ENCODING,
            start_on=self.variant.rule.start_on,
            system_message=SYSTEM_PROMPT if self.shape.head else None,
        )

    def steady_ms(self, measure: str) -> float:
        return median_ms(self.steady.get(measure, []))

    def fresh_ms(self, kind: str, first: int, last: int | None = None) -> float:
        """The median of loads ``first``..``last`` (1-based; ``last`` None: to the end)."""
        return median_ms([t for rep in self.fresh.get(kind, []) for t in rep[first - 1 : last]])


def make_cases(sizes: Sequence[int]) -> list[Case]:
    return [Case(shape, v, size) for shape in SHAPES for v in VARIANTS[shape] for size in sizes]


_COLUMNS = (
    MESSAGES.c.position,
    MESSAGES.c.role,
    MESSAGES.c.content,
    MESSAGES.c.name,
    MESSAGES.c.message,
    MESSAGES.c.unit,
    MESSAGES.c.text_tokens,
    MESSAGES.c.newline_tokens,
    MESSAGES.c.chat_tokens,
)


def newest_rows(store: Store, name: str) -> tuple[tuple[int, int], list[Row[Any]], list[Row[Any]]]:
    """The session's pinned range and rows, and its newest ``LIMIT + 1``
    other rows, oldest first (more than any window of ``LIMIT`` tokens)."""
    s, m = SESSIONS.c, MESSAGES.c
    sid = session_uuid(OWNER, name)
    with store.engine.connect() as conn:
        found = conn.execute(select(s.pinned_first, s.pinned_last).where(s.id == sid)).one()
        pin = (-1, -1) if found.pinned_first is None else (found.pinned_first, found.pinned_last)
        pinned = conn.execute(
            select(*_COLUMNS)
            .where(m.session_id == sid, m.position.between(*pin))
            .order_by(m.position)
        ).all()
        newest = conn.execute(
            select(*_COLUMNS)
            .where(m.session_id == sid, ~m.position.between(*pin))
            .order_by(m.position.desc())
            .limit(LIMIT + 1)
        ).all()
    return pin, list(pinned), list(newest[::-1])


def check_window(store: Store, case: Case, counter: TokenCounter) -> None:
    """The case's window (``store.window_rows``) against the plain-Python
    reference — ``fit_units`` over the stored costs of the session's newest
    messages, in the budget its pinned prompt leaves — and what the memory
    loads: the same rows, rendered (text) or the dicts saved (messages),
    counted again by tiktoken within the limit, and one older unit more over
    it. Fills in the case's window."""
    rule = case.variant.rule
    prefix_tokens = rule.prefix_tokens(counter)
    pin, pinned, newest = newest_rows(store, case.name)

    def cost(r: Row[Any]) -> int:
        counts = Counts(r.text_tokens, r.chat_tokens, r.newline_tokens)
        return rule.cost(r.role, counts, prefix_tokens)

    rest = rule.budget(None) - sum(map(cost, pinned))
    if rule.mode == "text":  # the newest line is joined to nothing
        rest += newest[-1].newline_tokens
    units = [
        (r.position, r.position if r.unit is None else r.unit, r.role, cost(r)) for r in newest
    ]
    longest = fit_units(units, rest)
    start = fit_units(units, rest, rule.start_on)
    if longest == 0:
        raise RuntimeError(f"{case.name}: the reference needs more than {len(newest)} messages")
    expected = [(r.position, cost(r), True) for r in pinned]
    expected += [(r.position, cost(r), False) for r in newest[start:]]
    got = [(row[0], row[5], bool(row[7])) for row in store.window_rows(case.name, rule, counter)]
    if got != expected:
        raise RuntimeError(f"{case.name}, {case.variant.label}: not the reference window")
    # the window without start_on, and one older unit: over the limit
    older = next(i for i in range(longest) if newest[i].position == units[longest - 1][1])
    window, longer = pinned + newest[start:], pinned + newest[older:]
    if rule.mode == "text":
        lines = [
            [rule.line_prefixes[r.role] + r.content for r in rows] for rows in (window, longer)
        ]
        shown: object = {"history": "\n".join(lines[0])}
        tokens, more = (counter.count("\n".join(rows)) for rows in lines)
    else:
        shown = [as_openai(Message(r.role, r.content, r.name, openai=r.message)) for r in window]
        tokens, more = (
            REPLY_PRIMING
            + sum(
                TOKENS_PER_MESSAGE
                + count_message(counter, r.role, r.content, r.name, r.message).chat_tokens
                for r in rows
            )
            for rows in (window, longer)
        )
    if case.variant.load(case.memory(store)) != shown or tokens > LIMIT or more <= LIMIT:
        raise RuntimeError(
            f"{case.name}, {case.variant.label}: the memory's window is not the longest that "
            f"fits ({tokens} tokens, {more} with one unit more)"
        )
    case.rows, case.pinned = len(expected), pin
    case.first, case.last = newest[start].position, newest[-1].position


# The window's rows by position, as any implementation must read them: the
# pinned prompt's range, then the rest's (one range each: an OR of the two
# is no index range to SQLite without statistics).
_PINNED_RANGES = (
    "SELECT position, role, content, message FROM tokenmem_messages"
    " WHERE session_id = {0} AND position BETWEEN {0} AND {0} UNION ALL"
    " SELECT position, role, content, message FROM tokenmem_messages"
    " WHERE session_id = {0} AND position BETWEEN {0} AND {0} ORDER BY position"
)


def prepare(
    store: Store, case: Case, counter: TokenCounter, baseline: types.ModuleType | None
) -> None:
    """Check the case's window and set up its bare queries: the window's
    rows by position and, on a text session beside a baseline, today's
    statement and the baseline's, which must return the window's rows."""
    check_window(store, case, counter)
    dialect = store.dialect
    sid = session_uuid(OWNER, case.name)
    key = driver_id(dialect, sid)
    if case.shape.head:
        sql = _PINNED_RANGES.format("?" if dialect == "sqlite" else "%s")
        case.queries["bare"] = Query(sql, (key, *case.pinned, key, case.first, case.last))
    else:
        case.queries["bare"] = Query(range_sql(dialect), (key, case.first, case.last))
    if case.shape is not TEXT or baseline is None:
        return
    for kind, statement, rule in window_statements(case, baseline):
        params = rule.params(sid, ENCODING, rule.prefix_tokens(counter))
        case.queries[kind] = query = statement_query(
            dialect, statement, params | {"w_session": key}
        )
        raw = store.engine.raw_connection()
        try:
            positions = [row[0] for row in query.run(raw)]
        finally:
            raw.close()
        if positions != list(range(case.first, case.last + 1)):
            raise RuntimeError(f"{case.name}: the {kind} statement returns {positions}")


def window_statements(
    case: Case, baseline: types.ModuleType | None
) -> list[tuple[str, Executable, Any]]:
    """(kind, statement, rule): the window statement of the case's rule, as
    tokenmem runs it, and on a text session the baseline's."""
    rule = case.variant.rule
    out = [("statement", window_select(rule.mode, row_cap(rule), rule.start_on), rule)]
    if case.shape is TEXT and baseline is not None:
        old = baseline.Rule(limit=LIMIT)
        out.append(("baseline", baseline.window_select(old.mode, baseline.row_cap(old)), old))
    return out


# --- plans ---------------------------------------------------------------------


def pg_settings(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {
            name: str(conn.exec_driver_sql(f"SHOW {name}").scalar_one())
            for name in ("server_version", "jit", "jit_above_cost", "plan_cache_mode")
        } | {"jit available": str(conn.exec_driver_sql("SELECT pg_jit_available()").scalar_one())}


def pg_explain(
    engine: Engine,
    statement: Executable,
    params: dict[str, object],
    plan_cache_mode: str,
    options: str = "ANALYZE, BUFFERS",
) -> list[Any]:
    """``EXPLAIN (options)`` of ``statement`` prepared, as psycopg runs it
    from its sixth execution, with ``plan_cache_mode`` forced; its rows' values."""
    sql = str(statement.compile(dialect=engine.dialect))
    names: list[str] = []

    def number(found: re.Match[str]) -> str:
        if found[1] not in names:
            names.append(found[1])
        return f"${names.index(found[1]) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", number, sql)
    literals = ", ".join(
        str(params[n]) if isinstance(params[n], int) else f"'{params[n]}'" for n in names
    )
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SET plan_cache_mode = {plan_cache_mode}")
        conn.exec_driver_sql(f"PREPARE tm_window AS {prepared}")
        rows = conn.exec_driver_sql(f"EXPLAIN ({options}) EXECUTE tm_window({literals})").all()
        conn.exec_driver_sql("DEALLOCATE tm_window")
        conn.rollback()
    return [row[0] for row in rows]


def _scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if node.get("Relation Name") == "tokenmem_messages":
        yield node
    for child in node.get("Plans", ()):
        yield from _scans(child)


def pg_summary(plan: dict[str, Any], cap: int) -> str:
    """One line of a JSON plan: is every read of tokenmem_messages an index
    range of at most ``cap`` rows (and the plan not JIT-compiled), is the
    cum_floor index read in order (newest first, under the LIMIT), and what
    it cost: the planner's estimate, buffers, times."""
    root = plan["Plan"]
    reads, bounded = [], "JIT" not in plan
    for node in _scans(root):
        index = node.get("Index Name") or " ".join(
            child.get("Index Name", "") for child in node.get("Plans", ())
        )
        backward = " Backward" if node.get("Scan Direction") == "Backward" else ""
        rows = node["Actual Rows"] * node["Actual Loops"]
        reads.append(f"{node['Node Type']}{backward} {index} ({rows:g} rows)")
        bounded = bounded and rows <= cap
        bounded = bounded and node["Node Type"] in ("Index Scan", "Bitmap Heap Scan")
    in_order = any(r.startswith(f"Index Scan Backward {SEEK_INDEX}") for r in reads)
    buffers = root.get("Shared Hit Blocks", 0) + root.get("Shared Read Blocks", 0)
    return (
        f"{'bounded' if bounded else 'NOT BOUNDED'}, cum_floor index "
        f"{'read newest first under the LIMIT' if in_order else 'NOT read in order'}; "
        f"cost {root['Total Cost']:,.0f} ({'JIT' if 'JIT' in plan else 'no JIT'}), "
        f"{buffers} buffers, planning "
        f"{plan['Planning Time']:.3f} ms, execution {plan['Execution Time']:.3f} ms; "
        f"tokenmem_messages read by: {'; '.join(reads)}"
    )


def sqlite_plan(store: Store, name: str, rule: Rule, counter: TokenCounter) -> list[str]:
    """``EXPLAIN QUERY PLAN`` as a tree, from its rows (id | parent | _ | detail)."""
    depth: dict[str, int] = {"0": -1}
    lines = []
    for line in store.explain_window(name, rule, counter).splitlines():
        node, parent, _, detail = line.split(" | ", 3)
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + detail)
    return lines


def plans(
    backend: str,
    store: Store,
    cases: list[Case],
    counter: TokenCounter,
    baseline: types.ModuleType | None,
) -> dict[str, list[str]]:
    """The plans of the largest sessions' windows: in full for the text
    window of each shape, and a line each for every window and (on
    PostgreSQL) the baseline statement."""
    size = max(c.size for c in cases)
    out: dict[str, list[str]] = {}
    summary = []
    for c in (c for c in cases if c.size == size):
        full = c.variant.label == "text"
        if backend == "sqlite":
            lines = sqlite_plan(store, c.name, c.variant.rule, counter)
            if full:
                out[f"EXPLAIN QUERY PLAN, {c.label}"] = lines
            plan = "\n".join(lines)
            summary.append(
                f"{c.label}: seeks through {SEEK_INDEX}: "
                + ("yes" if SEEK_INDEX in plan else "NO")
                + ("; SCANS tokenmem_messages" if "SCAN tokenmem_messages" in plan else "")
            )
            continue
        sid = session_uuid(OWNER, c.name)
        for kind, statement, rule in window_statements(c, baseline):
            label = c.label if kind == "statement" else f"{c.label}, the {BASELINE} statement"
            params = rule.params(sid, ENCODING, rule.prefix_tokens(counter))
            for mode in ("force_custom_plan", "force_generic_plan"):
                if full and kind == "statement":
                    title = f"EXPLAIN (ANALYZE, BUFFERS), prepared, {mode}, {label}"
                    out[title] = [
                        str(line) for line in pg_explain(store.engine, statement, params, mode)
                    ]
                (found,) = pg_explain(
                    store.engine, statement, params, mode, "ANALYZE, BUFFERS, FORMAT JSON"
                )
                plan = (found if isinstance(found, list) else json.loads(found))[0]
                summary.append(f"{label}, {mode}: {pg_summary(plan, row_cap(rule))}")
    out["Summary"] = summary
    return out


# --- measuring -----------------------------------------------------------------


def measure_steady(
    store: Store,
    raw: PoolProxiedConnection,
    cases: list[Case],
    reps: int,
    warmup: int,
    counter: TokenCounter,
) -> float:
    """Time every measurement of every case ``reps`` times, after ``warmup``
    untimed rounds, rotating which case and which measurement go first."""
    runs: list[dict[str, Callable[[], object]]] = []
    for case in cases:
        rule = case.variant.rule
        window = store.window if case.shape is TEXT else store.window_rows
        run: dict[str, Callable[[], object]] = {
            "load": functools.partial(case.variant.load, case.memory(store)),
            "window": functools.partial(window, case.name, rule, counter),
        }
        runs.append(run | {k: functools.partial(q.run, raw) for k, q in case.queries.items()})
    clock = time.perf_counter_ns
    started = time.perf_counter()
    pairs = list(zip(cases, runs, strict=True))
    for r in range(warmup + reps):
        k = r % len(pairs)
        for case, run in pairs[k:] + pairs[:k]:
            measures = case.measures
            j = r % len(measures)
            for m in measures[j:] + measures[:j]:
                fn = run[m]
                t0 = clock()
                fn()
                elapsed = clock() - t0
                if r >= warmup:
                    case.steady.setdefault(m, []).append(elapsed)
    return time.perf_counter() - started


def fresh_load_times(url: str, case: Case, loads: int) -> list[int]:
    """A new store (engine, pool) whose schema check opened its connection;
    then ``loads`` loads of the case's window, each timed."""
    store = Store(url)
    try:
        store.check()  # connects, initialises the dialect, checks the schema: untimed
        return timed_loads(case, case.memory(store), loads)
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
    return timed_loads(case, case.memory(store), loads)


def timed_loads(case: Case, memory: ConversationTokenBufferMemory, loads: int) -> list[int]:
    """``loads`` loads of the case's window through ``memory``, each timed (ns)."""
    clock, times, load = time.perf_counter_ns, [], case.variant.load
    for _ in range(loads):
        t0 = clock()
        load(memory)
        times.append(clock() - t0)
    return times


def fresh_query_times(url: str, query: Query, loads: int) -> list[int]:
    """A bare query on a new DBAPI connection (connected untimed), ``loads`` times."""
    raw = connect(url)
    try:
        clock, times = time.perf_counter_ns, []
        for _ in range(loads):
            t0 = clock()
            query.run(raw)
            times.append(clock() - t0)
        return times
    finally:
        raw.close()


def measure_fresh(url: str, cases: list[Case], reps: int, loads: int) -> float:
    started = time.perf_counter()
    renewed = Store(url)
    try:
        renewed.check()
        for r in range(reps):
            k = r % len(cases)
            for case in cases[k:] + cases[:k]:
                kinds = case.fresh_kinds
                j = r % len(kinds)
                for kind in kinds[j:] + kinds[:j]:
                    if kind == "load":
                        times = fresh_load_times(url, case, loads)
                    elif kind == "renewed":
                        times = renewed_load_times(renewed, case, loads)
                    else:
                        times = fresh_query_times(url, case.queries[kind], loads)
                    case.fresh.setdefault(kind, []).append(times)
    finally:
        renewed.close()
    return time.perf_counter() - started


# --- reporting -----------------------------------------------------------------


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}{TIMES}" if b else "n/a"


FRESH_SPANS = (("first load", 1, 1), ("loads 1-10", 1, 10), ("loads 11+", 11, None))


def figures(
    case: Case, measure: str = "load", floor: str = "bare"
) -> dict[str, tuple[float, float]]:
    """(``measure``, ``floor``) medians in ms: steady state and the fresh-connection spans."""
    out = {"steady": (case.steady_ms(measure), case.steady_ms(floor))}
    for label, first, last in FRESH_SPANS:
        out[label] = (case.fresh_ms(measure, first, last), case.fresh_ms(floor, first, last))
    if measure == "load":
        out["first load, pool renewed"] = (
            case.fresh_ms("renewed", 1, 1),
            case.fresh_ms(floor, 1, 1),
        )
    return out


def _reference(cases: list[Case], case: Case) -> Case | None:
    """The case ``case`` is compared with: the same window of the block's size."""
    return next(
        (c for c in cases if (c.shape, c.variant, c.size) == (case.shape, case.variant, BLOCK)),
        None,
    )


def table(results: dict[str, list[Case]], shape: Shape) -> str:
    window = "store.window" if shape is TEXT else "store.window_rows"
    variant = "| variant " if shape is TOOLS else ""
    lines = [
        f"| tables {variant}| history | window rows | load (ms) | {window} (ms) | bare (ms) "
        "| load ÷ load@2,000 | load ÷ bare | 1st load, new store (ms) "
        "| 1st load, new pool (ms) | bare 1st (ms) | 1st ÷ 1st@2,000 | 1st ÷ bare 1st "
        "| loads 1-10 (ms) | loads 11+ (ms) | bare 1-10 / 11+ (ms) |",
        "|---|" + ("---|" if variant else "") + "---:|" * 15,
    ]
    for state, cases in results.items():
        for c in (c for c in cases if c.shape is shape):
            ref = _reference(cases, c)
            base = figures(ref) if ref else None
            f = figures(c)
            load, bare = f["steady"]
            first, bare_first = f["first load"]
            lines.append(
                f"| {state} "
                + (f"| {c.variant.label} " if variant else "")
                + f"| {c.size:,} | {c.rows} | {load:.3f} | {c.steady_ms('window'):.3f} "
                f"| {bare:.3f} | {ratio(load, base['steady'][0] if base else None)} "
                f"| {ratio(load, bare)} | {first:.2f} "
                f"| {f['first load, pool renewed'][0]:.2f} | {bare_first:.2f} "
                f"| {ratio(first, base['first load'][0] if base else None)} "
                f"| {ratio(first, bare_first)} | {f['loads 1-10'][0]:.3f} "
                f"| {f['loads 11+'][0]:.3f} | {f['loads 1-10'][1]:.3f} / {f['loads 11+'][1]:.3f} |"
            )
    return "\n".join(lines)


def statements_table(results: dict[str, list[Case]]) -> str:
    """Today's window statement and the baseline's, on a bare connection."""
    b = BASELINE
    lines = [
        f"| tables | history | bare (ms) | statement (ms) | {b} statement (ms) "
        f"| statement ÷ {b} | statement ÷ bare | {b} ÷ bare | 1st statement (ms) "
        f"| 1st {b} (ms) | 1st ÷ 1st {b} | 11+ statement (ms) | 11+ {b} (ms) | 11+ ÷ 11+ {b} |",
        "|---|" + "---:|" * 13,
    ]
    for state, cases in results.items():
        for c in cases:
            if "baseline" not in c.queries:
                continue
            new, old = figures(c, "statement"), figures(c, "baseline")
            (stmt, bare), (base, _) = new["steady"], old["steady"]
            first, first_old = new["first load"][0], old["first load"][0]
            later, later_old = new["loads 11+"][0], old["loads 11+"][0]
            lines.append(
                f"| {state} | {c.size:,} | {bare:.3f} | {stmt:.3f} | {base:.3f} "
                f"| {ratio(stmt, base)} | {ratio(stmt, bare)} | {ratio(base, bare)} "
                f"| {first:.2f} | {first_old:.2f} | {ratio(first, first_old)} "
                f"| {later:.3f} | {later_old:.3f} | {ratio(later, later_old)} |"
            )
    return "\n".join(lines)


def goals(backend: str, results: dict[str, list[Case]]) -> list[tuple[str, bool]]:
    """Each goal as (line, met): per state and window, the largest session's
    load against the block's (and, on PostgreSQL, against the bare query)."""
    out = []
    for state, cases in results.items():
        largest = max(c.size for c in cases)
        for c in (c for c in cases if c.size == largest):
            ref = _reference(cases, c)
            if ref is None or largest <= BLOCK:
                continue
            base = figures(ref)
            for label, (load, bare) in figures(c).items():
                flat = load / base[label][0]
                line = (
                    f"{backend}, {state}, {c.label}, {label}: {largest:,} load ÷ {BLOCK:,} "
                    f"load {flat:.2f}{TIMES} (goal {FLAT_GOAL}{TIMES})"
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


def analysed_by_others(engine: Engine) -> str | None:
    """When PostgreSQL last analysed the tables, if it did: on a shared
    server another client's database-wide ``ANALYZE`` (as the test suite's
    plan tests run) reaches this schema too, and "never analysed" is then
    not true. Give the benchmark a database of its own there."""
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT max(greatest(last_analyze, last_autoanalyze)) FROM pg_stat_user_tables"
            " WHERE schemaname = current_schema()"
            " AND relname IN ('tokenmem_messages', 'tokenmem_sessions')"
        ).scalar_one()
    return None if found is None else str(found)


def check_unchanged(engine: Engine, cases: list[Case]) -> None:
    """Raise if a load wrote to a session (a system_message saved again)."""
    s = SESSIONS.c
    with engine.connect() as conn:
        for c in cases:
            sid = session_uuid(OWNER, c.name)
            found = conn.execute(select(s.next_position).where(s.id == sid)).scalar_one()
            if found != c.shape.head + c.size:
                raise RuntimeError(f"{c.name} was written to while it was measured")


def run_state(
    backend: str,
    url: str,
    state: str,
    args: argparse.Namespace,
    counter: TokenCounter,
    baseline: types.ModuleType | None,
) -> tuple[list[Case], dict[str, list[str]]]:
    cases = make_cases(args.scale.sizes)
    store = Store(url)
    try:
        for case in cases:
            prepare(store, case, counter, baseline)
        log(f"{state}: windows checked against the reference")
        shown = plans(backend, store, cases, counter, baseline)
        raw = store.engine.raw_connection()
        try:
            seconds = measure_steady(store, raw, cases, args.reps, args.warmup, counter)
        finally:
            raw.close()
        log(f"{state}: steady state measured in {seconds:.0f} s")
    finally:
        store.close()
    seconds = measure_fresh(url, cases, args.fresh_reps, args.fresh_loads)
    log(f"{state}: fresh connections measured in {seconds:.0f} s")
    return cases, shown


def run_backend(
    backend: str,
    args: argparse.Namespace,
    counter: TokenCounter,
    baseline: types.ModuleType | None,
) -> dict[str, Any]:
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
            for shape in SHAPES:
                for size in args.scale.sizes:
                    check_session(conn, backend, shape, size)
        compared = check_copies(store, args.scale.sizes, counter)
        check_seconds = time.perf_counter() - t0
        rows = table_rows(engine)
        store.close()
        print(
            f"Filled in {fill_seconds:.0f} s ("
            + ", ".join(f"{k}: {v:.1f} s" for k, v in fills.items())
            + f"): {rows:,} messages in the table. Sessions checked in SQL, and {compared:,} "
            "messages of a copied tool session against the same turns written by tokenmem, "
            f"in {check_seconds:.1f} s; windows checked against the reference in each state.",
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
            results[state], shown[state] = run_state(backend, url, state, args, counter, baseline)
            check_unchanged(engine, results[state])
            if state == "never analysed" and backend == "postgresql":
                report["analysed_meanwhile"] = when = analysed_by_others(engine)
                if when:
                    print(f"\nWARNING: the tables were analysed at {when} by another client.")
            largest = max(args.scale.sizes)
            for title, lines in shown[state].items():
                print(f"\n{title} ({state}), {largest:,}-message sessions:\n")
                print("\n".join(f"    {line}" for line in lines))
                if title.startswith("EXPLAIN"):
                    seeks = any(SEEK_INDEX in line for line in lines)
                    print(f"\nSeeks through {SEEK_INDEX}: {'yes' if seeks else 'NO'}.")
        engine.dispose()
    print(
        f"\nMedians: steady state {args.reps} rounds; fresh connections {args.fresh_reps} "
        f"per session and kind, {args.fresh_loads} loads each.\n\nText sessions:\n"
    )
    print(table(results, TEXT))
    if baseline is not None:
        print(f"\nThe window statement against {BASELINE}'s, text sessions, bare connection:\n")
        print(statements_table(results))
    print("\nTool sessions (a pinned system prompt, then the history's messages):\n")
    print(table(results, TOOLS))
    met = goals(backend, results)
    print()
    for line, ok in met:
        print(f"- {line}: {'met' if ok else 'MISSED'}")
    report["goals"] = [{"goal": line, "met": ok} for line, ok in met]
    report["plans"] = shown
    report["states"] = {
        state: [
            {
                "shape": c.shape.name,
                "variant": c.variant.label,
                "size": c.size,
                "window_rows": c.rows,
                "pinned": c.pinned,
                "first": c.first,
                "last": c.last,
                "figures_ms": {m: figures(c, m) for m in ("load", *c.queries)},
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
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help=f"the commit whose window statement is timed beside today's (default {BASELINE}; "
        "none: no baseline)",
    )
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
    baseline = None if args.baseline == "none" else baseline_window(args.baseline)
    counter = TokenCounter(ENCODING)
    sizes = args.scale.sizes
    filler = args.scale.filler_sessions * FILLER
    print(
        f"# Window load vs history length ({LIMIT:,}-token window, {ENCODING})\n\n"
        f"tokenmem sources {digest}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; scale {args.scale_name}: text sessions of "
        + ", ".join(f"{s:,}" for s in sizes)
        + " messages, tool sessions of as many after their pinned prompt, and "
        f"{args.scale.filler_sessions:,} filler sessions of {FILLER:,} "
        f"({filler + 2 * sum(sizes) + len(sizes):,} messages); baseline statement: "
        f"{args.baseline}."
    )
    reports = [run_backend(backend, args, counter, baseline) for backend in args.backends]
    total = time.perf_counter() - started
    missed = sum(not g["met"] for r in reports for g in r["goals"])
    print(f"\nGoals missed: {missed}. Total run time: {total:.0f} s.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "source_digest": digest,
                    "baseline": args.baseline,
                    "total_seconds": total,
                    "backends": reports,
                },
                out,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
