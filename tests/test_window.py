"""The SQL window against a plain-Python reference, on both databases."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmem import (
    ConfigurationError,
    ConversationTokenBufferMemory,
    Message,
    Rule,
    Store,
    TokenCounter,
)
from tokenmem.window import fit, get_buffer_string


def test_fit() -> None:
    assert fit([3, 4, 5], 9) == 1
    assert fit([3, 4, 5], 12) == 0
    assert fit([3, 4, 5], 4) == 3
    assert fit([], 10) == 0


def reference_text(messages: list[Message], rule: Rule, counter: TokenCounter) -> list[Message]:
    """LangChain's rule on the rendered string itself: drop the oldest line
    while the lines joined by newlines count more than the limit."""
    window = list(messages)

    def rendered(window: list[Message]) -> str:
        return get_buffer_string(window, rule.human_prefix, rule.ai_prefix)

    while window and counter.count(rendered(window)) > rule.limit:
        window = window[1:]
    return window


def test_get_buffer_string_has_langchain_s_signature() -> None:
    messages = [Message("system", "be brief"), Message("human", "hi"), Message("ai", "yo")]
    assert get_buffer_string(messages) == "System: be brief\nHuman: hi\nAI: yo"
    assert get_buffer_string(messages[1:], human_prefix="人类", ai_prefix="助手") == (
        "人类: hi\n助手: yo"
    )
    with pytest.raises(ConfigurationError, match="takes str prefixes, as LangChain's, not Rule"):
        get_buffer_string(messages, Rule(limit=5))  # type: ignore[arg-type]


def reference_messages(messages: list[Message], limit: int, counter: TokenCounter) -> list[Message]:
    """OpenAI's chat formula: 3 + role + content per message, 3 for the priming."""
    roles = {"human": "user", "ai": "assistant", "system": "system"}
    costs = [3 + counter.count(roles[m.type]) + counter.count(m.content) for m in messages]
    return messages[fit(costs, limit - 3) :]


texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="你好世界吗？！，。人工智能 abc\n\r ", max_size=30),
    st.sampled_from(["", " ", "\r\n ", "<|endoftext|>", "hi", "not much", "😀", "a\n"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=100, max_size=400),
).filter(lambda t: "\x00" not in t)
prefixes = st.sampled_from(["Human", "AI", "人类", "人工智能", "User 1", "", "a:", "x\n", "🤖"])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    exchanges=st.lists(st.tuples(texts, texts), min_size=0, max_size=12),
    limit=st.integers(min_value=1, max_value=400),
    human_prefix=prefixes,
    ai_prefix=prefixes,
    encoding=st.sampled_from(["o200k_base", "cl100k_base"]),
    clear_after=st.integers(min_value=0, max_value=12),
)
def test_window_matches_reference(
    store: Store,
    exchanges: list[tuple[str, str]],
    limit: int,
    human_prefix: str,
    ai_prefix: str,
    encoding: str,
    clear_after: int,
) -> None:
    memory = ConversationTokenBufferMemory(
        store=store,
        session_id=uuid.uuid4().hex,
        max_token_limit=limit,
        human_prefix=human_prefix,
        ai_prefix=ai_prefix,
        encoding=encoding,
    )
    messages: list[Message] = []
    for i, (human, ai) in enumerate(exchanges):
        if i == clear_after:
            memory.clear()
            messages = []
        memory.save_context({"input": human}, {"output": ai})
        messages += [Message("human", human), Message("ai", ai)]
    counter = memory.counter
    rule = memory.rule

    expected = reference_text(messages, rule, counter)
    rendered = memory.buffer_as_str
    window = [w.message for w in memory.window(return_messages=False)]
    assert counter.count(rendered) <= limit
    if rule.exact_lines(counter):  # the SQL counts the rendered string exactly
        assert window == expected
    else:  # counted again: a newest run that fits, perhaps not the longest
        assert window == messages[len(messages) - len(window) :]
        assert len(window) <= len(expected)

    assert memory.buffer_as_messages == reference_messages(messages, limit, counter)
    # Each message's cost comes back with it, as the chat formula counts it.
    chat = memory.window(return_messages=True)
    roles = {"human": "user", "ai": "assistant", "system": "system"}
    assert [w.tokens for w in chat] == [
        3 + counter.count(roles[w.message.type]) + counter.count(w.message.content) for w in chat
    ]


