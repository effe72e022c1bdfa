"""Bulk appends (Store.append_many and its async twin): every message checked
and counted before the transaction, one transaction per call, rows in
batches; the rows are those the one-at-a-time path writes, on both paths
(COPY on PostgreSQL's direct path, executemany elsewhere)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event

from tokenmem import (
    ConfigurationError,
    InvalidInputError,
    Message,
    Rule,
    Store,
    StoreError,
    TokenCounter,
)
from tokenmem import direct as direct_module
from tokenmem.aio import AsyncStore

from .conftest import async_twin, fresh_engine

# Text that COPY's text format must escape: tabs, newlines, backslashes, \N, CJK, emoji.
TEXTS = ["plain words", "tab\there", "new\nline\r\n", "back\\slash \\N", "你好 👋", "", "  "]


def messages(n: int) -> list[Message]:
    """Mostly human/ai pairs, with a system message and a lone human among them."""
    out = []
    for i in range(n):
        role = "system" if i % 11 == 10 else ("human" if i % 2 == 0 else "ai")
        out.append(
            Message(
                role,  # type: ignore[arg-type]
                f"{TEXTS[i % len(TEXTS)]} {i}",
                name="tool" if i % 13 == 0 else None,
                metadata={"i": i, "t": "\t\\"} if i % 5 == 0 else None,
            )
        )
    return out


def turns_of(msgs: list[Message]) -> list[list[Message]]:
    """The turns append_many makes: a human message and the AI one right after it."""
    out: list[list[Message]] = []
    for m in msgs:
        if out and m.type == "ai" and len(out[-1]) == 1 and out[-1][0].type == "human":
            out[-1].append(m)
        else:
            out.append([m])
    return out


def rows(store: Store, session: str) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT m.position, m.turn, m.role, m.content, m.name, m.metadata, m.encoding, "
            "m.text_tokens, m.newline_tokens, m.chat_tokens, m.cum_floor "
            "FROM tokenmem_messages m JOIN tokenmem_sessions s ON s.id = m.session_id "
            f"WHERE s.name = '{session}' ORDER BY m.position"
        ).all()
    return [tuple(r) for r in found]


def _store(direct: bool, engine: Any) -> Store:
    url = engine.url.render_as_string(hide_password=False)
    store = Store(url, upgrade=True) if direct else Store(engine, upgrade=True)
    assert store.direct is direct
    return store


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "engine"])
def test_append_many_writes_what_append_turns_writes(
    backend: str, tmp_path: Path, o200k: TokenCounter, direct: bool
) -> None:
    """Across batch boundaries, after earlier appends: the same positions,
    turns, counts and running floors as the one-transaction-a-turn path."""
    msgs = messages(53)
    with fresh_engine(backend, tmp_path) as engine:
        store = _store(direct, engine)
        for name in ("bulk", "turns"):
            store.append(name, [Message("human", "before"), Message("ai", "it")], o200k)
        sent: list[str] = []
        event.listen(store.engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
        stored = store.append_many("bulk", msgs, o200k, batch_size=7)
        assert stored == range(2, 55)
        # COPY on PostgreSQL's direct path (the DBAPI cursor: no event for it)
        copied = backend == "postgresql" and direct
        inserts = [sql for sql in sent if sql.startswith("INSERT INTO tokenmem_messages")]
        assert len(inserts) == (0 if direct else 8), sent
        if copied:
            assert direct_module._copies.get(store.engine.dialect), "COPY was not used"
        store.append_turns("turns", turns_of(msgs), o200k, batch_size=1)
        bulk, one_by_one = rows(store, "bulk"), rows(store, "turns")
        assert bulk == one_by_one
        assert [r[3] for r in bulk[2:]] == [m.content for m in msgs]  # stored exactly
        assert [r[1] for r in bulk[2:6]] == [1, 1, 2, 2]
        info = store.session("bulk")
        assert (info.next_position, info.next_turn) == (55, len(turns_of(msgs)) + 1)
        rule = Rule(limit=120)
        assert store.window("bulk", rule, o200k) == store.window("turns", rule, o200k)
        after = store.append("bulk", [Message("human", "next")], o200k)
        assert (after[0].position, after[0].turn) == (55, info.next_turn)
        store.close()


def _refuse_from(conn: Connection, position: int) -> None:
    """Make the database refuse a message row at ``position`` or beyond."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            f"CREATE TRIGGER no BEFORE INSERT ON tokenmem_messages WHEN NEW.position >= {position}"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        return
    conn.exec_driver_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN IF NEW.position >= {position} THEN RAISE EXCEPTION 'refused'; END IF; "
        "RETURN NEW; END $$"
    )
    conn.exec_driver_sql(
        "CREATE TRIGGER no BEFORE INSERT ON tokenmem_messages "
        "FOR EACH ROW EXECUTE FUNCTION refuse()"
    )


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "engine"])
def test_a_failed_batch_writes_nothing_of_the_call(
    backend: str, tmp_path: Path, o200k: TokenCounter, direct: bool
) -> None:
    """All or nothing per call: the database refusing a row in the third
    batch leaves none of the call's rows, nor its positions taken."""
    with fresh_engine(backend, tmp_path) as engine:
        store = _store(direct, engine)
        store.append("s", [Message("human", "kept")], o200k)
        with store.engine.begin() as conn:
            _refuse_from(conn, 25)
        sent = messages(40)
        with pytest.raises(StoreError, match="refused") as info:
            store.append_many("s", sent, o200k, batch_size=10)
        for m in sent:  # no values sent in errors (COPY quotes the row it failed on)
            assert len(m.content) < 8 or m.content not in str(info.value)
        assert [r[3] for r in rows(store, "s")] == ["kept"]
        assert store.session("s").next_position == 1
        store.close()


