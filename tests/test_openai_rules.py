"""OpenAI's message rules (``tests/openai_rules.py``): each broken once, and valid
sequences accepted, checked directly and through the ``openai`` client against
the fake server; then the Responses API's input rules, the same way.
"""

# The fixture is imported, and pytest hands it back as a same-named parameter.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from .openai_rules import MessageRuleError, check_input, check_messages
from .openai_server import FakeOpenAI, openai_server  # noqa: F401

HI = {"role": "user", "content": "hi"}


def call(call_id: Any, name: str = "get_weather", arguments: Any = '{"city": "Paris"}') -> Any:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def asks(*calls: Any) -> dict[str, Any]:
    """An assistant message that calls tools."""
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def answer(call_id: Any, content: Any = "18 degrees") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def user_parts(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


TEXT = {"type": "text", "text": "look"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-1"}}
PREFIX = "Invalid parameter: messages with role 'tool' must be a response to a preceeding message"
NOT_ANSWERED = (
    "An assistant message with 'tool_calls' must be followed by tool messages responding to "
    "each 'tool_call_id'. The following tool_call_ids did not have response messages: "
)
SUPPORTED_ROLES = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'"
SUPPORTED_PARTS = "'text', 'image_url', 'input_audio', 'refusal', 'audio', and 'file'"

# (id, messages, the API's message, param, code): each rule broken once.
BROKEN: list[tuple[str, Any, str, str, str | None]] = [
    (
        "messages not a list",
        {"role": "user", "content": "hi"},
        "Invalid type for 'messages': expected an array of objects, but got an object instead.",
        "messages",
        "invalid_type",
    ),
    (
        "no messages",
        [],
        "Invalid 'messages': empty array. Expected an array with minimum length 1, "
        "but got an empty array instead.",
        "messages",
        "empty_array",
    ),
    (
        "a message not an object",
        [HI, "hello"],
        "Invalid type for 'messages[1]': expected an object, but got a string instead.",
        "messages[1]",
        "invalid_type",
    ),
    (
        "no role",
        [{"content": "hi"}],
        "Missing required parameter: 'messages[0].role'.",
        "messages[0].role",
        "missing_required_parameter",
    ),
    (
        "unknown role",
        [{"role": "human", "content": "hi"}],
        f"Invalid value: 'human'. Supported values are: {SUPPORTED_ROLES}.",
        "messages[0].role",
        "invalid_value",
    ),
    (
        "no content",
        [{"role": "user"}],
        "Missing required parameter: 'messages[0].content'.",
        "messages[0].content",
        "missing_required_parameter",
    ),
    (
        "null content",
        [{"role": "system", "content": None}, HI],
        "Invalid value for 'content': expected a string, got null.",
        "messages.[0].content",
        None,
    ),
    (
        "null content on an assistant message without tool calls",
        [HI, {"role": "assistant", "content": None}],
        "Invalid value for 'content': expected a string, got null.",
        "messages.[1].content",
        None,
    ),
    (
        "content a number",
        [{"role": "user", "content": 7}],
        "Invalid type for 'messages[0].content': expected one of a string or array of objects, "
        "but got an integer instead.",
        "messages[0].content",
        "invalid_type",
    ),
    (
        "a content part not an object",
        [user_parts(TEXT, "look")],
        "Invalid type for 'messages[0].content[1]': expected an object, but got a string instead.",
        "messages[0].content[1]",
        "invalid_type",
    ),
    (
        "a content part without a type",
        [user_parts({"text": "look"})],
        "Missing required parameter: 'messages[0].content[0].type'.",
        "messages[0].content[0].type",
        "missing_required_parameter",
    ),
    (
        "an unknown content part",
        [user_parts({"type": "image", "image": "x"})],
        f"Invalid value: 'image'. Supported values are: {SUPPORTED_PARTS}.",
        "messages[0].content[0].type",
        "invalid_value",
    ),
    (
        "an image in a system message",
        [{"role": "system", "content": [TEXT, IMAGE]}, HI],
        "Invalid 'messages[0]'. Image URLs are only allowed for messages with role 'user', "
        "but this message with role 'system' contains an image URL.",
        "messages[0]",
        "invalid_value",
    ),
    (
        "audio in a tool answer",
        [HI, asks(call("call_1")), answer("call_1", [AUDIO])],
        "Invalid 'messages[2]'. Content parts of type 'input_audio' are not allowed in "
        "messages with role 'tool'.",
        "messages[2]",
        "invalid_value",
    ),
    (
        "a text part without its text",
        [user_parts({"type": "text"})],
        "Missing required parameter: 'messages[0].content[0].text'.",
        "messages[0].content[0].text",
        "missing_required_parameter",
    ),
    (
        "a text part whose text is not a string",
        [{"role": "developer", "content": [{"type": "text", "text": ["a"]}]}],
        "Invalid type for 'messages[0].content[0].text': expected a string, "
        "but got an array instead.",
        "messages[0].content[0].text",
        "invalid_type",
    ),
    (
        "tool_calls not a list",
        [HI, {"role": "assistant", "content": None, "tool_calls": call("call_1")}],
        "Invalid type for 'messages[1].tool_calls': expected an array of objects, "
        "but got an object instead.",
        "messages[1].tool_calls",
        "invalid_type",
    ),
    (
        "empty tool_calls",
        [HI, {"role": "assistant", "content": "ok", "tool_calls": []}],
        "Invalid 'messages[1].tool_calls': empty array. Expected an array with minimum length 1, "
        "but got an empty array instead.",
        "messages[1].tool_calls",
        "empty_array",
    ),
    (
        "a tool call not an object",
        [HI, asks("call_1")],
        "Invalid type for 'messages[1].tool_calls[0]': expected an object, "
        "but got a string instead.",
        "messages[1].tool_calls[0]",
        "invalid_type",
    ),
    (
        "a tool call without an id",
        [HI, asks({"type": "function", "function": {"name": "f", "arguments": "{}"}})],
        "Missing required parameter: 'messages[1].tool_calls[0].id'.",
        "messages[1].tool_calls[0].id",
        "missing_required_parameter",
    ),
    (
        "a tool call id not a string",
        [HI, asks({**call("x"), "id": 1})],
        "Invalid type for 'messages[1].tool_calls[0].id': expected a string, "
        "but got an integer instead.",
        "messages[1].tool_calls[0].id",
        "invalid_type",
    ),
    (
        "a tool call not of type function",
        [HI, asks({**call("call_1"), "type": "custom"})],
        "Invalid value: 'custom'. Supported values are: 'function'.",
        "messages[1].tool_calls[0].type",
        "invalid_value",
    ),
    (
        "a tool call's function not an object",
        [HI, asks({**call("call_1"), "function": "get_weather"})],
        "Invalid type for 'messages[1].tool_calls[0].function': expected an object, "
        "but got a string instead.",
        "messages[1].tool_calls[0].function",
        "invalid_type",
    ),
    (
        "a tool call without arguments",
        [HI, asks({**call("call_1"), "function": {"name": "f"}})],
        "Missing required parameter: 'messages[1].tool_calls[0].function.arguments'.",
        "messages[1].tool_calls[0].function.arguments",
        "missing_required_parameter",
    ),
    (
        "a tool call's arguments not a string",
        [HI, asks(call("call_1", arguments={"city": "Paris"}))],
        "Invalid type for 'messages[1].tool_calls[0].function.arguments': expected a string, "
        "but got an object instead.",
        "messages[1].tool_calls[0].function.arguments",
        "invalid_type",
    ),
    (
        "a tool call with an empty name",
        [HI, asks(call("call_1", name=""))],
        "Invalid 'messages[1].tool_calls[0].function.name': empty string. Expected a string "
        "with minimum length 1, but got an empty string instead.",
        "messages[1].tool_calls[0].function.name",
        "empty_string",
    ),
    (
        "a tool call id twice in one message",
        [HI, asks(call("call_1"), call("call_1")), answer("call_1")],
        "Invalid parameter: Duplicate value for 'id' of 'call_1', in messages[1].tool_calls[0] "
        "and messages[1].tool_calls[1].",
        "messages.[1].tool_calls.[1].id",
        None,
    ),
    (
        "a tool message without tool_call_id",
        [HI, asks(call("call_1")), {"role": "tool", "content": "18 degrees"}],
        "Missing parameter 'tool_call_id': messages with role 'tool' must have a 'tool_call_id'.",
        "messages.[2].tool_call_id",
        None,
    ),
    (
        "a tool_call_id not a string",
        [HI, asks(call("call_1")), answer(1)],
        "Invalid type for 'messages[2].tool_call_id': expected a string, "
        "but got an integer instead.",
        "messages[2].tool_call_id",
        "invalid_type",
    ),
    (
        "a function message without a name",
        [HI, {"role": "function", "content": "18 degrees"}],
        "Missing parameter 'name': messages with role 'function' must have a 'name'.",
        "messages.[1].name",
        None,
    ),
    (
        "a tool message first",
        [answer("call_1"), HI],
        f"{PREFIX} with 'tool_calls'.",
        "messages.[0].role",
        None,
    ),
    (
        "a tool message after an assistant message without tool calls",
        [HI, {"role": "assistant", "content": "let me look"}, answer("call_1")],
        f"{PREFIX} with 'tool_calls'.",
        "messages.[2].role",
        None,
    ),
    (
        "a tool message after the run of answers",
        [HI, asks(call("call_1")), answer("call_1"), HI, answer("call_1")],
        f"{PREFIX} with 'tool_calls'.",
        "messages.[4].role",
        None,
    ),
    (
        "a tool message answering an id not called",
        [HI, asks(call("call_1")), answer("call_9")],
        "Invalid parameter: 'tool_call_id' of 'call_9' not found in 'tool_calls' of "
        "previous message.",
        "messages.[2].tool_call_id",
        None,
    ),
    (
        "a tool call answered twice",
        [HI, asks(call("call_1"), call("call_2")), answer("call_1"), answer("call_1")],
        "Invalid parameter: Duplicate value for 'tool_call_id' of 'call_1', "
        "in messages[2] and messages[3].",
        "messages.[3].tool_call_id",
        None,
    ),
    (
        "tool calls unanswered before the next message",
        [HI, asks(call("call_1"), call("call_2"), call("call_3")), answer("call_2"), HI],
        f"{NOT_ANSWERED}call_1, call_3",
        "messages.[1].role",
        None,
    ),
    (
        "a tool call unanswered at the end",
        [HI, asks(call("call_1"))],
        f"{NOT_ANSWERED}call_1",
        "messages.[1].role",
        None,
    ),
]

VALID: list[tuple[str, list[dict[str, Any]]]] = [
    ("one user message", [HI]),
    (
        "system, developer and text parts",
        [
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            user_parts(TEXT, {"type": "text", "text": "and listen"}),
        ],
    ),
    ("user content parts of every kind", [user_parts(TEXT, IMAGE, AUDIO, FILE)]),
    (
        "parallel tool calls answered in another order",
        [
            HI,
            asks(call("call_1"), call("call_2", name="get_time", arguments="{}")),
            answer("call_2", "noon"),
            answer("call_1", [{"type": "text", "text": "18 degrees"}]),
            {"role": "assistant", "content": "18 degrees at noon."},
        ],
    ),
    (
        "two rounds of tool calls, the last answered at the end",
        [
            HI,
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call("call_1")]},
            answer("call_1"),
            asks(call("call_2")),
            answer("call_2"),
        ],
    ),
    (
        "assistant refusals and parts",
        [
            HI,
            {"role": "assistant", "content": None, "refusal": "No."},
            HI,
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "Still no."}]},
            HI,
            {"role": "assistant", "content": "Fine.", "tool_calls": None},
        ],
    ),
    (
        "the legacy function role",
        [
            HI,
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": ""}},
            {"role": "function", "name": "f", "content": "18 degrees"},
        ],
    ),
]


