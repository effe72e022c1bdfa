"""tokenmem inside LangChain (tokenmem.langchain), against the real
langchain-core and langchain-classic with LangChain's fake models, on SQLite
and PostgreSQL: RunnableWithMessageHistory over sessions and owners, tool
calls added as LangChain adds them (the call with one output, its answers
with the next input), every message type round-tripped, the window against
``trim_messages`` with exact counting, and the BaseMemory inside
langchain-classic's own ConversationChain.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_classic.chains import ConversationChain
from langchain_classic.chains.conversation.prompt import PROMPT
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_openai_messages,
    trim_messages,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import ConfigurableFieldSpec
from langchain_core.runnables.history import RunnableWithMessageHistory
from sqlalchemy import Engine

from tokenmem import AsyncStore, ConfigurationError, InvalidInputError, Store, TokenCounter
from tokenmem.langchain import (
    ConversationTokenBufferMemory,
    SQLTokenWindowHistory,
    from_langchain,
    to_langchain,
)

from .conftest import async_twin
from .openai_rules import MessageRuleError, check_messages
from .test_chat import chat_cost, words

# LangChain deprecates the classes users still run (the reason for this module).
pytestmark = [
    pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated"),
    pytest.mark.filterwarnings("ignore:The class `ConversationChain` was deprecated"),
]

O200K = TokenCounter("o200k_base")
PRIMING = 3  # the reply priming: counted once per request


def exact(messages: list[BaseMessage]) -> int:
    """An exact token counter for trim_messages: the chat formula of each
    message's OpenAI dict (tokenmem.chat's documented rule, written out in
    tests/test_chat.py), without the reply priming — trim_messages calls it
    once for the system message and once for the rest, so a counter adding
    the priming counts it twice; the limit is given less the priming."""
    return sum(chat_cost(O200K, d) for d in convert_to_openai_messages(messages))


def trimmed(messages: list[BaseMessage], limit: int, start_on: str | None) -> list[BaseMessage]:
    return trim_messages(
        messages,
        strategy="last",
        token_counter=exact,
        max_tokens=limit - PRIMING,
        start_on=start_on,  # type: ignore[arg-type]
        include_system=True,
        allow_partial=False,
    )


class Prompts(BaseCallbackHandler):
    """Records what each model call was sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], **kwargs: Any
    ) -> None:
        self.sent.append(messages[0])

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kwargs: Any) -> None:
        self.sent.append(prompts[0])


WEATHER_CALL = AIMessage(
    "",
    id="run-1",
    tool_calls=[
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_p"},
        {"name": "get_weather", "args": {"city": "Rome"}, "id": "call_r"},
    ],
    response_metadata={"model_name": "gpt-4o-mini", "finish_reason": "tool_calls"},
    usage_metadata={"input_tokens": 20, "output_tokens": 9, "total_tokens": 29},
)
EVERY_KIND: list[BaseMessage] = [
    SystemMessage("You answer weather questions."),
    SystemMessage("Use metric units.", additional_kwargs={"__openai_role__": "developer"}),
    HumanMessage("Weather in Paris and Rome?", name="ann", id="h-1"),
    HumanMessage(
        [
            {"type": "text", "text": "And this city?"},
            {"type": "image_url", "image_url": {"url": "https://example.test/city.png"}},
        ]
    ),
    WEATHER_CALL,
    ToolMessage("25C", tool_call_id="call_r", name="get_weather", artifact={"raw": [25]}),
    ToolMessage("18C", tool_call_id="call_p", status="success", id="t-2"),
    AIMessage(
        "Paris 18C, Rome 25C.",
        additional_kwargs={"refusal": None, "x": {"kept": [1, 2.5]}},
        response_metadata={"model_name": "gpt-4o-mini", "finish_reason": "stop"},
    ),
    HumanMessage([{"type": "text", "text": "thanks"}, {"type": "text", "text": "bye"}]),
    ChatMessage("any time", role="assistant"),
]


