"""Every statement goes through public SQLAlchemy (``Connection.execute``):
what a host sets on its engine — ``schema_translate_map``, event listeners,
SQL logging, ``hide_parameters`` — applies to every one of them, the hot
path included; lost connections are invalidated and retried; and no private
name of SQLAlchemy, tiktoken or openai is used anywhere in tokenmem."""

from __future__ import annotations

import ast
import asyncio
import logging
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.dialects import sqlite

import tokenmem
from tokenmem import (
    ConversationTokenBufferMemory,
    InvalidInputError,
    Message,
    Rule,
    Store,
    StoredMessage,
    StoreError,
    TokenCounter,
)
from tokenmem.aio import AsyncStore
from tokenmem.engine import make_engine
from tokenmem.models import UTCDateTime

from .conftest import PG_URL, _pg_admin, async_twin, fresh_engine

PACKAGE = Path(tokenmem.__file__).parent


def _refuse_inserts(conn: Connection) -> None:
    """A SQLite trigger that makes every message insert fail: a database error mid-append."""
    conn.exec_driver_sql(
        "CREATE TRIGGER no BEFORE INSERT ON tokenmem_messages "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )


def _watch(engine: object) -> list[str]:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: seen.append(str(args[2])))
    return seen


def test_event_listeners_see_the_hot_path(store: Store, o200k: TokenCounter) -> None:
    """A tracer (OpenTelemetry's SQLAlchemy instrumentation listens to these
    events) sees the append's and the window's statements, every time."""
    seen = _watch(store.engine)
    memory = ConversationTokenBufferMemory(store=store, session_id="w", max_token_limit=50)
    for _ in range(2):
        seen.clear()
        memory.save_context({"input": "hi"}, {"output": "there"})
        assert memory.load_memory_variables({})["history"].endswith("Human: hi\nAI: there")
        assert any(s.startswith("INSERT INTO tokenmem_sessions") for s in seen)
        assert any("INSERT INTO tokenmem_messages" in s for s in seen)  # in a WITH on PostgreSQL
        assert any(" OVER " in s for s in seen)