# --- the Responses API's input items ---------------------------------------------------


def fc(call_id: Any, name: str = "get_weather") -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": "{}"}


def fco(call_id: Any, output: str = "18C") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


ASKED = {"role": "user", "content": "Weather in Paris?"}
SAID = {
    "type": "message",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "18C.", "annotations": []}],
}

# (id, input, the API's message, param, code): each rule broken once.
BROKEN_INPUT: list[tuple[str, Any, str, str, str | None]] = [
    (
        "input not a string or list",
        {"role": "user", "content": "hi"},
        "Invalid type for 'input': expected one of a string or array of objects, but got an "
        "object instead.",
        "input",
        "invalid_type",
    ),
    (
        "an item not an object",
        [ASKED, "hi"],
        "Invalid type for 'input[1]': expected an object, but got a string instead.",
        "input[1]",
        "invalid_type",
    ),
    (
        "a call without call_id",
        [ASKED, {"type": "function_call", "name": "f", "arguments": "{}"}],
        "Missing required parameter: 'input[1].call_id'.",
        "input[1].call_id",
        "missing_required_parameter",
    ),
    (
        "an output's call_id not a string",
        [ASKED, fco(7)],
        "Invalid type for 'input[1].call_id': expected a string, but got an integer instead.",
        "input[1].call_id",
        "invalid_type",
    ),
    (
        "an output without its call",
        [ASKED, fco("call_1"), SAID],
        "No tool call found for function call output with call_id call_1.",
        "input",
        None,
    ),
    (
        "an output before its call",
        [ASKED, fco("call_1"), fc("call_1")],
        "No tool call found for function call output with call_id call_1.",
        "input",
        None,
    ),
    (
        "an output for another call",
        [ASKED, fc("call_1"), fco("call_2")],
        "No tool call found for function call output with call_id call_2.",
        "input",
        None,
    ),
    (
        "a call without its output",
        [ASKED, fc("call_1"), SAID, ASKED],
        "No tool output found for function call call_1.",
        "input",
        None,
    ),
    (
        "the first of two calls never answered",
        [ASKED, fc("call_1"), fc("call_2"), fco("call_2")],
        "No tool output found for function call call_1.",
        "input",
        None,
    ),
]