def test_the_core_works_without_the_extras_and_an_extra_s_error_names_it() -> None:
    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )

    loaded = run(
        "import sys, tokenmem, tokenmem.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('langchain')))"
    )
    assert loaded.stdout.strip() == "[]", loaded.stderr
    # Without the optional packages (an import of each fails, as when it is
    # not installed), the core imports and works: a memory saves and loads.
    works = run(
        "import sys\n"
        "for name in ('langchain_core', 'langchain_classic', 'langchain_openai', 'agents',"
        " 'starlette', 'jinja2', 'uvicorn'):\n"
        "    sys.modules[name] = None\n"
        "import tokenmem, tokenmem.cli\n"
        "from tokenmem import ConversationTokenBufferMemory, Store\n"
        "store = Store('sqlite://', upgrade=True)\n"
        "memory = ConversationTokenBufferMemory(store=store, max_token_limit=10)\n"
        "memory.save_context({'input': 'hi'}, {'output': 'whats up'})\n"
        "print(memory.load_memory_variables({}))\n"
    )
    assert works.stdout.strip() == "{'history': 'Human: hi\\nAI: whats up'}", works.stderr
    missing = run("import sys; sys.modules['langchain_core'] = None; import tokenmem.langchain")
    assert missing.returncode != 0
    assert "ImportError: tokenmem.langchain needs LangChain: pip install 'tokenmem[langchain]'" in (
        missing.stderr
    )
    # The history needs langchain-core only; the BaseMemory, langchain-classic.
    classic = run(
        "import sys; sys.modules['langchain_classic'] = None\n"
        "from tokenmem.langchain import SQLTokenWindowHistory\n"
        "from tokenmem.langchain import ConversationTokenBufferMemory"
    )
    assert "pip install langchain-classic" in classic.stderr
    assert "SQLTokenWindowHistory" not in classic.stderr


# --- messages -------------------------------------------------------------------------


def test_every_message_type_round_trips(store: Store) -> None:
    """Added in two calls — the model's tool calls, then their answers — and
    read back equal (ids, metadata, content parts, the developer role), in
    the window and in the full history; the OpenAI dicts are LangChain's
    conversion, which tokenmem's own API reads."""
    history = SQLTokenWindowHistory("kinds", store=store, max_token_limit=10_000)
    history.add_messages(EVERY_KIND[:5])
    assert history.messages == EVERY_KIND[:5]  # the open call ends the window
    history.add_messages(EVERY_KIND[5:])
    assert history.messages == EVERY_KIND
    assert SQLTokenWindowHistory("kinds", store=store).messages == EVERY_KIND
    oai = history.memory.load_messages()
    assert oai == convert_to_openai_messages(EVERY_KIND)
    check_messages(oai)  # what the API accepts
    # Kept in metadata only when the OpenAI dict does not rebuild it.
    stored = list(history.memory.history())
    assert stored[0].metadata is None and stored[4].metadata is not None
    assert [m.turn for m in stored] == [0] * 5 + [1] * 5


def test_messages_saved_by_tokenmem_read_as_langchain_messages(store: Store) -> None:
    from tokenmem import ConversationTokenBufferMemory as Memory

    memory = Memory(store=store, session_id="native", max_token_limit=500)
    memory.save_messages(convert_to_openai_messages(EVERY_KIND[1:8]))  # type: ignore[arg-type]
    memory.save_context({"input": "hi"}, {"output": "hello"})
    expected = [
        SystemMessage("Use metric units.", additional_kwargs={"__openai_role__": "developer"}),
        HumanMessage("Weather in Paris and Rome?", name="ann"),
        EVERY_KIND[3],
        AIMessage("", tool_calls=WEATHER_CALL.tool_calls),
        ToolMessage("25C", tool_call_id="call_r", name="get_weather"),
        ToolMessage("18C", tool_call_id="call_p"),
        AIMessage("Paris 18C, Rome 25C."),  # (LangChain's conversion drops the rest)
        HumanMessage("hi"),
        AIMessage("hello"),
    ]
    assert SQLTokenWindowHistory("native", store=store).messages == expected
    assert [to_langchain(m) for m in memory.buffer_as_messages] == expected


@pytest.mark.parametrize(
    ("first", "then", "error"),
    [
        ([FunctionMessage("x", name="f")], [], "role must be one of"),
        ([ChatMessage("x", role="robot")], [], "role must be one of"),
        ([ToolMessage("18C", tool_call_id="call_x")], [], "'call_x', which no open tool call"),
        ([WEATHER_CALL], [HumanMessage("well?")], r"tool_calls \['call_p', 'call_r'\]"),
        ([WEATHER_CALL], [EVERY_KIND[5], HumanMessage("?")], r"\['call_p'\] \(message 1\)"),
        ([WEATHER_CALL, HumanMessage("well?")], [], r"\['call_p', 'call_r'\] have no tool"),
        ([HumanMessage("a\x00b")], [], "NUL"),
    ],
)
def test_what_cannot_be_kept_is_refused_and_nothing_is_written(
    store: Store, first: list[BaseMessage], then: list[BaseMessage], error: str
) -> None:
    history = SQLTokenWindowHistory("bad", store=store, max_token_limit=500)
    history.add_messages([HumanMessage("before")])
    with pytest.raises(InvalidInputError, match=error):
        history.add_messages(first)
        history.add_messages(then)
    kept = SQLTokenWindowHistory("bad", store=store).messages
    assert kept[0] == HumanMessage("before") and HumanMessage("well?") not in kept


