"""Reading JSONL exports: each line parsed and checked as an import needs it.

:class:`Reader` turns the lines of a file :func:`tokenmem.transfer.export_jsonl`
wrote (or ``tokenmem history --format jsonl``, or a hand-written one) into
checked records, each message with its position in its session: JSON, the
fields, the OpenAI dict or Responses item (checked as ``save_messages`` and
``add_items`` check them), the tool-call units over each session's records,
and the tamper-evident chain an export carries. Errors name the line. The
import (:func:`tokenmem.transfer.import_jsonl`) reads a file twice through
it: once to check every line before anything is written, then to write.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from .chat import (
    OpenUnit,
    answered,
    as_openai,
    from_items,
    from_openai,
    item_type,
    place_items,
)
from .digest import message_digest
from .errors import InvalidInputError, TokenmemError
from .messages import Message, StoredMessage
from .models import ROLES
from .tokens import TokenCounter
from .validate import (
    DEFAULT_OWNER,
    SessionKey,
    check_key,
    check_metadata,
    check_text,
)

__all__ = ["Anchor", "Line", "Reader", "record_message", "twice"]


@dataclasses.dataclass(frozen=True)
class Anchor:
    """Where a session's message chain starts (tokenmem.digest): the digest
    and position of the newest message a prune removed (None: none was)."""

    digest: str | None
    position: int | None


# --- reading JSONL --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
    """A checked input line: a message (with its position) or a session line."""

    where: str  # "line 12", for errors
    key: SessionKey
    record: dict[str, Any]
    message: StoredMessage | None  # None: a session line
    position: int = -1
    # The first message after tool calls left unanswered (which only clear()
    # forgets: the session line checks it came before the window's start).
    forgets: bool = False
    number: int = 0  # its line (0: not a JSONL line)
    items: bool = False  # its session's records are Responses API items (placed by their rules)
    # "item": a Responses API item (tokenmem.chat.from_items) that is no Chat
    # Completions message; "chat": one (which may be an item too: _also_item).
    kind: str = "chat"


@dataclasses.dataclass
class _Seen:
    """What a reader remembers of a session: its last position, its encoding,
    whether a session line came since (then another export of it may follow:
    its positions start again and its encoding may be another)."""

    position: int = -1
    line: int = 0
    before: int = -1  # the position of the record before the last
    encoding: str | None = None
    ended: bool = False
    # The unit left open (tokenmem.chat.place_items: calls not answered yet,
    # or reasoning waiting for its item) and where it starts; the units a
    # chat message came after, for the session line (``plain``: a message
    # that may be an item too, which orphans them if its session holds items).
    unit: OpenUnit | None = None
    call: tuple[str, int] = ("", -1)
    left: list[_Left] = dataclasses.field(default_factory=list)
    items: bool = False  # an item record came (since the last session line)
    segments: int = 0  # session lines read: which of its exports this is
    # The digests of the export being read (tokenmem.digest): whether its
    # records carry them (None: no record yet), the last one, its first
    # record (checked when the session line names the anchor it chains to)
    # and its last.
    chained: bool | None = None
    digest: str = ""
    first: tuple[int, str, dict[str, Any]] | None = None
    last: int = 0


@dataclasses.dataclass(frozen=True)
class _Export:
    """One export of a session in a file: whether its records hold an item,
    and the window start its session line names (None: none)."""

    items: bool
    start: int | None


@dataclasses.dataclass(frozen=True)
class _Left:
    """A unit left open before a chat message (``by``), which only
    ``clear()`` forgets; ``plain``: the message may be an item too."""

    where: str
    position: int
    calls: list[str]
    by: str
    plain: bool


_REQUIRED = ("session_id", "role", "content")


class Reader:
    """Parses and checks JSONL lines, giving each message its position, and
    checks the digests an export carries (``chains``): each record's chains
    it to the one before it of its session, the first to the anchor its
    session line names, whose ``head_digest`` is the last's."""

    def __init__(
        self,
        owner: str | None,
        counter: TokenCounter | None,
        *,
        chains: bool = True,
        exports: Mapping[SessionKey, list[_Export]] | None = None,
    ) -> None:
        self.owner = owner
        self.counter = counter
        self.chains = chains
        self.seen: dict[SessionKey, _Seen] = {}
        self.keys: dict[tuple[str, str], SessionKey] = {}  # checked once per session
        # The anchors session lines name, by the line of their export's first record.
        self.anchors: dict[int, Anchor] = {}
        # Each session's exports in the file, as read; and as a reading
        # before this one found them (the writing pass needs to know, at
        # their first record, whether they hold items and where clear() was).
        self.exports: dict[SessionKey, list[_Export]] = {}
        self.known = exports or {}

    def read(self, lines: Iterable[str]) -> Iterator[Line]:
        number, it = 0, iter(lines)
        while True:
            try:
                text = next(it)
            except StopIteration:
                for key, seen in self.seen.items():
                    if not seen.ended:
                        self._ended(key, seen, None)
                    if seen.chained:
                        raise InvalidInputError(
                            f"line {seen.last}: the records of its session carry digests, but "
                            "no session line follows them: the file was cut short (an export "
                            "ends each session with its session line)"
                        ) from None
                return
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"not UTF-8 text after line {number}: {exc.reason}"
                ) from None
            number += 1
            if number == 1:  # a byte order mark (Windows tools write one) is no text
                text = text.removeprefix("\ufeff")
            if text.strip():
                try:
                    line = self._line(number, text)
                except InvalidInputError as exc:
                    raise InvalidInputError(f"line {number}: {exc}") from None
                except _Broken as exc:  # at another line
                    raise InvalidInputError(f"line {exc.args[0]}: {exc.args[1]}") from None
                yield self._unit(line)

    def _unit(self, line: Line) -> Line:
        """Check the unit rules over the line's session (errors name their
        lines), as its writes did: a chat tool message answers a call still
        open, at the next position; a unit a chat message came after is
        before the window's start, as only ``clear()`` forgets one; an item
        may come after anything (it orphans the unit it cannot join). A
        session's records are written by the items' rules if one of them is
        an item, so a message that may be either is then an item."""
        seen, message = self.seen[line.key], line.message
        if message is None:  # another export of the session may follow: its own units
            self._ended(line.key, seen, line.record.get("window_start"))
            return line
        exports = self.known.get(line.key, [])
        known = exports[seen.segments] if seen.segments < len(exports) else None
        seen.items |= line.kind == "item"
        items = known.items if known else seen.items
        open_, forgets = seen.unit, False
        if line.kind != "item" and message.type == "tool":
            call_id = answered(message.openai or {})
            if open_ is None or call_id not in open_.calls:
                raise InvalidInputError(
                    f"{line.where}: tool message answers {call_id!r}, which no open tool call "
                    "of its session made (or it was answered already): a tool message follows "
                    "the assistant message whose tool_calls it answers"
                )
            if line.position != seen.before + 1:
                raise InvalidInputError(
                    f"{line.where}: position {line.position} is not right after position "
                    f"{seen.before}: a tool message follows its call, or its call's "
                    "other answers"
                )
        elif line.kind != "item" and open_ is not None:
            plain = _also_item(message)
            seen.left.append(_Left(*seen.call, open_.calls, line.where, plain))
            forgets = not (plain and items)  # else it orphans the unit, as an item does
        if open_ is not None or message.openai is not None:  # (else it opens no unit)
            placed = place_items([message], None if forgets else open_, line.position)
            seen.unit = placed.after
            if placed.after is not None and placed.after.position == line.position:
                seen.call = (line.where, line.position)
        if items and known and known.start is not None:
            # Where clear() forgot the unit left open, which an item would
            # otherwise orphan (the last clear: the one its session line
            # names). Not for the checks above: the first reading cannot know.
            forgets |= seen.before < known.start <= line.position
        return dataclasses.replace(line, forgets=forgets, items=items)

    def _ended(self, key: SessionKey, seen: _Seen, start: int | None) -> None:
        """The end of one export of the session (its session line, or the
        file's end): check the units its chat messages came after (a message
        that may be an item orphans them, if the export holds items)."""
        seen.left = [x for x in seen.left if not (x.plain and seen.items)]
        _forgotten(seen, start)
        self.exports.setdefault(key, []).append(_Export(seen.items, start))
        seen.unit, seen.left, seen.items = None, [], False
        seen.segments += 1

    def _line(self, number: int, text: str) -> Line:
        try:
            record = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            # Some of json's messages end in "at" ("Unterminated string starting at").
            what = exc.msg.removesuffix(" at")
            raise InvalidInputError(f"not JSON: {what} at column {exc.colno}") from None
        if not isinstance(record, dict):
            raise InvalidInputError(f"a JSON object expected, not a {_json_type(record)}")
        kind = record.get("kind", "message")
        if kind not in ("message", "session"):
            raise InvalidInputError(f"kind must be 'message' or 'session', not {kind!r}")
        required = ("session_id",) if kind == "session" else _REQUIRED
        missing = [k for k in required if k not in record]
        if missing:
            needs = " and ".join(filter(None, [", ".join(required[:-1]), required[-1]]))
            raise InvalidInputError(f"missing {', '.join(missing)} (a {kind} needs {needs})")
        key = self._key(record["session_id"], self._owner(record.get("owner")))
        seen = self.seen.setdefault(key, _Seen())
        if kind == "session":
            for field in ("next_position", "next_turn", "window_start"):
                _number(record.get(field), field)
            _metadata(record.get("metadata"), "metadata")
            if self.chains:
                self._close(seen, number, record)
            seen.ended = True
            return Line(f"line {number}", key, record, None, number=number)
        message, kind = record_message(record)
        position = _number(record.get("position"), "position")
        if position is None:
            position = seen.position + 1
        elif position <= seen.position and not seen.ended:
            raise InvalidInputError(
                f"position {position} of session {key.name!r} is not after position "
                f"{seen.position} (line {seen.line}): a session's records go in order"
            )
        _number(record.get("turn"), "turn")
        before = -1 if seen.ended else seen.position  # another export: none before it
        seen.before, seen.position, seen.line = before, position, number
        encoding = record.get("encoding")
        if encoding is not None and self.counter is None:
            if not isinstance(encoding, str):
                raise InvalidInputError(f"encoding must be a str, not {_json_type(encoding)}")
            # A session exported part-way through a model switch names two:
            # its oldest records the new one (recounted), the rest its own.
            # The session is counted with its newest record's.
            if encoding != seen.encoding:
                try:
                    TokenCounter(encoding)  # one that cannot be loaded fails now
                except TokenmemError as exc:
                    raise InvalidInputError(str(exc)) from None
                seen.encoding = encoding
        if self.chains:
            self._chain(seen, number, record, message, position)
        seen.ended = False
        return Line(f"line {number}", key, record, message, position, number=number, kind=kind)

    def _chain(
        self, seen: _Seen, number: int, record: dict[str, Any], message: StoredMessage, at: int
    ) -> None:
        """Check the record's digest against the one before it (the first's
        waits for its session line), or that it has none, as the rest of
        its export (the records up to its session's next session line)."""
        claimed = record.get("digest")
        if seen.chained is None:
            seen.chained = claimed is not None
        elif seen.chained != (claimed is not None):
            this, that = ("no digest", "one") if seen.chained else ("a digest", "none")
            raise InvalidInputError(
                f"{this}, though the record before it of its session (line {seen.last}) has "
                f"{that}: digests were removed or added"
            )
        seen.last = number
        if claimed is None:
            return
        _digest(claimed, "digest")
        turn = record.get("turn")
        if turn is None or message.created_at is None:
            raise InvalidInputError("a record with a digest needs its turn and created_at")
        fields = _fields(at, turn, message)
        if seen.first is None:
            seen.first = (number, claimed, fields)
        elif message_digest(fields, seen.digest) != claimed:
            raise InvalidInputError(_BROKEN)
        seen.digest = claimed

    def _close(self, seen: _Seen, number: int, record: dict[str, Any]) -> None:
        """A session line: check the first record's digest against the
        anchor it names, and its head against the last record's; the next
        record of the session starts another export."""
        anchor = Anchor(
            _digest(record.get("anchor_digest"), "anchor_digest"),
            _number(record.get("anchor_position"), "anchor_position"),
        )
        head = _digest(record.get("head_digest"), "head_digest")
        if seen.chained is False:
            if head is not None:
                raise InvalidInputError(
                    f"head_digest given, but the records of its session before it (line "
                    f"{seen.last}) carry no digest: they were removed"
                )
        elif seen.first is not None:
            at, claimed, fields = seen.first
            if message_digest(fields, anchor.digest or "") != claimed:
                raise _Broken(at, _BROKEN + _ANCHORED.format(number))
            if head != seen.digest:
                raise InvalidInputError(
                    f"head_digest is not the digest of the last record of its session (line "
                    f"{seen.last}): records after it were removed, or this line was changed"
                )
            if anchor.digest is not None:
                self.anchors[at] = anchor
        elif head != anchor.digest:  # no records: the chain is its anchor
            raise InvalidInputError(
                "head_digest is not the anchor_digest, yet no record of its session comes "
                "before it: its records were removed, or this line was changed"
            )
        seen.chained, seen.digest, seen.first = None, "", None

    def _key(self, session_id: object, owner: str) -> SessionKey:
        if not isinstance(session_id, str):
            return SessionKey.of(session_id, owner)  # raises
        key = self.keys.get((session_id, owner))
        if key is None:
            key = self.keys[session_id, owner] = SessionKey.of(session_id, owner)
        return key

    def _owner(self, named: object) -> str:
        if self.owner is None:
            return DEFAULT_OWNER if named is None else named  # type: ignore[return-value]
        if named is None or named == self.owner:
            return self.owner
        raise InvalidInputError(
            f"the record belongs to {_owner_label(named)}, but the import is into "
            f"{_owner_label(self.owner)}: drop its owner field to import it there"
        )


