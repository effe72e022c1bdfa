"""Turns per second and the latency of a turn under load, beside the bare driver.

A *turn* is what a chat service does per request: build a
``ConversationTokenBufferMemory`` for the session (the recommended pattern: one
engine per process, a memory per request), ``save_context`` the exchange, then
``load_memory_variables({})`` for the next prompt (``max_token_limit=2000``,
text mode, o200k_base). 32 workers run turns against 1,000 sessions, each turn
on a session drawn uniformly at random, so a session sometimes takes two turns
at once. The sessions are prefilled with 64 messages first, so every window is
full (about 55 messages, 2,000 tokens), as in a conversation under way. The
messages are English-like text of 9 to 58 o200k_base tokens from seeded
``random.Random`` generators.

Four modes per backend, on the same sessions of the same database:

* **bare driver, threads** (the threads baseline): 32 threads, each with its
  own psycopg (sync) or sqlite3 connection, issue per turn what tokenmem's SQL
  amounts to at minimum: one transaction that upserts the session's counters
  (``INSERT .. ON CONFLICT DO UPDATE .. RETURNING``) and inserts the two
  message rows in one statement, then the window ``SELECT`` (the statement of
  ``tokenmem/window.py`` written out as plain SQL). Token counts are computed
  beforehand, outside the timing;
* **tokenmem, threads**: 32 threads share one ``Store``; each turn builds a
  memory and calls ``save_context`` then ``load_memory_variables`` (which count
  the tokens themselves: the exchange's at save; at load, only when the
  rendered window must be counted again, which these prefixes never need);
* **bare driver, asyncio** (the asyncio baseline): the same SQL from 32 tasks
  on one event loop, each with its own psycopg ``AsyncConnection`` or
  aiosqlite connection;
* **tokenmem, asyncio**: 32 tasks on one event loop share one ``AsyncStore``
  (psycopg async; aiosqlite) and call ``asave_context`` then
  ``aload_memory_variables``.

Engines are built by ``tokenmem.store.make_engine`` / ``make_async_engine``
(SQLite's WAL pragmas, no pre-ping) with ``pool_size=32, max_overflow=0`` —
what ``Store(url, engine_options=...)`` passes: one connection per worker, so
no worker ever waits for one (SQLAlchemy's default pool holds 5 + 10). SQLite is a
file in a temporary directory, PostgreSQL a fresh schema, dropped at the end.

Each mode runs ``--turns`` timed turns (default 3,000) in two rounds, the
modes in order A B C D then D C B A so that drift on a shared machine hits them
alike; every round first runs 8 untimed turns per worker. Save, load and the
whole turn (save + load, the memory's construction included) are timed with
``time.perf_counter_ns``; turns/s is timed turns over the rounds' wall time.
The table gives p50 and p99, and the ratio of each mode's turn p50 to its
own model's baseline (goal: at most 2x); the goal line adds tokenmem asyncio
against the threads baseline. Below it: this process's CPU time per turn (all
threads; on SQLite it includes SQLite's own work), any error a turn raised,
and the errors tokenmem's stores retried on their own (SQLite's "database is
locked", PostgreSQL's serialization failures: counted by wrapping
``tokenmem.store.retryable`` for the run, since the stores swallow them).

Then nothing may be lost. Per session, the messages in the database must equal
the prefill plus two per exchange the workers report saved (warm-ups
included), with positions gapless from 0, ``next_position`` and ``next_turn``
agreeing, every exchange's two messages adjacent (human, then ai, one turn),
each ``cum_floor`` the running sum of the floors before it; and every exchange
a worker saved must be found, by its text, in its session (the *lost* column,
per mode). Loads that did not contain the exchange their turn had just saved
are counted too (read-your-writes).

``--profile`` then runs turns one at a time (no concurrency): tokenmem and the
bare driver alternately, for their single-threaded medians and CPU time, then
tokenmem under cProfile, and prints where a turn's time goes: exclusive time
by component (tiktoken, SQLAlchemy, the driver, tokenmem itself...), and the
inclusive time of the functions that matter (token counting at save, the
window query, rendering the window, binding parameters, pool checkouts and
check-ins, commits).

Run from the repository root (the default is both backends; about four minutes
on two cores with ``--profile``, ``--quick`` about one)::

    .venv/bin/python benchmarks/load.py --profile
    .venv/bin/python benchmarks/load.py --backend sqlite --quick
    .venv/bin/python benchmarks/load.py --json /tmp/load.json

PostgreSQL comes from ``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import math
import os
import pstats
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import psycopg
from sqlalchemy import Engine, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

# The same English-like text and source digest as the window benchmark.
from window_load import pg_schema, sentence_text, source_digest

import tokenmem.aio
import tokenmem.store
from tokenmem import ConversationTokenBufferMemory, Message, Rule, Store, TokenCounter
from tokenmem.aio import AsyncStore, make_async_engine
from tokenmem.models import session_uuid, utcnow
from tokenmem.store import DEFAULT_OWNER, make_engine
from tokenmem.window import Counts, count_message

PG_URL = os.environ.get(
    "TOKENMEM_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgresql")
SESSIONS = 1_000
WORKERS = 32
POOL_SIZE, MAX_OVERFLOW = WORKERS, 0
TURNS, QUICK_TURNS = 3_000, 600
ROUNDS = 2
WARMUP_PER_WORKER = 8
PREFILL = 64  # messages per session: a full 2,000-token window from the first turn
PROFILE_TURNS, QUICK_PROFILE_TURNS = 400, 150
LIMIT = 2_000
ENCODING = "o200k_base"
SEED = 20_241_130
GOAL = 2.0  # tokenmem's turn p50 at most this many times the bare driver's
BARE, THREADS = "bare driver, threads", "tokenmem, threads"
BARE_ASYNC, ASYNCIO = "bare driver, asyncio", "tokenmem, asyncio"
MODES = (BARE, THREADS, BARE_ASYNC, ASYNCIO)
BASELINE = {THREADS: BARE, ASYNCIO: BARE_ASYNC}  # each compared with its own model
SQLITE_PRAGMAS = ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON")
PROFILE = "profile (single thread)"
TIMES = "\N{MULTIPLICATION SIGN}"


def session_name(i: int) -> str:
    return f"load-{i:04d}"


@dataclass(frozen=True)
class Turn:
    """One exchange to save in one session, with its token counts for the
    bare driver (tokenmem counts for itself)."""

    name: str
    sid: uuid.UUID
    human: str
    ai: str
    counts: tuple[Counts, Counts]


def make_turns(n: int, seed: int, counter: TokenCounter) -> list[Turn]:
    """``n`` exchanges (8 to 48 words a message), each on a session drawn uniformly."""
    rng = random.Random(seed)
    turns = []
    for _ in range(n):
        name = session_name(rng.randrange(SESSIONS))
        human = sentence_text(rng, rng.randint(8, 48))
        ai = sentence_text(rng, rng.randint(8, 48))
        counts = (
            count_message(counter, "human", human, None),
            count_message(counter, "ai", ai, None),
        )
        turns.append(Turn(name, session_uuid(DEFAULT_OWNER, name), human, ai, counts))
    return turns


def percentile(values: Sequence[int], p: float) -> float:
    """The nearest-rank ``p``-th percentile of nanoseconds, in milliseconds."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] / 1e6


