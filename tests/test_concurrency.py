"""Concurrent appends: nothing lost, nothing duplicated, every exchange adjacent.

Writers append exchanges to sessions at once, on SQLite and on PostgreSQL:

- 8 processes x 250 exchanges into one session, and into 8 sessions (one each);
  processes are spawned, not forked, and each builds its own :class:`Store`
  from the database URL, as a service's workers would;
- 8 threads x 50 exchanges sharing one :class:`Store`;
- 16 asyncio tasks x 25 exchanges through one :class:`AsyncStore`.

Every exchange carries a unique id (``w3-e17``) in its input and its output.
Afterwards each session's history must be exactly: positions 0..N-1, turns
0..N/2-1, human then ai at positions 2k and 2k+1 of turn k with the same
exchange id, every exchange of every writer once and in the order that writer
saved them. The session's counters (message count, next turn, floor total) and
each message's running ``cum_floor`` must agree with the rows, and each row's
token counts must be those of its own text.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import traceback
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from itertools import groupby
from multiprocessing import get_context
from multiprocessing.synchronize import Barrier

import pytest
from sqlalchemy import Engine, select

from tokenmem import ConversationTokenBufferMemory, Store, TokenCounter
from tokenmem.aio import AsyncStore
from tokenmem.models import MESSAGES, SESSIONS
from tokenmem.window import Counts

from .conftest import async_twin

ENCODING = "o200k_base"
PROCESSES, PROCESS_EXCHANGES = 8, 250
THREADS, THREAD_EXCHANGES = 8, 50
TASKS, TASK_EXCHANGES = 16, 25
# Only guards against a hung start (a worker that died before it); the
# database's own timeouts are left as the store sets them.
START_TIMEOUT = 120.0


def exchange(worker: int, i: int) -> tuple[dict[str, str], dict[str, str]]:
    """Exchange ``i`` of ``worker``: its id leads both texts; lengths vary so
    token counts (and the running floor totals) differ from row to row."""
    tag = f"w{worker}-e{i}"
    return (
        {"input": f"{tag} human asks" + " why" * (i % 5)},
        {"output": f"{tag} ai answers" + " because" * (i % 3)},
    )


def save_exchanges(memory: ConversationTokenBufferMemory, worker: int, count: int) -> None:
    for i in range(count):
        memory.save_context(*exchange(worker, i))


# --- checks ---------------------------------------------------------------------


def assert_session(
    store: Store, session_id: str, workers: Mapping[int, int], counter: TokenCounter
) -> None:
    """``session_id`` holds exactly ``workers[w]`` exchanges of each writer
    ``w``, gapless, adjacent and in each writer's order."""
    history = list(store.history(session_id))
    n = 2 * sum(workers.values())
    assert [m.position for m in history] == list(range(n))
    assert [m.turn for m in history] == [p // 2 for p in range(n)]
    assert [m.type for m in history] == ["human", "ai"] * (n // 2)
    saved: dict[int, list[int]] = defaultdict(list)
    for human, ai in zip(history[::2], history[1::2], strict=True):
        worker, _, i = human.content.split()[0][1:].partition("-e")
        inputs, outputs = exchange(int(worker), int(i))
        assert (human.content, ai.content) == (inputs["input"], outputs["output"])
        saved[int(worker)].append(int(i))
    assert saved == {w: list(range(count)) for w, count in workers.items()}
    if len(workers) > 1:
        # The writers did race: their exchanges interleave (runs of one writer's
        # exchanges outnumber the writers), else the checks above prove little.
        order = [human.content.partition("-")[0] for human in history[::2]]
        assert len(list(groupby(order))) > len(workers)
    for m in history:
        assert m.encoding == ENCODING
        assert m.text_tokens == counter.count(" " + m.content), m.position
        assert m.newline_tokens == counter.count(f" {m.content}\n") - m.text_tokens


def assert_counters(store: Store, sessions: Mapping[str, int]) -> None:
    """The sessions' counters agree with their rows: ``sessions`` maps each
    session to its number of messages, all exchanges of two."""
    assert {s.session_id: s.next_position for s in store.sessions()} == sessions
    assert store.count() == sum(sessions.values())
    s, m = SESSIONS.c, MESSAGES.c
    with store.engine.connect() as conn:
        for name, messages in sessions.items():
            session = conn.execute(
                select(s.id, s.next_position, s.next_turn, s.floor_total).where(s.name == name)
            ).one()
            assert (session.next_position, session.next_turn) == (messages, messages // 2)
            rows = conn.execute(
                select(m.text_tokens, m.chat_tokens, m.newline_tokens, m.cum_floor)
                .where(m.session_id == session.id)
                .order_by(m.position)
            ).all()
            cum = 0
            for position, row in enumerate(rows):
                assert row.cum_floor == cum, (name, position)
                cum += Counts(row.text_tokens, row.chat_tokens, row.newline_tokens).floor
            assert session.floor_total == cum, name


# --- processes ------------------------------------------------------------------

_start: Barrier | None = None


def _init_worker(start: Barrier) -> None:
    global _start
    _start = start
    TokenCounter(ENCODING).count("warm")  # load the encoding before any start


def _process_writer(url: str, session_id: str, worker: int, count: int) -> list[str]:
    """In a spawned process: save ``count`` exchanges through a store of its
    own, starting with the others. Return what went wrong, as text (an
    exception may not survive pickling): a traceback, or the warnings raised."""
    assert _start is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _write(_start, url, session_id, worker, count)
        except BaseException:
            _start.abort()  # the others stop waiting for this one
            return [traceback.format_exc()]
        gc.collect()  # an engine left open would warn now
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def _write(start: Barrier, url: str, session_id: str, worker: int, count: int) -> None:
    store = Store(url)
    try:
        memory = ConversationTokenBufferMemory(
            store=store, session_id=session_id, encoding=ENCODING
        )
        start.wait(START_TIMEOUT)
        save_exchanges(memory, worker, count)
    finally:
        store.engine.dispose()


def _spawned() -> None:
    assert _start is not None
    _start.wait(START_TIMEOUT)


class Writers:
    """``PROCESSES`` spawned processes, started once for the module: each
    spawn imports tokenmem and loads the encoding, seconds on two cores."""

    def __init__(self, pool: ProcessPoolExecutor, start: Barrier) -> None:
        self.pool, self.start = pool, start

    def run(self, url: str, sessions: list[str], count: int) -> None:
        """Process ``w`` saves ``count`` exchanges into ``sessions[w]``, all
        starting at once. A process blocks at the start until every one holds
        a task, so each takes exactly one."""
        assert len(sessions) == PROCESSES
        self.start.reset()
        futures = [
            self.pool.submit(_process_writer, url, session, worker, count)
            for worker, session in enumerate(sessions)
        ]
        problems = [f"process {w}: {p}" for w, f in enumerate(futures) for p in f.result()]
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def writers() -> Iterator[Writers]:
    context = get_context("spawn")
    start = context.Barrier(PROCESSES)
    with ProcessPoolExecutor(
        PROCESSES, mp_context=context, initializer=_init_worker, initargs=(start,)
    ) as pool:
        # Spawn them all now (one process per pending task), before any test.
        for future in [pool.submit(_spawned) for _ in range(PROCESSES)]:
            future.result()
        yield Writers(pool, start)


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.mark.slow
def test_processes_into_one_session(
    writers: Writers, db: Engine, store: Store, o200k: TokenCounter
) -> None:
    writers.run(url_of(db), ["shared"] * PROCESSES, PROCESS_EXCHANGES)
    assert_session(store, "shared", dict.fromkeys(range(PROCESSES), PROCESS_EXCHANGES), o200k)
    assert_counters(store, {"shared": 2 * PROCESSES * PROCESS_EXCHANGES})


@pytest.mark.slow
def test_processes_into_own_sessions(
    writers: Writers, db: Engine, store: Store, o200k: TokenCounter
) -> None:
    sessions = [f"s{w}" for w in range(PROCESSES)]
    writers.run(url_of(db), sessions, PROCESS_EXCHANGES)
    for worker, session in enumerate(sessions):
        assert_session(store, session, {worker: PROCESS_EXCHANGES}, o200k)
    assert_counters(store, dict.fromkeys(sessions, 2 * PROCESS_EXCHANGES))


# --- threads and tasks ----------------------------------------------------------


def test_threads_sharing_one_store(store: Store, o200k: TokenCounter) -> None:
    start = threading.Barrier(THREADS)

    def writer(worker: int) -> None:
        memory = ConversationTokenBufferMemory(store=store, session_id="shared", encoding=ENCODING)
        start.wait(START_TIMEOUT)
        save_exchanges(memory, worker, THREAD_EXCHANGES)

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(writer, worker) for worker in range(THREADS)]
        for future in futures:
            future.result()
    assert_session(store, "shared", dict.fromkeys(range(THREADS), THREAD_EXCHANGES), o200k)
    assert_counters(store, {"shared": 2 * THREADS * THREAD_EXCHANGES})


def test_async_tasks_sharing_one_store(db: Engine, store: Store, o200k: TokenCounter) -> None:
    async def writer(astore: AsyncStore, worker: int) -> None:
        memory = ConversationTokenBufferMemory(store=astore, session_id="shared", encoding=ENCODING)
        for i in range(TASK_EXCHANGES):
            await memory.asave_context(*exchange(worker, i))

    async def run() -> None:
        astore = AsyncStore(async_twin(db))
        try:
            await asyncio.gather(*(writer(astore, worker) for worker in range(TASKS)))
        finally:
            await astore.close()

    asyncio.run(run())
    assert_session(store, "shared", dict.fromkeys(range(TASKS), TASK_EXCHANGES), o200k)
    assert_counters(store, {"shared": 2 * TASKS * TASK_EXCHANGES})
