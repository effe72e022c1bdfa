"""tokenmem.agents: the OpenAI Agents SDK's Session protocol over tokenmem,
on SQLite and PostgreSQL, against the real SDK (openai-agents, installed by
the test extra).

Property tests generate agent conversations — messages, reasoning items,
parallel function calls answered in any order, hosted tool items, calls
never answered (orphans), a last unit left open — add them in random
chunks, and check every token window against a plain-Python reference
built from the units the generator made (not from tokenmem's rules),
against the Responses API's pairing rules, the limit, and the stored items
byte for byte; and that popping items leaves the session exactly as never
having added them. Then the SDK itself: ``Runner.run`` through the local
OpenAI-compatible server, tool approvals, and a differential run beside the
SDK's own ``SQLAlchemySession``. The Runner runs with the SDK's default
model, the Responses API's, and with the Chat Completions model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import openai
import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIProvider,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.extensions.memory import SQLAlchemySession
from agents.memory import Session, SessionSettings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from tokenmem import ConfigurationError, InvalidInputError, Store, TokenCounter
from tokenmem.agents import TokenmemSession
from tokenmem.aio import AsyncStore
from tokenmem.models import MESSAGES, SESSIONS

from .conftest import async_twin
from .openai_rules import check_input, check_messages
from .openai_server import FakeOpenAI
from .test_chat_items import item_cost

T = TypeVar("T")
set_tracing_disabled(True)  # no trace exports to OpenAI from the tests


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def new(store: Store | AsyncStore, **options: Any) -> TokenmemSession:
    return TokenmemSession(uuid.uuid4().hex, store=store, **options)


def check_items(window: list[dict[str, Any]]) -> None:
    """The Responses API's pairing rules: every call answered after it, every
    output answering a call before it, every reasoning item followed by an
    item the model made."""
    calls: dict[str, int] = {}
    for i, d in enumerate(window):
        kind = d.get("type", "message")
        if kind.endswith("_call") and "call_id" in d:
            calls[d["call_id"]] = i
        elif kind.endswith("_output"):
            assert calls.pop(d["call_id"], None) is not None, f"output {i} answers no call"
        elif kind == "reasoning":
            after = window[i + 1] if i + 1 < len(window) else None
            assert after is not None, "a reasoning item ends the window"
            made = after.get("type", "message")
            assert not made.endswith("_output") and (
                made != "message" or after["role"] == "assistant"
            ), f"reasoning {i} is followed by {after}"
    assert not calls, f"calls never answered: {calls}"


# --- conversations, with the units the generator made -----------------------------

words = st.text(alphabet="ab xyz 你好。!\n", max_size=16)


def said(text: str) -> dict[str, Any]:
    return {
        "id": "__fake_id__",
        "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": []}],
        "role": "assistant",
        "status": "completed",
        "type": "message",
    }


@st.composite
def blocks(draw: st.DrawFn, open_: bool = False) -> list[dict[str, Any]]:
    """A unit (or an item of its own), as the SDK writes them. ``open_``: a
    unit left waiting (calls not all answered, or a lone reasoning item)."""
    kind = draw(
        st.sampled_from(
            ["calls", "calls"] if open_ else ["user", "said", "think", "calls", "hosted", "system"]
        )
    )
    if kind == "user":
        text = draw(words)
        if draw(st.booleans()):
            return [{"content": text, "role": "user"}]
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        ]
    if kind == "said":
        return [said(draw(words))]
    if kind == "hosted":
        return [{"id": "ws_1", "type": "web_search_call", "status": "completed", "action": {}}]
    if kind == "system":
        return [{"role": draw(st.sampled_from(["system", "developer"])), "content": draw(words)}]
    think = [
        {
            "id": f"rs_{k}",
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": draw(words)}],
            "encrypted_content": "gAAAA" + draw(st.text(alphabet="xyz+/=", max_size=8)),
        }
        for k in range(draw(st.integers(0 if kind == "calls" else 1, 2)))
    ]
    if kind == "think":
        return [*think, said(draw(words))]
    n = draw(st.integers(1, 3))
    tag = draw(st.uuids()).hex[:8]
    calls: list[dict[str, Any]] = [
        {
            "arguments": json.dumps({"city": draw(words)}),
            "call_id": f"call_{tag}_{k}",
            "name": "get_weather",
            "type": "function_call",
            "id": "__fake_id__",
        }
        for k in range(n)
    ]
    if draw(st.booleans()):
        calls[0] = {"type": "computer_call", "call_id": f"cc_{tag}", "action": {"type": "click"}}
    outputs = [
        {
            "call_id": c["call_id"],
            "output": draw(words),
            "type": f"{c['type']}_output",
        }
        for c in draw(st.permutations(calls))
    ]
    if open_:  # the SDK stopped before every output was saved (or the call left open)
        if think and draw(st.booleans()):
            return think[:1]
        return [*think, *calls, *outputs[: draw(st.integers(0, n - 1))]]
    return [*think, *calls, *outputs]


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[list[dict[str, Any]]], list[int], list[bool], int]:
    """add_items chunks (split anywhere), and for each item the index where
    its unit starts, whether it is an orphan (a unit left waiting that the
    conversation moved on from: the next item is a user's), and where a
    unit still waiting at the end starts."""
    items: list[dict[str, Any]] = []
    starts: list[int] = []
    orphans: list[bool] = []
    for _ in range(draw(st.integers(1, 8))):
        abandoned = draw(st.integers(0, 5)) == 0
        block = draw(blocks(open_=abandoned))
        starts += [len(items)] * len(block)
        orphans += [abandoned] * len(block)
        items += block
        if abandoned:  # the user moves on
            starts.append(len(items))
            orphans.append(False)
            items.append({"content": draw(words), "role": "user"})
    end = len(items)
    if draw(st.booleans()):
        block = draw(blocks(open_=True))
        end = len(items)
        starts += [end] * len(block)
        orphans += [False] * len(block)
        items += block
    cuts = sorted(set(draw(st.lists(st.integers(1, len(items)), max_size=5))))
    chunks = [items[i:j] for i, j in zip([0, *cuts], [*cuts, len(items)], strict=True) if i < j]
    return chunks, starts, orphans, end


def reference(
    items: list[dict[str, Any]],
    starts: list[int],
    orphans: list[bool],
    end: int,
    limit: int,
    counter: TokenCounter,
) -> list[dict[str, Any]] | None:
    """The pinned prompt (the newest run of system/developer messages), then
    the newest whole units that fit in what it leaves — orphans counted but
    never sent, nothing from the unit left open at the end. None: the pinned
    prompt alone is over the limit."""
    pinned: list[int] = []
    for i in range(len(items) - 1, -1, -1):
        if items[i].get("role") in ("system", "developer"):
            pinned.insert(0, i)
        elif pinned:
            break
    budget = limit - 3 - sum(item_cost(counter, items[i]) for i in pinned)
    if pinned and budget < 0:
        return None
    rest = [i for i in range(end) if i not in pinned]
    total, start = 0, len(rest)
    for k in range(len(rest) - 1, -1, -1):
        total += item_cost(counter, items[rest[k]])
        if total > budget:
            break
        if starts[rest[k]] == rest[k] and not orphans[rest[k]]:
            start = k
    return [items[i] for i in pinned] + [items[i] for i in rest[start:] if not orphans[i]]


def state(store: Store, session: TokenmemSession) -> tuple[Any, ...]:
    """The session's row and its messages' placement, for comparing sessions."""
    s, m = SESSIONS.c, MESSAGES.c
    sid = session._key.id

    def read(conn: Any) -> tuple[Any, ...]:
        row = conn.execute(
            select(
                s.next_position,
                s.next_turn,
                s.floor_total,
                s.start_position,
                s.pinned_first,
                s.pinned_last,
                s.open_position,
                s.open_floor,
                s.open_calls,
            ).where(s.id == sid)
        ).one()
        rows = conn.execute(
            select(m.position, m.turn, m.unit, m.cum_floor, m.tool_call_id)
            .where(m.session_id == sid)
            .order_by(m.position)
        ).all()
        return tuple(row), [tuple(r) for r in rows]

    return store.run(read)


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(
    conversation=conversations(),
    limits=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=3),
    encoding=st.sampled_from(["o200k_base", "cl100k_base"]),
)
def test_windows_hold_whole_units_that_fit(
    store: Store,
    conversation: tuple[list[list[dict[str, Any]]], list[int], list[bool], int],
    limits: list[int],
    encoding: str,
) -> None:
    chunks, starts, orphans, end = conversation
    items = [d for chunk in chunks for d in chunk]
    counter = TokenCounter(encoding)

    async def check() -> None:
        saver = new(store, encoding=encoding)
        for chunk in chunks:
            await saver.add_items(chunk)
        for limit in limits:
            reader = TokenmemSession(
                saver.session_id, store=store, max_token_limit=limit, encoding=encoding
            )
            expected = reference(items, starts, orphans, end, limit, counter)
            if expected is None:
                with pytest.raises(ConfigurationError, match="pinned system prompt alone"):
                    await reader.get_items()
                continue
            window = await reader.get_items()
            assert json.dumps(window) == json.dumps(expected)  # byte-identical, in order
            assert not window or 3 + sum(item_cost(counter, d) for d in window) <= limit
            check_items([d for d in window if d.get("role") not in ("system", "developer")])
        # get_items(limit): the newest items exactly, as the protocol says
        for n in (1, 2, 5, len(items), len(items) + 3):
            assert json.dumps(await saver.get_items(limit=n)) == json.dumps(items[-n:])

    run(check())


@SETTINGS
@given(conversation=conversations(), data=st.data())
def test_pop_item_is_the_inverse_of_add_items(
    store: Store,
    conversation: tuple[list[list[dict[str, Any]]], list[int], list[bool], int],
    data: st.DataObject,
) -> None:
    """Popping the newest k items leaves the session exactly as adding all
    but them would have — positions, turns, floors, the pinned prompt, the
    open unit (an output popped re-opens its call; an item that orphaned
    the unit before it, popped, makes it open again), every row's unit —
    and adding them back gives back every window."""
    chunks = conversation[0]
    items = [d for chunk in chunks for d in chunk]
    k = data.draw(st.integers(1, min(6, len(items))))
    fewer: list[list[dict[str, Any]]] = []
    left = len(items) - k
    for chunk in chunks:
        if left > 0:
            fewer.append(chunk[:left])
        left -= len(chunk)

    async def check() -> None:
        popping, built = new(store, max_token_limit=150), new(store, max_token_limit=150)
        for chunk in chunks:
            await popping.add_items(chunk)
        before = await popping.get_items()
        popped = [await popping.pop_item() for _ in range(k)]
        assert json.dumps(popped) == json.dumps(items[::-1][:k])
        for chunk in fewer:
            await built.add_items(chunk)
        if fewer:
            assert await asyncio.to_thread(state, store, popping) == await asyncio.to_thread(
                state, store, built
            )
        assert json.dumps(await popping.get_items()) == json.dumps(await built.get_items())
        await popping.add_items(popped[::-1])
        assert json.dumps(await popping.get_items()) == json.dumps(before)

    run(check())


# --- the protocol -------------------------------------------------------------------

WEATHER: list[dict[str, Any]] = [
    {"content": "Weather in Paris and Rome?", "role": "user"},
    {"id": "rs_1", "type": "reasoning", "summary": [], "encrypted_content": "gAAAAB0=="},
    {
        "arguments": '{"city":"Paris"}',
        "call_id": "c_p",
        "name": "get_weather",
        "type": "function_call",
    },
    {
        "arguments": '{"city":"Rome"}',
        "call_id": "c_r",
        "name": "get_weather",
        "type": "function_call",
    },
    {"call_id": "c_r", "output": "25C", "type": "function_call_output"},
    {"call_id": "c_p", "output": "18C", "type": "function_call_output"},
    said("Paris 18C, Rome 25C."),
]


def test_the_protocol_and_a_faithful_round_trip(store: Store) -> None:
    async def check() -> None:
        session = new(store, max_token_limit=10_000)
        assert isinstance(session, Session)  # the SDK's runtime-checkable protocol
        assert session.session_settings == SessionSettings()
        assert await session.get_items() == [] and await session.pop_item() is None
        odd = {"type": "mcp_list_tools", "id": "m", "server_label": "ü", "tools": [], "x": 1.5e-7}
        await session.add_items([*WEATHER, odd])
        await session.add_items([])  # nothing: no turn, no error
        everything = [*WEATHER, odd]
        assert json.dumps(await session.get_items()) == json.dumps(everything)
        assert json.dumps(await session.get_items(limit=3)) == json.dumps(everything[-3:])
        assert await session.get_items(limit=0) == []
        with pytest.raises(InvalidInputError, match="limit must be None or an int"):
            await session.get_items(limit=-1)
        assert json.dumps(await session.pop_item()) == json.dumps(odd)
        with pytest.raises(InvalidInputError, match="needs a call_id"):
            await session.add_items([{"type": "function_call_output", "output": "?"}])
        assert json.dumps(await session.get_items()) == json.dumps(WEATHER)  # nothing written
        history = list(store.history(session.session_id))
        assert [m.type for m in history] == ["human", "ai", "ai", "ai", "tool", "tool", "ai"]
        assert history[4].content == "25C" and history[2].content == 'get_weather({"city":"Paris"})'

    run(check())


def test_the_window_never_splits_a_call_from_its_outputs(store: Store) -> None:
    """A budget with room for the outputs and the reply but not the calls
    (and their reasoning): all of the unit goes; with room for it, all of it
    comes. The reasoning item never comes without its calls."""
    counter = TokenCounter("o200k_base")
    costs = [item_cost(counter, d) for d in WEATHER]

    async def window(limit: int) -> list[Any]:
        session = TokenmemSession(
            "units", store=store, max_token_limit=limit, encoding="o200k_base"
        )
        return await session.get_items()

    run(TokenmemSession("units", store=store).add_items(WEATHER))
    assert run(window(3 + sum(costs[2:]))) == WEATHER[6:]
    assert run(window(3 + sum(costs[1:]) - 1)) == WEATHER[6:]
    assert run(window(3 + sum(costs[1:]))) == WEATHER[1:]
    assert run(window(3 + sum(costs))) == WEATHER


def test_a_unit_waits_for_its_outputs_and_an_abandoned_one_is_never_sent(store: Store) -> None:
    """The Runner saves a call alone when it waits for a tool approval: the
    window leaves it out until its output comes. If the conversation moves
    on instead (the approval never given), the call is an orphan: kept in
    the history, never sent, and the window goes on after it."""

    async def check() -> None:
        session = new(store)
        await session.add_items(WEATHER[:3])
        assert await session.get_items() == WEATHER[:1]
        assert await session.get_items(limit=2) == WEATHER[1:3]  # the protocol's tail: all of it
        await session.add_items(WEATHER[3:5])
        assert await session.get_items() == WEATHER[:1]  # c_p still unanswered
        moved_on = {"content": "Never mind. Hello!", "role": "user"}
        await session.add_items([moved_on])
        assert await session.get_items() == [WEATHER[0], moved_on]
        assert len(list(store.history(session.session_id))) == 6
        late = {"call_id": "c_p", "output": "18C", "type": "function_call_output"}
        await session.add_items([late])  # answers no open call: an orphan too
        assert await session.get_items() == [WEATHER[0], moved_on]
        await session.pop_item()
        assert await session.pop_item() == moved_on  # the unit is open again
        await session.add_items(WEATHER[5:])
        assert await session.get_items() == WEATHER

    run(check())


def test_clear_session_and_owners(store: Store) -> None:
    async def check() -> None:
        alice = TokenmemSession("chat", store=store, owner="alice")
        bob = TokenmemSession("chat", store=store.owner("bob"))
        await alice.add_items(WEATHER)
        await bob.add_items([{"role": "user", "content": "bob's"}])
        assert len(await alice.get_items()) == 7 and len(await bob.get_items()) == 1
        await alice.clear_session()
        assert await alice.get_items() == [] and await alice.get_items(limit=5) == []
        assert await alice.pop_item() is None  # nothing since the clear
        assert len(list(store.history("chat", owner="alice"))) == 7  # the history stays
        await alice.add_items([{"role": "user", "content": "again"}])
        assert await alice.get_items() == [{"role": "user", "content": "again"}]
        assert await bob.get_items() == [{"role": "user", "content": "bob's"}]
        with pytest.raises(ConfigurationError, match="scoped to owner 'bob'"):
            TokenmemSession("chat", store=store.owner("bob"), owner="alice")

    run(check())


def test_settings_limit_and_configuration(store: Store) -> None:
    async def check() -> None:
        session = new(store, session_settings=SessionSettings(limit=2))
        await session.add_items(WEATHER)
        assert await session.get_items() == WEATHER[-2:]  # the SDK's count, as its sessions do
        assert await session.get_items(limit=3) == WEATHER[-3:]

    run(check())
    with pytest.raises(ConfigurationError, match="positive"):
        new(store, max_token_limit=0)
    with pytest.raises(ConfigurationError, match="unknown model"):
        new(store, model="no-such-model")
    assert new(store, model="gpt-4").counter.encoding_name == "cl100k_base"


def test_a_model_with_another_encoding_recounts_the_items(store: Store) -> None:
    """Items added by a session counting with another encoding are counted
    with the session's, then the session is recounted (one batch, after the
    commit): the window is then counted with the new encoding."""

    async def check() -> None:
        old = new(store, encoding="o200k_base", max_token_limit=10_000)
        await old.add_items(WEATHER)
        fresh = TokenmemSession(
            old.session_id, store=store, encoding="cl100k_base", max_token_limit=10_000
        )
        await fresh.add_items([{"content": "Thanks!", "role": "user"}])
        assert store.session(old.session_id).encoding == "cl100k_base"
        counter = TokenCounter("cl100k_base")
        items = [*WEATHER, {"content": "Thanks!", "role": "user"}]
        budget = 3 + sum(item_cost(counter, d) for d in items[1:])
        fitting = TokenmemSession(
            old.session_id, store=store, encoding="cl100k_base", max_token_limit=budget
        )
        assert await fitting.get_items() == items[1:]
        tight = TokenmemSession(
            old.session_id, store=store, encoding="cl100k_base", max_token_limit=budget - 1
        )
        assert await tight.get_items() == items[-2:]

    run(check())


def test_async_store(db: Engine) -> None:
    async def check() -> None:
        store = AsyncStore(async_twin(db))
        await store.upgrade()
        try:
            session = new(store, max_token_limit=10_000)
            await session.add_items(WEATHER)
            assert json.dumps(await session.get_items()) == json.dumps(WEATHER)
            assert await session.pop_item() == WEATHER[-1]
            assert await session.pop_item() == WEATHER[-2]
            assert await session.get_items() == WEATHER[:1]  # c_p waits again
            await session.clear_session()
            assert await session.get_items(limit=10) == []
        finally:
            await store.close()

    asyncio.run(check())


def test_importing_tokenmem_does_not_import_the_sdk() -> None:
    code = "import sys, tokenmem, tokenmem.agents; assert 'agents' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_the_sdk_the_error_names_the_extra(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "agents", None)
    monkeypatch.setitem(sys.modules, "agents.memory", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'tokenmem\[agents\]'"):
        new(store)


# --- the SDK's Runner, over real HTTP -------------------------------------------------


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"{city}: 20C"


@function_tool(needs_approval=True)
def book_flight(city: str) -> str:
    """Book a flight (asks for approval first)."""
    return f"booked to {city}"


@pytest.fixture(params=["store", "async_store"])
def any_store(request: pytest.FixtureRequest, db: Engine) -> Iterator[Store | AsyncStore]:
    if request.param == "store":
        yield Store(db, upgrade=True)
        return
    store = AsyncStore(async_twin(db))
    asyncio.run(store.upgrade())
    yield store
    asyncio.run(store.close())


def agent_over(server: FakeOpenAI) -> tuple[Agent[Any], openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    model = OpenAIChatCompletionsModel(model="gpt-4o-mini", openai_client=client)
    agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather, book_flight])
    agent.model = model
    return agent, client


def test_runner_turns_with_tool_calls(openai_server: FakeOpenAI, any_store: Any) -> None:
    """Five turns of a real Agent, each calling the tool (two in parallel
    once) before answering, with a budget smaller than the history: every
    request the SDK makes is the window plus the turn, accepted by the
    server (which refuses an output without its call as the API does), and
    the session keeps every item."""
    session = new(any_store, max_token_limit=160, encoding="o200k_base")
    agent, client = agent_over(openai_server)
    cities = ["Paris", "Rome", "Oslo", "Lima", "Kyiv"]

    async def turns() -> list[str]:
        answers = []
        for k, city in enumerate(cities):
            calls = [("get_weather", json.dumps({"city": city}))]
            if k == 2:
                calls.append(("get_weather", json.dumps({"city": "Bern"})))
            openai_server.reply_tool_calls(*calls)
            openai_server.reply(f"It is 20C in {city}.")
            result = await Runner.run(agent, f"Weather in {city}?", session=session)
            answers.append(result.final_output)
        await client.close()
        return answers

    assert run(turns()) == [f"It is 20C in {city}." for city in cities]
    assert len(openai_server.requests) == 10  # each accepted: a 400 raises in the Runner
    sent = [r.body["messages"] for r in openai_server.requests]
    for messages in sent:
        check_messages(messages)
        assert messages[0] == {"role": "system", "content": "Answer briefly."}
    last = sent[-1]
    assert last[-2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Kyiv"}'
    assert len(last) < 1 + 5 * 4  # the window is smaller than the history
    everything = run(session.get_items(limit=100))
    assert len(everything) == 5 * 4 + 2  # user, call, output, reply each turn; two calls once
    assert [d.get("type", "message") for d in everything[8:13]] == [
        "message",
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
    ]
    window = run(session.get_items())
    check_items(window)
    assert window[-1] == everything[-1] and len(window) < len(everything)


def test_runner_tool_approval_given_and_never_given(
    openai_server: FakeOpenAI, any_store: Any
) -> None:
    """The Runner saves a call that waits for approval on its own, and its
    output after the approval, in another add_items; a run that leaves the
    approval unanswered and starts a new turn orphans the call — the next
    request is still one the API accepts."""
    session = new(any_store, max_token_limit=2000)
    agent, client = agent_over(openai_server)

    async def flow() -> None:
        openai_server.reply_tool_calls(("book_flight", '{"city": "Oslo"}'))
        first = await Runner.run(agent, "Book me a flight to Oslo.", session=session)
        assert [i.tool_name for i in first.interruptions] == ["book_flight"]
        assert [d.get("type", "message") for d in await session.get_items()] == ["message"]
        state = first.to_state()
        state.approve(first.interruptions[0])
        openai_server.reply("Booked.")
        done = await Runner.run(agent, state, session=session)
        assert done.final_output == "Booked."
        kinds = [d.get("type", "message") for d in await session.get_items()]
        assert kinds == ["message", "function_call", "function_call_output", "message"]
        openai_server.reply_tool_calls(("book_flight", '{"city": "Rome"}'))
        second = await Runner.run(agent, "And one to Rome.", session=session)
        assert second.interruptions  # never approved: the user moves on
        openai_server.reply("Hello!")
        hello = await Runner.run(agent, "Forget it. Hello!", session=session)
        assert hello.final_output == "Hello!"
        await client.close()

    run(flow())
    last = openai_server.requests[-1].body["messages"]
    check_messages(last)
    asked = [m["content"] for m in last if m["role"] == "user"]
    assert asked[-2:] == ["And one to Rome.", "Forget it. Hello!"]
    assert [m["tool_calls"][0]["function"]["arguments"] for m in last if "tool_calls" in m] == [
        '{"city": "Oslo"}'  # the orphaned call to Rome is not sent...
    ]
    history = run(session.get_items(limit=100))
    assert any(d.get("arguments") == '{"city": "Rome"}' for d in history)  # ...but kept


# --- the SDK's default model: the Responses API, over real HTTP -----------------------


class Recording(TokenmemSession):
    """A TokenmemSession that keeps a copy of the items of each add_items call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.added: list[list[dict[str, Any]]] = []

    async def add_items(self, items: Any) -> None:
        self.added.append(json.loads(json.dumps(items)))
        await super().add_items(items)