VALID_INPUT: list[tuple[str, Any]] = [
    ("a string", "hi"),
    ("a message", [ASKED]),
    ("a call and its output", [ASKED, fc("call_1"), fco("call_1"), SAID]),
    (
        "parallel calls answered in any order",
        [ASKED, fc("call_1"), fc("call_2"), fco("call_2"), fco("call_1"), SAID],
    ),
    (
        "the output after other items",
        [ASKED, fc("call_1"), {"type": "reasoning", "id": "rs_1", "summary": []}, fco("call_1")],
    ),
    ("other items unchecked", [ASKED, {"type": "web_search_call", "id": "ws_1"}, SAID]),
]


# Each broken rule with the check that finds it: chat's, then the Responses API's.
BROKEN_ALL = [pytest.param(check_messages, *case[1:], id=case[0]) for case in BROKEN] + [
    pytest.param(check_input, *case[1:], id=f"input: {case[0]}") for case in BROKEN_INPUT
]
VALID_ALL = [pytest.param(check_messages, m, id=name) for name, m in VALID] + [
    pytest.param(check_input, m, id=f"input: {name}") for name, m in VALID_INPUT
]


@pytest.mark.parametrize(("check", "value", "message", "param", "code"), BROKEN_ALL)
def test_broken_rule(
    check: Callable[[Any], None], value: Any, message: str, param: str, code: str | None
) -> None:
    with pytest.raises(MessageRuleError) as caught:
        check(value)
    assert (caught.value.message, caught.value.param, caught.value.code) == (message, param, code)
    assert str(caught.value) == message