class _Broken(Exception):
    """A line found broken while reading another: ``(number, message)``."""


_BROKEN = (
    "its digest does not match the record: the record was changed, or a record of its "
    "session before it removed, added or moved"
)
_ANCHORED = " (the first of its session: chained to the anchor its session line, line {}, names)"
_HEX = re.compile("[0-9a-f]{64}")


def _digest(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise InvalidInputError(f"{what} must be a SHA-256 in lowercase hex, not {value!r}")
    return value


def _fields(position: int, turn: int, m: StoredMessage) -> dict[str, Any]:
    """What a record's digest covers (:data:`tokenmem.digest.MESSAGE_FIELDS`),
    as the import writes it."""
    openai = m.openai or {}
    return {
        "position": position,
        "turn": turn,
        "role": m.type,
        "content": m.content,
        "name": m.name,
        "metadata": m.metadata,
        "message": m.openai,
        "tool_calls": openai.get("tool_calls"),
        "tool_call_id": answered(openai),
        "created_at": m.created_at,
    }


def _forgotten(seen: _Seen, start: int | None) -> None:
    """Check that the tool calls a message left unanswered in ``seen``'s
    session are before its window's ``start`` (the session line's; None:
    none came): only ``clear()`` forgets open calls."""
    for left in seen.left:
        if start is None or left.position >= start:
            why = (
                "and no session line says the window starts after them"
                if start is None
                else f"yet the session's window starts at {start}, not after them"
            )
            what = (
                f"tool_calls {left.calls} have no tool message answering them"
                if left.calls
                else "a reasoning item has no item the model made after it"
            )
            raise InvalidInputError(
                f"{left.where}: {what} before {left.by}, {why}: only clear() forgets "
                "unanswered calls (was a line lost?)"
            )


def _owner_label(owner: object) -> str:
    return "the default owner ('')" if owner == DEFAULT_OWNER else f"owner {owner!r}"


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _number(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{what} must be a whole number >= 0, not {value!r}")
    return value


def _metadata(value: object, what: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be an object or null, not a {_json_type(value)}")


def record_message(record: dict[str, Any]) -> tuple[StoredMessage, str]:
    """The record's message, and which kind it is (:attr:`Line.kind`)."""
    role = record["role"]
    if role not in ROLES:
        raise InvalidInputError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    check_text(record["content"], "content")
    name = record.get("name")
    if name is not None:
        check_key(name, "name")
    _metadata(record.get("metadata"), "metadata")
    check_metadata(record.get("metadata"), "metadata")
    created = record.get("created_at")
    try:
        created_at = datetime.fromisoformat(created) if created else None
    except (TypeError, ValueError):
        raise InvalidInputError(f"bad created_at {created!r}: not an ISO 8601 time") from None
    if created_at is not None and created_at.tzinfo is None:
        raise InvalidInputError(f"created_at {created!r} needs a timezone")
    openai, kind = _openai(record)
    message = StoredMessage(
        type=role,
        content=record["content"],
        name=name,
        metadata=record.get("metadata"),
        created_at=created_at,
        openai=openai,
    )
    return message, kind


def _openai(record: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The record's ``openai`` dict — a Chat Completions message checked as
    ``save_messages`` checks it, or a Responses API item as ``add_items``
    does (:func:`tokenmem.chat.from_items`: one with a ``type``, or that only
    it takes) — checked against the record's role, content and name (an
    export writes them from it); None when there is none, or when role,
    content and name rebuild it. And the record's kind (:attr:`Line.kind`)."""
    given = record.get("openai")
    if given is None:
        if record["role"] == "tool":
            raise InvalidInputError(
                "a tool message needs its openai object (with its tool_call_id)"
            )
        return None, "chat"
    if not isinstance(given, dict):
        raise InvalidInputError(f"openai must be an object or null, not a {_json_type(given)}")
    check_metadata(given, "openai")
    # One message or item: a tool answer may continue, and calls may be left
    # open for, other records (the reader checks the units).
    chat = None if "type" in given else _made(from_openai, given, "messages[0]")
    made = chat if isinstance(chat, Message) else _made(from_items, given, "items[0]")
    if isinstance(made, InvalidInputError):  # both refused it: the error of its kind
        raise chat if isinstance(chat, InvalidInputError) else made
    if made.type != record["role"]:
        what = f"role {given['role']!r}" if chat is made else f"{item_type(given)} item"
        raise InvalidInputError(f"openai's {what} does not make a {record['role']!r} message")
    if made.content != record["content"]:
        raise InvalidInputError(
            "content is not the text of openai's message (tokenmem.chat.display_text): "
            "one of them was changed"
        )
    if made.name != record.get("name"):
        raise InvalidInputError(f"name {record.get('name')!r} is not openai's {made.name!r}")
    return made.openai, "chat" if chat is made else "item"


def _also_item(message: Message) -> bool:
    """Whether a Chat Completions message is a Responses API item too (as a
    user's message is): ``add_items`` may have saved it."""
    try:
        from_items([as_openai(message)])
    except InvalidInputError:
        return False
    return True


def _made(
    check: Callable[[Sequence[Any]], list[Message]], given: dict[str, Any], prefix: str
) -> Message | InvalidInputError:
    """``given`` as ``check`` (from_openai, from_items) makes it, or its
    error, worded for the record's ``openai``."""
    try:
        (made,) = check([given])
    except InvalidInputError as exc:
        return InvalidInputError("openai" + str(exc).removeprefix(prefix))
    return made


@contextmanager
def twice(lines: Iterable[str]) -> Iterator[tuple[Iterable[str], Callable[[], Iterable[str]]]]:
    """``lines`` to read now, and a function that gives them again: a list
    as it is, a seekable file from where it was, anything else spooled to a
    temporary file as it is read."""
    if isinstance(lines, list | tuple):
        yield lines, lambda: lines
        return
    if isinstance(lines, io.IOBase) and lines.seekable():
        try:
            start = lines.tell()
        except OSError:  # a text file already iterated cannot tell
            pass
        else:

            def rewind() -> Iterable[str]:
                lines.seek(start)
                return lines

            yield lines, rewind
            return
    with tempfile.TemporaryFile(
        "w+", encoding="utf-8", errors="surrogateescape", newline="\n"
    ) as spool:

        def tee() -> Iterator[str]:
            for line in lines:
                spool.write(line if line.endswith("\n") else line + "\n")
                yield line

        def replay() -> Iterable[str]:
            spool.seek(0)
            return spool

        yield tee(), replay