def default_model_over(server: FakeOpenAI) -> tuple[Agent[Any], RunConfig, openai.AsyncOpenAI]:
    """An agent with no model of its own: the Runner asks the SDK's default
    provider, which answers with its default, the Responses API model, here
    over a client of the local server. No trace leaves the machine."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    config = RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)
    agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather])
    return agent, config, client


def run_turns(
    server: FakeOpenAI,
    session: TokenmemSession,
    cities: list[str],
    *,
    parallel_at: int = -1,
    reasoning: bool = False,
) -> list[str]:
    """One turn per city: the model calls get_weather (twice in parallel at
    turn ``parallel_at``), then answers, reasoning before each with
    ``reasoning``; returns the final outputs."""
    agent, config, client = default_model_over(server)

    async def turns() -> list[str]:
        answers = []
        try:
            for k, city in enumerate(cities):
                calls = [("get_weather", json.dumps({"city": city}))]
                if k == parallel_at:
                    calls.append(("get_weather", json.dumps({"city": "Bern"})))
                if reasoning:
                    server.reply_reasoning(f"Look up {city}.")
                    server.reply_reasoning("Answer with the tool's figure.")
                server.reply_tool_calls(*calls)
                server.reply(f"It is 20C in {city}.")
                question = f"Weather in {city}?"
                result = await Runner.run(agent, question, session=session, run_config=config)
                answers.append(result.final_output)
        finally:
            await client.close()
        return answers

    return run(turns())


def test_responses_runner_sends_the_session_back_as_it_was_added(
    openai_server: FakeOpenAI, any_store: Any
) -> None:
    """Three turns of a real Agent on the SDK's default model, each calling
    the tool: each turn's first request is the session's items (the user's
    message, the call, its output, the reply: as the SDK added them, the ids
    the server gave included) and the new question; get_items gives back
    every item exactly as add_items got it."""
    session = Recording(uuid.uuid4().hex, store=any_store, max_token_limit=10_000)
    cities = ["Paris", "Rome", "Oslo"]
    assert run_turns(openai_server, session, cities) == [f"It is 20C in {c}." for c in cities]
    requests = openai_server.requests
    assert [r.path for r in requests] == ["/v1/responses"] * 6  # two a turn, none refused
    added = [item for items in session.added for item in items]
    assert json.dumps(run(session.get_items(limit=100))) == json.dumps(added)
    assert json.dumps(run(session.get_items())) == json.dumps(added)  # all fit
    first_turn = added[:4]
    assert [(d.get("type", "message"), d.get("role")) for d in first_turn] == [
        ("message", "user"),
        ("function_call", None),
        ("function_call_output", None),
        ("message", "assistant"),
    ]
    assert first_turn[0] == {"content": "Weather in Paris?", "role": "user"}
    assert (first_turn[1]["id"], first_turn[1]["call_id"]) == ("fc_1", "call_1")
    assert first_turn[2] == {
        "call_id": "call_1",
        "output": "Paris: 20C",
        "type": "function_call_output",
    }
    assert first_turn[3]["id"] == "msg_2"
    assert first_turn[3]["content"][0]["text"] == "It is 20C in Paris."
    for turn in range(3):
        asked, answered = (requests[2 * turn].body, requests[2 * turn + 1].body)
        assert asked["instructions"] == "Answer briefly."
        history = added[: 4 * turn]
        question = {"content": f"Weather in {cities[turn]}?", "role": "user"}
        assert asked["input"] == [*history, question]
        assert answered["input"] == [*history, *added[4 * turn : 4 * turn + 3]]
        check_input(answered["input"])


def test_responses_runner_streamed(openai_server: FakeOpenAI, any_store: Any) -> None:
    """Runner.run_streamed on the default model (Server-Sent Events from the
    server): the session gets each turn's items (the question, the call,
    its output, the answer), and the next turn sends them back."""
    session = Recording(uuid.uuid4().hex, store=any_store)
    agent, config, client = default_model_over(openai_server)

    async def turns() -> list[str]:
        texts = []
        try:
            for city in ("Paris", "Rome"):
                openai_server.reply_tool_calls(("get_weather", json.dumps({"city": city})))
                openai_server.reply(f"It is 20C in {city}.")
                question = f"Weather in {city}?"
                result = Runner.run_streamed(agent, question, session=session, run_config=config)
                deltas = [
                    e.data.delta
                    async for e in result.stream_events()
                    if e.type == "raw_response_event"
                    and e.data.type == "response.output_text.delta"
                ]
                texts.append("".join(deltas))
        finally:
            await client.close()
        return texts

    assert run(turns()) == ["It is 20C in Paris.", "It is 20C in Rome."]
    requests = openai_server.requests
    assert [r.body.get("stream") for r in requests] == [True] * 4
    added = [item for items in session.added for item in items]
    assert [d.get("type", "message") for d in added[:4]] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert json.dumps(run(session.get_items())) == json.dumps(added)
    assert requests[2].body["input"] == [*added[:4], added[4]]


def test_responses_runner_with_a_small_budget(openai_server: FakeOpenAI, any_store: Any) -> None:
    """Five turns on the default model, each calling the tool (two calls in
    parallel at turn 3), with a budget of one turn: each request carries the
    newest items that fit, whole units (a call never without its output),
    older items drop out, the server accepts every request, and the
    session keeps everything."""
    counter = TokenCounter("o200k_base")
    probe = Recording(uuid.uuid4().hex, store=any_store, encoding="o200k_base")
    cities = ["Paris", "Rome", "Oslo", "Lima", "Kyiv"]
    run_turns(openai_server, probe, cities[3:4])  # what the turn to Lima costs
    one_turn = 3 + sum(item_cost(counter, d) for items in probe.added for d in items)
    start = len(openai_server.requests)
    session = Recording(
        uuid.uuid4().hex, store=any_store, max_token_limit=one_turn, encoding="o200k_base"
    )
    answers = run_turns(openai_server, session, cities, parallel_at=2)
    assert answers == [f"It is 20C in {c}." for c in cities]
    requests = openai_server.requests[start:]
    assert [r.path for r in requests] == ["/v1/responses"] * 10  # a 400 raises in the Runner
    added = [item for items in session.added for item in items]
    assert json.dumps(run(session.get_items(limit=100))) == json.dumps(added)
    assert len(added) == 5 * 4 + 2  # the parallel turn has two calls and two outputs
    stored = 0  # how many items the session held when each turn began
    for turn in range(5):
        sent = requests[2 * turn].body["input"]
        history, question = sent[:-1], sent[-1]
        assert question == {"content": f"Weather in {cities[turn]}?", "role": "user"}
        assert history == added[stored - len(history) : stored]  # the newest items
        check_items(history)  # whole units
        if turn >= 2:
            assert len(history) < stored  # the oldest items dropped out
        assert 3 + sum(item_cost(counter, d) for d in history) <= one_turn
        stored += 4 + 2 * (turn == 2)
    # At the turn to Lima, the two parallel calls and their outputs did not
    # fit: they dropped out together, and the reply after them came alone.
    assert requests[6].body["input"][:-1] == added[13:14]
    assert added[13]["content"][0]["text"] == "It is 20C in Oslo."
    # The budget is what the turn to Lima costs: the last turn gets it, whole.
    assert requests[8].body["input"][:-1] == added[-8:-4]
    assert all("Paris" not in json.dumps(r.body["input"]) for r in requests[4:])


def test_responses_runner_keeps_reasoning_with_what_it_led_to(
    openai_server: FakeOpenAI, any_store: Any
) -> None:
    """A reasoning model: before each call and each answer it reasons, and
    the API refuses a reasoning item without the item made after it, and
    that item without it (the server checks both). With a budget of about
    a turn, every request keeps each pair together and the server accepts
    them all; the session gives back every item as it was added."""
    counter = TokenCounter("o200k_base")
    probe = Recording(uuid.uuid4().hex, store=any_store, encoding="o200k_base")
    run_turns(openai_server, probe, ["Lima"], reasoning=True)
    one_turn = 3 + sum(item_cost(counter, d) for items in probe.added for d in items)
    start = len(openai_server.requests)
    session = Recording(
        uuid.uuid4().hex, store=any_store, max_token_limit=one_turn, encoding="o200k_base"
    )
    cities = ["Paris", "Rome", "Oslo", "Lima"]
    answers = run_turns(openai_server, session, cities, parallel_at=1, reasoning=True)
    assert answers == [f"It is 20C in {c}." for c in cities]
    requests = openai_server.requests[start:]
    assert len(requests) == 8  # none refused
    added = [item for items in session.added for item in items]
    assert json.dumps(run(session.get_items(limit=100))) == json.dumps(added)
    kinds = [d.get("type", "message") for d in added[:6]]
    assert kinds == [
        "message",
        "reasoning",
        "function_call",
        "function_call_output",
        "reasoning",
        "message",
    ]
    assert added[1]["summary"][0]["text"] == "Look up Paris."
    for request in requests:
        sent = request.body["input"]
        check_items(sent[:-1] if sent[-1].get("role") == "user" else sent)
    # At the turn to Oslo, the two parallel calls of the turn to Rome (with
    # their reasoning and outputs) did not fit: the window is the answer and
    # the reasoning that led to it.
    oslo = requests[4].body["input"]
    assert [d.get("type", "message") for d in oslo] == ["reasoning", "message", "message"]
    assert oslo[:2] == added[12:14]  # the end of the turn to Rome
    last = requests[-2].body["input"]
    assert last[:-1] == added[-12:-6]  # the turn to Lima's budget: the turn to Oslo, whole
    assert all("Paris" not in json.dumps(r.body["input"]) for r in requests[4:])


# --- beside the SDK's own SQLAlchemySession -------------------------------------------


def test_differential_with_sqlalchemy_session(db: Engine, store: Store) -> None:
    """The same add_items and pop_item calls on both: get_items(limit) is the
    same, item for item, byte for byte (the protocol's newest N). But N
    items is all SQLAlchemySession can bound its history by, and some N cut
    a call from its output or a reasoning item from its call; tokenmem's
    token window never does, whatever the budget."""
    conversation = [
        {"content": "Weather in Paris and Rome?", "role": "user"},
        *WEATHER[1:],
        {"content": "And in Oslo?", "role": "user"},
        {
            "arguments": '{"city":"Oslo"}',
            "call_id": "c_o",
            "name": "get_weather",
            "type": "function_call",
        },
        {"call_id": "c_o", "output": "5C", "type": "function_call_output"},
        said("5C in Oslo."),
    ]

    async def check() -> None:
        engine = async_twin(db)
        try:
            await compare(engine)
        finally:
            await engine.dispose()

    async def compare(engine: Any) -> None:
        theirs = SQLAlchemySession("diff", engine=engine, create_tables=True)
        ours = TokenmemSession("diff", store=store)
        for chunk in (conversation[:4], conversation[4:9], conversation[9:10], conversation[10:]):
            await theirs.add_items(chunk)
            await ours.add_items(chunk)
        assert json.dumps(await theirs.pop_item()) == json.dumps(await ours.pop_item())
        await theirs.add_items(conversation[-1:])
        await ours.add_items(conversation[-1:])
        cut = []
        for n in range(len(conversation) + 2):
            tail = await theirs.get_items(limit=n)
            assert json.dumps(tail) == json.dumps(await ours.get_items(limit=n))
            try:
                check_items(tail)
            except AssertionError:
                cut.append(n)
        assert cut == [2, 6, 7, 8]  # outputs without their calls
        counter = TokenCounter("o200k_base")
        budgets = range(1, 3 + sum(item_cost(counter, d) for d in conversation) + 2)
        windows = set()
        for limit in budgets:
            window = await TokenmemSession("diff", store=store, max_token_limit=limit).get_items()
            check_items(window)
            windows.add(len(window))
        assert windows == {0, 1, 3, 4, 5, 10, 11}  # whole units: never a cut

    run(check())


def test_the_runner_beside_sqlalchemy_session(
    openai_server: FakeOpenAI, db: Engine, store: Store
) -> None:
    """What each session makes the Runner send after a tool turn. Bounded
    by two items, SQLAlchemySession hands it the tool's output without its
    call; the Runner drops that orphan (the request goes through) and the
    tool's answer is lost. tokenmem's window, bounded by tokens, sends the
    call, its output and the reply: the unit whole."""
    agent, client = agent_over(openai_server)
    engine = async_twin(db)
    counter = TokenCounter("o200k_base")

    async def second_request(session: Any) -> list[dict[str, Any]]:
        openai_server.reply_tool_calls(("get_weather", '{"city": "Paris"}'))
        openai_server.reply("20C in Paris.")
        await Runner.run(agent, "Weather in Paris?", session=session)
        openai_server.reply("You are welcome.")
        await Runner.run(agent, "Thanks!", session=session)
        body = openai_server.requests[-1].body
        return list(body["messages"])

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        try:
            theirs = SQLAlchemySession(
                "beside", engine=engine, create_tables=True, session_settings={"limit": 2}
            )
            sent_theirs = await second_request(theirs)
            items = await theirs.get_items(limit=10)
            turn = items[1:4]  # the call, its output, the reply (not the question)
            budget = 3 + sum(item_cost(counter, d) for d in turn)
            ours = TokenmemSession("beside", store=store, max_token_limit=budget)
            sent_ours = await second_request(ours)
            return sent_theirs, sent_ours
        finally:
            await engine.dispose()
            await client.close()

    sent_theirs, sent_ours = run(both())
    roles = [m["role"] for m in sent_theirs]
    assert roles == ["system", "assistant", "user"]  # the output came alone, and was dropped
    assert [m["role"] for m in sent_ours] == ["system", "assistant", "tool", "assistant", "user"]
    assert sent_ours[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_history_and_viewer_show_an_item_s_call_and_output(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tokenmem history` and the audit viewer name the call a function_call
    item makes and the one its output answers, as they do for chat tool calls
    (they showed `← None` and no call id)."""
    from tokenmem.cli import main
    from tokenmem.web import create_app

    from .test_web import client

    session = TokenmemSession("items", store=store)
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather"}
    run(session.add_items([{"role": "user", "content": "Weather in Paris?"}]))
    run(session.add_items([{**call, "arguments": '{"city": "Paris"}'}]))
    run(session.add_items([{"type": "function_call_output", "call_id": "c1", "output": "18C"}]))
    url = store.engine.url.render_as_string(hide_password=False)
    assert main(["--db", url, "history", "items"]) == 0
    shown = capsys.readouterr().out
    assert '→ c1 get_weather({"city": "Paris"})' in shown and "← c1 18C" in shown
    page = client(create_app(store)).get("/session", params={"id": "items"}).text
    assert "→ c1 get_weather({&#34;city&#34;: &#34;Paris&#34;})" in page and "← c1" in page