@pytest.mark.parametrize(("check", "value"), VALID_ALL)
def test_valid(check: Callable[[Any], None], value: Any) -> None:
    assert check(value) is None


# Over HTTP: the fake server answers each broken rule as the real API does, and
# the SDK sends the messages as given (it checks none of these rules itself).


@pytest.fixture
def client(openai_server: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0) as c:
        yield c


def send(client: openai.OpenAI, check: Callable[[Any], None], value: Any) -> str:
    """Send ``value`` as what ``check`` checks: chat messages or a response's
    input. Returns the request's key for it."""
    if check is check_messages:
        client.chat.completions.create(model="m", messages=value)
        return "messages"
    client.responses.create(model="m", input=value)
    return "input"


@pytest.mark.parametrize(("check", "value", "message", "param", "code"), BROKEN_ALL)
def test_broken_rule_over_http(
    openai_server: FakeOpenAI,
    client: openai.OpenAI,
    check: Callable[[Any], None],
    value: Any,
    message: str,
    param: str,
    code: str | None,
) -> None:
    key = "input" if check is check_input else "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        send(client, check, value)
    error = caught.value
    assert error.status_code == 400
    assert error.body == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": code,
    }
    assert (error.param, error.code) == (param, code)
    assert error.message == f"Error code: 400 - {message}"
    [request] = openai_server.requests
    assert request.body[key] == value


