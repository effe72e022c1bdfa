"""Turns per second and the latency of a turn under load, beside the bare driver.

A *turn* is what a chat service does per request: a new
``ConversationTokenBufferMemory`` for the session, ``save_context`` of the
exchange, then ``load_memory_variables({})`` (2,000-token window, text mode,
o200k_base). 32 workers run turns on 1,000 sessions drawn at random, each
prefilled with 64 messages so that every window is full. Four modes, on the
same database: tokenmem from 32 threads sharing a ``Store`` and from 32 asyncio
tasks sharing an ``AsyncStore`` (``pool_size=32, max_overflow=0``), each beside
the bare driver of its concurrency model (sqlite3 / psycopg from 32 threads,
aiosqlite / psycopg's ``AsyncConnection`` from 32 tasks, a connection each)
running tokenmem's own statements (``common.TurnSQL``, checked against what
both stores send) with the token counts computed beforehand.

Each mode runs ``--turns`` timed turns in two rounds, the modes in order A B C D
then D C B A so that drift on a shared machine hits them alike, each round
after 8 untimed turns a worker; turns/s is timed turns over the rounds' wall
time, and each p50 is divided by its own model's bare driver (goal: at most
2x). Then single-threaded turns, tokenmem's and the bare driver's alternately,
give each one's CPU time (``time.process_time``, SQLite's own work included;
goal: at most 1.5x). Then nothing may be lost: per session, positions gapless
and agreeing with the session's counters, each exchange human-then-ai in one
turn, ``cum_floor`` the running sum of floors, every exchange a worker saved
found once in its own session (*lost* counts those that are not) and nothing
that no worker saved. Run from the repository root::

    .venv/bin/python benchmarks/load.py    # both backends: about a minute on two cores
    .venv/bin/python benchmarks/load.py --backend sqlite --quick --json /tmp/load.json

PostgreSQL comes from ``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), in a fresh schema.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import os
import random
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import psycopg
from common import TIMES
from sqlalchemy import select

from tokenmem import ConversationTokenBufferMemory, Message, Rule, Store, TokenCounter
from tokenmem.aio import AsyncStore, make_async_engine
from tokenmem.engine import make_engine
from tokenmem.models import MESSAGES, SESSIONS, session_uuid
from tokenmem.window import Counts, count_message

SESSIONS_N, PREFILL, WORKERS, LIMIT = 1_000, 64, 32, 2_000
TURNS, QUICK_TURNS, SINGLE, QUICK_SINGLE = 3_000, 600, 500, 200
ROUNDS, WARMUP, SEED = 2, 8, 20_241_130
GOAL_P50, GOAL_CPU = 2.0, 1.5
POOL = {"pool_size": WORKERS, "max_overflow": 0}
BARE, THREADS = f"bare driver, {WORKERS} threads", f"tokenmem, {WORKERS} threads"
ABARE, TASKS = f"bare driver, {WORKERS} asyncio tasks", f"tokenmem, {WORKERS} asyncio tasks"
MODES = (BARE, THREADS, ABARE, TASKS)
BASELINE = {BARE: BARE, THREADS: BARE, ABARE: ABARE, TASKS: ABARE}


@dataclass(frozen=True)
class Exchange:
    """What a turn saves, where, with the bare driver's token counts."""

    name: str
    sid: uuid.UUID
    texts: tuple[str, str]
    counts: tuple[Counts, Counts]


def exchanges(n: int, seed: int, counter: TokenCounter) -> list[Exchange]:
    rng, out = random.Random(seed), []
    for _ in range(n):
        name = f"load-{rng.randrange(SESSIONS_N):04d}"
        h, a = (common.sentence_text(rng, rng.randint(8, 48)) for _ in "ha")
        counts = (count_message(counter, "human", h, None), count_message(counter, "ai", a, None))
        out.append(Exchange(name, session_uuid(common.OWNER, name), (h, a), counts))
    return out


def new_memory(store: Store | AsyncStore, name: str) -> ConversationTokenBufferMemory:
    return ConversationTokenBufferMemory(
        store=store, session_id=name, max_token_limit=LIMIT, encoding=common.ENCODING
    )