def test_bad_input_is_refused_before_anything_is_written(store: Store, o200k: TokenCounter) -> None:
    bad = messages(30)
    bad[17] = Message("ai", "nul \x00 inside")
    with pytest.raises(InvalidInputError, match="message 17 content contains a NUL"):
        store.append_many("s", bad, o200k, batch_size=5)
    with pytest.raises(InvalidInputError, match="message 2 must be a Message, not dict"):
        store.append_many("s", [*messages(2), {"role": "human"}], o200k)  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="message 1: type must be one of"):
        store.append_many("s", [Message("human", "a"), Message("bot", "b")], o200k)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="nothing to append"):
        store.append_many("s", iter([]), o200k)
    for size in (0, -1, 2.5, True):
        with pytest.raises(ConfigurationError, match="batch_size must be a positive int"):
            store.append_many("s", messages(3), o200k, batch_size=size)  # type: ignore[arg-type]
    assert store.session_stats() == []


def test_append_many_takes_any_iterable_and_keeps_the_session_s_encoding(
    store: Store, o200k: TokenCounter, cl100k: TokenCounter
) -> None:
    """Messages for a session counted with another encoding are counted with
    the session's (never the whole session again inside the bulk append's
    transaction); ``recount`` switches it."""
    store.append_many("s", (m for m in messages(9)), o200k)
    assert store.append_many("s", messages(4), cl100k, batch_size=3) == range(9, 13)
    stored = list(store.history("s"))
    assert {m.encoding for m in stored} == {"o200k_base"}
    assert stored[9].text_tokens == o200k.count(" " + stored[9].content)
    assert store.recount("s", cl100k)
    stored = list(store.history("s"))
    assert {m.encoding for m in stored} == {"cl100k_base"}
    assert [m.text_tokens for m in stored] == [cl100k.count(" " + m.content) for m in stored]


def test_owners_are_kept_apart(store: Store, o200k: TokenCounter) -> None:
    store.append_many("s", messages(3), o200k, owner="alice")
    assert store.append_many("s", messages(2), o200k, owner="bob") == range(0, 2)
    assert store.owner("alice").session("s").next_position == 3
    with pytest.raises(ConfigurationError, match="scoped to owner 'alice'"):
        store.owner("alice").append_many("s", messages(2), o200k, owner="bob")


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "engine"])
def test_async_append_many(backend: str, tmp_path: Path, o200k: TokenCounter, direct: bool) -> None:
    msgs = messages(23)
    with fresh_engine(backend, tmp_path) as engine:
        sync = Store(engine, upgrade=True)
        sync.append_many("sync", msgs, o200k, batch_size=4)

        async def run() -> range:
            if direct:
                url = engine.url.set(
                    drivername="sqlite+aiosqlite" if backend == "sqlite" else engine.url.drivername
                )
                store = AsyncStore(url.render_as_string(hide_password=False))
            else:
                store = AsyncStore(async_twin(engine))
            assert store.direct is direct
            try:
                with pytest.raises(InvalidInputError, match="message 0 content"):
                    await store.append_many("async", [Message("human", "\x00")], o200k)
                return await store.append_many("async", msgs, o200k, batch_size=4)
            finally:
                await store.close()

        assert asyncio.run(run()) == range(23)
        assert rows(sync, "async") == rows(sync, "sync")
        sync.close()


def test_turns_pair_a_human_message_with_the_ai_reply_right_after_it(
    store: Store, o200k: TokenCounter
) -> None:
    kinds = ["human", "human", "ai", "ai", "system", "human", "ai", "human"]
    sent = [Message(k, f"{k} {i}") for i, k in enumerate(kinds)]  # type: ignore[arg-type]
    store.append_many("s", sent, o200k)
    assert [m.turn for m in store.history("s")] == [0, 1, 1, 2, 3, 4, 4, 5]
    assert [len(t) for t in turns_of(sent)] == [1, 2, 1, 1, 2, 1]
    with pytest.raises(ConfigurationError, match="counter must be a TokenCounter, not NoneType"):
        store.append_many("s", sent, None)  # type: ignore[arg-type]