def describe(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


# --- databases -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One database: SQLAlchemy URLs for both stores, and what the bare driver opens."""

    backend: str
    url: URL
    async_url: URL
    dbapi: str  # the SQLite file, or a libpq URI


@contextmanager
def open_target(backend: str) -> Iterator[Target]:
    """A SQLite file in a temporary directory, or a fresh PostgreSQL schema
    (in the URL, so every engine and connection finds it), removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="tokenmem-load-") as tmp:
            path = Path(tmp) / "load.sqlite3"
            url = make_url(f"sqlite:///{path}")
            yield Target(backend, url, url.set(drivername="sqlite+aiosqlite"), str(path))
        return
    with pg_schema(PG_URL, "load") as schema:
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        dbapi = url.set(drivername="postgresql").render_as_string(hide_password=False)
        yield Target(backend, url, url, dbapi)


def sync_engine(target: Target) -> Engine:
    """An engine as ``Store(url, engine_options=...)`` builds it, with a
    connection per worker."""
    return make_engine(target.url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)


def async_engine(target: Target) -> AsyncEngine:
    """An async engine as ``AsyncStore`` builds it, with a connection per worker."""
    return make_async_engine(target.async_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)


def prefill(store: Store, counter: TokenCounter) -> float:
    """Give every session ``PREFILL`` messages (one transaction each); return seconds."""
    t0 = time.perf_counter()
    for i in range(SESSIONS):
        rng = random.Random(SEED + i)
        turns = [
            [
                Message("human", sentence_text(rng, rng.randint(8, 48))),
                Message("ai", sentence_text(rng, rng.randint(8, 48))),
            ]
            for _ in range(PREFILL // 2)
        ]
        store.append_turns(session_name(i), turns, counter)
    return time.perf_counter() - t0


# --- the workers ---------------------------------------------------------------


class SyncWorker(Protocol):
    def save(self, turn: Turn) -> None: ...

    def load(self, turn: Turn) -> Container[str]: ...


class AsyncWorker(Protocol):
    async def save(self, turn: Turn) -> None: ...

    async def load(self, turn: Turn) -> Container[str]: ...


def new_memory(store: Store | AsyncStore, turn: Turn) -> ConversationTokenBufferMemory:
    return ConversationTokenBufferMemory(
        store=store, session_id=turn.name, max_token_limit=LIMIT, encoding=ENCODING
    )


class MemoryWorker:
    """A tokenmem turn: a new memory on the shared store, save, then load."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.memory: ConversationTokenBufferMemory | None = None

    def save(self, turn: Turn) -> None:
        self.memory = new_memory(self.store, turn)
        self.memory.save_context({"input": turn.human}, {"output": turn.ai})

    def load(self, turn: Turn) -> Container[str]:
        assert self.memory is not None
        history: str = self.memory.load_memory_variables({})["history"]
        return history


class AsyncMemoryWorker:
    """:class:`MemoryWorker` on the shared AsyncStore."""

    def __init__(self, store: AsyncStore) -> None:
        self.store = store
        self.memory: ConversationTokenBufferMemory | None = None

    async def save(self, turn: Turn) -> None:
        self.memory = new_memory(self.store, turn)
        await self.memory.asave_context({"input": turn.human}, {"output": turn.ai})

    async def load(self, turn: Turn) -> Container[str]:
        assert self.memory is not None
        history: str = (await self.memory.aload_memory_variables({}))["history"]
        return history


_BUMP = """
INSERT INTO tokenmem_sessions (id, owner_id, name, encoding, next_position, next_turn,
    floor_total, start_position, start_floor, next_call, created_at, updated_at)
VALUES (:sid, '', :name, :encoding, 2, 1, :floor, 0, 0, 0, :now, :now)
ON CONFLICT (id) DO UPDATE SET encoding = :encoding,
    next_position = tokenmem_sessions.next_position + 2,
    next_turn = tokenmem_sessions.next_turn + 1,
    floor_total = tokenmem_sessions.floor_total + :floor, updated_at = :now
  WHERE tokenmem_sessions.encoding = :encoding OR tokenmem_sessions.encoding IS NULL
RETURNING next_position, next_turn, floor_total
"""
_INSERT = """
INSERT INTO tokenmem_messages (session_id, position, turn, role, content, name, metadata,
    created_at, encoding, text_tokens, chat_tokens, newline_tokens, cum_floor)
VALUES (:sid, :p0, :turn, 'human', :human, NULL, NULL, :now, :encoding, :h_text, :h_chat,
        :h_newline, :h_cum),
       (:sid, :p1, :turn, 'ai', :ai, NULL, NULL, :now, :encoding, :a_text, :a_chat, :a_newline,
        :a_cum)
"""
_WINDOW = """
SELECT position, turn, role, content, name, running, counted FROM (
  SELECT m.position, m.turn, m.role, m.content, m.name,
         SUM(CASE m.role WHEN 'human' THEN :prefix_human WHEN 'ai' THEN :prefix_ai
             ELSE :prefix_system END + m.text_tokens + COALESCE(m.newline_tokens, 1))
           OVER (ORDER BY m.position DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
           AS running,
         m.newline_tokens IS NOT NULL AS counted,
         :budget + newest.newline AS budget
  FROM tokenmem_sessions s
  JOIN (SELECT COALESCE(n.newline_tokens, 1) AS newline FROM tokenmem_messages n
        WHERE n.session_id = :sid ORDER BY n.position DESC LIMIT 1) newest ON 1 = 1
  JOIN tokenmem_messages m ON m.session_id = s.id
  WHERE s.id = :sid AND m.session_id = :sid AND s.encoding = :encoding
    AND m.cum_floor >= CASE WHEN s.start_floor > s.floor_total - (:budget + newest.newline)
                            THEN s.start_floor
                            ELSE s.floor_total - (:budget + newest.newline) END
) candidates
WHERE running <= budget ORDER BY position
"""


def _pyformat(sql: str) -> str:
    return re.sub(r":(\w+)", r"%(\1)s", sql)


class _Bare:
    """The baseline's SQL and parameters: a turn as plain SQL on a DBAPI
    connection of its own (:class:`BareWorker`, :class:`AsyncBareWorker`)."""

    def __init__(self, target: Target, prefix_tokens: Mapping[str, int]) -> None:
        self.sqlite = target.backend == "sqlite"
        self.sql = (
            (_BUMP, _INSERT, _WINDOW)
            if self.sqlite
            else (_pyformat(_BUMP), _pyformat(_INSERT), _pyformat(_WINDOW))
        )
        self.window_params = {
            "encoding": ENCODING,
            "budget": LIMIT,
            **{f"prefix_{role}": n for role, n in prefix_tokens.items()},
        }

    def _sid(self, turn: Turn) -> object:
        return turn.sid.hex if self.sqlite else turn.sid  # how SQLAlchemy's Uuid stores it

    def bump_params(self, turn: Turn) -> dict[str, Any]:
        now = utcnow()
        # SQLAlchemy keeps SQLite datetimes as naive UTC text, in this format.
        when = now.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else now
        h, a = turn.counts
        floor = h.floor + a.floor
        sid = self._sid(turn)
        return {"sid": sid, "name": turn.name, "encoding": ENCODING, "floor": floor, "now": when}

    def insert_params(self, turn: Turn, bump: dict[str, Any], row: Sequence[int]) -> dict[str, Any]:
        next_position, next_turn, floor_total = row
        h, a = turn.counts
        position, cum = next_position - 2, floor_total - bump["floor"]
        return {
            "sid": bump["sid"],
            "p0": position,
            "p1": position + 1,
            "turn": next_turn - 1,
            "human": turn.human,
            "ai": turn.ai,
            "now": bump["now"],
            "encoding": ENCODING,
            "h_text": h.text_tokens,
            "h_newline": h.newline_tokens,
            "h_chat": h.chat_tokens,
            "h_cum": cum,
            "a_text": a.text_tokens,
            "a_newline": a.newline_tokens,
            "a_chat": a.chat_tokens,
            "a_cum": cum + h.floor,
        }

    def load_params(self, turn: Turn) -> dict[str, Any]:
        return {**self.window_params, "sid": self._sid(turn)}


class BareWorker(_Bare):
    """The threads baseline: sqlite3 or psycopg, one connection per worker."""

    def __init__(self, target: Target, prefix_tokens: Mapping[str, int]) -> None:
        super().__init__(target, prefix_tokens)
        self.conn: Any
        if self.sqlite:
            self.conn = sqlite3.connect(target.dbapi, timeout=30, check_same_thread=False)
            for pragma in SQLITE_PRAGMAS:
                self.conn.execute(f"PRAGMA {pragma}")
        else:
            self.conn = psycopg.connect(target.dbapi)

    def save(self, turn: Turn) -> None:
        bump, insert, _ = self.sql
        params = self.bump_params(turn)
        cur = self.conn.cursor()
        try:
            cur.execute(bump, params)
            cur.execute(insert, self.insert_params(turn, params, cur.fetchone()))
        except BaseException:
            self.conn.rollback()
            raise
        finally:
            cur.close()
        self.conn.commit()

    def load(self, turn: Turn) -> list[str]:
        cur = self.conn.cursor()
        try:
            cur.execute(self.sql[2], self.load_params(turn))
            rows = cur.fetchall()
        finally:
            cur.close()
        self.conn.commit()
        return [row[3] for row in rows]

    def close(self) -> None:
        self.conn.close()


class AsyncBareWorker(_Bare):
    """The asyncio baseline: aiosqlite or psycopg's AsyncConnection, one per task."""

    conn: Any

    @classmethod
    async def open(cls, target: Target, prefix_tokens: Mapping[str, int]) -> AsyncBareWorker:
        self = cls(target, prefix_tokens)
        if self.sqlite:
            self.conn = await aiosqlite.connect(target.dbapi, timeout=30)
            for pragma in SQLITE_PRAGMAS:
                await self.conn.execute(f"PRAGMA {pragma}")
        else:
            self.conn = await psycopg.AsyncConnection.connect(target.dbapi)
        return self

    async def save(self, turn: Turn) -> None:
        bump, insert, _ = self.sql
        params = self.bump_params(turn)
        cur = await self.conn.cursor() if self.sqlite else self.conn.cursor()
        try:
            await cur.execute(bump, params)
            await cur.execute(insert, self.insert_params(turn, params, await cur.fetchone()))
        except BaseException:
            await self.conn.rollback()
            raise
        finally:
            await cur.close()
        await self.conn.commit()

    async def load(self, turn: Turn) -> list[str]:
        cur = await self.conn.cursor() if self.sqlite else self.conn.cursor()
        try:
            await cur.execute(self.sql[2], self.load_params(turn))
            rows = await cur.fetchall()
        finally:
            await cur.close()
        await self.conn.commit()
        return [row[3] for row in rows]

    async def close(self) -> None:
        await self.conn.close()


# --- running turns -------------------------------------------------------------


@dataclass
class Tally:
    """What some turns did: timings (turn, save, load ns), exchanges saved, errors."""

    samples: list[tuple[int, int, int]] = field(default_factory=list)
    saved: list[Turn] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    stale: int = 0  # loads without the exchange their turn had just saved
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time, all threads
    retried: Counter[str] = field(default_factory=Counter)  # errors tokenmem retried

    def add(self, other: Tally, *, timed: bool) -> None:
        if timed:
            self.samples += other.samples
            self.seconds += other.seconds
            self.cpu_seconds += other.cpu_seconds
            self.stale += other.stale
        self.saved += other.saved
        self.errors += other.errors
        self.retried += other.retried


def _record(tally: Tally, turn: Turn, window: Container[str] | None, ns: tuple[int, ...]) -> None:
    tally.saved.append(turn)
    if window is not None:
        t0, t1, t2 = ns
        tally.samples.append((t2 - t0, t1 - t0, t2 - t1))
        if turn.ai not in window:
            tally.stale += 1


def run_turn(worker: SyncWorker, turn: Turn, tally: Tally) -> None:
    clock = time.perf_counter_ns
    t0 = clock()
    try:
        worker.save(turn)
    except Exception as exc:
        tally.errors[describe(exc)] += 1
        return
    t1 = clock()
    try:
        window: Container[str] | None = worker.load(turn)
    except Exception as exc:
        tally.errors[describe(exc)] += 1
        window = None
    _record(tally, turn, window, (t0, t1, clock()))


async def arun_turn(worker: AsyncWorker, turn: Turn, tally: Tally) -> None:
    clock = time.perf_counter_ns
    t0 = clock()
    try:
        await worker.save(turn)
    except Exception as exc:
        tally.errors[describe(exc)] += 1
        return
    t1 = clock()
    try:
        window: Container[str] | None = await worker.load(turn)
    except Exception as exc:
        tally.errors[describe(exc)] += 1
        window = None
    _record(tally, turn, window, (t0, t1, clock()))


def thread_phase(workers: Sequence[SyncWorker], turns: Sequence[Turn]) -> Tally:
    """Run ``turns`` on one thread per worker, each taking the next turn when
    done with its last; the wall time runs from the common start to the last finish."""
    lock = threading.Lock()
    source = iter(turns)
    barrier = threading.Barrier(len(workers))
    starts = [0] * len(workers)
    ends = [0] * len(workers)
    total = Tally()

    def loop(i: int) -> None:
        local = Tally()
        barrier.wait()
        starts[i] = time.perf_counter_ns()
        while True:
            with lock:
                turn = next(source, None)
            if turn is None:
                break
            run_turn(workers[i], turn, local)
        ends[i] = time.perf_counter_ns()
        with lock:
            total.add(local, timed=True)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(workers))]
    cpu = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total.cpu_seconds = time.process_time() - cpu
    total.seconds = (max(ends) - min(starts)) / 1e9
    return total


async def task_phase(workers: Sequence[AsyncWorker], turns: Sequence[Turn]) -> Tally:
    """:func:`thread_phase` with one asyncio task per worker."""
    source = iter(turns)
    total = Tally()

    async def loop(worker: AsyncWorker) -> None:
        while (turn := next(source, None)) is not None:
            await arun_turn(worker, turn, total)

    t0, cpu = time.perf_counter_ns(), time.process_time()
    await asyncio.gather(*(loop(w) for w in workers))
    total.cpu_seconds = time.process_time() - cpu
    total.seconds = (time.perf_counter_ns() - t0) / 1e9
    return total


@dataclass
class Bench:
    """One backend's database, its shared store, and what each mode did."""

    target: Target
    store: Store
    counter: TokenCounter
    prefix_tokens: dict[str, int]
    results: dict[str, Tally] = field(default_factory=dict)

    def result(self, mode: str) -> Tally:
        return self.results.setdefault(mode, Tally())


@contextmanager
def counting_retries() -> Iterator[Counter[str]]:
    """Count the errors tokenmem's stores retry, which they otherwise swallow
    (SQLite's "database is locked", PostgreSQL's serialization failures)."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    original = tokenmem.store.retryable

    def retryable(exc: SQLAlchemyError, *, committing: bool = False) -> bool:
        verdict = original(exc, committing=committing)
        if verdict:
            with lock:
                seen[describe(getattr(exc, "orig", None) or exc)] += 1
        return verdict

    # Both stores look the function up in their module's globals at each error.
    modules, name = (tokenmem.store, tokenmem.aio), "retryable"
    for module in modules:
        setattr(module, name, retryable)
    try:
        yield seen
    finally:
        for module in modules:
            setattr(module, name, original)


def run_round(bench: Bench, mode: str, turns: list[Turn], warmup: list[Turn]) -> None:
    """Warm up, then time ``turns`` in ``mode``; add both to the mode's tally."""
    with counting_retries() as retried:
        _run_round(bench, mode, turns, warmup)
    bench.result(mode).retried += retried


