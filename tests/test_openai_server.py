"""The fake OpenAI server, driven by the real ``openai`` clients over HTTP.

These tests pin both the fake's wire format (the SDK must parse it) and the
SDK behaviour tokenmem relies on: retries, timeouts, broken streams.
"""

# The fixture is imported, and pytest hands it back as a same-named parameter.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .openai_server import FakeOpenAI, openai_server  # noqa: F401

API_KEY = "test-key"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello big world"}]


@pytest.fixture
def client(openai_server: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0) as c:
        yield c


def async_client(server: FakeOpenAI) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def test_chat(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply("Hello there, friend")
    r = client.chat.completions.create(model="gpt-test", messages=HI)
    assert r.object == "chat.completion"
    assert r.model == "gpt-test"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello there, friend"
    assert r.choices[0].message.refusal is None
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 3, 6)
    [req] = openai_server.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.body["messages"] == HI
    assert req.headers["authorization"] == f"Bearer {API_KEY}"
    assert req.headers["content-type"] == "application/json"


def test_replies_are_fifo_then_echo(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply("first", "second")
    texts = [
        client.chat.completions.create(model="m", messages=HI).choices[0].message.content
        for _ in range(3)
    ]
    assert texts == ["first", "second", "echo: hello big world"]


def test_prompt_tokens_hook(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.prompt_tokens = lambda body: 100 * len(body["messages"])
    r = client.chat.completions.create(model="m", messages=HI * 2)
    assert r.usage is not None
    assert r.usage.prompt_tokens == 200
    assert r.usage.total_tokens == 200 + r.usage.completion_tokens


def test_prompt_tokens_count_text_parts(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    def text(words: str) -> dict[str, str]:
        return {"type": "text", "text": words}

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages: list[Any] = [
        {"role": "system", "content": [text("be very terse")]},
        {"role": "user", "content": [text("look at"), image]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "user", "content": [text("and"), text("this")]},
    ]
    r = client.chat.completions.create(model="m", messages=messages)
    assert r.usage is not None
    assert r.usage.prompt_tokens == 3 + 2 + 0 + 2 + 2
    assert r.choices[0].message.content == "echo: and this"  # the text parts, spaced


def test_chat_stream(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply("one two three four")
    stream = client.chat.completions.create(
        model="m",
        messages=HI,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) == 4
    assert "".join(texts) == "one two three four"
    assert chunks[0].choices[0].delta.role == "assistant"
    *_, last_choice, usage = chunks
    assert last_choice.choices[0].finish_reason == "stop"
    assert usage.choices == []
    assert usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (3, 4)
    assert openai_server.requests[0].body["stream"] is True


def test_chat_stream_without_usage(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=HI, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: hello big world"


def test_completions(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    prompt = "The quick brown fox jumps over the lazy dog, twice over."
    r = client.completions.create(model="m", prompt=prompt)
    assert r.object == "text_completion"
    assert r.choices[0].text == f"echo: {prompt[-40:]}"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(prompt.split())
    assert openai_server.requests[0].path == "/v1/completions"

    openai_server.reply("a b c")
    chunks = list(
        client.completions.create(
            model="m", prompt=prompt, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a b c"
    assert len([c for c in chunks if c.choices and c.choices[0].text]) == 3
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_models_and_unknown_paths(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [openai_server.model]
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.type == "invalid_request_error"
    assert "/v1/models/nope" in caught.value.message
    assert [r.method for r in openai_server.requests] == ["GET", "GET"]


def test_server_errors_are_retried(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.fail(500, times=2)
    openai_server.reply("finally")
    start = time.monotonic()
    r = client.with_options(max_retries=2).chat.completions.create(model="m", messages=HI)
    assert r.choices[0].message.content == "finally"
    assert time.monotonic() - start < 1  # retry-after-ms: 10 beats the 0.5 s backoff
    requests = openai_server.requests
    assert [r.headers["x-stainless-retry-count"] for r in requests] == ["0", "1", "2"]


def test_rate_limit_gives_up(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.fail(429, times=5, message="slow down")
    with pytest.raises(openai.RateLimitError) as caught:
        client.with_options(max_retries=1).chat.completions.create(model="m", messages=HI)
    assert len(openai_server.requests) == 2
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.message.endswith("slow down")  # the SDK prefixes "Error code: 429 - "
    assert caught.value.request_id == "req_2"


def test_bad_request_is_not_retried(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.fail(400, times=3)
    with pytest.raises(openai.BadRequestError):
        client.with_options(max_retries=2).chat.completions.create(model="m", messages=HI)
    assert len(openai_server.requests) == 1


def test_timeout_and_concurrency(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.delay(30)  # still sleeping at teardown: close() must wake it
    openai_server.reply("never seen", "second")
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(model="m", messages=HI)
    # The delayed handler is asleep; the server still answers the next request,
    # and replies go to requests in arrival order.
    r = client.chat.completions.create(model="m", messages=HI)
    assert r.choices[0].message.content == "second"
    assert len(openai_server.requests) == 2


def test_close_wakes_a_delayed_handler() -> None:
    server = FakeOpenAI()
    server.delay(30)
    errors: list[BaseException] = []

    def call() -> None:
        with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as c:
            try:
                c.models.list()
            except openai.APIConnectionError as exc:
                errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.005)
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 1
    caller.join(5)
    assert not caller.is_alive()
    assert len(errors) == 1  # the server hung up without answering


def test_broken_stream(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply("a b c d e")
    openai_server.break_stream(2)
    got: list[str | None] = []
    stream = client.chat.completions.create(model="m", messages=HI, stream=True)
    with pytest.raises(openai.APIConnectionError) as caught:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["a ", "b "]
    assert "incomplete chunked read" in str(caught.value.__cause__)
    # Only the stream was broken: the connection pool recovers.
    assert client.chat.completions.create(model="m", messages=HI).choices[0].message.content


def test_refusal(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.refuse()
    openai_server.reply("kept for later")
    message = client.chat.completions.create(model="m", messages=HI).choices[0].message
    assert message.content is None
    assert message.refusal == "I can't help with that."

    openai_server.refuse("No.")
    chunks = list(client.chat.completions.create(model="m", messages=HI, stream=True))
    assert "".join(c.choices[0].delta.refusal or "" for c in chunks) == "No."
    assert all(c.choices[0].delta.content is None for c in chunks)

    again = client.chat.completions.create(model="m", messages=HI)
    assert again.choices[0].message.content == "kept for later"


WEATHER = ("get_weather", '{"city": "Paris"}')


def test_tool_calls(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    ids = openai_server.reply_tool_calls(
        WEATHER, {"name": "get_time", "arguments": {"zone": "CET"}}
    )
    openai_server.reply("a completion")
    # Tool calls are chat replies: a completions request leaves them queued.
    assert client.completions.create(model="m", prompt="hi").choices[0].text == "a completion"
    r = client.chat.completions.create(model="m", messages=HI)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    assert [
        (c.id, c.type, c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ] == [
        ("call_1", "function", "get_weather", '{"city": "Paris"}'),
        ("call_2", "function", "get_time", '{"zone": "CET"}'),
    ]
    assert ids == openai_server.tool_call_ids == ["call_1", "call_2"]
    assert r.usage is not None
    assert r.usage.completion_tokens == 6  # the names' and arguments' words
    # Ids stay unique on this server; the next chat reply is the default again.
    assert openai_server.reply_tool_calls(WEATHER) == ["call_3"]
    client.chat.completions.create(model="m", messages=HI)
    assert openai_server.tool_call_ids == ["call_1", "call_2", "call_3"]
    assert (
        client.chat.completions.create(model="m", messages=HI).choices[0].message.tool_calls is None
    )


def test_tool_calls_stream(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply_tool_calls(WEATHER, ("get_time", "{}"))
    chunks = list(client.chat.completions.create(model="m", messages=HI, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert (deltas[0].role, deltas[0].content) == ("assistant", None)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Each call opens with its index, id and name; its arguments follow a word at a time.
    pieces = [
        (t.index, t.id, t.function.name, t.function.arguments)
        for d in deltas
        for t in d.tool_calls or []
        if t.function is not None
    ]
    assert pieces == [
        (0, "call_1", "get_weather", ""),
        (0, None, None, '{"city": '),
        (0, None, None, '"Paris"}'),
        (1, "call_2", "get_time", ""),
        (1, None, None, "{}"),
    ]

    # The SDK's stream helper joins them into the final message.
    openai_server.reply_tool_calls(WEATHER)
    with client.chat.completions.stream(model="m", messages=HI) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    [call] = final.choices[0].message.tool_calls or []
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_3",
        "get_weather",
        '{"city": "Paris"}',
    )


def test_two_round_tool_exchange(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    """user -> assistant tool_calls -> tool answers -> assistant text, as an app drives it."""
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    openai_server.reply_tool_calls(
        ("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Oslo"}')
    )
    openai_server.reply("Paris is warmer.")
    messages: list[Any] = [{"role": "user", "content": "Paris or Oslo: which is warmer?"}]
    asked = client.chat.completions.create(model="m", messages=messages, tools=tools)
    message = asked.choices[0].message
    messages.append(message.to_dict())
    degrees = {"Paris": "18", "Oslo": "9"}
    for call in message.tool_calls or []:
        city = json.loads(call.function.arguments)["city"]
        messages.append({"role": "tool", "tool_call_id": call.id, "content": degrees[city]})

    answered = client.chat.completions.create(model="m", messages=messages, tools=tools)
    assert answered.choices[0].message.content == "Paris is warmer."
    assert answered.choices[0].finish_reason == "stop"
    sent = openai_server.requests[1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == openai_server.tool_call_ids
    assert sent[1]["content"] is None

    # A history that lost one answer is the real API's 400.
    unanswered = [*messages[:3], {"role": "user", "content": "Well?"}]
    with pytest.raises(openai.BadRequestError, match=r"did not have response messages: call_2$"):
        client.chat.completions.create(model="m", messages=unanswered, tools=tools)


def test_empty_reply(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.empty_reply(times=2)
    chat = client.chat.completions.create(model="m", messages=HI)
    assert chat.choices[0].message.content == ""
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 0
    assert client.completions.create(model="m", prompt="hi").choices[0].text == ""
    assert client.completions.create(model="m", prompt="hi").choices[0].text == "echo: hi"


def test_bad_arguments(openai_server: FakeOpenAI) -> None:
    with pytest.raises(ValueError, match="error status"):
        openai_server.fail(200)
    with pytest.raises(ValueError, match="times"):
        openai_server.fail(500, times=0)
    with pytest.raises(ValueError, match="seconds"):
        openai_server.delay(-1)
    with pytest.raises(ValueError, match="after_chunks"):
        openai_server.break_stream(-1)
    with pytest.raises(ValueError, match="times"):
        openai_server.empty_reply(0)
    with pytest.raises(ValueError, match="at least one call"):
        openai_server.reply_tool_calls()
    with pytest.raises(ValueError, match="a name"):
        openai_server.reply_tool_calls(("", "{}"))
    with pytest.raises(ValueError, match="JSON arguments"):
        openai_server.reply_tool_calls(("get_weather", {"city": "Paris"}))  # type: ignore[arg-type]
    assert openai_server.tool_call_ids == []


def test_async_client(openai_server: FakeOpenAI) -> None:
    openai_server.reply("async hello", "streamed async reply")

    async def run() -> tuple[str | None, list[str], int | None]:
        async with async_client(openai_server) as c:
            r = await c.chat.completions.create(model="m", messages=HI)
            stream = await c.chat.completions.create(
                model="m",
                messages=HI,
                stream=True,
                stream_options={"include_usage": True},
            )
            texts, usage = [], None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    texts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage.total_tokens
            return r.choices[0].message.content, texts, usage

    content, texts, usage = asyncio.run(run())
    assert content == "async hello"
    assert texts == ["streamed ", "async ", "reply"]
    assert usage == 3 + 3
    assert {r.headers["authorization"] for r in openai_server.requests} == {f"Bearer {API_KEY}"}


def test_async_broken_stream(openai_server: FakeOpenAI) -> None:
    openai_server.break_stream(1)

    async def run() -> list[str | None]:
        got: list[str | None] = []
        async with async_client(openai_server) as c:
            stream = await c.chat.completions.create(model="m", messages=HI, stream=True)
            with pytest.raises(openai.APIConnectionError):
                async for chunk in stream:
                    got.append(chunk.choices[0].delta.content)
        return got

    assert asyncio.run(run()) == ["echo: "]


# --- the Responses API ---------------------------------------------------------------

ASK: list[Any] = [{"role": "user", "content": "hello big world"}]


def test_responses(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply("Hello there, friend")
    r = client.responses.create(model="gpt-test", input=ASK, instructions="Be brief.")
    assert (r.id, r.object, r.model, r.status) == ("resp_1", "response", "gpt-test", "completed")
    assert r.output_text == "Hello there, friend"
    [message] = r.output
    assert message.type == "message"
    assert (message.id, message.role, message.status) == ("msg_1", "assistant", "completed")
    assert [part.type for part in message.content] == ["output_text"]
    assert (r.parallel_tool_calls, r.tool_choice, r.tools) == (True, "auto", [])
    assert r.usage is not None
    # The instructions' words and the input's.
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (5, 3, 8)
    assert r.usage.input_tokens_details.cached_tokens == 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    [req] = openai_server.requests
    assert (req.method, req.path) == ("POST", "/v1/responses")
    assert req.body["input"] == ASK and req.body["instructions"] == "Be brief."
    # The default reply echoes the last user message, from a string input too.
    assert client.responses.create(model="m", input="a string").output_text == "echo: a string"
    openai_server.prompt_tokens = lambda body: 42
    again = client.responses.create(model="m", input=ASK)
    assert again.usage is not None and again.usage.input_tokens == 42


def test_responses_tool_calls(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    """Scripted tool calls come as function_call items, numbered with the
    chat ones; the app answers them with function_call_output items."""
    tools: list[Any] = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": False,
        }
    ]
    ids = openai_server.reply_tool_calls(WEATHER, ("get_weather", '{"city": "Oslo"}'))
    openai_server.reply("Paris is warmer.")
    asked = client.responses.create(model="m", input=ASK, tools=tools)
    assert [(d.type, d.id, d.call_id, d.arguments) for d in asked.output] == [  # type: ignore[union-attr]
        ("function_call", "fc_1", "call_1", '{"city": "Paris"}'),
        ("function_call", "fc_2", "call_2", '{"city": "Oslo"}'),
    ]
    assert ids == openai_server.tool_call_ids == ["call_1", "call_2"]
    assert asked.tools[0].type == "function" and asked.tools[0].name == "get_weather"
    assert asked.usage is not None and asked.usage.output_tokens == 6
    items: list[Any] = [*ASK, *(d.model_dump(exclude_none=True) for d in asked.output)]
    items += [{"type": "function_call_output", "call_id": i, "output": "18C"} for i in ids]
    answered = client.responses.create(model="m", input=items, tools=tools)
    assert answered.output_text == "Paris is warmer."
    assert openai_server.requests[1].body["input"] == items
    # Chat and responses share the numbering of call ids.
    assert openai_server.reply_tool_calls(WEATHER) == ["call_3"]
    r = client.chat.completions.create(model="m", messages=HI)
    assert [c.id for c in r.choices[0].message.tool_calls or []] == ["call_3"]


def test_responses_refusal_and_empty_reply(
    openai_server: FakeOpenAI, client: openai.OpenAI
) -> None:
    openai_server.refuse("No.")
    openai_server.empty_reply()
    [message] = client.responses.create(model="m", input=ASK).output
    assert message.type == "message"
    assert [(p.type, getattr(p, "refusal", None)) for p in message.content] == [("refusal", "No.")]
    assert client.responses.create(model="m", input=ASK).output_text == ""


def test_responses_stream(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply("one two three")
    with client.responses.stream(model="m", input=ASK) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["one ", "two ", "three"]
    assert final.output_text == "one two three" and final.id == "resp_1"
    assert final.usage is not None and final.usage.output_tokens == 3
    assert openai_server.requests[0].body["stream"] is True

    openai_server.reply_tool_calls(WEATHER)
    with client.responses.stream(model="m", input=ASK) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        [call] = stream.get_final_response().output
    assert pieces == ['{"city": ', '"Paris"}']
    assert call.type == "function_call" and call.arguments == '{"city": "Paris"}'

    openai_server.refuse("No.")
    with client.responses.stream(model="m", input=ASK) as stream:
        refused = "".join(e.delta for e in stream if e.type == "response.refusal.delta")
    assert refused == "No."


def test_responses_broken_stream(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    openai_server.reply("a b c d e")
    openai_server.break_stream(2)
    got: list[str] = []
    with (
        pytest.raises(openai.APIConnectionError),
        client.responses.stream(model="m", input=ASK) as stream,
    ):
        for event in stream:
            if event.type == "response.output_text.delta":
                got.append(event.delta)
    assert got == ["a ", "b "]
    assert client.responses.create(model="m", input=ASK).output_text == "echo: hello big world"


def test_responses_reasoning(openai_server: FakeOpenAI, client: openai.OpenAI) -> None:
    """A reply that reasons first; then the item it made after its reasoning
    must come with it, as the API requires of a reasoning model's items."""
    openai_server.reply_reasoning("Check the forecast.")
    openai_server.reply_tool_calls(WEATHER)
    asked = client.responses.create(model="m", input=ASK)
    thought, call = asked.output
    assert (thought.type, thought.id, call.type, call.id) == (
        "reasoning",
        "rs_1",
        "function_call",
        "fc_1",
    )
    assert [s.text for s in thought.summary] == ["Check the forecast."]  # type: ignore[union-attr]
    assert asked.usage is not None and asked.usage.output_tokens_details.reasoning_tokens == 3
    made = [d.model_dump(exclude_none=True) for d in asked.output]
    answer = {"type": "function_call_output", "call_id": "call_1", "output": "18C"}
    with pytest.raises(
        openai.BadRequestError, match=r"'fc_1' .* required 'reasoning' item: 'rs_1'"
    ):
        client.responses.create(model="m", input=[*ASK, made[1], answer])
    with pytest.raises(openai.BadRequestError, match=r"'rs_1' .* without its required following"):
        client.responses.create(model="m", input=[*ASK, made[0]])
    openai_server.reply_reasoning("Easy.")
    done = client.responses.create(model="m", input=[*ASK, *made, answer])
    assert [d.type for d in done.output] == ["reasoning", "message"]
    assert done.output_text == "echo: hello big world"
    with client.responses.stream(model="m", input=[*ASK, *made, answer]) as stream:
        assert [d.type for d in stream.get_final_response().output] == ["message"]
    openai_server.reply_reasoning("Streamed.")
    with client.responses.stream(model="m", input=ASK) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[2:4] == ["response.output_item.added", "response.output_item.done"]
    assert [d.type for d in final.output] == ["reasoning", "message"]


def test_responses_keep_no_previous_response(
    openai_server: FakeOpenAI, client: openai.OpenAI
) -> None:
    first = client.responses.create(model="m", input=ASK)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", input="and?", previous_response_id=first.id)
    assert caught.value.body == {
        "message": "Previous response with id 'resp_1' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }
