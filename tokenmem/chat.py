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
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError
from .messages import Message
from .tokens import TokenCounter

__all__ = [
    "FROM_OPENAI",
    "TOOL_CALL_TOKENS",
    "TO_OPENAI",
    "OpenUnit",
    "Units",
    "as_openai",
    "content_tokens",
    "display_text",
    "from_openai",
    "resume",
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
    if isinstance(messages, Mapping | str | bytes) or not isinstance(messages, Sequence):
        raise InvalidInputError(f"messages must be a list of dicts, not {type(messages).__name__}")
    if not messages:
        raise InvalidInputError("nothing to save: no messages")
    made = []
    for i, d in enumerate(messages):
        if not isinstance(d, Mapping):
            raise InvalidInputError(f"messages[{i}] must be a dict, not {type(d).__name__}")
        d = dict(d)
        _check_json(d, i)
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


def _check_json(d: dict[str, Any], i: int) -> None:
    try:
        json.dumps(d, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"messages[{i}] is not JSON: {exc}") from None


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


def display_text(d: Mapping[str, Any]) -> str:
    """The text a string window renders for an OpenAI message (the module
    docstring's rule): what the ``content`` column holds."""
    content = d.get("content")
    if isinstance(content, str):
        lines = [content]
    elif isinstance(content, list):
        lines = [
            p.get("text", "") if p.get("type") == "text" else f"[{p.get('type')}]" for p in content
        ]
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
    calls (the module docstring's rule); role and name are counted apart."""
    content = d.get("content")
    total = 0
    if isinstance(content, str):
        total = counter.count(content)
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type")
            if kind == "text":
                total += counter.count(part.get("text", ""))
            elif kind == "image_url":
                total += counter.image_tokens
            else:
                total += counter.count(json.dumps(part, ensure_ascii=False))
    elif isinstance(d.get("refusal"), str):
        total = counter.count(d["refusal"])
    for call in d.get("tool_calls") or ():
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        total += TOOL_CALL_TOKENS + counter.count(name) + counter.count(arguments)
    return total