def _run_round(bench: Bench, mode: str, turns: list[Turn], warmup: list[Turn]) -> None:
    result = bench.result(mode)
    if mode == ASYNCIO:

        async def rounds() -> tuple[Tally, Tally]:
            store = AsyncStore(async_engine(bench.target))
            try:
                workers = [AsyncMemoryWorker(store) for _ in range(WORKERS)]
                return await task_phase(workers, warmup), await task_phase(workers, turns)
            finally:
                await store.dispose()

        warm, timed = asyncio.run(rounds())
    elif mode == BARE_ASYNC:

        async def bare_rounds() -> tuple[Tally, Tally]:
            workers = [
                await AsyncBareWorker.open(bench.target, bench.prefix_tokens)
                for _ in range(WORKERS)
            ]
            try:
                return await task_phase(workers, warmup), await task_phase(workers, turns)
            finally:
                for worker in workers:
                    await worker.close()

        warm, timed = asyncio.run(bare_rounds())
    elif mode == THREADS:
        workers = [MemoryWorker(bench.store) for _ in range(WORKERS)]
        warm, timed = thread_phase(workers, warmup), thread_phase(workers, turns)
        bench.store.engine.dispose()  # only 100 PostgreSQL connections to go round
    else:
        bare = [BareWorker(bench.target, bench.prefix_tokens) for _ in range(WORKERS)]
        try:
            warm, timed = thread_phase(bare, warmup), thread_phase(bare, turns)
        finally:
            for worker in bare:
                worker.close()
    result.add(warm, timed=False)
    result.add(timed, timed=True)


