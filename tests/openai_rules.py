"""OpenAI's rules for a request's conversation, in plain Python: Chat
Completions ``messages`` (:func:`check_messages`) and the Responses API's
``input`` items (:func:`check_input`, below).

``check_messages`` returns None for messages the real API accepts and raises
:class:`MessageRuleError` for the first rule they break, with the API's error
text, the ``param`` it names and its ``code``; the fake server
(``tests/openai_server.py``) answers a 400 with exactly these::

    check_messages([{"role": "user", "content": "hi"}])  # fine
    check_messages([{"role": "tool", "tool_call_id": "call_1", "content": "42"}])
    # MessageRuleError: Invalid parameter: messages with role 'tool' must be a
    # response to a preceeding message with 'tool_calls'.  (param messages.[0].role)

The messages' rules, checked message by message first (the shape of each), then in order
(the tool calls and their answers):

1. ``messages`` is a non-empty list of objects, each with a ``role``: system,
   developer, user, assistant, tool or the legacy function;
2. ``content`` is a string or a list of content parts, objects with a
   ``type`` and a value under that name (``{"type": "text", "text": "hi"}``):
   user messages may send text, image_url, input_audio and file parts,
   assistant messages text and refusal parts, the others text parts only;
   ``content`` may be null (or absent) only on an assistant message with
   ``tool_calls``, ``function_call`` or a ``refusal``;
3. an assistant's ``tool_calls`` is a non-empty list of ``{"id": str, "type":
   "function", "function": {"name": str, "arguments": str}}``, ids unique
   within the message; a tool message has a ``tool_call_id``, a function
   message a ``name``;
4. tool messages come in one unbroken run right after an assistant message
   with ``tool_calls``, each answering one of its ids not yet answered;
5. every id of those ``tool_calls`` is answered before the next message that
   is not a tool message, or before the end of the list.

The error texts are the real API's, quoted from public reports of its 400s
(the source is named beside each); the few that no report showed are ours, in
the API's style, and say so. The real API names the param in two styles,
``messages.[3].role`` (its checks of tool messages and null content) and
``messages[3].role`` (its checks of types and values); each error here uses
the style its real counterpart does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CONTENT_PART_TYPES", "ROLES", "MessageRuleError", "check_input", "check_messages"]

# In the order the API's "Supported values" error lists them.
ROLES = ("system", "assistant", "user", "function", "tool", "developer")
CONTENT_PART_TYPES = ("text", "image_url", "input_audio", "refusal", "audio", "file")
_PARTS_BY_ROLE = {
    "system": {"text"},
    "developer": {"text"},
    "user": {"text", "image_url", "input_audio", "file"},
    "assistant": {"text", "refusal"},
    "tool": {"text"},
    "function": {"text"},
}


class MessageRuleError(ValueError):
    """A broken rule: the API's error ``message``, the ``param`` it names and its ``code``."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Return None when OpenAI would accept ``messages``.

    Raises :class:`MessageRuleError` for the first rule they break (any value
    is checked, not only a list of dicts: the server passes the request's JSON).
    """
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of objects", messages)
    if not messages:
        raise _empty_array("messages")
    for i, message in enumerate(messages):
        _check_message(i, message)
    _check_tool_answers(messages)


def _check_message(i: int, message: Any) -> None:
    at = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _wrong_type(at, "an object", message)
    if "role" not in message:
        raise _missing(f"{at}.role")
    role = message["role"]
    if role not in ROLES:
        raise _invalid_value(role, ROLES, f"{at}.role")
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None:
        _check_tool_calls(i, calls)
    _check_content(i, message, may_be_null=role == "assistant" and _has_other_output(message))
    if role == "tool" and message.get("tool_call_id") is None:
        # github.com/langchain-ai/langchain/issues/22600, MadcowD/ell#325
        raise MessageRuleError(
            "Missing parameter 'tool_call_id': messages with role 'tool' must have a "
            "'tool_call_id'.",
            f"messages.[{i}].tool_call_id",
        )
    if role == "tool" and not isinstance(message["tool_call_id"], str):
        raise _wrong_type(f"{at}.tool_call_id", "a string", message["tool_call_id"])
    if role == "function" and message.get("name") is None:
        # github.com/langchain-ai/langchainjs/issues/6570 (param and code from a mock of it)
        raise MessageRuleError(
            "Missing parameter 'name': messages with role 'function' must have a 'name'.",
            f"messages.[{i}].name",
        )


def _has_other_output(message: dict[str, Any]) -> bool:
    """Whether an assistant message says something besides its ``content``."""
    return any(message.get(key) for key in ("tool_calls", "function_call", "refusal"))


def _check_content(i: int, message: dict[str, Any], *, may_be_null: bool) -> None:
    at = f"messages[{i}].content"
    content = message.get("content")
    if content is None:
        if may_be_null:
            return
        if "content" not in message:
            raise _missing(at)
        # github.com/langchain-ai/langchainjs/issues/4153 (the API's full answer)
        raise MessageRuleError(
            "Invalid value for 'content': expected a string, got null.", f"messages.[{i}].content"
        )
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _wrong_type(at, "one of a string or array of objects", content)
    role = message["role"]
    for j, part in enumerate(content):
        _check_part(i, role, f"{at}[{j}]", part)


def _check_part(i: int, role: str, at: str, part: Any) -> None:
    if not isinstance(part, dict):
        raise _wrong_type(at, "an object", part)
    if "type" not in part:
        raise _missing(f"{at}.type")
    kind = part["type"]
    if kind not in CONTENT_PART_TYPES:
        raise _invalid_value(kind, CONTENT_PART_TYPES, f"{at}.type")
    if kind not in _PARTS_BY_ROLE[role]:
        if kind == "image_url":
            # github.com/openai/openai-node/issues/1030; param and code quoted in public code
            text = (
                f"Invalid 'messages[{i}]'. Image URLs are only allowed for messages with role "
                f"'user', but this message with role '{role}' contains an image URL."
            )
        else:  # ours, in the style of the image rule
            text = (
                f"Invalid 'messages[{i}]'. Content parts of type '{kind}' are not allowed in "
                f"messages with role '{role}'."
            )
        raise MessageRuleError(text, f"messages[{i}]", "invalid_value")
    if kind not in part:
        raise _missing(f"{at}.{kind}")
    if kind in ("text", "refusal") and not isinstance(part[kind], str):
        raise _wrong_type(f"{at}.{kind}", "a string", part[kind])


def _check_tool_calls(i: int, calls: Any) -> None:
    at = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise _wrong_type(at, "an array of objects", calls)
    if not calls:
        raise _empty_array(at)
    first: dict[str, int] = {}  # id -> index of the call that has it
    for k, call in enumerate(calls):
        here = f"{at}[{k}]"
        if not isinstance(call, dict):
            raise _wrong_type(here, "an object", call)
        for key in ("id", "type", "function"):
            if key not in call:
                raise _missing(f"{here}.{key}")
        if not isinstance(call["id"], str):
            raise _wrong_type(f"{here}.id", "a string", call["id"])
        if call["type"] != "function":
            raise _invalid_value(call["type"], ("function",), f"{here}.type")
        function = call["function"]
        if not isinstance(function, dict):
            raise _wrong_type(f"{here}.function", "an object", function)
        for key in ("name", "arguments"):
            if key not in function:
                raise _missing(f"{here}.function.{key}")
            if not isinstance(function[key], str):
                raise _wrong_type(f"{here}.function.{key}", "a string", function[key])
        if not function["name"]:
            # github.com/continuedev/continue/issues/11645 (the code is our guess)
            raise MessageRuleError(
                f"Invalid '{here}.function.name': empty string. Expected a string with minimum "
                "length 1, but got an empty string instead.",
                f"{here}.function.name",
                "empty_string",
            )
        if call["id"] in first:  # ours, in the style of the API's duplicate answer below
            raise MessageRuleError(
                f"Invalid parameter: Duplicate value for 'id' of '{call['id']}', in "
                f"{at}[{first[call['id']]}] and {here}.",
                f"messages.[{i}].tool_calls.[{k}].id",
            )
        first[call["id"]] = k


def _check_tool_answers(messages: list[dict[str, Any]]) -> None:
    """Rules 4 and 5: each run of tool messages answers the tool calls just before it."""
    caller: int | None = None  # index of the assistant message whose answers may follow
    unanswered: list[str] = []
    answered: dict[str, int] = {}  # id -> index of the tool message that answered it
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            call_id = message["tool_call_id"]
            if caller is None:
                # github.com/miurla/morphic/issues/136, smarter-sh/smarter#264, sdcb/chats#132:
                # OpenAI's own spelling, "preceeding".
                raise MessageRuleError(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            if call_id in answered:
                # github.com/agno-agi/agno/issues/5116
                raise MessageRuleError(
                    f"Invalid parameter: Duplicate value for 'tool_call_id' of '{call_id}', "
                    f"in messages[{answered[call_id]}] and messages[{i}].",
                    f"messages.[{i}].tool_call_id",
                )
            if call_id not in unanswered:
                # github.com/dapr/dapr-agents/issues/145 (the param is our guess)
                raise MessageRuleError(
                    f"Invalid parameter: 'tool_call_id' of '{call_id}' not found in "
                    "'tool_calls' of previous message.",
                    f"messages.[{i}].tool_call_id",
                )
            unanswered.remove(call_id)
            answered[call_id] = i
            continue
        if unanswered:
            raise _unanswered(caller, unanswered)
        caller, unanswered, answered = None, [], {}
        if message["role"] == "assistant" and message.get("tool_calls"):
            caller, unanswered = i, [call["id"] for call in message["tool_calls"]]
    if unanswered:
        raise _unanswered(caller, unanswered)


def _unanswered(caller: int | None, ids: list[str]) -> MessageRuleError:
    # github.com/router-for-me/CLIProxyAPI/issues/2798, sdcb/chats#132 (ids joined by
    # ", " in a report quoted in public code). The reports name a message's role
    # without the request, so which message, here the assistant's, is our guess.
    return MessageRuleError(
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(ids),
        f"messages.[{caller}].role",
    )


# -- the Responses API: a request's input items ------------------------------------------


def check_input(items: Any, reasoned: Mapping[str, str] | None = None) -> None:
    """Return None when the Responses API would accept ``items``, a request's
    ``input`` sent without ``previous_response_id`` (so the items are the
    whole conversation).

    ``reasoned`` maps the id of each reasoning item the model made to the id
    of the item it made right after it (the fake server keeps it for its own
    replies): the API requires the two together, as it made them.

    The rules, checked item by item:

    1. ``input`` is a string (one user message) or a list of objects;
    2. a ``function_call`` and a ``function_call_output`` have a string
       ``call_id``;
    3. a ``function_call_output`` answers a ``function_call`` earlier in the
       list (same ``call_id``);
    4. a reasoning item in ``reasoned`` comes right before the item made
       after it, and that item right after it;
    5. every ``function_call`` has its ``function_call_output`` later in the
       list.

    Raises :class:`MessageRuleError` for the first rule broken (an output
    without its call is reported as it is met, before any call left without
    its output: which of the two the real API reports first when a request
    breaks both is not known). The errors' ``param`` is ``input``, their
    ``code`` null, as the real API's answers show. Other item types
    (``custom_tool_call`` and its output, hosted tool calls) are not
    checked: no report showed their errors.
    """
    if isinstance(items, str):
        return
    if not isinstance(items, list):
        # ours: the API's wording for a value of the wrong type, unconfirmed for 'input'
        raise _wrong_type("input", "one of a string or array of objects", items)
    reasoned = reasoned or {}
    reasoning_of = {made: reasoning for reasoning, made in reasoned.items()}
    called: set[str] = set()
    unanswered: list[str] = []  # the calls waiting for an output, in order
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _wrong_type(f"input[{i}]", "an object", item)
        _check_reasoned(items, i, reasoned, reasoning_of)
        kind = item.get("type")
        if kind not in ("function_call", "function_call_output"):
            continue
        call_id = item.get("call_id")
        if call_id is None:
            raise _missing(f"input[{i}].call_id")
        if not isinstance(call_id, str):
            raise _wrong_type(f"input[{i}].call_id", "a string", call_id)
        if kind == "function_call":
            called.add(call_id)
            unanswered.append(call_id)
        elif call_id not in called:
            # The API's full answer: github.com/microsoft/vscode/issues/320060,
            # continuedev/continue#10092 (param "input", code null).
            raise MessageRuleError(
                f"No tool call found for function call output with call_id {call_id}.", "input"
            )
        elif call_id in unanswered:
            unanswered.remove(call_id)
    if unanswered:
        # The API's full answer: github.com/tjardoo/openai-client/pull/124
        # (param "input", code null).
        raise MessageRuleError(f"No tool output found for function call {unanswered[0]}.", "input")


def _check_reasoned(
    items: list[Any], i: int, reasoned: Mapping[str, str], reasoning_of: Mapping[str, str]
) -> None:
    """Rule 4 at ``items[i]``: a reasoning item and the item made after it
    come together, in that order (``reasoning_of`` is ``reasoned`` inverted)."""
    item, after = items[i], items[i + 1] if i + 1 < len(items) else None
    before = items[i - 1] if i > 0 else None
    ident = item.get("id")
    if not isinstance(ident, str):
        return
    made_after = reasoned.get(ident) if item.get("type") == "reasoning" else None
    if made_after is not None and not (isinstance(after, dict) and after.get("id") == made_after):
        # The API's full answer: github.com/continuedev/continue/issues/8933, #10428.
        text = f"Item '{ident}' of type 'reasoning' was provided without its required following"
        raise MessageRuleError(f"{text} item.", "input")
    needs = reasoning_of.get(ident)
    if needs is not None and not (isinstance(before, dict) and before.get("id") == needs):
        # The API's full answer: github.com/continuedev/continue/issues/10018,
        # VRSEN/agency-swarm#367 (a function_call; #12620 shows a message's).
        raise MessageRuleError(
            f"Item '{ident}' of type '{item.get('type', 'message')}' was provided without "
            f"its required 'reasoning' item: '{needs}'.",
            "input",
        )


# -- the API's answers to a value of the wrong shape ------------------------------------


def _missing(param: str) -> MessageRuleError:
    # github.com/mark3labs/mcphost/issues/117, openai/openai-cookbook#1248
    return MessageRuleError(
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    )


def _wrong_type(param: str, expected: str, got: Any) -> MessageRuleError:
    # github.com/pydantic/pydantic-ai/issues/2653
    return MessageRuleError(
        f"Invalid type for '{param}': expected {expected}, but got {_a(got)} instead.",
        param,
        "invalid_type",
    )


def _invalid_value(value: Any, supported: tuple[str, ...], param: str) -> MessageRuleError:
    # Roles: an openai.BadRequestError quoted whole (param messages[2].role, code
    # invalid_value) in public notes found by code search, and copied by
    # OpenAI-compatible servers' tests. Part types: the same text for 'thinking' with
    # param messages[1].content[0].type, quoted in public code.
    return MessageRuleError(
        f"Invalid value: '{value}'. Supported values are: {_listed(supported)}.",
        param,
        "invalid_value",
    )


def _empty_array(param: str) -> MessageRuleError:
    # github.com/CopilotKit/CopilotKit/issues/529 (messages), home-assistant/core#118577
    return MessageRuleError(
        f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an "
        "empty array instead.",
        param,
        "empty_array",
    )


def _listed(values: tuple[str, ...]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def _a(value: Any) -> str:
    """The JSON type of ``value`` with its article, as the API words it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
