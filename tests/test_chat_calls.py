"""Chat messages through real HTTP (issue 13): a tool-calling conversation
driven through the local OpenAI-compatible server, which rejects what the
API rejects; and ConversationChain sending the pinned prompt and a
tool-aware window that its audit log rebuilds exactly."""

from __future__ import annotations

import json
from typing import Any

import openai

from tokenmem import ChatOpenAI, ConversationChain, ConversationTokenBufferMemory, Store
from tokenmem.chat import as_openai, content_tokens

from .openai_rules import check_messages
from .openai_server import FakeOpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_a_tool_calling_conversation_with_a_small_window(
    openai_server: FakeOpenAI, store: Store
) -> None:
    """Four user turns, each answered through two rounds (tool calls, then
    text), with a window too small for the whole history: every request the
    loop sends is the pinned prompt plus the window plus the new messages,
    and the server (which rejects orphan tool messages and unanswered calls
    as the API does) accepts every one."""
    memory = ConversationTokenBufferMemory(
        store=store,
        session_id="weather",
        max_token_limit=120,
        system_message="You answer weather questions. Use the tool.",
        start_on="human",
        encoding="o200k_base",
    )
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
    cities = ["Paris", "Rome", "Oslo", "Lima"]
    for city in cities:
        turn: list[dict[str, Any]] = [{"role": "user", "content": f"Weather in {city}?"}]
        openai_server.reply_tool_calls(("get_weather", json.dumps({"city": city})))
        first = client.chat.completions.create(
            model="gpt-4o-mini", messages=[*memory.load_messages(), *turn], tools=TOOLS
        )
        call = first.choices[0].message
        assert call.tool_calls
        turn.append(call.model_dump(exclude_none=True))
        for c in call.tool_calls:
            turn.append({"role": "tool", "tool_call_id": c.id, "content": f"{city}: 20C"})
        openai_server.reply(f"It is 20C in {city}.")
        second = client.chat.completions.create(
            model="gpt-4o-mini", messages=[*memory.load_messages(), *turn], tools=TOOLS
        )
        turn.append({"role": "assistant", "content": second.choices[0].message.content})
        memory.save_messages(turn)
    client.close()
    assert len(openai_server.requests) == 8  # each accepted: a 400 raises BadRequestError
    window = memory.load_messages()
    check_messages(window)
    assert window[0] == {"role": "system", "content": "You answer weather questions. Use the tool."}
    assert window[1]["role"] == "user"  # start_on="human"
    assert window[-1] == {"role": "assistant", "content": "It is 20C in Lima."}
    assert len(window) < 1 + 4 * 4  # the window is smaller than the history
    history = list(memory.history())
    assert len(history) == 1 + 4 * 4
    # The model's own tool-call message is stored exactly as the SDK gave it.
    stored_call = next(m for m in history if m.openai and m.openai.get("tool_calls"))
    assert stored_call.openai["tool_calls"][0]["function"]["name"] == "get_weather"  # type: ignore[index]


def test_the_server_rejects_a_split_tool_unit(openai_server: FakeOpenAI) -> None:
    """What a naive window (the newest N messages) can send: the API's 400."""
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
    try:
        orphan = [{"role": "tool", "tool_call_id": "call_1", "content": "20C"}]
        try:
            client.chat.completions.create(model="m", messages=orphan)  # type: ignore[arg-type]
        except openai.BadRequestError as exc:
            assert "must be a response to a preceeding message with 'tool_calls'" in str(exc)
        else:
            raise AssertionError("the server accepted an orphan tool message")
    finally:
        client.close()


def test_the_chain_sends_the_pinned_prompt_and_tool_traffic(
    openai_server: FakeOpenAI, store: Store
) -> None:
    llm = ChatOpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
    memory = ConversationTokenBufferMemory(
        llm=llm, store=store, max_token_limit=400, system_message="你是天气助手。"
    )
    memory.save_messages(
        [
            {"role": "user", "content": "巴黎天气？"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"巴黎"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_9", "content": "18C"},
            {"role": "assistant", "content": "巴黎 18C。"},
        ]
    )
    chain = ConversationChain(llm=llm, memory=memory)
    openai_server.reply("不客气。")
    assert chain.predict(input="谢谢") == "不客气。"
    body = openai_server.requests[-1].body
    assert body is not None
    sent = body["messages"]
    # the session's prompt replaces the template's instructions; the tool
    # unit goes as it was saved
    assert sent[0] == {"role": "system", "content": "你是天气助手。"}
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert sent[2]["tool_calls"][0]["id"] == "call_9"
    check_messages(sent)
    (turn,) = store.turns(memory.session_id)
    assert store.rebuild_prompt(memory.session_id, turn.seq or 0) == sent
    assert turn.pinned_first is not None and turn.pinned_first == turn.pinned_last
    # the local count: the chat formula over what was sent, tool call included
    counter = memory.counter
    expected = 3 + sum(3 + counter.count(m["role"]) + content_tokens(counter, m) for m in sent)
    assert turn.prompt_tokens == expected
    # a second call: the exchange saved by the first is in the window
    openai_server.reply("好的。")
    chain.predict(input="再见")
    later = openai_server.requests[-1].body["messages"]  # type: ignore[index]
    assert later[-3:] == [
        {"role": "user", "content": "谢谢"},
        {"role": "assistant", "content": "不客气。"},
        {"role": "user", "content": "再见"},
    ]
    assert as_openai(memory.window(return_messages=True)[0].message) == sent[0]


def test_the_chain_sends_the_summary_and_rebuilds_it(
    openai_server: FakeOpenAI, store: Store
) -> None:
    """A ConversationChain over ConversationSummaryBufferMemory: each call
    sends the pinned prompt, the summary of what fell out (a system message
    after it) and the window; the turn log names the summary, and
    rebuild_prompt gives back exactly what was sent."""
    from tokenmem import ConversationSummaryBufferMemory

    llm = ChatOpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
    memory = ConversationSummaryBufferMemory(
        llm=llm, store=store, max_token_limit=90, system_message="Be brief."
    )
    chain = ConversationChain(llm=llm, memory=memory)
    openai_server.reply(*[f"Noted {k}." for k in range(40)])  # replies and summaries alike
    for i in range(6):
        chain.predict(input=f"Tell me fact number {i} about the moon, please.")
    summaries = memory.summaries()
    assert summaries, "messages fell out: a summary was made"
    chats = [
        r.body
        for r in openai_server.requests
        if r.body and r.body["messages"][-1]["content"].startswith("Tell me")
    ]
    turns = store.turns(memory.session_id)
    assert len(turns) == len(chats) == 6
    assert any(t.summary_seq is not None for t in turns)
    for turn, body in zip(turns, chats, strict=True):
        sent = body["messages"]  # type: ignore[index]
        assert store.rebuild_prompt(memory.session_id, turn.seq or 0) == sent
        assert sent[0] == {"role": "system", "content": "Be brief."}
        if turn.summary_seq is not None:
            (summary,) = [s for s in summaries if s.seq == turn.summary_seq]
            assert sent[1] == {"role": "system", "content": summary.content}
        check_messages(sent)