def check_same_window(bench: Bench) -> None:
    """The bare SQL must read the same rows as ``store.window``."""
    bare = BareWorker(bench.target, bench.prefix_tokens)
    try:
        for i in range(0, SESSIONS, SESSIONS // 5):
            name = session_name(i)
            nothing = Counts(0, 0)
            probe = Turn(name, session_uuid(DEFAULT_OWNER, name), "", "", (nothing, nothing))
            window = bench.store.window(name, Rule(limit=LIMIT), bench.counter)
            if not window or bare.load(probe) != [w.message.content for w in window]:
                raise RuntimeError(f"{name}: the bare SQL read other rows than store.window")
    finally:
        bare.close()


# --- checking that nothing was lost ---------------------------------------------


@dataclass
class Check:
    sessions: int = 0
    messages: int = 0
    expected: int = 0
    saved: int = 0
    lost: int = 0
    extra: int = 0
    bad_sessions: list[str] = field(default_factory=list)
    bad_structure: int = 0
    bad_cum_floor: int = 0
    lost_by_mode: dict[str, int] = field(default_factory=dict)
    unmatched: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.extra
            or self.bad_sessions
            or self.bad_structure
            or self.bad_cum_floor
            or self.unmatched
            or any(self.lost_by_mode.values())
        )