def test_sql_logging_sees_every_statement(
    store: Store, o200k: TokenCounter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sqlalchemy.engine")
    store.append("logged", [Message("human", "hi")], o200k)
    assert "INSERT INTO tokenmem_messages" in caplog.text


def test_schema_translate_map_reaches_every_statement(o200k: TokenCounter) -> None:
    """A host keeps tokenmem's tables in a schema of their own: one store,
    one schema, for the hot path (append, window) and the rest alike. The
    connection's search_path is an empty schema, so a statement that missed
    the map would fail."""
    schema, decoy = (f"tm_{uuid.uuid4().hex[:10]}" for _ in range(2))
    admin = _pg_admin()
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE SCHEMA {decoy}"))
    migrated = create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    base = create_engine(f"{PG_URL}?options=-csearch_path%3D{decoy}")
    try:
        # Migrated through the map too (alembic's ALTERs run in the schema).
        store = Store(base.execution_options(schema_translate_map={None: schema}), upgrade=True)
        memory = ConversationTokenBufferMemory(store=store, session_id="t", max_token_limit=50)
        memory.save_context({"input": "hi"}, {"output": "there"})
        assert memory.load_memory_variables({}) == {"history": "Human: hi\nAI: there"}
        assert store.count() == 2 and [s.session_id for s in store.session_stats()] == ["t"]
        assert [m.content for m in store.history("t")] == ["hi", "there"]
        store.clear("t")
        assert store.erase("t") == 2
        assert Store(migrated).count(all_owners=True) == 0
        # The same map on an engine the store makes: every statement honours it.
        options = {"execution_options": {"schema_translate_map": {None: schema}}}
        made = Store(base.url.render_as_string(hide_password=False), engine_options=options)
        assert not made.direct
        ConversationTokenBufferMemory(store=made, session_id="m").save_context(
            {"input": "a"}, {"output": "b"}
        )
        assert [m.content for m in Store(migrated).history("m")] == ["a", "b"]
        assert "tokenmem_messages" in made.explain_window("m", Rule(limit=10), o200k)
        made.close()
    finally:
        migrated.dispose()
        base.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            conn.execute(text(f"DROP SCHEMA {decoy} CASCADE"))
        admin.dispose()


def test_errors_hide_parameters_when_asked(tmp_path: Path, o200k: TokenCounter) -> None:
    store = Store(make_engine(f"sqlite:///{tmp_path}/h.sqlite3", hide_parameters=True))
    store.upgrade()
    with store.engine.begin() as conn:  # a trigger makes the next insert fail
        _refuse_inserts(conn)
    with pytest.raises(StoreError, match="refused") as info:
        store.append("s", [Message("human", "SECRET")], o200k)
    assert "SECRET" not in str(info.value)
    assert store.session_stats() == []  # the session row went with the transaction


def test_errors_never_carry_parameters(tmp_path: Path, o200k: TokenCounter) -> None:
    """Bound values are users' messages: not in a StoreError, whatever the engine."""
    store = Store(make_engine(f"sqlite:///{tmp_path}/p.sqlite3"), upgrade=True)
    with store.engine.begin() as conn:
        _refuse_inserts(conn)
    with pytest.raises(StoreError, match="refused") as info:
        store.append("s", [Message("human", "SECRET words")], o200k)
    assert "SECRET" not in str(info.value) and "INSERT INTO tokenmem_messages" in str(info.value)


def test_bad_engine_options_are_configuration_errors(tmp_path: Path) -> None:
    from tokenmem import ConfigurationError

    url = f"sqlite:///{tmp_path}/o.sqlite3"
    with pytest.raises(ConfigurationError, match="bogus"):
        Store(url, engine_options={"bogus": 1})
    with pytest.raises(ConfigurationError, match="bogus"):
        AsyncStore(url, engine_options={"bogus": 1})


def test_naive_timestamps_are_bad_input(store: Store, o200k: TokenCounter) -> None:
    naive = StoredMessage("human", "x", created_at=datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="timezone-aware"):
        store.append("s", [naive], o200k)


@pytest.mark.parametrize("direct", [True, False])
def test_a_dropped_connection_is_retried(
    tmp_path: Path, o200k: TokenCounter, caplog: pytest.LogCaptureFixture, direct: bool
) -> None:
    """A pooled connection whose server went away fails its first statement;
    the pool's idle connections go with it and the store runs the append
    again — on the direct path too."""
    with fresh_engine("postgresql", tmp_path) as engine:
        # More pooled connections than retries: after a server restart all of
        # them are dead, and the first failure must invalidate the whole pool.
        url = str(engine.url.render_as_string(False))
        options = {"pool_size": 10}
        store = Store(url, engine_options=options) if direct else Store(make_engine(url, **options))
        assert store.direct is direct
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
            await astore.close()
            return contents

        assert asyncio.run(async_turns()) == ["before", "after"]
        assert "retrying a transaction (attempt 2)" in caplog.text
        store.engine.dispose()


def _private_uses(tree: ast.AST, own: set[str]) -> list[str]:
    """Attribute or imported names with a leading underscore that tokenmem
    does not define itself: a private name of a dependency."""
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [alias.name for alias in node.names]
            names += [part for part in (node.module or "").split(".")]
            if (node.module or "").startswith("sqlalchemy.util"):  # internals, not API
                found.append(f"line {node.lineno}: {node.module}")
        for name in names:
            if name.startswith("_") and not name.startswith("__") and name not in own:
                found.append(f"line {node.lineno}: {name}")
    return found


def test_no_private_names_of_dependencies() -> None:
    trees = {path: ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}
    assert PACKAGE / "langchain" / "history.py" in trees  # subpackages too
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                own.add(node.target.id)
    found = {str(path): uses for path, tree in trees.items() if (uses := _private_uses(tree, own))}
    assert found == {}
    # The check finds what it is for.
    sample = ast.parse(
        "from sqlalchemy.util import greenlet_spawn\nconn._handle_dbapi_exception(e)"
    )
    assert _private_uses(sample, own) == [
        "line 1: sqlalchemy.util",
        "line 2: _handle_dbapi_exception",
    ]
    sample = ast.parse("from sqlalchemy.engine._util import x\nfrom tiktoken import _x")
    assert len(_private_uses(sample, own)) == 2
    sample = ast.parse("from langchain_core._api import deprecated\nm._lc_kwargs")
    assert len(_private_uses(sample, own)) == 2


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


def _timeless(value: object) -> object:
    """A stored time with its digits masked: the same format, another moment."""
    if isinstance(value, datetime):
        return type(value), value.tzinfo
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", value):
        return re.sub(r"\d", "0", value)  # SQLite's DATETIME text
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return "digest"  # over the time too; each path's chain is verified instead
    return value


def _scenario(store: Store, o200k: TokenCounter) -> dict[str, object]:
    """Appends (one and many messages, an encoding change), clear, windows of
    both modes: what a store writes and reads, in plain values."""
    memory = ConversationTokenBufferMemory(store=store, session_id="p", max_token_limit=40)
    for i in range(6):
        memory.save_context({"input": f"question {i} 你好?"}, {"output": f"answer {i}.\nok"})
    store.append("p", [Message("system", "be brief", name="sys", metadata={"k": [1, "二"]})], o200k)
    store.append_turns("q", [[Message("human", f"m{i}")] for i in range(20)], o200k)
    store.append("q", [Message("ai", "recounted")], TokenCounter("cl100k_base"))
    texts = memory.load_memory_variables({})["history"]
    store.clear("q")
    store.append("q", [Message("human", "after clear")], o200k)
    rows = {}
    with store.engine.connect() as conn:
        for table in ("tokenmem_sessions", "tokenmem_messages"):
            found = conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1, 2").all()
            rows[table] = [tuple(_timeless(v) for v in row) for row in found]
    messages = ConversationTokenBufferMemory(
        store=store, session_id="p", max_token_limit=60, return_messages=True
    ).load_memory_variables({})["history"]
    return {
        "text": texts,
        "messages": messages,
        "window_q": store.window("q", Rule(limit=30), o200k),
        # (Message.metadata is not compared by ==)
        "metadata": [w.message.metadata for w in store.window("p", Rule(limit=60), o200k)],
        "rows": rows,
        "verified": [store.verify(name).ok for name in ("p", "q")],
    }


def test_the_direct_path_writes_and_reads_what_the_public_one_does(
    backend: str, tmp_path: Path, o200k: TokenCounter
) -> None:
    """A store on an engine it made runs the hot statements on the DBAPI
    cursor (tokenmem/direct.py); one on an engine passed in, through
    Connection.execute. Same scenario, same rows, same windows."""
    results = []
    for direct in (True, False):
        with fresh_engine(backend, tmp_path / str(direct)) as engine:
            url = engine.url.render_as_string(hide_password=False)
            store = Store(url, upgrade=True) if direct else Store(engine, upgrade=True)
            assert store.direct is direct
            results.append(_scenario(store, o200k))
            store.close()
    assert results[0] == results[1]
    assert results[0]["text"] and results[0]["window_q"]
    assert results[0]["metadata"][0] == {"k": [1, "二"]}  # the pinned system message's


def test_the_direct_path_wraps_errors_and_retries(tmp_path: Path, o200k: TokenCounter) -> None:
    store = Store(f"sqlite:///{tmp_path}/d.sqlite3", upgrade=True)
    assert store.direct
    with store.engine.begin() as conn:
        _refuse_inserts(conn)
    with pytest.raises(StoreError, match="refused") as info:
        store.append("s", [Message("human", "SECRET")], o200k)
    assert "SECRET" not in str(info.value)  # parameters are never shown
    assert store.session_stats() == []  # the session row went with the transaction
    store.engine.echo = True  # watched: back to Connection.execute
    assert not store.direct
    store.close()
