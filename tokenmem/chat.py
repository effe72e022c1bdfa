"""OpenAI Chat Completions messages: checked, kept exactly as given, counted.

``memory.save_messages`` takes the dicts ``client.chat.completions.create``
takes — roles ``system``, ``developer``, ``user``, ``assistant``, ``tool``;
``content`` a string, a list of content parts, or null for an assistant
message that only calls tools; ``name``; ``tool_calls``; ``tool_call_id``;
any other key kept — and :func:`from_openai` turns them into
:class:`~tokenmem.messages.Message` values (``user``/``assistant`` are
LangChain's ``human``/``ai``), the dict itself kept in ``Message.openai``
unless role, content and name rebuild it byte for byte::

    >>> [m.type for m in from_openai([{"role": "user", "content": "hi"}])]
    ['human']
    >>> as_openai(Message("ai", "yo"))
    {'role': 'assistant', 'content': 'yo'}

**Units.** An assistant message with ``tool_calls`` and the ``tool``
messages answering it form one unit, which a window holds whole or not at
all. The answers follow their call, right after it (as the API requires),
in the same ``save_messages`` call or in the next ones: a unit left open
(calls unanswered) is kept out of windows until its last answer is saved.
A ``tool`` message answering no open call, or another message arriving
while calls are open, is refused before anything is written.

**String rendering** (``save_context``'s windows, ``tokenmem history``): a
message's ``content`` column is its text — a string content as is; content
parts' text parts joined by newlines, any other part as ``[its type]``; an
assistant's tool calls one per line as ``name(arguments)`` after its text;
a refusal's text. Tool messages render with the prefix ``Tool``, developer
messages with ``Developer``.

**Counting** (the chat formula; OpenAI does not publish one for tool
traffic, so this is tokenmem's, stated and fixed): a message costs 3, plus
its role, its name (+1), its content — a string counted whole; a text part
its text; an ``image_url`` part ``TokenCounter.image_tokens`` (85 by
default, OpenAI's price of a low-detail image); any other part the tokens of
its JSON — plus, per tool call, :data:`TOOL_CALL_TOKENS` + the function's
name + its arguments string. A ``tool`` message's ``tool_call_id`` is not
counted. The turn log keeps the API's reported ``usage.prompt_tokens``
beside the local count (``tokenmem turns``), so the difference per model
is visible.

**Responses API items** (:func:`from_items`; the OpenAI Agents SDK's session
items, :mod:`tokenmem.agents`) are kept exactly as given too. An item's role
is its message's (``user``, ``assistant``, ``system``, ``developer``: human,
ai, system, developer); an output item (``function_call_output`` and every
other ``*_output``) is a ``tool`` message; any other item (``function_call``,
``reasoning``, hosted tool calls ...) an ``ai`` message::

    >>> [m.type for m in from_items([{"type": "function_call", "call_id": "c1",
    ...     "name": "f", "arguments": "{}"}, {"type": "function_call_output",
    ...     "call_id": "c1", "output": "42"}])]
    ['ai', 'tool']

Their units: a call item (:data:`CALL_OUTPUTS`: ``function_call``,
``custom_tool_call``, ``computer_call``, ``local_shell_call``,
``shell_call``, ``apply_patch_call``) opens a unit, which further calls join
(parallel calls) and the outputs of the same ``call_id`` answer; it closes
with its last answer. A ``reasoning`` item (or a run of them) opens a unit
that the next item the model made joins — an assistant message, a call (the
unit then waits for its outputs), any item other than a message or an output
— since the API refuses a reasoning item without the item after it. Every
other item is a unit of its own (``mcp_approval_request`` and its response
too: they are not paired). A unit may span saves, and is kept out of windows
while open, as above. Unlike Chat Completions messages, items are never
refused for their order, because the Agents SDK's Runner goes on after a call
it never answered (an interrupted run, a tool approval never given) and drops
such calls from what it sends: an item that cannot join the open unit
*orphans* it (the unit's rows stay in the history but are never sent), and
an output answering no open call is an orphan of its own.

Rendered as a string, a function call is ``name(arguments)`` (a custom tool
call ``name(input)``), an output its ``output`` (a string, or its parts as
above), a reasoning item its summary texts (else ``[reasoning]``), any other
item ``[its type]``; ``input_text``/``output_text`` parts are text parts and
``input_image`` parts images. Counted, an item costs 3 plus its role plus:
a message as above; a function or custom tool call :data:`TOOL_CALL_TOKENS`
+ its name + its ``arguments`` (``input``); an output its ``output`` (a
string, or its parts); a reasoning item its summary and content texts and
its ``encrypted_content`` (as text: OpenAI does not say what an encrypted
item costs, so this errs high); any other item the tokens of its JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import InvalidInputError
from .messages import Message
from .tokens import TokenCounter

__all__ = [
    "CALL_OUTPUTS",
    "FROM_OPENAI",
    "TOOL_CALL_TOKENS",
    "TO_OPENAI",
    "OpenUnit",
    "Placement",
    "Traffic",
    "Units",
    "answered",
    "as_openai",
    "content_tokens",
    "display_text",
    "from_items",
    "from_openai",
    "item_type",
    "place_items",
    "reopen",
    "resume",
    "role_of",
    "traffic",
    "units",
]

FROM_OPENAI = {
    "system": "system",
    "developer": "developer",
    "user": "human",
    "assistant": "ai",
    "tool": "tool",
}
TO_OPENAI = {v: k for k, v in FROM_OPENAI.items()}
# A tool call's cost beyond its function's name and arguments.
TOOL_CALL_TOKENS = 3
_TEXT_ONLY = {"system", "developer", "tool"}  # roles whose parts must be text
# Content parts read as text, and as images (Chat Completions', then the Responses API's).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
# Responses API call items, and the output item answering each (by call_id).
CALL_OUTPUTS = {
    "function_call": "function_call_output",
    "custom_tool_call": "custom_tool_call_output",
    "computer_call": "computer_call_output",
    "local_shell_call": "local_shell_call_output",
    "shell_call": "shell_call_output",
    "apply_patch_call": "apply_patch_call_output",
}
_OUTPUTS = frozenset(CALL_OUTPUTS.values())
_ITEM_ROLES = ("user", "assistant", "system", "developer")  # a Responses message's


def as_openai(message: Message) -> dict[str, Any]:
    """The message as the Chat Completions API takes it: exactly as it was
    saved by ``save_messages``, else rebuilt from role, content and name."""
    if message.openai is not None:
        return message.openai
    made: dict[str, Any] = {"role": TO_OPENAI[message.type], "content": message.content}
    if message.name is not None:
        made["name"] = message.name
    return made


def _rebuilds(d: Mapping[str, Any], role: str) -> bool:
    """Whether role, content and name give back ``d`` byte for byte."""
    keys = list(d)
    return (
        keys in (["role", "content"], ["role", "content", "name"])
        and isinstance(d["content"], str)
        and (len(keys) == 2 or isinstance(d["name"], str))
        and role in ("human", "ai", "system", "developer")
    )


def from_openai(messages: Sequence[Any]) -> list[Message]:
    """Check ``messages`` (Chat Completions dicts) against the API's rules
    and return them as messages: the dict kept in ``openai`` unless its role,
    content and name rebuild it. Raises :class:`InvalidInputError` naming
    the message and the rule."""
    made = []
    for i, d in enumerate(_dicts(messages, "messages")):
        if "type" in d:
            raise InvalidInputError(
                f"messages[{i}] has a 'type': Chat Completions messages have none (a Responses "
                "API item? tokenmem.agents.TokenmemSession and chat.from_items take those)"
            )
        role = FROM_OPENAI.get(d.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InvalidInputError(
                f"messages[{i}]: role must be one of {sorted(FROM_OPENAI)}, not {d.get('role')!r}"
            )
        _check_content(d, i, role)
        name = d.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidInputError(f"messages[{i}]: name must be a str")
        keep = None if _rebuilds(d, role) else d
        made.append(Message(role, display_text(d), name, openai=keep))  # type: ignore[arg-type]
    units(made)  # the tool-call rules (those across saves: checked when written)
    return made


def _dicts(values: Sequence[Any], what: str) -> list[dict[str, Any]]:
    """``values`` (``what``: "messages" or "items") checked to be a
    non-empty list of dicts holding JSON; copied."""
    if isinstance(values, Mapping | str | bytes) or not isinstance(values, Sequence):
        raise InvalidInputError(f"{what} must be a list of dicts, not {type(values).__name__}")
    if not values:
        raise InvalidInputError(f"nothing to save: no {what}")
    made = []
    for i, d in enumerate(values):
        if not isinstance(d, Mapping):
            raise InvalidInputError(f"{what}[{i}] must be a dict, not {type(d).__name__}")
        try:
            json.dumps(d, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{what}[{i}] is not JSON: {exc}") from None
        made.append(dict(d))
    return made


def _check_content(d: Mapping[str, Any], i: int, role: str) -> None:
    content = d.get("content")
    calls = d.get("tool_calls")
    if role != "ai" and calls is not None:
        raise InvalidInputError(f"messages[{i}]: only assistant messages have tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            raise InvalidInputError(f"messages[{i}]: tool_calls must be a non-empty list")
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, Mapping) else None
            if (
                not isinstance(call.get("id") if isinstance(call, Mapping) else None, str)
                or not isinstance(function, Mapping)
                or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)
            ):
                raise InvalidInputError(
                    f"messages[{i}].tool_calls[{k}] must be "
                    '{"id": str, "type": "function", "function": {"name": str, "arguments": str}}'
                )
    if role == "tool" and not isinstance(d.get("tool_call_id"), str):
        raise InvalidInputError(f"messages[{i}]: a tool message needs a tool_call_id (a str)")
    if role != "tool" and "tool_call_id" in d:
        raise InvalidInputError(f"messages[{i}]: only tool messages have a tool_call_id")
    if content is None:
        if role == "ai" and (calls or isinstance(d.get("refusal"), str)):
            return
        raise InvalidInputError(
            f"messages[{i}]: content may be null only in an assistant message with "
            "tool_calls or a refusal"
        )
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise InvalidInputError(
            f"messages[{i}]: content must be a str, a non-empty list of content parts, or null"
        )
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str):
            raise InvalidInputError(f"messages[{i}].content[{k}] must be a dict with a 'type'")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise InvalidInputError(f"messages[{i}].content[{k}]: a text part needs 'text'")
        if kind != "text" and role in _TEXT_ONLY:
            raise InvalidInputError(
                f"messages[{i}].content[{k}]: {TO_OPENAI[role]} messages take text parts only"
            )


@dataclass(frozen=True)
class Units:
    """The units of an append's messages (see :func:`units`): ``back[i]``
    how many messages before message ``i`` its unit starts (0: at itself);
    ``continues``, the call ids its leading tool messages answer — calls an
    earlier save left open, in a unit that starts before this append
    (checked against the session under its lock: :func:`resume`); ``opens``,
    the call ids still unanswered at its end, of the unit starting at
    message ``open_at``."""

    back: list[int]
    continues: list[str] = field(default_factory=list)
    opens: list[str] = field(default_factory=list)
    open_at: int | None = None


def units(messages: Sequence[Message]) -> Units:
    """The units of ``messages``: an assistant message with tool calls and
    the tool messages answering it, right after it. Tool messages at the
    start may answer calls an earlier save left open (:attr:`Units.continues`)
    and calls may be left open at the end (:attr:`Units.opens`), for the
    next save to answer. Raises :class:`InvalidInputError` when a tool
    message answers no open call, a call is answered twice, or a message
    other than a tool answer comes while calls are open."""
    back: list[int] = []
    continues: list[str] = []
    start: int | None = None  # the open unit's assistant message (None: before this append)
    open_ids: list[str] = []
    leading = True  # still in the tool messages that open the append
    for i, m in enumerate(messages):
        d = m.openai or {}
        if m.type == "tool":
            call_id = d.get("tool_call_id")
            if leading and start is None:
                if call_id in continues:
                    raise InvalidInputError(f"messages[{i}]: tool call {call_id!r} answered twice")
                continues.append(str(call_id))
                back.append(0)  # its unit starts before this append (resume())
                continue
            if start is None or call_id not in open_ids:
                raise InvalidInputError(
                    f"messages[{i}]: tool message answers {call_id!r}, which no assistant "
                    "message right before it called (or it was answered already); a tool "
                    "message must follow the assistant message whose tool_calls it answers"
                )
            open_ids.remove(call_id)
            back.append(start - i)
            continue
        leading = False
        if open_ids:
            raise InvalidInputError(
                f"messages[{start}]: tool_calls {open_ids} have no tool message answering "
                f"them before messages[{i}]; answer every call before the next message"
            )
        start = None
        calls = d.get("tool_calls") if m.type == "ai" else None
        if calls:
            ids = [c["id"] for c in calls]
            if len(set(ids)) != len(ids):
                raise InvalidInputError(f"messages[{i}]: tool call ids must be unique: {ids}")
            start, open_ids = i, ids
        back.append(0)
    return Units(back, continues, open_ids, start if open_ids else None)


@dataclass(frozen=True)
class OpenUnit:
    """A session's unit whose calls are not all answered: it starts at
    ``position`` (whose ``cum_floor`` is ``floor``) and waits for ``calls``.
    Windows end before it (the API refuses an unanswered call)."""

    position: int
    floor: int
    calls: list[str]


def resume(u: Units, session: OpenUnit | None, first: int, name: str) -> OpenUnit | None:
    """Check an append's units against the unit its session left open
    (under the session's lock) and return the unit open after it; ``first``
    is the position of the append's first message. Raises
    :class:`InvalidInputError` (the transaction then writes nothing)."""
    waiting = list(session.calls) if session else []
    if session is not None and not waiting:
        raise InvalidInputError(
            f"session {name!r}: a reasoning item (message {session.position}) waits for the "
            "item the model made after it; a Chat Completions message cannot follow it"
        )
    for call_id in u.continues:
        if call_id not in waiting:
            raise InvalidInputError(
                f"session {name!r}: a tool message answers {call_id!r}, which no open "
                "tool call of the session made (or it was answered already)"
            )
        waiting.remove(call_id)
    rest = len(u.continues) < len(u.back)
    if waiting and rest:
        raise InvalidInputError(
            f"session {name!r}: tool_calls {waiting} (message {session.position if session else 0})"
            " have no tool message answering them before the next message; answer every "
            "call first"
        )
    if u.open_at is not None:
        return OpenUnit(first + u.open_at, -1, list(u.opens))  # floor: filled in by the writer
    if waiting and session is not None:
        return OpenUnit(session.position, session.floor, waiting)
    return None


def item_type(d: Mapping[str, Any]) -> str:
    """``"message"`` for a message (a Chat Completions dict, or a Responses
    message item with or without ``"type": "message"``), else the item's type."""
    kind = d.get("type")
    return kind if isinstance(kind, str) else "message"


def role_of(d: Mapping[str, Any]) -> str | None:
    """The role a message or item is stored with (the module docstring's
    mapping), or None for a message whose role tokenmem does not know."""
    kind = item_type(d)
    if kind == "message":
        return FROM_OPENAI.get(d.get("role"))  # type: ignore[arg-type]
    return "tool" if kind.endswith("_output") else "ai"


def answered(d: Mapping[str, Any]) -> str | None:
    """The call id a tool message or an output item answers (else None)."""
    if item_type(d) in _OUTPUTS:
        return str(d["call_id"])
    call_id = d.get("tool_call_id")
    return call_id if isinstance(call_id, str) and d.get("role") == "tool" else None


def _calls(d: Mapping[str, Any]) -> list[str]:
    """The call ids a call item, or an assistant message's tool_calls, makes."""
    kind = item_type(d)
    if kind in CALL_OUTPUTS:
        return [str(d["call_id"])]
    if kind == "message" and d.get("role") == "assistant":
        return [c["id"] for c in d.get("tool_calls") or ()]
    return []


def _parts_text(parts: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        str(p.get("text", "")) if p.get("type") in _TEXT_PARTS else f"[{p.get('type')}]"
        for p in parts
    ]


def _parts_tokens(counter: TokenCounter, parts: Sequence[Mapping[str, Any]]) -> int:
    total = 0
    for part in parts:
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            total += counter.count(str(part.get("text", "")))
        elif kind in _IMAGE_PARTS:
            total += counter.image_tokens
        else:
            total += counter.count(json.dumps(part, ensure_ascii=False))
    return total


class Traffic(NamedTuple):
    """How a history shows a message: its text without its tool calls, the
    calls it makes, each ``(call id, "name(arguments)")`` (an assistant
    message's ``tool_calls``, or a call item), and the id of the call it
    answers (a tool message or an output item; else None)."""

    text: str
    calls: list[tuple[str, str]]
    answers: str | None


def traffic(role: str, content: str, d: Mapping[str, Any] | None) -> Traffic:
    """:class:`Traffic` of a stored message (``role``, ``content``, the
    OpenAI dict or item ``d`` kept for it), for ``tokenmem history`` and the
    audit viewer."""
    d = d or {}
    call = _call_text(d)
    if call is not None or item_type(d) in CALL_OUTPUTS:
        shown = f"{call[0]}({call[1]})" if call else f"[{item_type(d)}]"
        return Traffic("", [(str(d.get("call_id", "")), shown)], None)
    answers = answered(d)
    if answers is not None or role == "tool":
        return Traffic(content, [], answers or "")
    calls = [
        (str(c.get("id", "")), f"{c['function']['name']}({c['function']['arguments']})")
        for c in d.get("tool_calls") or ()
        if isinstance(c, Mapping) and "function" in c
    ]
    text = display_text({**d, "tool_calls": None}) if calls else content
    return Traffic(text, calls, None)


def _call_text(d: Mapping[str, Any]) -> tuple[str, str] | None:
    """A function or custom tool call's name and arguments (input), else None."""
    kind = item_type(d)
    if kind == "function_call":
        return str(d["name"]), str(d["arguments"])
    if kind == "custom_tool_call" and isinstance(d.get("input"), str):
        return str(d.get("name", "")), d["input"]
    return None


def _output(d: Mapping[str, Any]) -> str | list[Any] | None:
    """An output item's output, when it is text or content parts."""
    output = d.get("output")
    if item_type(d).endswith("_output") and isinstance(output, str | list):
        return output
    return None


def _reasoning_texts(d: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """A reasoning item's summary texts and content texts."""

    def texts(key: str) -> list[str]:
        parts = d.get(key)
        if not isinstance(parts, list):
            return []
        return [str(p["text"]) for p in parts if isinstance(p, Mapping) and "text" in p]

    return texts("summary"), texts("content")


def display_text(d: Mapping[str, Any]) -> str:
    """The text a string window renders for an OpenAI message or item (the
    module docstring's rule): what the ``content`` column holds."""
    kind = item_type(d)
    if kind != "message":
        call = _call_text(d)
        output = _output(d)
        if call is not None:
            return f"{call[0]}({call[1]})"
        if output is not None:
            return output if isinstance(output, str) else "\n".join(_parts_text(output))
        summary = _reasoning_texts(d)[0] if kind == "reasoning" else []
        return "\n".join(summary) if summary else f"[{kind}]"
    content = d.get("content")
    if isinstance(content, str):
        lines = [content]
    elif isinstance(content, list):
        lines = _parts_text(content)
    elif isinstance(d.get("refusal"), str):
        lines = [d["refusal"]]
    else:
        lines = []
    for call in d.get("tool_calls") or ():
        function = call["function"]
        lines.append(f"{function['name']}({function['arguments']})")
    return "\n".join(lines)


def content_tokens(counter: TokenCounter, d: Mapping[str, Any]) -> int:
    """The chat formula's tokens of an OpenAI message's content and tool
    calls, or of an item (the module docstring's rule); role and name are
    counted apart."""
    kind = item_type(d)
    if kind != "message":
        call = _call_text(d)
        output = _output(d)
        if call is not None:
            return TOOL_CALL_TOKENS + counter.count(call[0]) + counter.count(call[1])
        if output is not None:
            return (
                counter.count(output) if isinstance(output, str) else _parts_tokens(counter, output)
            )
        if kind == "reasoning":
            summary, texts = _reasoning_texts(d)
            encrypted = d.get("encrypted_content")
            return sum(map(counter.count, [*summary, *texts])) + (
                counter.count(encrypted) if isinstance(encrypted, str) else 0
            )
        return counter.count(json.dumps(d, ensure_ascii=False))
    content = d.get("content")
    total = 0
    if isinstance(content, str):
        total = counter.count(content)
    elif isinstance(content, list):
        total = _parts_tokens(counter, content)
    elif isinstance(d.get("refusal"), str):
        total = counter.count(d["refusal"])
    for call in d.get("tool_calls") or ():
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        total += TOOL_CALL_TOKENS + counter.count(name) + counter.count(arguments)
    return total


# --- Responses API items ------------------------------------------------------------


def from_items(items: Sequence[Any]) -> list[Message]:
    """Check Responses API input items (the Agents SDK's session items) and
    return them as messages, each item kept in ``openai`` unless role and
    content rebuild it. Only their shape is checked — a message's role and
    content, a call's or output's ``call_id`` (a function call's ``name``
    and ``arguments``), JSON throughout — never their order (see the module
    docstring). Raises :class:`InvalidInputError` naming the item."""
    made = []
    for i, d in enumerate(_dicts(items, "items")):
        role = _check_item(d, i)
        plain = list(d) == ["role", "content"] and isinstance(d["content"], str)
        made.append(Message(role, display_text(d), openai=None if plain else d))  # type: ignore[arg-type]
    return made


def _check_item(d: Mapping[str, Any], i: int) -> str:
    """Check one item's shape; return its role."""
    kind = d.get("type", "message")
    if not isinstance(kind, str) or not kind:
        raise InvalidInputError(f"items[{i}]: type must be a str, not {kind!r}")
    if kind == "message":
        if d.get("role") not in _ITEM_ROLES:
            raise InvalidInputError(
                f"items[{i}]: a message's role must be one of {list(_ITEM_ROLES)}, "
                f"not {d.get('role')!r}"
            )
        if "tool_calls" in d or "tool_call_id" in d:
            raise InvalidInputError(
                f"items[{i}]: a Responses message has no tool_calls or tool_call_id "
                "(function calls and their outputs are items of their own)"
            )
        if not _parts(d.get("content"), text=True):
            raise InvalidInputError(
                f"items[{i}]: a message's content must be a str or a list of parts "
                "(dicts with a 'type')"
            )
    elif kind in CALL_OUTPUTS or kind in _OUTPUTS:
        if not isinstance(d.get("call_id"), str):
            raise InvalidInputError(f"items[{i}]: a {kind} needs a call_id (a str)")
        if kind in _OUTPUTS and not _parts(d.get("output"), text=False):
            raise InvalidInputError(
                f"items[{i}]: a list output must hold content parts (dicts with a 'type')"
            )
    if kind == "function_call" and not (
        isinstance(d.get("name"), str) and isinstance(d.get("arguments"), str)
    ):
        raise InvalidInputError(f"items[{i}]: a function_call needs a name and arguments (str)")
    return str(role_of(d))


def _parts(value: object, *, text: bool) -> bool:
    """Whether ``value`` is a str or a list of content parts; ``text``:
    nothing else (a message's content), else also any other value (an
    output that is neither, counted as the item's JSON)."""
    if isinstance(value, list):
        return all(isinstance(p, Mapping) and isinstance(p.get("type"), str) for p in value)
    return isinstance(value, str) or not text


class _Rules:
    """The unit rules of items, one item at a time, from a unit left open
    (``start``: its first position; ``waiting``: the call ids it waits for,
    none while it holds only reasoning and waits for the item after it)."""

    def __init__(self, unit: OpenUnit | None) -> None:
        self.start = unit.position if unit else None
        self.waiting = list(unit.calls) if unit else []

    def step(self, d: Mapping[str, Any], position: int) -> tuple[int | None, int | None]:
        """Place the item ``d`` at ``position``: return the value of its
        ``unit`` column (None: it starts a unit; negative: an orphan) and the
        start of the unit it orphans, if any."""
        calls, answer, kind = _calls(d), answered(d), item_type(d)
        orphaned = None
        if self.start is not None:
            unit = self.start
            if not self.waiting:  # reasoning, waiting for the item the model made after it
                if answer is None and (kind != "message" or d.get("role") == "assistant"):
                    self.waiting = calls
                    if not calls and kind != "reasoning":
                        self.start = None  # its item came: the unit is whole
                    return unit, None
            elif calls or answer in self.waiting:
                if calls:
                    self.waiting += calls
                else:
                    self.waiting.remove(str(answer))
                    if not self.waiting:
                        self.start = None
                return unit, None
            orphaned, self.start, self.waiting = self.start, None, []
        if answer is not None:  # answers no open call: never sent
            return -1 - position, orphaned
        if calls or kind == "reasoning":
            self.start, self.waiting = position, calls
        return None, orphaned


@dataclass(frozen=True)
class Placement:
    """An append's items placed in their units (:func:`place_items`):
    ``units[i]`` the ``unit`` column of item ``i`` — None where it starts a
    unit (or is one), the position its unit starts at, or ``-1 - start``
    for an orphan of the unit starting at ``start`` (never sent);
    ``orphaned``, the start of the session's open unit this append orphans
    (its stored rows become orphans too); ``after``, the unit open after the
    append (``floor`` -1 when the append opened it: the writer knows it)."""

    units: list[int | None]
    orphaned: int | None
    after: OpenUnit | None


def place_items(messages: Sequence[Message], session: OpenUnit | None, first: int) -> Placement:
    """Place an append's items (its first at position ``first``) in units,
    going on from the unit the session left open (under its lock). Never
    raises: an item that cannot join the open unit orphans it."""
    rules = _Rules(session)
    units: list[int | None] = []
    orphaned = None
    for i, m in enumerate(messages):
        unit, gone = rules.step(as_openai(m), first + i)
        if gone is not None:
            if gone < first:
                orphaned = gone
            units = [
                -1 - gone if u == gone or first + k == gone else u for k, u in enumerate(units)
            ]
        units.append(unit)
    after = None
    if rules.start is not None:
        kept = session is not None and rules.start == session.position
        after = OpenUnit(rules.start, session.floor if session and kept else -1, rules.waiting)
    return Placement(units, orphaned, after)


def reopen(unit: Sequence[Mapping[str, Any]]) -> list[str] | None:
    """The call ids the messages or items of one unit (oldest first) still
    wait for, ``[]`` when it holds only reasoning; None when it is whole (or
    never was a unit that could be: a stray output). What a unit is left
    waiting for when its newest item is popped."""
    rules = _Rules(None)
    for k, d in enumerate(unit):
        rules.step(d, k)
    return rules.waiting if rules.start == 0 else None