def verify(bench: Bench) -> Check:
    """Compare the database with what the workers report having saved."""
    sqlite = bench.target.backend == "sqlite"
    floor = "{}(m.text_tokens + COALESCE(m.newline_tokens, 1) + 1, m.chat_tokens + 3)".format(
        "MIN" if sqlite else "LEAST"
    )
    saved = Counter(t.name for tally in bench.results.values() for t in tally.saved)
    check = Check(saved=sum(saved.values()))
    with bench.store.engine.connect() as conn:
        per_session = conn.execute(
            text(
                "SELECT s.name, s.next_position, s.next_turn, s.floor_total, COUNT(m.position), "
                f"MIN(m.position), MAX(m.position), SUM({floor}) "
                "FROM tokenmem_sessions s LEFT JOIN tokenmem_messages m ON m.session_id = s.id "
                "GROUP BY s.id, s.name, s.next_position, s.next_turn, s.floor_total"
            )
        ).all()
        bad_structure, bad_cum = conn.execute(
            text(
                "SELECT COALESCE(SUM(CASE WHEN turn <> position / 2 OR role <> CASE WHEN "
                "position % 2 = 0 THEN 'human' ELSE 'ai' END THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(CASE WHEN cum_floor <> before THEN 1 ELSE 0 END), 0) FROM ("
                "SELECT m.position, m.turn, m.role, m.cum_floor, COALESCE(SUM("
                f"{floor}) OVER (PARTITION BY m.session_id ORDER BY m.position "
                "ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before "
                "FROM tokenmem_messages m) x"
            )
        ).one()
        rows = conn.execute(
            text(
                "SELECT s.name, m.position, m.role, m.content FROM tokenmem_messages m "
                "JOIN tokenmem_sessions s ON s.id = m.session_id WHERE m.position >= :prefill "
                "ORDER BY s.name, m.position"
            ),
            {"prefill": PREFILL},
        ).all()
    check.sessions, check.bad_structure, check.bad_cum_floor = (
        len(per_session),
        int(bad_structure),
        int(bad_cum),
    )
    for name, next_position, next_turn, floor_total, count, lo, hi, floors in per_session:
        expected = PREFILL + 2 * saved[name]
        check.messages += count
        check.expected += expected
        check.lost += max(0, expected - count)
        check.extra += max(0, count - expected)
        if not (
            count == expected == next_position == 2 * next_turn
            and lo == 0
            and hi == count - 1
            and floors == floor_total
        ):
            check.bad_sessions.append(name)
    if check.sessions != SESSIONS:
        check.bad_sessions.append(f"{check.sessions} sessions, expected {SESSIONS}")
    found: Counter[tuple[str, str, str]] = Counter()
    for first, second in zip(rows[::2], rows[1::2], strict=False):
        if first.name == second.name and (first.role, second.role) == ("human", "ai"):
            found[(first.name, first.content, second.content)] += 1
    for mode, tally in bench.results.items():
        lost = 0
        for t in tally.saved:
            key = (t.name, t.human, t.ai)
            if found[key] > 0:
                found[key] -= 1
            else:
                lost += 1
        check.lost_by_mode[mode] = lost
    check.unmatched = sum(found.values())
    return check


def check_lines(backend: str, check: Check) -> list[str]:
    verdict = "OK" if check.ok else "FAILED"
    lines = [
        f"Check ({backend}): {verdict}. {check.sessions:,} sessions hold {check.messages:,} "
        f"messages; expected {check.expected:,} = {SESSIONS:,} {TIMES} {PREFILL} prefilled + 2 "
        f"{TIMES} {check.saved:,} exchanges the workers report saved (warm-ups included). "
        f"Missing {check.lost}, extra {check.extra}.",
        f"  Sessions where count = next_position = 2 {TIMES} next_turn = max position + 1, "
        f"positions from 0 without gaps, floor_total = sum of floors: "
        f"{check.sessions - len(check.bad_sessions):,}/{SESSIONS:,}"
        + (f" (bad: {', '.join(check.bad_sessions[:5])})" if check.bad_sessions else "")
        + ".",
        f"  Messages out of place (not human at even positions and ai at odd, one turn "
        f"per exchange): {check.bad_structure}; cum_floor not the running sum of floors: "
        f"{check.bad_cum_floor}.",
        "  Saved exchanges not found by their text: "
        + ", ".join(f"{mode} {n}" for mode, n in check.lost_by_mode.items())
        + f"; exchanges in the database no worker reported: {check.unmatched}.",
    ]
    return lines


# --- profiling -----------------------------------------------------------------


def _component(key: tuple[str, int, str]) -> str:
    filename, _, func = key
    where = f"{filename} {func}"
    if "tiktoken" in where or "CoreBPE" in where:
        return "tiktoken (token counting)"
    if "psycopg" in where:
        return "psycopg (driver, incl. waiting for the server)"
    if "sqlite3" in where:
        return "sqlite3 (driver and SQLite itself)"
    if "sqlalchemy" in where:
        return "SQLAlchemy"
    if f"{os.sep}tokenmem{os.sep}" in filename:
        return "tokenmem's own Python"
    return "other Python (stdlib: uuid, datetime, json...)"


_KEY_FUNCTIONS = (  # (where the function is defined, its name, what it stands for)
    ("tokenmem/memory.py", "save_context", "save_context, total"),
    ("tokenmem/ops.py", "prepare_append", "  checking and counting the 2 messages"),
    ("tokenmem/memory.py", "load_memory_variables", "load_memory_variables, total"),
    ("tokenmem/store.py", "_window_rows", "  the window query (Store._window_rows)"),
    ("tokenmem/memory.py", "_fit", "  rendering the window, and any recount (_fit)"),
    ("tokenmem/memory.py", "__init__", "a new memory per turn (__init__)"),
    ("tokenmem/tokens.py", "count", "all token counting (TokenCounter.count)"),
    ("tokenmem/direct.py", "bind", "binding parameters (3 statements a turn)"),
    ("sqlalchemy/pool/base.py", "_checkout", "pool checkouts (2 a turn)"),
    ("sqlalchemy/pool/base.py", "_finalize_fairy", "pool check-ins (2 a turn)"),
    ("tokenmem/direct.py", "commit", "COMMITs (2 a turn; the log flush)"),
)


