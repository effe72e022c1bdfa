"""OpenAI chat messages (issue 13): saved as given, windows an API accepts.

Property tests generate conversations with tool calls (parallel ones too),
system and developer messages, content parts and extra keys, save them in
random chunks, and check on SQLite and PostgreSQL that every window is
accepted by the OpenAI message rules (tests/openai_rules.py), never exceeds
the limit, equals a plain-Python reference written from the documented
rules, and round-trips byte-identically.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from tokenmem import (
    AsyncStore,
    ConfigurationError,
    ConversationTokenBufferMemory,
    InvalidInputError,
    Store,
    TokenCounter,
)

from .conftest import async_twin
from .openai_rules import check_messages

PINNED_ROLES = ("system", "developer")


def chat_cost(counter: TokenCounter, d: dict[str, Any]) -> int:
    """The documented rule (tokenmem.chat), written out again."""
    total = 3 + counter.count(d["role"])
    content = d.get("content")
    if isinstance(content, str):
        total += counter.count(content)
    elif isinstance(content, list):
        for part in content:
            if part["type"] == "text":
                total += counter.count(part["text"])
            elif part["type"] == "image_url":
                total += counter.image_tokens
            else:
                total += counter.count(json.dumps(part, ensure_ascii=False))
    if d.get("name"):
        total += counter.count(d["name"]) + 1
    for call in d.get("tool_calls") or ():
        f = call["function"]
        total += 3 + counter.count(f["name"]) + counter.count(f["arguments"])
    return total


def reference(
    messages: list[dict[str, Any]],
    limit: int,
    counter: TokenCounter,
    start_on: str | None,
    include_open: bool = False,
) -> list[dict[str, Any]] | None:
    """The pinned prompt (the newest run of system/developer messages), then
    the newest whole units that fit in what it leaves, from a user message
    with start_on="human"; a unit waiting for answers left out unless
    include_open. None: the pinned prompt alone is over the limit."""
    pinned: list[int] = []
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in PINNED_ROLES:
            pinned.insert(0, i)
        elif pinned:
            break
    budget = limit - 3 - sum(chat_cost(counter, messages[i]) for i in pinned)
    if pinned and budget < 0:
        return None
    # a unit whose calls are not all answered is not sent, nor anything after it
    waiting: dict[str, int] = {}
    for i, d in enumerate(messages):
        waiting.update({c["id"]: i for c in d.get("tool_calls") or ()})
        waiting.pop(d.get("tool_call_id", ""), None)
    end = len(messages) if include_open else min(waiting.values(), default=len(messages))
    rest = [i for i in range(end) if i not in pinned]
    answered_by: dict[str, int] = {}  # a call id: the assistant message making it
    unit_of: dict[int, int] = {}
    for i in rest:
        d = messages[i]
        for call in d.get("tool_calls") or ():
            answered_by[call["id"]] = i
        unit_of[i] = answered_by[d["tool_call_id"]] if d["role"] == "tool" else i
    total, start = 0, len(rest)
    for k in range(len(rest) - 1, -1, -1):
        total += chat_cost(counter, messages[rest[k]])
        if total > budget:
            break
        if unit_of[rest[k]] == rest[k]:
            start = k
    if start_on == "human":
        while start < len(rest) and messages[rest[start]]["role"] != "user":
            start += 1
    return [messages[i] for i in pinned] + [messages[i] for i in rest[start:]]


# --- conversations ----------------------------------------------------------------

words = st.text(alphabet="abc xyz 你好世界。!?\n", min_size=0, max_size=24)
ids = st.integers(min_value=0, max_value=10**9)


@st.composite
def blocks(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One self-contained piece of a conversation: a message, or an assistant
    message with tool calls and their answers."""
    kind = draw(st.sampled_from(["user", "user_parts", "assistant", "tools", "system", "dev"]))
    if kind == "user":
        d: dict[str, Any] = {"role": "user", "content": draw(words)}
        if draw(st.booleans()):
            d["name"] = draw(st.sampled_from(["alice", "bob"]))
        return [d]
    if kind == "user_parts":
        parts = draw(
            st.lists(
                st.one_of(
                    words.map(lambda t: {"type": "text", "text": t}),
                    st.just({"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}),
                ),
                min_size=1,
                max_size=3,
            )
        )
        return [{"role": "user", "content": parts}]
    if kind == "assistant":
        d = {"role": "assistant", "content": draw(words)}
        if draw(st.booleans()):
            d["x_extra"] = {"kept": [1, 2.5, None]}  # unknown keys are kept
        return [d]
    if kind in ("system", "dev"):
        return [{"role": "system" if kind == "system" else "developer", "content": draw(words)}]
    n = draw(st.integers(min_value=1, max_value=3))
    calls = [
        {
            "id": f"call_{draw(ids)}_{k}",
            "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"q": draw(words)})},
        }
        for k in range(n)
    ]
    answers = [
        {"role": "tool", "tool_call_id": c["id"], "content": draw(words)}
        for c in draw(st.permutations(calls))
    ]
    text = draw(st.one_of(st.none(), words))
    return [{"role": "assistant", "content": text, "tool_calls": calls}, *answers]


@st.composite
def conversations(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    """Blocks in save_messages calls split anywhere — a unit's calls in one
    call, its answers in the next — the last unit perhaps left open (some of
    its answers never saved)."""
    pieces = draw(st.lists(blocks(), min_size=1, max_size=10))
    last = pieces[-1]
    if last[0].get("tool_calls") and draw(st.booleans()):
        pieces[-1] = last[: draw(st.integers(min_value=1, max_value=len(last) - 1))]
    messages = [m for block in pieces for m in block]
    cuts = sorted(set(draw(st.lists(st.integers(1, len(messages)), max_size=6))))
    return [messages[i:j] for i, j in zip([0, *cuts], [*cuts, len(messages)], strict=True) if i < j]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chunks=conversations(),
    limits=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=4),
    start_on=st.sampled_from([None, "human"]),
    encoding=st.sampled_from(["o200k_base", "cl100k_base"]),
)
def test_windows_follow_the_rules(
    store: Store,
    chunks: list[list[dict[str, Any]]],
    limits: list[int],
    start_on: str | None,
    encoding: str,
) -> None:
    session = uuid.uuid4().hex
    saver = ConversationTokenBufferMemory(store=store, session_id=session, encoding=encoding)
    for chunk in chunks:
        saver.save_messages(chunk)
    saved = [m for chunk in chunks for m in chunk]
    counter = saver.counter

    def memory_for(limit: int, include_open: bool = False) -> ConversationTokenBufferMemory:
        return ConversationTokenBufferMemory(
            store=store,
            session_id=session,
            max_token_limit=limit,
            encoding=encoding,
            start_on=start_on,  # type: ignore[arg-type]
            include_open=include_open,
        )

    for limit in limits:
        memory = memory_for(limit)
        expected = reference(saved, limit, counter, start_on)
        if expected is None:
            with pytest.raises(ConfigurationError, match="pinned system prompt alone"):
                memory.load_messages()
            continue
        window = memory.load_messages()
        assert json.dumps(window) == json.dumps(expected)  # byte-identical, in order
        assert not window or 3 + sum(chat_cost(counter, d) for d in window) <= limit
        unpinned = [d for d in window if d["role"] not in PINNED_ROLES or d not in expected[:1]]
        if window and any(d["role"] not in PINNED_ROLES for d in window):
            check_messages(window)
        if start_on == "human" and unpinned:
            first = next((d for d in window if d["role"] not in PINNED_ROLES), None)
            assert first is None or first["role"] == "user"
        # The string window of the same session stays under the limit too.
        assert counter.count(memory.buffer_as_str) <= limit
        # include_open: a unit waiting for answers ends the window, as it is so far.
        window = memory_for(limit, include_open=True).load_messages()
        expected = reference(saved, limit, counter, start_on, include_open=True)
        assert json.dumps(window) == json.dumps(expected)
        assert not window or 3 + sum(chat_cost(counter, d) for d in window) <= limit
    # The full history keeps every message exactly.
    assert json.dumps([m.openai or _plain(m) for m in saver.history()]) == json.dumps(saved)


def _plain(m: Any) -> dict[str, Any]:
    from tokenmem.chat import as_openai

    return as_openai(m)


# --- examples ------------------------------------------------------------------------

WEATHER = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_p",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_r",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_r", "content": "25C"},
    {"role": "tool", "tool_call_id": "call_p", "content": "18C"},
    {"role": "assistant", "content": "Paris 18C, Rome 25C."},
]


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "tool", "tool_call_id": "x", "content": "?"}], "answers 'x', which no"),
        ([*WEATHER[:3], WEATHER[0]], r"tool_calls \['call_p'\] have no tool message"),
        ([*WEATHER[:2], WEATHER[0]], r"\['call_p', 'call_r'\] have no tool message answering"),
        ([{"role": "robot", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": None}], "content may be null only"),
        ([{"role": "system", "content": [{"type": "image_url"}]}], "take text parts only"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant messages"),
        ([{"role": "user", "content": float("nan")}], "not JSON"),
        ([{"role": "user", "content": "a\x00b"}], "NUL"),
        ([], "nothing to save"),
    ],
)
def test_bad_messages_are_refused_and_nothing_is_written(
    store: Store, messages: list[dict[str, Any]], error: str
) -> None:
    memory = ConversationTokenBufferMemory(store=store, session_id="bad")
    memory.save_messages([{"role": "user", "content": "before"}])
    payload = [{"role": "user", "content": "kept out"}, *messages] if messages else []
    with pytest.raises(InvalidInputError, match=error):
        memory.save_messages(payload)
    assert [m.content for m in memory.history()] == ["before"]


def test_a_unit_left_open_waits_for_its_answers(store: Store) -> None:
    """Calls may be answered in a later save (a chat loop saves the model's
    tool calls, runs the tools, saves the answers): until the last answer
    the unit is kept out of windows; another message first is refused."""
    memory = ConversationTokenBufferMemory(store=store, session_id="open", max_token_limit=500)
    memory.save_messages([{"role": "user", "content": "earlier"}])
    memory.save_messages(WEATHER[:2])  # the user's question and the calls
    waiting = [{"role": "user", "content": "earlier"}, WEATHER[0]]
    assert memory.load_messages() == waiting
    with pytest.raises(InvalidInputError, match=r"tool_calls \['call_p', 'call_r'\] .* before"):
        memory.save_messages([{"role": "user", "content": "never mind"}])
    with pytest.raises(InvalidInputError, match="'call_x', which no open tool call"):
        memory.save_messages([{"role": "tool", "tool_call_id": "call_x", "content": "?"}])
    memory.save_messages([WEATHER[2]])  # one answer: still open
    assert memory.load_messages() == waiting
    memory.save_messages(WEATHER[3:])  # the last answer, and the reply
    assert memory.load_messages() == [{"role": "user", "content": "earlier"}, *WEATHER]
    assert len(list(memory.history())) == 6  # the refused saves wrote nothing
    memory.save_messages([{"role": "user", "content": "thanks"}])
    # clear() forgets an open unit along with the window
    memory.save_messages(WEATHER[:2])
    memory.clear()
    memory.save_messages([{"role": "user", "content": "fresh"}])
    assert memory.load_messages() == [{"role": "user", "content": "fresh"}]


def test_include_open_ends_the_window_with_the_waiting_unit(store: Store) -> None:
    """For a caller whose next request sends the answers after the window
    (LangChain's RunnableWithMessageHistory): the unit waiting for answers
    ends the window, whole so far — from the statement, counted in Python
    (another encoding), and in text mode."""
    earlier = {"role": "user", "content": "earlier"}

    def memory(limit: int = 500, encoding: str = "o200k_base") -> ConversationTokenBufferMemory:
        return ConversationTokenBufferMemory(
            store=store,
            session_id="tail",
            max_token_limit=limit,
            encoding=encoding,
            include_open=True,
        )

    memory().save_messages([earlier])
    memory().save_messages(WEATHER[:2])
    assert memory().load_messages() == [earlier, *WEATHER[:2]]
    memory().save_messages([WEATHER[2]])
    tail = [earlier, *WEATHER[:3]]
    assert memory().load_messages() == tail
    check_messages([*tail, WEATHER[3]])  # the next request, the last answer after it
    assert memory(encoding="cl100k_base").load_messages() == tail
    assert memory().buffer_as_str.endswith("\nTool: 25C")
    # No room for the waiting unit: nothing newer fits either.
    costs = [chat_cost(memory().counter, d) for d in tail]
    assert memory(limit=3 + sum(costs[2:]) - 1).load_messages() == []
    assert memory(limit=3 + sum(costs[2:])).load_messages() == tail[2:]
    memory().save_messages(WEATHER[3:])  # answered: an ordinary unit
    assert memory().load_messages() == [earlier, *WEATHER]


def test_tool_traffic_in_string_windows_and_history(store: Store) -> None:
    """save_context and load_memory_variables keep working on a session
    holding tool calls; tool traffic renders by the documented rule."""
    memory = ConversationTokenBufferMemory(store=store, session_id="mixed", max_token_limit=500)
    memory.save_messages(WEATHER)
    memory.save_context({"input": "thanks"}, {"output": "any time"})
    assert memory.load_memory_variables({})["history"] == (
        "Human: Weather in Paris and Rome?\n"
        'AI: get_weather({"city": "Paris"})\n'
        'get_weather({"city": "Rome"})\n'
        "Tool: 25C\n"
        "Tool: 18C\n"
        "AI: Paris 18C, Rome 25C.\n"
        "Human: thanks\n"
        "AI: any time"
    )
    assert memory.load_messages()[-2:] == [
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "any time"},
    ]
    stored = list(memory.history())
    assert [m.type for m in stored] == ["human", "ai", "tool", "tool", "ai", "human", "ai"]
    assert stored[2].openai == WEATHER[2]
    assert stored[0].openai is None  # rebuilt exactly from role and content
    assert {m.turn for m in stored[:5]} == {0}  # one save_messages call, one turn


def test_the_window_never_splits_a_tool_call_from_its_answers(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store, session_id="units", encoding="o200k_base")
    memory.save_messages(WEATHER)
    counter = memory.counter
    costs = [chat_cost(counter, d) for d in WEATHER]
    # just room for the final answer and the two tool messages: not enough
    # for their call, so they go too
    tight = ConversationTokenBufferMemory(
        store=store, session_id="units", encoding="o200k_base", max_token_limit=3 + sum(costs[2:])
    )
    assert tight.load_messages() == WEATHER[4:]
    roomy = ConversationTokenBufferMemory(
        store=store, session_id="units", encoding="o200k_base", max_token_limit=3 + sum(costs[1:])
    )
    assert roomy.load_messages() == WEATHER[1:]
    starts = ConversationTokenBufferMemory(
        store=store,
        session_id="units",
        encoding="o200k_base",
        max_token_limit=3 + sum(costs[1:]),
        start_on="human",
    )
    assert starts.load_messages() == []  # no user message fits before them


def test_system_message_is_pinned_and_counted_first(store: Store) -> None:
    memory = ConversationTokenBufferMemory(
        store=store, session_id="pin", max_token_limit=40, system_message="Be brief."
    )
    assert memory.load_messages() == [{"role": "system", "content": "Be brief."}]
    for i in range(10):
        memory.save_context({"input": f"question {i}"}, {"output": f"answer {i}"})
    window = memory.load_messages()
    assert window[0] == {"role": "system", "content": "Be brief."}
    assert len(window) > 2
    counter = memory.counter
    assert 3 + sum(chat_cost(counter, d) for d in window) <= 40
    assert memory.buffer_as_str.startswith("System: Be brief.\nHuman: question")
    # A new prompt replaces the pinned one (the old stays in the history).
    other = ConversationTokenBufferMemory(
        store=store, session_id="pin", max_token_limit=40, system_message="Be kind."
    )
    assert other.load_messages()[0] == {"role": "system", "content": "Be kind."}
    assert "Be brief." not in [d["content"] for d in other.load_messages()]
    assert [m.content for m in other.history() if m.type == "system"] == ["Be brief.", "Be kind."]
    # Too long for the limit: a clear error.
    tiny = ConversationTokenBufferMemory(
        store=store, session_id="pin", max_token_limit=5, system_message="Be kind."
    )
    with pytest.raises(ConfigurationError, match="pinned system prompt alone costs"):
        tiny.load_messages()


def test_clear_unpins(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store, session_id="c", max_token_limit=100)
    memory.save_messages([{"role": "developer", "content": "Use metric units."}, WEATHER[0]])
    assert memory.load_messages()[0]["role"] == "developer"
    memory.clear()
    assert memory.load_messages() == []
    memory.save_messages([{"role": "user", "content": "hello"}])
    assert memory.load_messages() == [{"role": "user", "content": "hello"}]


def test_async_twins(db: Engine) -> None:
    async def main() -> None:
        store = AsyncStore(async_twin(db))
        await store.upgrade()
        try:
            memory = ConversationTokenBufferMemory(store=store, session_id="a", max_token_limit=500)
            await memory.asave_messages(WEATHER)
            assert json.dumps(await memory.aload_messages()) == json.dumps(WEATHER)
            with pytest.raises(InvalidInputError, match="which no open tool call"):
                await memory.asave_messages([WEATHER[2]])
        finally:
            await store.close()

    asyncio.run(main())