def test_clear_starts_an_empty_window_and_keeps_the_history(store: Store) -> None:
    history = SQLTokenWindowHistory("c", store=store, max_token_limit=100)
    history.add_user_message("hello")
    history.add_ai_message("hi")
    assert [m.content for m in history.messages] == ["hello", "hi"]
    history.clear()
    assert history.messages == [] and SQLTokenWindowHistory("c", store=store).messages == []
    history.add_messages([HumanMessage("again")])
    assert SQLTokenWindowHistory("c", store=store).messages == [HumanMessage("again")]
    assert [m.content for m in history.memory.history()] == ["hello", "hi", "again"]
    assert SQLTokenWindowHistory("never", store=store).messages == []


# --- RunnableWithMessageHistory ---------------------------------------------------------


def test_runnable_with_message_history_over_sessions_and_owners(store: Store) -> None:
    """Three conversations — alice's c1 and c2, bob's c1 — interleaved: each
    model call gets its session's window (what trim_messages gives of the
    session's messages), and each session keeps exactly its messages."""
    prompts = Prompts()
    replies = iter(f"reply {i}: " + "words " * (i % 4) for i in itertools.count())
    model = GenericFakeChatModel(messages=replies, callbacks=[prompts])
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Be brief."), MessagesPlaceholder("history"), ("human", "{input}")]
    )
    chat = RunnableWithMessageHistory(
        prompt | model,
        lambda user_id, conversation_id: SQLTokenWindowHistory(
            conversation_id, store=store, owner=user_id, max_token_limit=60
        ),
        input_messages_key="input",
        history_messages_key="history",
        history_factory_config=[
            ConfigurableFieldSpec(id="user_id", annotation=str, is_shared=True),
            ConfigurableFieldSpec(id="conversation_id", annotation=str, is_shared=True),
        ],
    )
    sessions = [("alice", "c1"), ("alice", "c2"), ("bob", "c1")]
    reference: dict[tuple[str, str], list[BaseMessage]] = {key: [] for key in sessions}
    for turn in range(5):
        for user, conversation in sessions:
            text = f"{user} {conversation} turn {turn}?"
            config = {"configurable": {"user_id": user, "conversation_id": conversation}}
            reply = chat.invoke({"input": text}, config)  # type: ignore[arg-type]
            seen = prompts.sent[-1]
            past = reference[(user, conversation)]
            assert seen[1:-1] == trimmed(past, 60, None)
            assert seen[1:-1] or not past, "the window holds at least the last exchange"
            past += [HumanMessage(text), reply]
    for (user, conversation), messages in reference.items():
        assert SQLTokenWindowHistory(conversation, store=store, owner=user).messages == messages
    assert {s.session_id for s in store.sessions(owner="alice")} == {"c1", "c2"}


def test_tool_calls_through_runnable_with_message_history(store: Store) -> None:
    """The model calls two tools; the answers are the next input: the call
    is saved with the first output and ends the window until they come, and
    every request is one OpenAI accepts. A small window drops the call and
    its answers together, where trim_messages starts at a ToolMessage."""
    prompts = Prompts()
    final = AIMessage("Paris 18C, Rome 25C.", id="run-2")
    model = GenericFakeChatModel(
        messages=iter([WEATHER_CALL, final, "You are welcome."]), callbacks=[prompts]
    )
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You answer weather questions."),
            MessagesPlaceholder("history"),
            MessagesPlaceholder("input"),
        ]
    )
    chat = RunnableWithMessageHistory(
        prompt | model,
        lambda session_id: SQLTokenWindowHistory(session_id, store=store, max_token_limit=500),
        input_messages_key="input",
        history_messages_key="history",
    )
    config = {"configurable": {"session_id": "tools"}}
    question = HumanMessage("Weather in Paris and Rome?")
    answers = [
        ToolMessage("25C", tool_call_id="call_r"),
        ToolMessage("18C", tool_call_id="call_p"),
    ]
    assert chat.invoke({"input": [question]}, config) == WEATHER_CALL  # type: ignore[arg-type]
    assert chat.invoke({"input": answers}, config) == final  # type: ignore[arg-type]
    thanks = HumanMessage("Thanks!")
    welcome = chat.invoke({"input": [thanks]}, config)  # type: ignore[arg-type]
    assert prompts.sent[1][1:] == [question, WEATHER_CALL, *answers]
    for sent in prompts.sent:
        check_messages(convert_to_openai_messages(sent))
    conversation = [question, WEATHER_CALL, *answers, final, thanks, welcome]
    assert prompts.sent[2][1:] == conversation[:-1]
    # Room for the answers and what follows, not for their call.
    limit = PRIMING + exact(conversation[2:])
    small = SQLTokenWindowHistory("tools", store=store, max_token_limit=limit)
    assert small.messages == conversation[4:]
    assert trimmed(conversation, limit, None) == conversation[2:]  # an orphan ToolMessage first
    with pytest.raises(MessageRuleError, match="tool"):
        check_messages(convert_to_openai_messages(conversation[2:]))


