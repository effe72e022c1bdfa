"""A model with another encoding takes over a long session without a stall
(tokenmem/writes.py, recount_start and recount_batch): appends never count the
whole session in their transaction, the new model's window is exact from its
first load, and the stored counts catch up one bounded batch at a time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select

from tokenmem import ConfigurationError, ConversationTokenBufferMemory, Message, Store, TokenCounter
from tokenmem.models import MESSAGES, SESSIONS
from tokenmem.window import Counts

from .test_window import reference_text as _reference_text

OLD, NEW = "cl100k_base", "o200k_base"


def reference_text(messages: list[Message], rule: Any, counter: TokenCounter) -> list[Message]:
    """The reference window of the newest messages: a line costs at least two
    tokens, so a 200-token window holds fewer than 120 (and the reference,
    counting the string after each line dropped, is quadratic)."""
    assert rule.limit <= 200
    return _reference_text(messages[-120:], rule, counter)


def _exchange(i: int) -> tuple[str, str]:
    return f"你好 number {i}, how are things?", f"reply {'很好 ' * (i % 5)}done {i}."


def _fill(store: Store, exchanges: int) -> tuple[ConversationTokenBufferMemory, list[Message]]:
    old = ConversationTokenBufferMemory(store=store, encoding=OLD, max_token_limit=200)
    turns = [[Message("human", h), Message("ai", a)] for h, a in map(_exchange, range(exchanges))]
    store.append_turns(old.session_id, turns, old.counter)
    return old, [m for turn in turns for m in turn]


@pytest.fixture
def statements(store: Store) -> Iterator[list[tuple[str, int]]]:
    """Every statement the store sends with how many parameter sets, and a
    ``("COMMIT", 0)`` after each transaction (the store's engine was passed
    in, so every statement goes through Connection.execute)."""
    sent: list[tuple[str, int]] = []

    def before(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        sent.append((sql, len(params) if many else 1))

    def commit(conn: Any) -> None:
        sent.append(("COMMIT", 0))

    event.listen(store.engine, "before_cursor_execute", before)
    event.listen(store.engine, "commit", commit)
    yield sent
    event.remove(store.engine, "before_cursor_execute", before)
    event.remove(store.engine, "commit", commit)


def _transactions(sent: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    done: list[list[tuple[str, int]]] = [[]]
    for sql, n in sent:
        if sql == "COMMIT":
            done.append([])
        else:
            done[-1].append((sql, n))
    return [t for t in done if t]


def _updated_messages(transaction: list[tuple[str, int]]) -> int:
    return sum(n for sql, n in transaction if sql.startswith("UPDATE tokenmem_messages"))


def _assert_consistent(store: Store, session_id: str, encoding: str) -> None:
    """Every row counted with ``encoding``, its counts right, ``cum_floor`` the
    running sum of floors, and the session's totals agreeing."""
    counter = TokenCounter(encoding)
    s, m = SESSIONS.c, MESSAGES.c
    with store.engine.connect() as conn:
        session = conn.execute(
            select(s.id, s.encoding, s.floor_total).where(s.name == session_id)
        ).one()
        rows = conn.execute(
            select(m.content, m.encoding, m.text_tokens, m.chat_tokens, m.newline_tokens)
            .add_columns(m.cum_floor)
            .where(m.session_id == session.id)
            .order_by(m.position)
        ).all()
    assert session.encoding == encoding
    cum = 0
    for row in rows:
        assert row.encoding == encoding
        assert row.text_tokens == counter.count(" " + row.content)
        assert row.cum_floor == cum
        cum += Counts(row.text_tokens, row.chat_tokens, row.newline_tokens).floor
    assert session.floor_total == cum


def test_a_new_model_takes_over_a_long_session_a_batch_at_a_time(
    store: Store, statements: list[tuple[str, int]]
) -> None:
    old, messages = _fill(store, 1250)  # 2,500 messages: two batches and the last one
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )
    assert [w.message for w in new.window()] == reference_text(messages, new.rule, new.counter)
    statements.clear()
    recounted = []
    for i in range(1250, 1253):
        human, ai = _exchange(i)
        new.save_context({"input": human}, {"output": ai})
        messages += [Message("human", human), Message("ai", ai)]
        history = list(store.history(old.session_id))
        recounted.append(sum(m.encoding == NEW for m in history))
        # Each model's window is exact at every step: counted in Python while
        # the session is recounted (the statement serves neither then).
        assert [w.message for w in new.window()] == reference_text(messages, new.rule, new.counter)
        assert [w.message for w in old.window()] == reference_text(messages, old.rule, old.counter)
    assert recounted == [1000, 2000, 2506]
    for transaction in _transactions(statements):
        assert _updated_messages(transaction) <= 1000
        inserts = [sql for sql, _ in transaction if sql.startswith("INSERT INTO tokenmem_messages")]
        if inserts:  # the save itself: its two rows, nothing recounted
            assert _updated_messages(transaction) == 0
    _assert_consistent(store, old.session_id, NEW)
    assert [w.message for w in new.window()] == reference_text(messages, new.rule, new.counter)