@pytest.mark.parametrize(("check", "value"), VALID_ALL)
def test_valid_over_http(
    openai_server: FakeOpenAI, client: openai.OpenAI, check: Callable[[Any], None], value: Any
) -> None:
    key = send(client, check, value)
    assert openai_server.requests[0].body[key] == value


def test_a_rejected_request_takes_no_reply(
    openai_server: FakeOpenAI, client: openai.OpenAI
) -> None:
    openai_server.reply("kept")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[answer("call_1")])
    reply = client.chat.completions.create(model="m", messages=[HI])
    assert reply.choices[0].message.content == "kept"
    assert len(openai_server.requests) == 2


# A reasoning item the model made, and the call it made after it.
REASONED = {"rs_1": "fc_1"}
THOUGHT = {"type": "reasoning", "id": "rs_1", "summary": []}
CALLED = {**fc("call_1"), "id": "fc_1", "status": "completed"}
ALONE = "Item 'rs_1' of type 'reasoning' was provided without its required following item."
LOST = (
    "Item 'fc_1' of type 'function_call' was provided without its required 'reasoning' item: "
    "'rs_1'."
)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        pytest.param([ASKED, THOUGHT], ALONE, id="reasoning last"),
        pytest.param([ASKED, THOUGHT, ASKED, CALLED, fco("call_1")], ALONE, id="something between"),
        pytest.param([ASKED, CALLED, fco("call_1")], LOST, id="the call without its reasoning"),
        pytest.param([ASKED, CALLED, THOUGHT, fco("call_1")], LOST, id="the wrong order"),
    ],
)
def test_broken_reasoning_rule(items: Any, message: str) -> None:
    with pytest.raises(MessageRuleError) as caught:
        check_input(items, REASONED)
    assert (caught.value.message, caught.value.param, caught.value.code) == (message, "input", None)


def test_valid_reasoning() -> None:
    assert check_input([ASKED, THOUGHT, CALLED, fco("call_1"), SAID], REASONED) is None
    assert check_input([ASKED, THOUGHT], {}) is None  # not one the model made: unchecked
    assert check_input([ASKED, CALLED, fco("call_1")], {}) is None


def test_a_rejected_response_request_takes_no_reply(
    openai_server: FakeOpenAI, client: openai.OpenAI
) -> None:
    openai_server.reply_tool_calls(("get_weather", "{}"))
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input=[fco("call_0")])
    assert client.responses.create(model="m", input="hi").output[0].type == "function_call"