# --- the window against trim_messages ---------------------------------------------------


@st.composite
def langchain_blocks(draw: st.DrawFn) -> list[BaseMessage]:
    """A message, or an AI message with tool calls and their answers."""
    kind = draw(st.sampled_from(["human", "parts", "ai", "tools"]))
    if kind == "human":
        return [HumanMessage(draw(words), id=draw(st.none() | st.just("h")))]
    if kind == "parts":
        return [
            HumanMessage(
                [
                    {"type": "text", "text": draw(words)},
                    {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
                ]
            )
        ]
    if kind == "ai":
        return [AIMessage(draw(words), id="r", response_metadata={"finish_reason": "stop"})]
    n = draw(st.integers(min_value=1, max_value=3))
    calls = [
        {"name": "lookup", "args": {"q": draw(words)}, "id": f"call_{uuid.uuid4().hex[:8]}"}
        for _ in range(n)
    ]
    answers = [ToolMessage(draw(words), tool_call_id=c["id"]) for c in draw(st.permutations(calls))]
    return [AIMessage(draw(words), tool_calls=calls), *answers]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    system=st.sampled_from([None, "system", "developer"]),
    pieces=st.lists(langchain_blocks(), min_size=1, max_size=8),
    cuts=st.sets(st.integers(min_value=1, max_value=40), max_size=5),
    limits=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=4),
)
def test_the_window_is_what_trim_messages_gives(
    store: Store,
    system: str | None,
    pieces: list[list[BaseMessage]],
    cuts: set[int],
    limits: list[int],
) -> None:
    """With exact counting, start_on="human" and include_system=True, the
    window is exactly trim_messages' (a window starting at a human message
    never splits a unit). Without start_on, trim_messages may start inside a
    unit, at a ToolMessage whose call it cut off (a request OpenAI refuses):
    the window is its result without those. The conversation is added in
    add_messages calls cut anywhere, between a call and its answers too."""
    messages = [m for block in pieces for m in block]
    if system is not None:
        extra = {"__openai_role__": "developer"} if system == "developer" else {}
        messages.insert(0, SystemMessage("Answer briefly.", additional_kwargs=extra))
    session = uuid.uuid4().hex
    writer = SQLTokenWindowHistory(session, store=store)
    bounds = [0, *sorted(c for c in cuts if c < len(messages)), len(messages)]
    for lo, hi in itertools.pairwise(bounds):
        writer.add_messages(messages[lo:hi])
    assert writer.messages == messages
    for limit, start_on in itertools.product(limits, [None, "human"]):
        history = SQLTokenWindowHistory(
            session,
            store=store,
            max_token_limit=limit,
            start_on=start_on,  # type: ignore[arg-type]
        )
        if system is not None and PRIMING + exact(messages[:1]) > limit:
            with pytest.raises(ConfigurationError, match="pinned system prompt alone"):
                history.messages  # noqa: B018
            continue  # (trim_messages keeps the system message alone)
        expected = trimmed(messages, limit, start_on)
        if start_on is None:
            pinned = expected[:1] if system else []
            rest = expected[len(pinned) :]
            while rest and isinstance(rest[0], ToolMessage):
                rest = rest[1:]
            expected = pinned + rest
        assert history.messages == expected


# --- async ------------------------------------------------------------------------------