class Memory:
    """tokenmem's turn: a new memory on the shared store, save, then load."""

    def __init__(self, store: Store | AsyncStore) -> None:
        self.store = store

    def save(self, ex: Exchange) -> None:
        self.memory = new_memory(self.store, ex.name)
        self.memory.save_context({"input": ex.texts[0]}, {"output": ex.texts[1]})

    def load(self, ex: Exchange) -> str:
        return str(self.memory.load_memory_variables({})["history"])

    async def asave(self, ex: Exchange) -> None:
        self.memory = new_memory(self.store, ex.name)
        await self.memory.asave_context({"input": ex.texts[0]}, {"output": ex.texts[1]})

    async def aload(self, ex: Exchange) -> str:
        return str((await self.memory.aload_memory_variables({}))["history"])


class Bare:
    """The same turn on a bare connection: sqlite3 or psycopg (save, load),
    aiosqlite or psycopg's AsyncConnection (asave, aload)."""

    def __init__(self, sql: common.TurnSQL, conn: Any) -> None:
        self.sql, self.conn = sql, conn

    def save(self, ex: Exchange) -> None:
        p = self.sql.upsert_params(ex.sid, ex.name, ex.counts)
        try:
            (row,) = self.conn.execute(self.sql.upsert, p).fetchall()
            rows = self.sql.insert_params(p, row, ex.texts, ex.counts)
            with contextlib.closing(self.conn.cursor()) as cursor:
                cursor.executemany(self.sql.append, self.sql.append_params(rows))
            if self.sql.head is not None:
                self.conn.execute(self.sql.head, self.sql.head_params(p, rows))
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise

    def load(self, ex: Exchange) -> list[str]:
        rows = self.conn.execute(self.sql.window, self.sql.load_params(ex.sid)).fetchall()
        self.conn.commit()
        return [row[3] for row in rows]

    async def asave(self, ex: Exchange) -> None:
        p = self.sql.upsert_params(ex.sid, ex.name, ex.counts)
        try:
            (row,) = await (await self.conn.execute(self.sql.upsert, p)).fetchall()
            rows = self.sql.insert_params(p, row, ex.texts, ex.counts)
            cursor = self.conn.cursor()  # aiosqlite's is awaited, psycopg's is not
            cursor = await cursor if inspect.isawaitable(cursor) else cursor
            await cursor.executemany(self.sql.append, self.sql.append_params(rows))
            await cursor.close()
            if self.sql.head is not None:
                await self.conn.execute(self.sql.head, self.sql.head_params(p, rows))
            await self.conn.commit()
        except BaseException:
            await self.conn.rollback()
            raise

    async def aload(self, ex: Exchange) -> list[str]:
        cursor = await self.conn.execute(self.sql.window, self.sql.load_params(ex.sid))
        rows = await cursor.fetchall()
        await self.conn.commit()
        return [row[3] for row in rows]


@dataclass
class Tally:
    """What some turns did: their times (ns), the exchanges saved, errors."""

    samples: list[int] = field(default_factory=list)
    saved: list[Exchange] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    stale: int = 0  # loads without the exchange their own turn had just saved
    seconds: float = 0.0

    def add(self, other: Tally, *, timed: bool = True) -> None:
        self.saved += other.saved
        self.errors += other.errors
        if timed:
            self.samples += other.samples
            self.stale += other.stale
            self.seconds += other.seconds

    def failed(self, exc: Exception) -> None:
        self.errors[f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"] += 1


def run_turn(worker: Memory | Bare, ex: Exchange, tally: Tally) -> None:
    t0 = time.perf_counter_ns()
    try:
        worker.save(ex)
        tally.saved.append(ex)
        loaded = worker.load(ex)
        tally.samples.append(time.perf_counter_ns() - t0)
        tally.stale += ex.texts[1] not in loaded
    except Exception as exc:
        tally.failed(exc)


async def arun_turn(worker: Memory | Bare, ex: Exchange, tally: Tally) -> None:
    t0 = time.perf_counter_ns()
    try:
        await worker.asave(ex)
        tally.saved.append(ex)
        loaded = await worker.aload(ex)
        tally.samples.append(time.perf_counter_ns() - t0)
        tally.stale += ex.texts[1] not in loaded
    except Exception as exc:
        tally.failed(exc)


def thread_phase(workers: Sequence[Memory | Bare], todo: Sequence[Exchange]) -> Tally:
    """``todo`` on a thread per worker, each taking the next exchange when done
    with its last; the wall time is until the last one finishes."""
    source, lock, total = iter(todo), threading.Lock(), Tally()

    def loop(worker: Memory | Bare) -> None:
        mine = Tally()
        while True:
            with lock:
                ex = next(source, None)
            if ex is None:
                break
            run_turn(worker, ex, mine)
        with lock:
            total.add(mine)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total.seconds = time.perf_counter() - t0
    return total


async def task_phase(workers: Sequence[Memory | Bare], todo: Sequence[Exchange]) -> Tally:
    """:func:`thread_phase` with an asyncio task per worker."""
    source, total = iter(todo), Tally()

    async def loop(worker: Memory | Bare) -> None:
        while (ex := next(source, None)) is not None:
            await arun_turn(worker, ex, total)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in workers))
    total.seconds = time.perf_counter() - t0
    return total


