"""Owner isolation, erasure and retention."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, insert, select, update

from tokenmem import (
    ConfigurationError,
    ConversationTokenBufferMemory,
    InvalidInputError,
    Message,
    Rule,
    SessionNotFound,
    Store,
    TokenCounter,
    TurnRecord,
)
from tokenmem.models import MESSAGES, SUMMARIES, TURNS, session_uuid, utcnow


def record(input: str, window: tuple[int, int] | None = None) -> TurnRecord:
    """A successful call's turn record, its window the positions ``window``."""
    return TurnRecord(
        model="m",
        api="chat",
        system="s",
        template="{history}{input}",
        human_prefix="Human",
        ai_prefix="AI",
        input=input,
        window_first=window and window[0],
        window_last=window and window[1],
        token_budget=10,
        prompt_tokens=5,
        latency_ms=1.0,
        outcome="ok",
    )


def missing_error(call: object) -> str:
    with pytest.raises(SessionNotFound) as info:
        call()  # type: ignore[operator]
    return str(info.value)


def test_one_owner_cannot_reach_another(store: Store, o200k: TokenCounter) -> None:
    alice, bob = store.owner("alice"), store.owner("bob")
    alice.append("chat-1", [Message("human", "alice's secret"), Message("ai", "noted")], o200k)
    alice.record_turn("chat-1", record("alice's secret"))

    # Reading: bob sees exactly what he sees for a session that does not exist.
    assert bob.window("chat-1", Rule(limit=100), o200k) == []
    assert bob.window("no-such", Rule(limit=100), o200k) == []
    assert missing_error(lambda: list(bob.history("chat-1"))) == missing_error(
        lambda: list(bob.history("no-such"))
    ).replace("no-such", "chat-1")
    assert missing_error(lambda: bob.turns("chat-1")) == "session 'chat-1' not found"
    assert missing_error(lambda: bob.rebuild_prompt("chat-1", 0)) == "session 'chat-1' not found"
    assert bob.sessions() == []

    # Writing: bob's clear and erase do not touch alice's session...
    bob.clear("chat-1")
    assert missing_error(lambda: bob.erase("chat-1")) == "session 'chat-1' not found"
    # ...and appending under the same id makes a separate session of bob's.
    bob.append("chat-1", [Message("human", "bob's own")], o200k)
    assert [m.content for m in bob.history("chat-1")] == ["bob's own"]
    assert [m.content for m in alice.history("chat-1")] == ["alice's secret", "noted"]
    assert len(alice.window("chat-1", Rule(limit=100), o200k)) == 2
    assert [s.session_id for s in alice.sessions()] == ["chat-1"]
    assert [s.owner_id for s in bob.sessions()] == ["bob"]


def test_memory_owner_scope(store: Store) -> None:
    a = ConversationTokenBufferMemory(store=store, owner="alice", session_id="s")
    a.save_context({"input": "mine"}, {"output": "yours"})
    b = ConversationTokenBufferMemory(store=store, owner="bob", session_id="s")
    assert b.buffer == ""
    scoped = ConversationTokenBufferMemory(store=store.owner("alice"), session_id="s")
    assert scoped.buffer == "Human: mine\nAI: yours"


@pytest.mark.parametrize("owner", ["", "x" * 256, "a\x00b", 7])
def test_bad_owner(store: Store, owner: object) -> None:
    if owner == "":
        assert store.owner("").sessions() == []  # the default, unnamed owner
        return
    with pytest.raises(InvalidInputError, match="owner"):
        store.owner(owner)  # type: ignore[arg-type]


def summarize(store: Store, session: str, owner: str, made: datetime | None = None) -> None:
    """A row of tokenmem_summaries for the session (as the summary memory writes)."""
    with store.engine.begin() as conn:
        seq = conn.execute(
            select(func.count()).where(SUMMARIES.c.session_id == session_uuid(owner, session))
        ).scalar_one()
        conn.execute(
            insert(SUMMARIES).values(
                session_id=session_uuid(owner, session),
                seq=seq,
                first_position=seq,
                last_position=seq,
                content="a summary",
                model="m",
                encoding="o200k_base",
                text_tokens=3,
                newline_tokens=1,
                chat_tokens=4,
                created_at=made or utcnow(),
            )
        )


def summaries(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(SUMMARIES)).scalar_one())


def test_erase_owner(store: Store, o200k: TokenCounter) -> None:
    for owner in ("alice", "bob"):
        for session in ("a", "b"):
            store.append(session, [Message("human", "x"), Message("ai", "y")], o200k, owner=owner)
            store.record_turn(session, record("x"), owner=owner)
            summarize(store, session, owner)
    erased = store.erase_owner("alice")
    assert (erased.sessions, erased.messages, erased.turns, erased.summaries) == (2, 4, 2, 2)
    assert summaries(store) == 2
    assert store.sessions(owner="alice") == []
    assert [s.session_id for s in store.sessions(owner="bob")] == ["a", "b"]
    assert store.count(all_owners=True) == 4
    assert store.count() == 0  # the default (unnamed) owner has nothing
    assert store.erase_owner("alice").sessions == 0
    store.erase("a", owner="bob")
    assert summaries(store) == 1


