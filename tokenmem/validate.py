"""Validation: what can be stored, checked before any transaction opens.

Every value is checked (a ``str``, no NUL, valid Unicode; keys of 1 to 255
characters; metadata a JSON object) and every message counted with tiktoken
in :func:`prepare_append`, so a failed save writes nothing and no lock is
held while tiktoken works::

    prepared = prepare_append(SessionKey.of("chat-1"), [[Message("human", "hi")]], counter)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from .chat import Units, role_of, units
from .errors import ConfigurationError, InvalidInputError
from .messages import Message
from .models import ROLES, session_uuid
from .tokens import TokenCounter
from .window import Counts, count_message

__all__ = [
    "DEFAULT_OWNER",
    "PreparedAppend",
    "SessionKey",
    "batches",
    "check_counter",
    "check_key",
    "check_text",
    "prepare_append",
    "prepare_messages",
]

DEFAULT_OWNER = ""
_MAX_KEY = 255
_PINNED = ("system", "developer")


def check_text(value: object, what: str) -> str:
    """Return ``value`` if it can be stored and read back exactly, else raise."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInputError(
            f"{what} contains a NUL character (U+0000), which SQL text cannot hold"
        )
    try:
        if not value.isascii():  # (ASCII is valid: no copy made to find out)
            value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid Unicode: {exc.reason} at {exc.start}"
        ) from None
    return value


def check_key(value: object, what: str) -> str:
    text = check_text(value, what)
    if not text or len(text) > _MAX_KEY:
        raise InvalidInputError(f"{what} must have 1 to {_MAX_KEY} characters")
    return text


def check_metadata(value: object, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a dict, not {type(value).__name__}")
    try:
        dumped = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not JSON: {exc}") from None
    if "\\u0000" in dumped:
        raise InvalidInputError(f"{what} contains a NUL character (U+0000)")
    check_text(dumped, what)


class SessionKey(NamedTuple):
    """A session as the public API names it: owner and session id."""

    owner: str
    name: str

    @classmethod
    def of(cls, name: object, owner: object = DEFAULT_OWNER) -> SessionKey:
        owner = "" if owner == "" else check_key(owner, "owner")
        return cls(str(owner), check_key(name, "session_id"))

    @property
    def id(self) -> uuid.UUID:
        return session_uuid(self.owner, self.name)


# --- writes ---------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedAppend:
    """Turns checked and counted, ready to be written in one transaction."""

    key: SessionKey
    encoding: str
    messages: list[Message]
    counts: list[Counts]
    turn_of: list[int]
    turns: int
    counter: TokenCounter
    # Original timestamps of imported messages (None: now).
    created_at: list[datetime | None]
    # Responses API items (chat.from_items): placed in units under the
    # session's lock (chat.place_items), never refused for their order.
    items: bool = False

    @functools.cached_property
    def floor(self) -> int:
        return sum(c.floor for c in self.counts)

    @functools.cached_property
    def units(self) -> Units:
        """The messages' tool-call units (checked: :func:`tokenmem.chat.units`;
        not for items)."""
        return units(self.messages)

    @functools.cached_property
    def pinned(self) -> tuple[int, int] | None:
        """The first and last index of the newest run of system/developer
        messages, which becomes the session's pinned prompt (or None)."""
        last = None
        for i in range(len(self.messages) - 1, -1, -1):
            pinned = self.messages[i].type in _PINNED
            if last is None and pinned:
                last = i
            elif last is not None and not pinned:
                return i + 1, last
        return None if last is None else (0, last)

    def counted_with(self, counter: TokenCounter) -> PreparedAppend:
        """The same messages, counted with ``counter``'s encoding."""
        counts = [
            count_message(counter, m.type, m.content, m.name, m.openai) for m in self.messages
        ]
        return dataclasses.replace(
            self, encoding=counter.encoding_name, counts=counts, counter=counter
        )


def batches(turns: Iterable[Sequence[Message]], size: int) -> Iterator[list[Sequence[Message]]]:
    """``turns`` in lists of ``size``, read lazily (an import may be long)."""
    batch: list[Sequence[Message]] = []
    for turn in turns:
        batch.append(turn)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_append(
    key: SessionKey,
    turns: Sequence[Sequence[Message]],
    counter: TokenCounter,
    *,
    items: bool = False,
) -> PreparedAppend:
    """``turns`` checked and counted with ``counter``: each a turn of its own.
    ``items``: they are Responses API items (:func:`tokenmem.chat.from_items`),
    placed in units by the items' rules."""
    if not turns or not all(turns):
        raise InvalidInputError("nothing to append: a turn needs at least one message")
    messages = [m for turn in turns for m in turn]
    turn_of = [t for t, turn in enumerate(turns) for _ in turn]
    return _prepare(key, messages, turn_of, counter, items)


def check_counter(counter: object) -> None:
    """Refuse what is not a token counter (``None``, a model name ...)."""
    if not isinstance(getattr(counter, "encoding_name", None), str):
        raise ConfigurationError(f"counter must be a TokenCounter, not {type(counter).__name__}")


def prepare_messages(
    key: SessionKey, messages: Iterable[Message], counter: TokenCounter
) -> PreparedAppend:
    """``messages`` checked and counted with ``counter``, in turns as
    ``save_context`` makes them: a human message and the AI message right
    after it are one turn, every other message a turn of its own. (The
    store checked ``counter`` with :func:`check_counter` first.)"""
    listed = list(messages)
    if not listed:
        raise InvalidInputError("nothing to append: no messages")
    turn_of, turn, previous = [], -1, None
    for msg in listed:
        kind = getattr(msg, "type", None)
        paired = previous == "human" and kind == "ai"
        if not paired:
            turn += 1
        turn_of.append(turn)
        previous = None if paired else kind
    return _prepare(key, listed, turn_of, counter)


def _prepare(
    key: SessionKey,
    messages: list[Message],
    turn_of: list[int],
    counter: TokenCounter,
    items: bool = False,
) -> PreparedAppend:
    for i, msg in enumerate(messages):
        if not isinstance(msg, Message):
            raise InvalidInputError(f"message {i} must be a Message, not {type(msg).__name__}")
        if msg.type not in ROLES:
            raise InvalidInputError(f"message {i}: type must be one of {ROLES}, not {msg.type!r}")
        check_text(msg.content, f"message {i} content")
        if msg.name is not None:
            check_key(msg.name, f"message {i} name")
        check_metadata(msg.metadata, f"message {i} metadata")
        if msg.openai is not None:
            check_metadata(msg.openai, f"message {i} openai")
            if role_of(msg.openai) != msg.type:
                raise InvalidInputError(
                    f"message {i}: its openai dict is a {role_of(msg.openai)!r} message, "
                    f"not {msg.type!r}"
                )
        created = getattr(msg, "created_at", None)
        if created is not None and (not isinstance(created, datetime) or created.tzinfo is None):
            raise InvalidInputError(f"message {i} created_at must be a timezone-aware datetime")
    prepared = PreparedAppend(
        key=key,
        encoding=counter.encoding_name,
        messages=messages,
        counts=[count_message(counter, m.type, m.content, m.name, m.openai) for m in messages],
        turn_of=turn_of,
        turns=turn_of[-1] + 1,
        counter=counter,
        created_at=[getattr(m, "created_at", None) for m in messages],
        items=items,
    )
    if not items:
        prepared.units  # noqa: B018  (the tool-call rules, checked before any transaction)
    return prepared
