"""The hot statements on the DBAPI cursor (tokenmem/direct.py) behave as
``Connection.execute`` would: same rows written, same errors, lost
connections invalidated and retried."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import bindparam, event, insert, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError, OperationalError

from tokenmem import (
    ConversationTokenBufferMemory,
    InvalidInputError,
    Message,
    Store,
    StoredMessage,
    TokenCounter,
)
from tokenmem.aio import AsyncStore
from tokenmem.direct import Direct, RawConnection
from tokenmem.models import MESSAGES, SESSIONS, UTCDateTime, session_uuid
from tokenmem.store import make_engine

from .conftest import _pg_admin, async_twin, fresh_engine


def test_direct_writes_what_core_writes(store: Store, o200k: TokenCounter) -> None:
    store.append("s", [Message("human", "x")], o200k)
    row = {
        "session_id": session_uuid("", "s"),
        "turn": 9,
        "role": "ai",
        "content": "héllo 你好",
        "name": "bot",
        "metadata": {"k": [1, "二", None]},
        "created_at": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc),
        "encoding": "o200k_base",
        "text_tokens": 3,
        "newline_tokens": 0,
        "chat_tokens": 5,
        "cum_floor": 7,
    }
    with store.engine.begin() as conn:
        Direct(insert(MESSAGES)).run(conn, [{**row, "position": 10}])
        conn.execute(insert(MESSAGES), {**row, "position": 11})
        raw = conn.execute(
            text("SELECT * FROM tokenmem_messages WHERE position IN (10, 11) ORDER BY position")
        ).all()
    assert raw[0][2:] == raw[1][2:] and raw[0][0] == raw[1][0]
    assert [m.metadata for m in store.history("s")][1:] == [row["metadata"]] * 2


def test_errors_are_sqlalchemy_errors(store: Store, o200k: TokenCounter) -> None:
    store.append("s", [Message("human", "x")], o200k)
    row = {c.key: None for c in MESSAGES.c} | {"session_id": session_uuid("", "s")}
    with store.engine.connect() as conn, pytest.raises(IntegrityError) as info:
        Direct(insert(MESSAGES)).run(conn, {**row, "position": 0})
    assert info.value.orig is not None and "INSERT INTO tokenmem_messages" in str(info.value)


def test_raw_connection_is_one_transaction(store: Store, o200k: TokenCounter) -> None:
    """Direct and Core statements on a RawConnection share one transaction:
    committed together, or rolled back together when it closes uncommitted."""
    store.append("s", [Message("human", "x")], o200k)
    row = {c.key: None for c in MESSAGES.c} | {
        "session_id": session_uuid("", "s"),
        "turn": 1,
        "role": "ai",
        "content": "y",
        "created_at": datetime(2026, 1, 2, tzinfo=timezone.utc),
        "encoding": "o200k_base",
        "text_tokens": 1,
        "chat_tokens": 1,
        "cum_floor": 1,
    }
    for commit in (False, True):
        with RawConnection(store.engine) as conn:
            Direct(insert(MESSAGES)).run(conn, {**row, "position": 1})
            conn.execute(insert(MESSAGES), {**row, "position": 2})
            if commit:
                conn.commit()
        assert len(list(store.history("s"))) == (3 if commit else 1)
    with RawConnection(store.engine) as conn, pytest.raises(IntegrityError) as info:
        Direct(insert(MESSAGES)).run(conn, {**row, "position": 1})
    assert "INSERT INTO tokenmem_messages" in str(info.value)
    assert store.engine.pool.checkedout() == 0


def test_raw_connection_to_nowhere_is_a_sqlalchemy_error() -> None:
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(OperationalError):
        RawConnection(engine)
    engine.dispose()


def test_errors_hide_parameters_when_asked(tmp_path: Path, o200k: TokenCounter) -> None:
    store = Store(make_engine(f"sqlite:///{tmp_path}/h.sqlite3", hide_parameters=True))
    store.upgrade()
    store.append("s", [Message("human", "x")], o200k)
    row = {c.key: None for c in MESSAGES.c} | {"session_id": session_uuid("", "s")}
    with store.engine.connect() as conn, pytest.raises(IntegrityError) as info:
        Direct(insert(MESSAGES)).run(conn, {**row, "position": 0, "content": "SECRET"})
    assert "SECRET" not in str(info.value)


def test_naive_timestamps_are_bad_input(store: Store, o200k: TokenCounter) -> None:
    naive = StoredMessage("human", "x", created_at=datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="timezone-aware"):
        store.append("s", [naive], o200k)


def test_statements_needing_execution_time_defaults_are_refused(store: Store) -> None:
    with pytest.raises(TypeError, match="not a direct statement"):
        # next_position and the other counters would take their Python-side defaults
        Direct(insert(SESSIONS).values(id=bindparam("x"))).compiled(store.engine.dialect)


def test_a_dropped_connection_is_retried(
    tmp_path: Path, o200k: TokenCounter, caplog: pytest.LogCaptureFixture
) -> None:
    """A pooled connection whose server went away fails its first (direct)
    statement; the store invalidates it and runs the append again."""
    with fresh_engine("postgresql", tmp_path) as engine:
        # More pooled connections than retries: after a server restart all of
        # them are dead, and the first failure must invalidate the whole pool.
        store = Store(make_engine(str(engine.url.render_as_string(False)), pool_size=10))
        store.upgrade()
        store.append("s", [Message("human", "before")], o200k)
        held = [store.engine.connect() for _ in range(10)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in held]
        for c in held:
            c.close()
        admin = _pg_admin()
        with admin.begin() as conn:
            for pid in pids:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.dispose()
        caplog.set_level(logging.INFO, "tokenmem.store")
        store.append("s", [Message("human", "after")], o200k)
        assert [m.content for m in store.history("s")] == ["before", "after"]
        assert "retrying a transaction (attempt 2)" in caplog.text
        caplog.clear()

        async def async_turns() -> list[str]:
            astore = AsyncStore(async_twin(engine))
            await astore.append("a", [Message("human", "before")], o200k)
            async with astore.engine.connect() as conn:
                apid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            admin = _pg_admin()
            with admin.begin() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": apid})
            admin.dispose()
            await astore.append("a", [Message("human", "after")], o200k)
            contents = [m.content for m in await astore.history_page("a")]
            await astore.dispose()
            return contents

        assert asyncio.run(async_turns()) == ["before", "after"]
        assert "retrying a transaction (attempt 2)" in caplog.text
        store.engine.dispose()


def test_watched_engines_see_every_statement(store: Store, o200k: TokenCounter) -> None:
    """With an event listener (a tracer, a logger) the hot statements go
    through SQLAlchemy's execution, so the listener sees them."""
    seen: list[str] = []

    def record(*args: object) -> None:
        seen.append(str(args[2]))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        memory = ConversationTokenBufferMemory(store=store, session_id="w", max_token_limit=50)
        memory.save_context({"input": "hi"}, {"output": "there"})
        assert memory.load_memory_variables({}) == {"history": "Human: hi\nAI: there"}
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    assert any(s.startswith("INSERT INTO tokenmem_sessions") for s in seen)
    assert any(s.startswith("INSERT INTO tokenmem_messages") for s in seen)
    assert any(" OVER " in s for s in seen)
    seen.clear()
    memory.save_context({"input": "unwatched"}, {"output": "fast"})
    assert seen == []


def test_sql_logging_sees_every_statement(
    store: Store, o200k: TokenCounter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sqlalchemy.engine")
    store.append("logged", [Message("human", "hi")], o200k)
    assert "INSERT INTO tokenmem_messages" in caplog.text


def test_sqlite_timestamps_are_sqlalchemys_text() -> None:
    """UTCDateTime writes SQLite's DATETIME text itself (one C call); it must
    be what SQLAlchemy's own processor writes, so that old rows compare."""
    dialect = sqlite.dialect()
    ours = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    theirs = sqlite.DATETIME().bind_processor(dialect)
    assert ours is not None and theirs is not None
    for value in (
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        datetime(1, 1, 1, tzinfo=timezone.utc),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
    ):
        assert ours(value) == theirs(value.replace(tzinfo=None))
    shifted = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=8)))
    assert ours(shifted) == "2026-01-01 19:04:05.000000"
    assert ours(None) is None