def test_prune_by_age(store: Store, o200k: TokenCounter) -> None:
    for owner in ("alice", "bob"):
        store.append("s", [Message("human", "old"), Message("ai", "old reply")], o200k, owner=owner)
        store.record_turn("s", record("old"), owner=owner)
        summarize(store, "s", owner, utcnow() - timedelta(days=35))
    with store.engine.begin() as conn:  # age them by 40 days
        conn.execute(update(MESSAGES).values(created_at=utcnow() - timedelta(days=40)))
        conn.execute(update(TURNS).values(created_at=utcnow() - timedelta(days=40)))
    for owner in ("alice", "bob"):
        store.append("s", [Message("human", "new"), Message("ai", "new reply")], o200k, owner=owner)
        summarize(store, "s", owner)  # newer than the cutoff: stays

    pruned = store.prune(timedelta(days=30), owner="alice")
    assert (pruned.messages, pruned.turns, pruned.summaries) == (2, 1, 1)
    assert summaries(store) == 3
    assert [m.content for m in store.history("s", owner="alice")] == ["new", "new reply"]
    assert [m.position for m in store.history("s", owner="alice")] == [2, 3]
    assert len(list(store.history("s", owner="bob"))) == 4

    assert store.prune(timedelta(days=30), owner="").messages == 0  # the default owner has none
    assert store.prune(timedelta(days=30), all_owners=True).messages == 2
    assert [m.content for m in store.history("s", owner="bob")] == ["new", "new reply"]
    memory = ConversationTokenBufferMemory(store=store, owner="bob", session_id="s")
    assert memory.buffer == "Human: new\nAI: new reply"
    memory.save_context({"input": "after"}, {"output": "pruning"})
    assert [m.position for m in memory.history()] == [2, 3, 4, 5]


def test_a_scoped_store_stays_in_its_scope(store: Store, o200k: TokenCounter) -> None:
    from tokenmem import ConfigurationError
    from tokenmem.transfer import export_jsonl

    alice, bob = store.owner("alice"), store.owner("bob")
    alice.append("s", [Message("human", "alice's")], o200k)
    bob.append("s", [Message("human", "bob's secret")], o200k)
    for call in (
        lambda: list(alice.history("s", owner="bob")),
        lambda: alice.session_stats(all_owners=True),
        lambda: alice.erase_owner("bob"),
        lambda: alice.prune(timedelta(0), all_owners=True),
        lambda: alice.count(owner="bob"),
    ):
        with pytest.raises(ConfigurationError, match="scoped"):
            call()
    assert alice.count() == 1 and store.count(all_owners=True) == 2
    assert alice.prune(timedelta(0)).messages == 1  # alice's only
    assert [m.content for m in bob.history("s")] == ["bob's secret"]
    import io

    dump = io.StringIO()
    export_jsonl(bob, dump)
    assert "bob's secret" in dump.getvalue() and "alice" not in dump.getvalue()
    assert bob.erase_owner().messages == 1


def test_a_scope_is_never_moved(store: Store, o200k: TokenCounter) -> None:
    """A scoped store naming another owner raises, by .owner() too: bob's
    store re-scoped to alice would read alice's messages."""
    store.append("S", [Message("human", "alice's secret")], o200k, owner="alice")
    bob = store.owner("bob")
    for other in ("alice", ""):
        with pytest.raises(ConfigurationError, match="scoped to owner 'bob'"):
            bob.owner(other)
        with pytest.raises(ConfigurationError, match="scoped to owner 'bob'"):
            ConversationTokenBufferMemory(
                store=bob, owner=other, session_id="S"
            ).load_memory_variables({})
    assert bob.owner("bob").sessions() == [] and bob.owner("bob").scoped
    memory = ConversationTokenBufferMemory(store=bob.owner("bob"), owner="bob", session_id="S")
    assert memory.buffer == ""
    alice = store.owner("alice")
    assert [m.content for m in alice.owner("alice").history("S")] == ["alice's secret"]
    with pytest.raises(InvalidInputError, match="owner"):
        bob.owner(None)  # type: ignore[arg-type]


def test_none_never_selects_an_owner_to_erase(store: Store, o200k: TokenCounter) -> None:
    """erase_owner(None) erased the default owner's data (a user id that came
    back None); prune(older_than) pruned it. Both need the owner named, unless
    the store is scoped to one."""
    for owner in ("", "alice"):
        store.append("s", [Message("human", "x"), Message("ai", "y")], o200k, owner=owner)
    for call in (
        lambda: store.erase_owner(None),
        lambda: store.erase_owner(),
        lambda: store.prune(timedelta(0)),
        lambda: store.prune(timedelta(0), owner=None),
        lambda: store.prune(timedelta(0), owner="alice", all_owners=True),
    ):
        with pytest.raises(ConfigurationError, match="owner"):
            call()
    assert store.count(owner="") == 2 and store.count(all_owners=True) == 4
    assert store.owner("alice").prune(timedelta(0)).messages == 2  # its scope, named
    assert store.prune(timedelta(0), owner="").messages == 2  # "" names the default owner
    for owner in ("", "alice"):
        store.append("t", [Message("human", "z")], o200k, owner=owner)
    assert store.owner("").erase_owner().messages == 1
    assert store.erase_owner("alice").sessions == 2
    assert store.count(all_owners=True) == 0