def profile(bench: Bench, n: int) -> tuple[dict[str, Any], list[str]]:
    """Single-threaded turns: tokenmem and the bare driver alternately, then
    tokenmem under cProfile. Returns the numbers, and lines that show the
    medians and where tokenmem's time goes."""
    counter, store = bench.counter, bench.store
    result = bench.result(PROFILE)
    memory, bare = MemoryWorker(store), BareWorker(bench.target, bench.prefix_tokens)
    plain = {THREADS: Tally(), BARE: Tally()}
    cpu_ns = {THREADS: 0, BARE: 0}
    try:
        pairs = zip(
            make_turns(n, SEED + 7_001, counter),
            make_turns(n, SEED + 7_002, counter),
            strict=True,
        )
        for i, (a, b) in enumerate(pairs):
            order: list[tuple[str, SyncWorker, Turn]] = [(THREADS, memory, a), (BARE, bare, b)]
            for mode, worker, turn in order if i % 2 else order[::-1]:
                c0 = time.thread_time_ns()
                run_turn(worker, turn, plain[mode])
                cpu_ns[mode] += time.thread_time_ns() - c0
    finally:
        bare.close()
    profiled = Tally()
    turns = make_turns(n, SEED + 7_003, counter)
    profiler = cProfile.Profile()
    profiler.enable()
    for turn in turns:
        run_turn(memory, turn, profiled)
    profiler.disable()
    for tally in (*plain.values(), profiled):
        result.add(tally, timed=False)
        if tally.errors:
            raise RuntimeError(f"errors while profiling: {dict(tally.errors)}")
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    per_turn = 1e3 / n  # seconds summed over n turns -> ms per turn
    components: Counter[str] = Counter()
    for key, (_, _, tottime, _, _) in stats.items():
        components[_component(key)] += tottime * per_turn
    functions: Counter[str] = Counter()
    for where, func, label in _KEY_FUNCTIONS:
        functions[label] += per_turn * sum(
            cumtime
            for (filename, _, name), (_, _, _, cumtime, _) in stats.items()
            if name == func and Path(filename).as_posix().endswith(where)
        )
    median = {mode: statistics.median(s[0] for s in t.samples) / 1e6 for mode, t in plain.items()}
    cpu = {mode: ns / n / 1e6 for mode, ns in cpu_ns.items()}
    profiled_ms = sum(components.values())
    lines = [
        f"Single-threaded, {n} turns each, alternating: turn median tokenmem "
        f"{median[THREADS]:.3f} ms, bare driver {median[BARE]:.3f} ms "
        f"({median[THREADS] / median[BARE]:.2f}{TIMES}); CPU time of the calling thread "
        f"per turn: tokenmem {cpu[THREADS]:.3f} ms, bare driver {cpu[BARE]:.3f} ms.",
        "",
        f"cProfile of {n} more tokenmem turns ({profiled_ms:.2f} ms a turn under the "
        "profiler, which inflates Python-heavy parts). Exclusive time by component:",
        "",
        "| component | ms per turn | share |",
        "|---|---:|---:|",
        *(f"| {c} | {ms:.3f} | {ms / profiled_ms:.0%} |" for c, ms in components.most_common()),
        "",
        "Inclusive time of the key functions:",
        "",
        "| function | ms per turn | share |",
        "|---|---:|---:|",
        *(f"| {f} | {ms:.3f} | {ms / profiled_ms:.0%} |" for f, ms in functions.items()),
    ]
    report = {
        "single_thread_median_ms": median,
        "single_thread_cpu_ms": cpu,
        "profiled_ms_per_turn": profiled_ms,
        "components_ms": dict(components),
        "functions_ms": dict(functions),
    }
    return report, lines


# --- reporting -----------------------------------------------------------------


_SUMMARY = (
    "turns",
    "turns_per_s",
    "turn_p50",
    "turn_p99",
    "save_p50",
    "save_p99",
    "load_p50",
    "load_p99",
)


def summary(tally: Tally) -> dict[str, float]:
    if not tally.samples:  # every turn failed: the errors are printed below the table
        return dict.fromkeys(_SUMMARY, math.nan)
    turn, save, load = (list(x) for x in zip(*tally.samples, strict=True))
    return {
        "turns": len(tally.samples),
        "turns_per_s": len(tally.samples) / tally.seconds,
        "turn_p50": percentile(turn, 50),
        "turn_p99": percentile(turn, 99),
        "save_p50": percentile(save, 50),
        "save_p99": percentile(save, 99),
        "load_p50": percentile(load, 50),
        "load_p99": percentile(load, 99),
    }