def test_window_after_switching_encoding(store: Store) -> None:
    """A session counted with cl100k_base, read and then written with o200k_base."""
    old = ConversationTokenBufferMemory(store=store, encoding="cl100k_base", max_token_limit=30)
    messages = []
    for i in range(30):
        human, ai = f"你好 number {i}", f"reply {'很好' * (i % 4)}"
        old.save_context({"input": human}, {"output": ai})
        messages += [Message("human", human), Message("ai", ai)]
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding="o200k_base", max_token_limit=30
    )
    o200k = new.counter
    assert [w.message for w in new.window()] == reference_text(messages, new.rule, o200k)
    assert new.buffer_as_messages == reference_messages(messages, 30, o200k)
    # Reading never rewrote the counts; the next write recounts the session.
    assert {m.encoding for m in new.history()} == {"cl100k_base"}
    new.save_context({"input": "switch"}, {"output": "done"})
    messages += [Message("human", "switch"), Message("ai", "done")]
    history = list(new.history())
    assert {m.encoding for m in history} == {"o200k_base"}
    assert [m.text_tokens for m in history] == [o200k.count(" " + m.content) for m in messages]
    assert [w.message for w in new.window()] == reference_text(messages, new.rule, o200k)
    # And the old model still gets its own, correct, window.
    assert [w.message for w in old.window()] == reference_text(messages, old.rule, old.counter)


def test_window_of_one_huge_message_is_empty(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store, max_token_limit=20)
    memory.save_context({"input": "short"}, {"output": "word " * 50})
    assert memory.buffer == ""
    assert memory.buffer_as_messages == []
    assert len(list(memory.history())) == 2


def test_prune_then_encoding_switch_keeps_the_window(store: Store) -> None:
    """Recounting after retention deleted the oldest messages keeps every
    surviving message reachable (the clear() start is re-derived)."""
    from datetime import timedelta

    from sqlalchemy import update

    from tokenmem.models import MESSAGES, utcnow

    old = ConversationTokenBufferMemory(store=store, encoding="cl100k_base", max_token_limit=200)
    for i in range(4):
        old.save_context({"input": f"q{i}"}, {"output": f"a{i}"})
    with store.engine.begin() as conn:
        conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.position < 2)
            .values(created_at=utcnow() - timedelta(days=9))
        )
    assert store.prune(timedelta(days=1), owner="").messages == 2
    expected = "Human: q1\nAI: a1\nHuman: q2\nAI: a2\nHuman: q3\nAI: a3"
    assert old.buffer == expected
    new = ConversationTokenBufferMemory(
        store=store, session_id=old.session_id, encoding="o200k_base", max_token_limit=200
    )
    assert new.buffer == expected  # read path, counted in Python
    new.save_context({"input": "q4"}, {"output": "a4"})  # recounts the session
    assert new.buffer == expected + "\nHuman: q4\nAI: a4"
    new.clear()
    new.save_context({"input": "q5"}, {"output": "a5"})
    store.recount(new.session_id, TokenCounter("cl100k_base"))
    assert old.buffer == "Human: q5\nAI: a5"


def test_a_window_as_long_as_the_row_cap_is_asked_again_without_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement reads at most row_cap(rule) rows; a window of exactly
    that many may have been cut, so the store asks again uncapped (a message
    costs at least two tokens, so the real cap is never reached: forced here)."""
    from tokenmem import reads

    memory = ConversationTokenBufferMemory(store=store, max_token_limit=200)
    for i in range(20):
        memory.save_context({"input": f"q{i}"}, {"output": f"a{i}"})
    expected = memory.window()
    assert len(expected) > 8
    sent: list[int | None] = []
    select = reads.window_select

    def recording(
        mode: str, cap: int | None = None, start_on: None = None, include_open: bool = False
    ) -> object:
        sent.append(cap)
        return select(mode, cap, start_on, include_open)  # type: ignore[arg-type]

    monkeypatch.setattr(reads, "window_select", recording)
    monkeypatch.setattr(reads, "row_cap", lambda rule: 4)
    assert memory.window() == expected
    assert sent == [4, None]