def test_saves_during_a_recount_keep_the_session_s_encoding(store: Store) -> None:
    old, messages = _fill(store, 700)
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )
    assert not store.recount(old.session_id, new.counter, batch_size=300, batches=1)
    # Saved by both models mid-way (the new one's save recounts positions 300
    # to 1,299): counted with the session's (old) encoding.
    for memory in (new, old):
        memory.save_context({"input": "mid-way"}, {"output": "still cl100k"})
        messages += [Message("human", "mid-way"), Message("ai", "still cl100k")]
    history = list(store.history(old.session_id))
    assert [m.encoding for m in history[-4:]] == [OLD] * 4
    assert history[-1].text_tokens == old.counter.count(" still cl100k")
    assert [w.message for w in old.window()] == reference_text(messages, old.rule, old.counter)
    assert store.recount(old.session_id, new.counter, batch_size=300)
    _assert_consistent(store, old.session_id, NEW)
    assert [w.message for w in new.window()] == reference_text(messages, new.rule, new.counter)


def test_a_recount_goes_on_where_it_stopped(
    store: Store, statements: list[tuple[str, int]]
) -> None:
    old, _ = _fill(store, 500)
    new_counter = TokenCounter(NEW)
    for _ in range(3):
        assert not store.recount(old.session_id, new_counter, batch_size=100, batches=1)
    history = list(store.history(old.session_id))
    assert [m.encoding for m in history] == [NEW] * 300 + [OLD] * 700
    statements.clear()
    assert store.recount(old.session_id, new_counter, batch_size=400)
    # 700 left: one batch of 400, then the last 300 (none counted twice)
    assert [_updated_messages(t) for t in _transactions(statements)] == [0, 400, 300]
    _assert_consistent(store, old.session_id, NEW)


def test_clear_and_prune_survive_a_recount(store: Store) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from tokenmem.models import utcnow

    old, _ = _fill(store, 300)
    with store.engine.begin() as conn:
        conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.position < 100)
            .values(created_at=utcnow() - timedelta(days=9))
        )
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )
    assert not store.recount(old.session_id, new.counter, batch_size=150, batches=1)
    assert store.prune(timedelta(days=1), owner="").messages == 100
    old.clear()
    old.save_context({"input": "after clear"}, {"output": "only this"})
    assert store.recount(old.session_id, new.counter, batch_size=150)
    assert new.buffer == old.buffer == "Human: after clear\nAI: only this"
    assert len(list(store.history(old.session_id))) == 502


def test_saves_racing_a_recount_end_counted_with_the_new_encoding(store: Store) -> None:
    """The new model saves (each save running a batch of its own) while
    ``Store.recount`` runs in small batches: every row ends counted with the
    new encoding and the running floors stay exact."""
    import threading

    old, _ = _fill(store, 300)
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )
    stop = threading.Event()
    saved: list[int] = []

    def writer() -> None:
        while not stop.is_set() or len(saved) < 20:
            new.save_context({"input": f"race {len(saved)}"}, {"output": "racing"})
            saved.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while not saved:
            time.sleep(0.001)
        assert store.recount(old.session_id, new.counter, batch_size=40)
    finally:
        stop.set()
        thread.join()
    history = list(store.history(old.session_id))
    assert len(history) == 600 + 2 * len(saved)
    _assert_consistent(store, old.session_id, NEW)


def test_two_models_writing_one_session_keep_it_consistent(store: Store) -> None:
    """Old and new model alternate (a rolling deploy): each save by the
    model whose encoding the session does not have runs a batch towards its
    own, so the session may switch back and forth, but every state is
    consistent and both windows stay exact — also when the recount has come
    within a window of the newest message (2,000 messages: the new model's
    second save recounts up to position 1,999, six newer ones are left)."""
    old, messages = _fill(store, 1000)
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )
    for i in range(6):
        for memory in (new, old):
            said = memory.counter.encoding_name
            memory.save_context({"input": f"deploy {i}"}, {"output": said})
            messages += [Message("human", f"deploy {i}"), Message("ai", said)]
        for memory in (new, old):
            assert [w.message for w in memory.window()] == reference_text(
                messages, memory.rule, memory.counter
            )
    assert store.recount(old.session_id, new.counter)
    _assert_consistent(store, old.session_id, NEW)