def table(bench: Bench, check: Check) -> str:
    """The results; each mode's p50 divided by its own model's bare driver
    (threads by the threads baseline, asyncio by the asyncio one)."""
    lines = [
        "| mode | turns/s | turn p50 (ms) | turn p99 (ms) | save p50 (ms) | load p50 (ms) "
        "| p50 ÷ bare driver | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        s = summary(bench.results[mode])
        base = summary(bench.results[BASELINE.get(mode, mode)])["turn_p50"]
        lines.append(
            f"| {mode} | {s['turns_per_s']:,.0f} | {s['turn_p50']:.2f} | {s['turn_p99']:.2f} "
            f"| {s['save_p50']:.2f} | {s['load_p50']:.2f} | {s['turn_p50'] / base:.2f}{TIMES} "
            f"| {check.lost_by_mode.get(mode, 0)} |"
        )
    return "\n".join(lines)


def goal_line(backend: str, bench: Bench, check: Check) -> str:
    parts = []
    for mode, baseline in BASELINE.items():
        ratio = (
            summary(bench.results[mode])["turn_p50"] / summary(bench.results[baseline])["turn_p50"]
        )
        parts.append(
            f"{mode} {ratio:.2f}{TIMES} the {baseline} ({'met' if ratio <= GOAL else 'NOT met'})"
        )
    across = summary(bench.results[ASYNCIO])["turn_p50"] / summary(bench.results[BARE])["turn_p50"]
    parts.append(f"{ASYNCIO} {across:.2f}{TIMES} the {BARE}")
    lost = "nothing lost" if check.ok else "LOST OR INCONSISTENT DATA (see the check)"
    return f"Goal ({backend}): turn p50 within {GOAL:g}{TIMES} of the bare driver: " + (
        "; ".join(parts) + f"; {lost}."
    )


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    counter = TokenCounter(ENCODING)
    report: dict[str, Any] = {"backend": backend}
    profiled: list[str] = []
    with open_target(backend) as target:
        engine = sync_engine(target)
        try:
            store = Store(engine, upgrade=True)
            rule = Rule(limit=LIMIT)
            bench = Bench(target, store, counter, rule.prefix_tokens(counter))
            filled = prefill(store, counter)
            check_same_window(bench)
            print(f"\n## {backend}\n")
            print(
                f"Prefilled {SESSIONS:,} sessions {TIMES} {PREFILL} messages in {filled:.1f} s "
                f"(Store.append_turns, one transaction a session)."
            )
            warmup = WARMUP_PER_WORKER * WORKERS
            for r in range(ROUNDS):
                n = args.turns // ROUNDS + (1 if r < args.turns % ROUNDS else 0)
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    seed = SEED + 100 * MODES.index(mode) + 10 * r
                    run_round(
                        bench,
                        mode,
                        make_turns(n, seed, counter),
                        make_turns(warmup, seed + 5, counter),
                    )
            if args.profile:
                report["profile"], profiled = profile(bench, args.profile_turns)
            check = verify(bench)
        finally:
            engine.dispose()
    timed = sum(t.seconds for t in bench.results.values())
    print(
        f"\n{args.turns:,} timed turns a mode in {ROUNDS} rounds ({timed:.1f} s of timing), "
        f"{WORKERS} workers, after {warmup} warm-up turns a round:\n"
    )
    print(table(bench, check))
    for mode, tally in bench.results.items():
        for error, n in tally.errors.most_common():
            print(f"\n{mode}: {n} {TIMES} {error}")
        for error, n in tally.retried.most_common():
            print(f"\n{mode}: tokenmem retried {n} {TIMES} after {error} (warm-ups included)")
    print(
        "\nThis process's CPU time (all threads) per timed turn: "
        + ", ".join(
            f"{mode} {1e3 * t.cpu_seconds / max(1, len(t.samples)):.2f} ms"
            for mode, t in bench.results.items()
            if mode in MODES
        )
        + "."
    )
    print("\n" + "\n".join(check_lines(backend, check)))
    stale = sum(t.stale for t in bench.results.values())
    print(f"  Timed loads without the exchange their own turn had just saved: {stale}.")
    print(f"\n{goal_line(backend, bench, check)}")
    if profiled:
        print("\n" + "\n".join(profiled))
    report.update(
        prefill_seconds=filled,
        check={**check.__dict__, "ok": check.ok},
        modes={
            mode: {
                **(summary(t) if t.samples else {}),
                "seconds": t.seconds,
                "saved": len(t.saved),
                "errors": dict(t.errors),
                "stale": t.stale,
                "cpu_seconds": t.cpu_seconds,
                "retried": dict(t.retried),
                "samples_ns": t.samples,
            }
            for mode, t in bench.results.items()
        },
        seconds=time.perf_counter() - started,
    )
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="repeatable; default: both"
    )
    parser.add_argument("--turns", type=int, help=f"timed turns per mode (default {TURNS:,})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TURNS} turns per mode")
    parser.add_argument("--profile", action="store_true", help="then profile single-threaded turns")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the raw numbers here")
    args = parser.parse_args(argv)
    args.backends = args.backend or list(BACKENDS)
    if args.turns is None:
        args.turns = QUICK_TURNS if args.quick else TURNS
    if args.turns < ROUNDS:
        parser.error(f"--turns must be at least {ROUNDS}")
    args.profile_turns = QUICK_PROFILE_TURNS if args.quick else PROFILE_TURNS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    digest = source_digest()
    print(
        f"# Load: {WORKERS} workers, save-then-load turns on {SESSIONS:,} sessions "
        f"({LIMIT:,}-token window, text mode, {ENCODING})\n\n"
        f"tokenmem sources {digest}, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, psycopg {psycopg.__version__}, {os.cpu_count()} CPUs; "
        f"pools: pool_size={POOL_SIZE}, max_overflow={MAX_OVERFLOW}, no pre-ping"
    )
    reports = [run_backend(backend, args) for backend in args.backends]
    total = time.perf_counter() - started
    print(f"\nTotal run time: {total:.0f} s.")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"source_digest": digest, "total_seconds": total, "backends": reports}, indent=1
            )
        )
    ok = all(r["check"]["ok"] for r in reports)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
