"""The store: history for audit, sessions, schema checks, the window's query plan."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import Engine, text

from tokenmem import (
    InvalidInputError,
    Message,
    Rule,
    SchemaError,
    SessionNotFound,
    Store,
    StoreError,
    TokenCounter,
    migrate,
)

WORDS = "the of and to in is you that it he was for on are as with his they at be this".split()


def turns(n: int, seed: int = 0) -> list[list[Message]]:
    rnd = random.Random(seed)

    def say() -> str:
        return " ".join(rnd.choices(WORDS, k=rnd.randint(3, 30)))

    return [[Message("human", say()), Message("ai", say())] for _ in range(n)]


def test_history_pages_and_iterates(store: Store, o200k: TokenCounter) -> None:
    written = store.append_turns("audit", turns(60), o200k, batch_size=7)
    assert written == 120
    page = store.history_page("audit", after=9, limit=5)
    assert [m.position for m in page] == [10, 11, 12, 13, 14]
    history = list(store.history("audit", page_size=16))
    assert [m.position for m in history] == list(range(120))
    assert [m.turn for m in history] == [i // 2 for i in range(120)]
    assert all(m.encoding == "o200k_base" for m in history)
    assert history[5].text_tokens == o200k.count(" " + history[5].content)
    assert history[5].chat_tokens == o200k.count("assistant") + o200k.count(history[5].content)


def test_history_of_missing_session(store: Store) -> None:
    with pytest.raises(SessionNotFound, match="'nope'"):
        list(store.history("nope"))
    with pytest.raises(SessionNotFound):
        store.erase("nope")


def test_sessions_listing(store: Store, o200k: TokenCounter) -> None:
    store.append("b", [Message("human", "x")], o200k)
    store.append("a", [Message("human", "x"), Message("ai", "y")], o200k)
    store.append("a", [Message("human", "z")], o200k, owner="alice")
    listed = store.sessions()
    assert [(s.session_id, s.next_position) for s in listed] == [("a", 2), ("b", 1)]
    assert [(s.session_id, s.next_position) for s in store.sessions(owner="alice")] == [("a", 1)]
    assert listed[0].created_at.tzinfo is not None


def test_owners_do_not_share_sessions(store: Store, o200k: TokenCounter) -> None:
    store.append("chat", [Message("human", "alice's secret")], o200k, owner="alice")
    with pytest.raises(SessionNotFound):
        list(store.history("chat", owner="bob"))
    assert store.window("chat", Rule(limit=100), o200k, owner="bob") == []


def test_names_and_metadata_roundtrip(store: Store, o200k: TokenCounter) -> None:
    store.append(
        "meta",
        [Message("system", "be brief", name="setup", metadata={"source": "api", "n": [1, 2]})],
        o200k,
    )
    (stored,) = store.history("meta")
    assert stored.type == "system" and stored.name == "setup"
    assert stored.metadata == {"source": "api", "n": [1, 2]}
    # The window returns it too: from the statement, and counted in Python
    # for another encoding than the session's.
    for counter in (o200k, TokenCounter("cl100k_base")):
        for mode in ("text", "messages"):
            (shown,) = store.window("meta", Rule(limit=100, mode=mode), counter)
            assert shown.message.metadata == {"source": "api", "n": [1, 2]}
    assert stored.chat_tokens == o200k.count("system") + o200k.count("be brief") + (
        o200k.count("setup") + 1
    )
    with pytest.raises(InvalidInputError, match="metadata is not JSON"):
        store.append("meta", [Message("human", "x", metadata={"t": object()})], o200k)
    with pytest.raises(InvalidInputError, match="NUL"):
        store.append("meta", [Message("human", "x", metadata={"t": "a\x00"})], o200k)
    with pytest.raises(InvalidInputError, match="session_id"):
        store.append("", [Message("human", "x")], o200k)
    assert len(list(store.history("meta"))) == 1


def test_unmigrated_database_says_so(db: Engine, o200k: TokenCounter) -> None:
    store = Store(db)
    with pytest.raises(SchemaError, match=r"not migrated.*upgrade"):
        store.append("s", [Message("human", "x")], o200k)
    store.upgrade("0001")
    head = migrate.head()
    with pytest.raises(SchemaError, match=f"at revision 0001, the code needs {head}") as info:
        store.check()
    assert (info.value.current, info.value.head) == ("0001", head)
    store.upgrade()
    store.append("s", [Message("human", "x")], o200k)


def test_database_errors_are_wrapped(tmp_path: object, o200k: TokenCounter) -> None:
    store = Store(f"sqlite:///{tmp_path}/x.sqlite3", upgrade=True)
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE tokenmem_messages"))
    with pytest.raises(StoreError, match="database error") as info:
        store.append("s", [Message("human", "x")], o200k)
    assert info.value.__cause__ is not None


def test_window_plan_uses_the_cum_floor_index(store: Store, o200k: TokenCounter) -> None:
    """A freshly bulk-loaded table, never analysed, still gets the index range plan."""
    if store.dialect == "postgresql":
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE tokenmem_messages SET (autovacuum_enabled = false)"))
    for session in ("big", "other"):
        store.append_turns(session, turns(3000), o200k, batch_size=1000)
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            analyzed = conn.execute(
                text(
                    "SELECT coalesce(last_analyze, last_autoanalyze) FROM pg_stat_user_tables "
                    "WHERE relname = 'tokenmem_messages' AND schemaname = current_schema()"
                )
            ).scalar()
        assert analyzed is None
    plan = store.explain_window("big", Rule(limit=2000), o200k)
    assert "ix_tokenmem_messages_session_id_cum_floor" in plan, plan
    assert "Seq Scan" not in plan and "SCAN tokenmem_messages" not in plan, plan