def test_a_switch_abandoned_halfway_is_finished_by_recount(store: Store) -> None:
    """The new model saved once and went away (rolled back): the session
    keeps its encoding, its oldest messages another; loads are counted in
    Python. ``tokenmem recount --encoding`` with the session's own encoding
    finishes it; without one it is left alone."""
    from tokenmem.transfer import recount

    old, messages = _fill(store, 700)
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )
    new.save_context({"input": "hello"}, {"output": "from the new model"})
    messages += [Message("human", "hello"), Message("ai", "from the new model")]
    (stats,) = store.session_stats()
    assert (stats.encoding, stats.recounting) == (OLD, 1000)
    assert [w.message for w in old.window()] == reference_text(messages, old.rule, old.counter)
    assert recount(store, None) == 0  # filling in uncounted rows only: not this
    assert recount(store, TokenCounter(OLD)) == 1
    (stats,) = store.session_stats()
    assert (stats.encoding, stats.recounting) == (OLD, 0)
    _assert_consistent(store, old.session_id, OLD)
    assert recount(store, TokenCounter(OLD)) == 0


def test_two_recounts_at_once_never_switch_a_session_half_counted(store: Store) -> None:
    """A recount to o200k_base counts the oldest 1,000 messages; a recount
    to the session's own cl100k_base then rewrites them; when the first
    goes on, its last batch finds its work undone and starts again, so the
    session is never switched with messages of another encoding."""
    from functools import partial

    from tokenmem import writes
    from tokenmem.validate import SessionKey

    old, _ = _fill(store, 1000)
    key, new_counter = SessionKey.of(old.session_id, ""), TokenCounter(NEW)
    at = store.run(partial(writes.recount_start, key=key, encoding=NEW))
    at = store.run(partial(writes.recount_batch, key=key, counter=new_counter, at=at, size=1000))
    assert (at.after, at.done) == (999, False)
    assert store.recount(old.session_id, old.counter)  # the session's own: whole, at once
    _assert_consistent(store, old.session_id, OLD)
    at = store.run(partial(writes.recount_batch, key=key, counter=new_counter, at=at, size=5000))
    assert (at.after, at.done) == (-1, False)  # its work was undone: from the oldest again
    while not at.done:
        at = store.run(
            partial(writes.recount_batch, key=key, counter=new_counter, at=at, size=5000)
        )
    _assert_consistent(store, old.session_id, NEW)


def test_an_old_encoding_that_cannot_be_loaded_switches_the_session_at_once(
    store: Store,
) -> None:
    """A session counted with an encoding this machine cannot load (no
    network): the new model's append counts the whole session with its own
    in its transaction, as it always did, rather than failing."""
    from sqlalchemy import update

    old, messages = _fill(store, 50)
    with store.engine.begin() as conn:
        conn.execute(update(SESSIONS).values(encoding="nosuch_base"))
        conn.execute(update(MESSAGES).values(encoding="nosuch_base"))
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )
    new.save_context({"input": "hi"}, {"output": "there"})
    messages += [Message("human", "hi"), Message("ai", "there")]
    _assert_consistent(store, old.session_id, NEW)
    assert [w.message for w in new.window()] == reference_text(messages, new.rule, new.counter)


def test_a_failed_recount_batch_after_a_save_does_not_fail_the_save(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch a save by another model runs comes after the save's commit:
    an error in it is logged, and the exchange is saved once."""
    from tokenmem import StoreError, writes

    old, _ = _fill(store, 50)
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding=NEW, max_token_limit=200
    )

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("database error: simulated")

    original = writes.recount_batch
    writes.recount_batch = failing  # type: ignore[assignment]
    try:
        new.save_context({"input": "saved"}, {"output": "once"})
    finally:
        writes.recount_batch = original  # type: ignore[assignment]
    assert [m.content for m in store.history(old.session_id)][-2:] == ["saved", "once"]
    assert "simulated" in caplog.text
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="batch_size must be an int >= 1"):
            store.recount(old.session_id, new.counter, batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="batches must be an int >= 0"):
        store.recount(old.session_id, new.counter, batches=-1)