@dataclass
class Bench:
    """One backend: its database, the shared store, the bare SQL, the tallies."""

    url: str
    store: Store
    sql: common.TurnSQL
    counter: TokenCounter
    tallies: dict[str, Tally] = field(default_factory=dict)

    def tally(self, mode: str) -> Tally:
        return self.tallies.setdefault(mode, Tally())

    def bare(self) -> Bare:
        return Bare(self.sql, common.connect(self.url))

    def run(self, mode: str, todo: list[Exchange], warmup: list[Exchange]) -> None:
        """Warm up, then time ``todo`` in ``mode``."""
        if mode in (ABARE, TASKS):
            warm, timed = asyncio.run(self.arun(mode, todo, warmup))
        else:
            new = (lambda: Memory(self.store)) if mode == THREADS else self.bare
            workers = [new() for _ in range(WORKERS)]
            warm, timed = thread_phase(workers, warmup), thread_phase(workers, todo)
            for w in workers:
                if isinstance(w, Bare):
                    w.conn.close()
            self.store.close()  # PostgreSQL has 100 connections to go round
        self.tally(mode).add(warm, timed=False)
        self.tally(mode).add(timed)

    async def arun(self, mode: str, todo: list[Exchange], warmup: list[Exchange]) -> Any:
        if mode == TASKS:
            store = AsyncStore(self.url, engine_options=POOL)
            workers = [Memory(store) for _ in range(WORKERS)]
            result = await task_phase(workers, warmup), await task_phase(workers, todo)
            await store.close()
            return result
        bare = [Bare(self.sql, await common.aconnect(self.url)) for _ in range(WORKERS)]
        result = await task_phase(bare, warmup), await task_phase(bare, todo)
        for w in bare:
            await w.conn.close()
        return result


def single_thread(b: Bench, n: int) -> dict[str, float]:
    """Turns one at a time, tokenmem's and the bare driver's alternately (which
    goes first alternating too): each one's CPU time per turn and median turn."""
    bare = b.bare()
    workers: dict[str, Memory | Bare] = {THREADS: Memory(b.store), BARE: bare}
    timed, cpu = {THREADS: Tally(), BARE: Tally()}, {THREADS: 0.0, BARE: 0.0}
    todo = {m: exchanges(WARMUP + n, SEED + 7_000 + k, b.counter) for k, m in enumerate(cpu)}
    for i in range(WARMUP + n):
        for mode in (THREADS, BARE) if i % 2 else (BARE, THREADS):
            one, c0 = Tally(), time.process_time()
            run_turn(workers[mode], todo[mode][i], one)
            cpu[mode] += (time.process_time() - c0) * (i >= WARMUP)
            timed[mode].add(one, timed=i >= WARMUP)
    bare.conn.close()
    for tally in timed.values():
        if tally.errors:
            raise RuntimeError(f"single-threaded turns failed: {dict(tally.errors)}")
        b.tally("single-threaded").add(tally, timed=False)
    ms = {m: 1e3 * cpu[m] / n for m in cpu}
    return {
        "tokenmem_cpu_ms": ms[THREADS],
        "bare_cpu_ms": ms[BARE],
        "cpu_ratio": ms[THREADS] / ms[BARE],
        "tokenmem_p50_ms": common.median_ms(timed[THREADS].samples),
        "bare_p50_ms": common.median_ms(timed[BARE].samples),
    }