def test_async_store(db: Engine) -> None:
    async def main() -> None:
        store = AsyncStore(async_twin(db))
        await store.upgrade()
        try:
            history = SQLTokenWindowHistory("a", store=store, max_token_limit=10_000)
            await history.aadd_messages(EVERY_KIND[:5])
            await history.aadd_messages(EVERY_KIND[5:])
            assert await history.aget_messages() == EVERY_KIND
            everything = SQLTokenWindowHistory("a", store=store)
            assert await everything.aget_messages() == EVERY_KIND
            with pytest.raises(ConfigurationError, match="use its a-methods"):
                history.add_messages([HumanMessage("x")])
            prompts = Prompts()
            model = GenericFakeChatModel(messages=iter(["one", "two"]), callbacks=[prompts])
            prompt = ChatPromptTemplate.from_messages(
                [MessagesPlaceholder("history"), ("human", "{input}")]
            )
            chat = RunnableWithMessageHistory(
                prompt | model,
                lambda session_id: SQLTokenWindowHistory(session_id, store=store),
                input_messages_key="input",
                history_messages_key="history",
            )
            config: Any = {"configurable": {"session_id": "b"}}
            await chat.ainvoke({"input": "hi"}, config)
            await chat.ainvoke({"input": "again"}, config)
            assert [m.content for m in prompts.sent[1]] == ["hi", "one", "again"]
            await history.aclear()
            assert await history.aget_messages() == []
            assert len(await everything.aget_messages()) == 0
        finally:
            await store.close()

    asyncio.run(main())


def test_async_methods_on_a_sync_store(store: Store) -> None:
    async def main() -> None:
        history = SQLTokenWindowHistory("s", store=store, max_token_limit=100)
        await history.aadd_messages([HumanMessage("hi"), AIMessage("yo", id="x")])
        assert await history.aget_messages() == [HumanMessage("hi"), AIMessage("yo", id="x")]
        await history.aclear()
        assert await history.aget_messages() == []

    asyncio.run(main())


# --- the BaseMemory in langchain-classic's ConversationChain -----------------------------


def test_conversation_chain_swaps_only_the_memory(store: Store) -> None:
    """langchain_classic's ConversationChain with a fake completion model and
    tokenmem's BaseMemory: each prompt holds the memory's window (a new
    memory on the same session sees it: it is in the database), and the
    exchanges are saved as LangChain saves them."""
    prompts = Prompts()
    llm = FakeListLLM(responses=[f"answer {i}" for i in range(6)], callbacks=[prompts])

    def memory() -> ConversationTokenBufferMemory:
        return ConversationTokenBufferMemory(
            llm=llm, max_token_limit=15, store=store, session_id="chain", encoding="o200k_base"
        )

    for i in range(4):
        window = memory().buffer
        chain = ConversationChain(llm=llm, memory=memory())
        assert chain.predict(input=f"question {i}") == f"answer {i}"
        assert prompts.sent[-1] == PROMPT.format(history=window, input=f"question {i}")
    assert memory().buffer == "Human: question 3\nAI: answer 3"
    assert O200K.count(memory().buffer_as_str) <= 15
    before = memory().buffer  # what the chain's result holds: the window it sent
    result = ConversationChain(llm=llm, memory=memory()).invoke({"input": "question 4"})
    assert result == {"input": "question 4", "history": before, "response": "answer 4"}
    everything = [m.content for m in memory().tokenmem_memory.history()]
    assert everything == [f"{kind} {i}" for i in range(5) for kind in ("question", "answer")]

    async def later() -> None:
        chain = ConversationChain(llm=llm, memory=memory())
        assert await chain.apredict(input="question 5") == "answer 5"

    asyncio.run(later())
    assert memory().load_memory_variables({}) == {"history": "Human: question 5\nAI: answer 5"}


def test_the_memory_has_langchains_surface(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store, return_messages=True, max_token_limit=40)
    assert memory.session_id and memory.memory_variables == ["history"]
    memory.save_context({"input": "hi"}, {"output": "whats up"})
    memory.save_context({"input": "not much you"}, {"output": "not much"})
    window = [
        HumanMessage("hi"),
        AIMessage("whats up"),
        HumanMessage("not much you"),
        AIMessage("not much"),
    ]
    assert memory.load_memory_variables({}) == {"history": window}
    assert memory.buffer == window == memory.buffer_as_messages
    assert memory.chat_memory.messages == window
    memory.chat_memory.add_messages([HumanMessage("and you?"), AIMessage("same")])
    assert memory.buffer_as_str.endswith("Human: and you?\nAI: same")
    same = ConversationTokenBufferMemory(store=store, session_id=memory.session_id)
    assert same.buffer_as_str == memory.buffer_as_str
    memory.clear()
    assert memory.buffer == [] and same.buffer == ""
    assert asyncio.run(memory.aload_memory_variables({})) == {"history": []}
    assert from_langchain([HumanMessage("x")])[0].metadata is None
    # tokenmem's checks, as pydantic reports a model's (a ValidationError, a ValueError)
    with pytest.raises(ValueError, match="max_token_limit must be positive, not 0"):
        ConversationTokenBufferMemory(store=store, max_token_limit=0)
