"""The async store and memory: same behaviour as the sync ones, same SQL."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from tokenmem import (
    ConfigurationError,
    ConversationTokenBufferMemory,
    InvalidInputError,
    Message,
    Rule,
    SessionNotFound,
    Store,
    TokenCounter,
)
from tokenmem.aio import AsyncStore

from .conftest import async_twin
from .openai_server import FakeOpenAI

EXCHANGES = [("hi", "whats up"), ("not much you", "not much"), ("你好", "最近怎么样")] * 4


def scrub(messages: list[Any]) -> list[dict[str, Any]]:
    # (the digest covers created_at: it differs as the times do)
    return [{**dataclasses.asdict(m), "created_at": None, "digest": None} for m in messages]


def sync_scenario(store: Store, counter: TokenCounter) -> dict[str, Any]:
    memory = ConversationTokenBufferMemory(
        store=store, session_id="s", max_token_limit=25, encoding=counter.encoding_name
    )
    for human, ai in EXCHANGES[:6]:
        memory.save_context({"input": human}, {"output": ai})
    memory.clear()
    for human, ai in EXCHANGES[6:]:
        memory.save_context({"input": human}, {"output": ai})
    store.append("s", [Message("system", "be brief", name="cfg")], counter, owner="alice")
    return {
        "text": memory.load_memory_variables({}),
        "messages": memory.buffer_as_messages,
        "window": store.window("s", Rule(limit=40, mode="messages"), counter),
        "history": scrub(list(store.history("s", page_size=5))),
        "alice": scrub(list(store.owner("alice").history("s"))),
        "sessions": [s.session_id for s in store.sessions()],
        "count": store.count(),
        "erased": store.erase("s", owner="alice"),
    }


async def async_scenario(store: AsyncStore, counter: TokenCounter) -> dict[str, Any]:
    memory = ConversationTokenBufferMemory(
        store=store, session_id="s", max_token_limit=25, encoding=counter.encoding_name
    )
    for human, ai in EXCHANGES[:6]:
        await memory.asave_context({"input": human}, {"output": ai})
    await memory.aclear()
    for human, ai in EXCHANGES[6:]:
        await memory.asave_context({"input": human}, {"output": ai})
    await store.append("s", [Message("system", "be brief", name="cfg")], counter, owner="alice")
    memory_messages = ConversationTokenBufferMemory(
        store=store,
        session_id="s",
        max_token_limit=25,
        return_messages=True,
        encoding=counter.encoding_name,
    )
    return {
        "text": await memory.aload_memory_variables({}),
        "messages": (await memory_messages.aload_memory_variables({}))["history"],
        "window": await store.window("s", Rule(limit=40, mode="messages"), counter),
        "history": scrub([m async for m in store.history("s", page_size=5)]),
        "alice": scrub([m async for m in store.owner("alice").history("s")]),
        "sessions": [s.session_id for s in await store.sessions()],
        "count": await store.count(),
        "erased": await store.erase("s", owner="alice"),
    }


def test_parity(db: Engine, o200k: TokenCounter, tmp_path: object) -> None:
    """The same scenario through both shells gives the same results."""
    sync_store = Store(db, upgrade=True)
    expected = sync_scenario(sync_store, o200k)
    sync_store.downgrade("base")

    async def run() -> dict[str, Any]:
        store = AsyncStore(async_twin(db))
        await store.upgrade()
        try:
            return await async_scenario(store, o200k)
        finally:
            await store.close()

    assert asyncio.run(run()) == expected
    assert expected["history"] and expected["text"]["history"]


def test_async_errors_and_sync_guard(db: Engine, o200k: TokenCounter) -> None:
    async def run() -> None:
        store = AsyncStore(async_twin(db))
        await store.upgrade()
        try:
            with pytest.raises(SessionNotFound):
                await store.history_page("missing")
            memory = ConversationTokenBufferMemory(store=store)
            with pytest.raises(ConfigurationError, match="AsyncStore"):
                memory.load_memory_variables({})
        finally:
            await store.close()

    asyncio.run(run())


ROUNDS, TASKS = 25, 12


@pytest.mark.slow
def test_cancelled_appends_leave_nothing_half_done(db: Engine, o200k: TokenCounter) -> None:
    """Concurrent appends, most cancelled at random points, on a small pool:
    each exchange is written whole or not at all, every connection comes
    back, and none is left holding a transaction (on SQLite that stalled
    every later append behind the write lock)."""

    async def run() -> tuple[int, int, list[list[str]]]:
        store = AsyncStore(async_twin(db, pool_size=3, max_overflow=0))
        await store.upgrade()
        rng, cancelled, n = random.Random(7), 0, 0
        try:
            for _ in range(ROUNDS):
                tasks = [
                    asyncio.ensure_future(
                        store.append(
                            f"c{j % 4}", [Message("human", f"h{n + j}"), Message("ai", "a")], o200k
                        )
                    )
                    for j in range(TASKS)
                ]
                n += TASKS
                await asyncio.sleep(rng.random() * 0.02)
                for task in tasks:
                    if rng.random() < 0.7:
                        task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                cancelled += sum(isinstance(r, asyncio.CancelledError) for r in results)
                assert not [r for r in results if isinstance(r, Exception)]
            pool = store.engine.sync_engine.pool
            checked_out = pool.checkedout()  # type: ignore[attr-defined]
            sessions = [
                [m.content for m in await store.history_page(f"c{j}", limit=1000)] for j in range(4)
            ]
            return cancelled, checked_out, sessions
        finally:
            await store.close()

    cancelled, checked_out, sessions = asyncio.run(asyncio.wait_for(run(), 120))
    assert cancelled > 0 and checked_out == 0
    saved = [c for contents in sessions for c in contents[::2]]
    for contents in sessions:
        assert contents[1::2] == ["a"] * (len(contents) // 2) and len(contents) % 2 == 0
    assert 0 < len(saved) < ROUNDS * TASKS


def test_async_methods_on_a_sync_store(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store)

    async def run() -> dict[str, Any]:
        await memory.asave_context({"input": "hi"}, {"output": "there"})
        return await memory.aload_memory_variables({})

    assert asyncio.run(run()) == {"history": "Human: hi\nAI: there"}


def test_work_runs_to_its_end_and_a_cancelled_caller_hears_so() -> None:
    """_to_completion: the work finishes even when its caller is cancelled,
    and that caller gets CancelledError whether the work returned or failed
    (a failed append is then not retried for a caller that is gone)."""
    from tokenmem.aio import _to_completion

    async def run() -> list[str]:
        done: list[str] = []

        async def work(outcome: str) -> str:
            await asyncio.sleep(0.02)
            done.append(outcome)
            if outcome == "fails":
                raise ValueError(outcome)
            return outcome

        for outcome in ("returns", "fails"):
            caller = asyncio.ensure_future(_to_completion(work(outcome)))
            await asyncio.sleep(0.005)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        assert await _to_completion(work("returns")) == "returns"
        with pytest.raises(ValueError):
            await _to_completion(work("fails"))
        return done

    assert asyncio.run(run()) == ["returns", "fails", "returns", "fails"]


def test_async_scopes_erasure_and_plan(db: Engine, o200k: TokenCounter) -> None:
    async def run() -> None:
        store = AsyncStore(async_twin(db))
        await store.upgrade()
        try:
            await store.append("S", [Message("human", "alice's secret")], o200k, owner="alice")
            await store.append("S", [Message("human", "default's")], o200k, owner="")
            bob = store.owner("bob")
            with pytest.raises(ConfigurationError, match="scoped to owner 'bob'"):
                bob.owner("alice")
            with pytest.raises(ConfigurationError, match="scoped to owner 'bob'"):
                memory = ConversationTokenBufferMemory(store=bob, owner="alice", session_id="S")
                await memory.aload_memory_variables({})
            with pytest.raises(ConfigurationError, match="owner"):
                await store.erase_owner(None)
            with pytest.raises(ConfigurationError, match="owner"):
                await store.prune(timedelta(0))
            assert await store.count(all_owners=True) == 2

            await store.align("T", 5, 2)
            stored = await store.append("T", [Message("human", "x")], o200k)
            assert (stored[0].position, stored[0].turn) == (5, 2)
            plan = await store.explain_window("T", Rule(limit=100), o200k)
            sync_plan = Store(db).explain_window("T", Rule(limit=100), o200k)
            assert plan and plan == sync_plan
        finally:
            await store.close()

    asyncio.run(run())


class _FakeFastAPI:
    """Enough of FastAPI to run the README's service (fastapi is not a
    dependency): routes are plain functions, Depends gives the default."""

    class HTTPException(Exception):
        def __init__(self, status_code: int, detail: str = "") -> None:
            super().__init__(status_code, detail)
            self.status_code = status_code

    class FastAPI:
        def __init__(self, lifespan: Any = None) -> None:
            self.lifespan = lifespan
            self.routes: dict[tuple[str, str], Any] = {}

        def _route(self, method: str, path: str) -> Any:
            def add(f: Any) -> Any:
                self.routes[method, path] = f
                return f

            return add

        def post(self, path: str) -> Any:
            return self._route("POST", path)

        def delete(self, path: str) -> Any:
            return self._route("DELETE", path)

    @staticmethod
    def Depends(dependency: Any) -> Any:
        return dependency


def test_the_readme_service_example(
    db: Engine,
    openai_server: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's "Multi-user services" block, as written: it migrates its
    database at startup, its authentication stub refuses, a user's chat and
    erasure stay within that user, and no user (None) erases nothing."""
    import re
    import sys
    import types
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Multi-user services") :]
    code = re.search(r"```python\n(.*?)^```", section, re.S | re.M)
    assert code is not None
    example = 'AsyncStore("postgresql+psycopg://app@db/app")'
    assert example in code.group(1)
    url = db.url.render_as_string(hide_password=False)
    fastapi = types.ModuleType("fastapi")
    for name in ("FastAPI", "HTTPException", "Depends"):
        setattr(fastapi, name, getattr(_FakeFastAPI, name))
    monkeypatch.setitem(sys.modules, "fastapi", fastapi)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    scope: dict[str, Any] = {}
    exec(code.group(1).replace(example, f"AsyncStore({url!r})"), scope)
    app, current_user = scope["app"], scope["current_user"]
    chat, forget_me = app.routes["POST", "/chat/{session_id}"], app.routes["DELETE", "/me"]

    async def run() -> None:
        with pytest.raises(_FakeFastAPI.HTTPException) as refused:
            current_user()
        assert refused.value.status_code == 401
        async with app.lifespan(app):  # startup migrates the (fresh) database
            store = scope["store"]
            openai_server.reply("hello alice", "hello default")
            assert await chat("chat-1", "hi", user="alice") == {"reply": "hello alice"}
            await store.append(
                "chat-1", [Message("human", "default's")], TokenCounter("o200k_base"), owner=""
            )
            with pytest.raises(InvalidInputError, match="owner"):
                await forget_me(user=None)  # a stub that returned None: nothing erased
            assert await store.count(owner="") == 1
            assert await forget_me(user="alice") == {"messages": 2}
            assert await store.count(owner="") == 1 and await store.count(owner="alice") == 0

    asyncio.run(run())