def check_baseline(b: Bench) -> None:
    """The bare driver must send what both stores send and read the window the
    memory renders. The stores listened to are throwaway ones on engines passed
    in, where every statement goes through ``Connection.execute`` and listeners
    see it; the timed stores made their engines and run the same compiled
    statements on the DBAPI cursor (tokenmem/direct.py)."""
    probe, ex = Store(make_engine(b.url)), exchanges(2, SEED + 9_000, b.counter)
    probe.check()  # its one-off look at the schema, before listening
    with common.statements_sent(probe.engine) as sent:
        run_turn(Memory(probe), ex[0], b.tally("checks"))
    probe.close()
    common.same_sql(sent, b.sql, "Store")

    async def async_probe() -> list[tuple[str, Any]]:
        astore = AsyncStore(make_async_engine(b.url))
        await astore.check()
        with common.statements_sent(astore.engine.sync_engine) as sent:
            await arun_turn(Memory(astore), ex[1], b.tally("checks"))
        await astore.close()
        return sent

    common.same_sql(asyncio.run(async_probe()), b.sql, "AsyncStore")
    if b.tally("checks").errors:
        raise RuntimeError(f"a turn failed: {dict(b.tally('checks').errors)}")
    conn = common.connect(b.url)
    for i in range(0, SESSIONS_N, SESSIONS_N // 5):
        name = f"load-{i:04d}"
        rows = conn.execute(b.sql.window, b.sql.load_params(session_uuid(common.OWNER, name)))
        lines = "\n".join(f"{'Human' if r[2] == 'human' else 'AI'}: {r[3]}" for r in rows)
        if not lines or lines != new_memory(b.store, name).load_memory_variables({})["history"]:
            raise RuntimeError(f"{name}: the bare driver's window is not the memory's")
        conn.commit()
    conn.close()


def verify(b: Bench) -> dict[str, Any]:
    """Compare the database with what the workers report having saved."""
    with b.store.engine.connect() as conn:
        heads = {r.id: r for r in conn.execute(select(SESSIONS))}
        m = MESSAGES.c
        rows = conn.execute(select(MESSAGES).order_by(m.session_id, m.position)).all()
    saved = Counter(ex.name for tally in b.tallies.values() for ex in tally.saved)
    sessions, bad, found = 0, [], Counter[tuple[str, str, str]]()
    for sid, group in itertools.groupby(rows, key=lambda r: r.session_id):
        msgs, head, floor, sessions = list(group), heads[sid], 0, sessions + 1
        ok = len(msgs) == head.next_position == 2 * head.next_turn == PREFILL + 2 * saved[head.name]
        for i, r in enumerate(msgs):
            ok = ok and (r.position, r.turn, r.role) == (i, i // 2, ("human", "ai")[i % 2])
            ok = ok and r.cum_floor == floor
            newline = 1 if r.newline_tokens is None else r.newline_tokens
            floor += Counts(r.text_tokens, r.chat_tokens, newline).floor
        if not ok or floor != head.floor_total:
            bad.append(head.name)
        # (an odd message out already makes the session bad)
        for h, a in zip(msgs[PREFILL::2], msgs[PREFILL + 1 :: 2], strict=False):
            found[(head.name, h.content, a.content)] += 1
    lost = dict.fromkeys(b.tallies, 0)
    for mode, tally in b.tallies.items():
        for ex in tally.saved:
            key = (ex.name, *ex.texts)
            if found[key]:
                found[key] -= 1
            else:
                lost[mode] += 1
    unmatched = sum(found.values())
    ok = sessions == len(heads) == SESSIONS_N and not (bad or unmatched or any(lost.values()))
    return {"ok": ok, "messages": len(rows), "bad_sessions": bad, "lost": lost} | {
        "unmatched": unmatched
    }


def summary(t: Tally, baseline: Tally) -> dict[str, Any]:
    p50 = common.percentile_ms(t.samples, 50)
    return {
        "turns_per_s": len(t.samples) / t.seconds,
        "p50_ms": p50,
        "p99_ms": common.percentile_ms(t.samples, 99),
        "p50_ratio": p50 / common.percentile_ms(baseline.samples, 50),
        "stale": t.stale,
        "errors": dict(t.errors),
        "turn_ns": t.samples,
    }


def prefill(store: Store, counter: TokenCounter) -> None:
    for i in range(SESSIONS_N):
        rng = random.Random(SEED + i)
        texts = [common.sentence_text(rng, rng.randint(8, 48)) for _ in range(PREFILL)]
        pairs = zip(texts[::2], texts[1::2], strict=True)
        turns = [[Message("human", h), Message("ai", a)] for h, a in pairs]
        store.append_turns(f"load-{i:04d}", turns, counter)


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    counter, started = TokenCounter(common.ENCODING), time.perf_counter()
    with common.database(backend, "load") as url:
        store = Store(url, engine_options=POOL)
        store.upgrade()
        prefill(store, counter)
        b = Bench(url, store, common.TurnSQL(backend, Rule(limit=LIMIT), counter), counter)
        check_baseline(b)
        for r in range(ROUNDS):
            n = args.turns // ROUNDS + (r < args.turns % ROUNDS)
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                seed = SEED + 100 * MODES.index(mode) + 10 * r
                warmup = exchanges(WARMUP * WORKERS, seed + 5, counter)
                b.run(mode, exchanges(n, seed, counter), warmup)
        single = single_thread(b, args.single)
        check = verify(b)
        store.close()
    modes = {mode: summary(b.tallies[mode], b.tallies[BASELINE[mode]]) for mode in MODES}
    errors = [f"{m}: {n} {TIMES} {e}" for m, t in b.tallies.items() for e, n in t.errors.items()]
    return {"backend": backend, "modes": modes, "single_thread": single, "check": check} | {
        "errors": errors,
        "seconds": time.perf_counter() - started,
    }


def show(r: dict[str, Any]) -> None:
    """Print one backend's results."""
    modes, single, check = r["modes"], r["single_thread"], r["check"]
    print(f"\n## {r['backend']}\n")
    print("| mode | turns/s | turn p50 (ms) | turn p99 (ms) | p50 ÷ bare driver | lost |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, s in modes.items():
        print(
            f"| {mode} | {s['turns_per_s']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {s['p50_ratio']:.2f}{TIMES} | {check['lost'][mode]} |"
        )
    print(
        f"\nSingle-threaded CPU time per turn: tokenmem {single['tokenmem_cpu_ms']:.3f} ms, bare "
        f"driver {single['bare_cpu_ms']:.3f} ms: {single['cpu_ratio']:.2f}{TIMES} (median turn "
        f"{single['tokenmem_p50_ms']:.3f} and {single['bare_p50_ms']:.3f} ms). Errors: "
        f"{'; '.join(r['errors']) or 'none'}. Loads missing their own turn's exchange: "
        f"{sum(s['stale'] for s in modes.values())}. Check: {check['messages']:,} messages, "
        f"sessions out of order {len(check['bad_sessions'])}, saved exchanges not found "
        f"{sum(check['lost'].values())}, found but saved by no one {check['unmatched']}."
    )
    met = {True: "met", False: "NOT met"}
    p50 = [(m, modes[m]["p50_ratio"]) for m in (THREADS, TASKS)]
    print(
        f"\nGoals ({r['backend']}): p50 within {GOAL_P50:g}{TIMES} of the bare driver: "
        + ", ".join(f"{m} {x:.2f}{TIMES} ({met[x <= GOAL_P50]})" for m, x in p50)
        + f"; single-threaded CPU per turn within {GOAL_CPU:g}{TIMES}: "
        f"{single['cpu_ratio']:.2f}{TIMES} ({met[single['cpu_ratio'] <= GOAL_CPU]}); "
        + ("nothing lost." if check["ok"] else "DATA LOST OR OUT OF PLACE.")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=common.BACKENDS, help="default: both")
    parser.add_argument("--turns", type=int, help=f"timed turns a mode (default {TURNS:,})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TURNS} turns a mode")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    args.turns = args.turns or (QUICK_TURNS if args.quick else TURNS)
    args.single = QUICK_SINGLE if args.quick else SINGLE
    if args.turns < ROUNDS:
        parser.error(f"--turns must be at least {ROUNDS}")
    digest = common.source_digest()
    versions = {"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version}
    versions |= {"psycopg": psycopg.__version__, "cpus": os.cpu_count(), "turns": args.turns}
    print(
        f"# Load: {WORKERS} workers, save-then-load turns on {SESSIONS_N:,} sessions, "
        f"{PREFILL} messages in each first ({LIMIT:,}-token window, text mode, "
        f"{common.ENCODING})\n\n"
        f"tokenmem sources {digest}, Python {versions['python']}, SQLite {versions['sqlite']}, "
        f"psycopg {versions['psycopg']}, {versions['cpus']} CPUs. "
        f"{args.turns:,} timed turns a mode in {ROUNDS} rounds, each after {WARMUP} warm-up "
        f"turns a worker; {args.single} single-threaded turns each. The bare driver sends the "
        "stores' statements and reads the memory's window (checked)."
    )
    reports = []
    for backend in args.backend or common.BACKENDS:
        reports.append(run_backend(backend, args))
        show(reports[-1])
    if args.json:
        args.json.write_text(json.dumps({"source_digest": digest, **versions, "backends": reports}))
    return 0 if all(r["check"]["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
