"""Moving conversations in and out: JSONL export/import, LangChain's
``SQLChatMessageHistory`` tables, and recounting tokens for another encoding.

An export writes each session as its messages, one JSON object a line (the
lines ``tokenmem history --format jsonl`` prints), then one session line
(``"kind": "session"``) with what the messages do not say: where ``clear()``
started the window, the next position and turn, the session's metadata. An
import restores all of it, each session counted with the encoding its records
name, so ``export | import | export`` into an empty database writes the same
file again (but for a session exported part-way through a model switch: its
oldest records name the new encoding, and the import counts it all with its
newest record's, the session's own). Not carried: the turn audit log and the sessions' timestamps.
A message ``save_messages`` saved carries its Chat Completions dict
(``openai``), which an import checks as ``save_messages`` does (and the
tool-call rules over each session's records), so tool calls and their
answers are units again — one left open too — and the pinned prompt stays
where it was. An Agents SDK session's records carry their Responses API
items (:mod:`tokenmem.agents`): an import checks each as ``add_items``
does (:func:`tokenmem.chat.from_items`) and writes the session's records by
the items' rules (:func:`tokenmem.chat.place_items`, which never refuse an
order: orphans are imported as orphans), forgetting at the window start the
unit ``clear()`` forgot there, so the copy holds the same units (but for a
unit an earlier ``clear()`` forgot, which the export does not name: it is
orphaned by the item after it, before the window's start, where nothing
reads it). A session both wrote (the store takes that) is checked as the
store checked it: its chat messages by the chat rules, the rest by the items'.

Exports carry the tamper-evident chain (:mod:`tokenmem.digest`): each
record its message's ``digest``, each session line the session's
``head_digest`` (its last record's) and, after a prune, the
``anchor_digest`` and ``anchor_position`` its chain starts from. An import
checks the chain while it checks the lines, so a break fails it before
anything is written, naming the line: a record whose digest does not
follow from its fields and the record before it of its session (the first
one's: from the anchor its session line names, so that record is named when
the session line is read), a session line whose head is not its last
record's, digests on some of a session's records and not others, records
with digests and no session line after them (a file cut short). A session
with no chain yet in the database gets the records' chain as it is (with
its anchor): the copy verifies with the source's head digest. A file without
digests — written before them, by ``tokenmem history --format jsonl``, or by
hand — imports as before, its rows digested afresh as they are written.

Exports and recounts stream, page by page. An import reads its input twice
(a stream is spooled to a temporary file): first to check every line, so a
bad one fails it before anything is written, then to write, holding up to a
few thousand records (a batch per session) and a few numbers per session. A
session's lines need not be consecutive. Turns are as the records group them:
by their ``turn`` values, kept unless the session is past them; without one,
a human message and the AI reply after it in its session form a turn.

Imports are idempotent: records keep their positions (a record without one
comes right after its session's previous record, the first at 0) and those a
session already holds are skipped, once checked to be the same messages, so
importing twice adds nothing and an interrupted import resumes. Each batch
decides that under the session's row lock, in the transaction that writes
it, so imports of one file at once write each record once. An application
writing to a session while it is imported: a record whose position the
application took first stops the import with an error naming its line
(nothing is written twice, nor out of place)::

    with open("backup.jsonl", "w") as out:
        export_jsonl(store, out)                   # every session of every owner
    with open("backup.jsonl") as src:
        import_jsonl(other_store, src)             # each session in its own encoding
    import_langchain(store, "sqlite:///chat.db", TokenCounter("o200k_base"))
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any

from sqlalchemy import (
    Connection,
    MetaData,
    Table,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from . import reads
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
from .engine import source_engine
from .errors import (
    ConfigurationError,
    InvalidInputError,
    SessionNotFound,
    StoreError,
    TokenmemError,
)
from .messages import Message, SessionInfo, StoredMessage
from .models import MESSAGES, ROLES, SESSIONS, utcnow
from .store import Store
from .tokens import TokenCounter
from .urls import scrub, shown, sqlite_path
from .validate import (
    DEFAULT_OWNER,
    PreparedAppend,
    SessionKey,
    check_key,
    check_metadata,
    check_text,
    prepare_append,
)
from .writes import BULK_BATCH, align, append_many, session_upsert

__all__ = [
    "ImportResult",
    "export_jsonl",
    "import_jsonl",
    "import_langchain",
    "recount",
    "to_json",
    "to_record",
]

Progress = Callable[[int], None]
_BATCH = BULK_BATCH  # a session's records per transaction, as Store.append_many's statements
# For records that name no encoding: gpt-4o-mini's, the default everywhere.
_DEFAULT_ENCODING = "o200k_base"


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What an import did: ``sessions`` it touched (distinct), messages
    ``imported``, and messages ``skipped`` because the database already held
    them (checked to be the same)."""

    sessions: int
    imported: int
    skipped: int


def _sorted(value: Any) -> Any:
    """JSON with its objects' keys sorted: PostgreSQL's JSONB keeps its own
    order, so an export is the same whichever database it came from."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def to_json(value: Any, *, indent: int | None = None) -> str:
    """``value`` as JSON the way exports write it: text as it is (not
    ``\\u`` escapes), except control characters — C0 as ``json`` escapes
    them, and DEL and C1 too — so a line printed on a terminal cannot drive
    it, and reads back the same."""
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


_UNSAFE = re.compile("[\x7f-\x9f]")  # json leaves DEL and C1 as they are


def to_record(owner: str, session_id: str, m: StoredMessage) -> dict[str, Any]:
    """A stored message as one JSONL record (the export format; an import
    counts again, with the record's ``encoding``, and gets the same counts).
    ``openai``: the Chat Completions dict ``save_messages`` kept for it (or
    the Responses API item ``add_items`` did), only when it has one
    (:attr:`Message.openai`)."""
    record = {
        "owner": owner,
        "session_id": session_id,
        "position": m.position,
        "turn": m.turn,
        "role": m.type,
        "content": m.content,
        "name": m.name,
        "metadata": _sorted(m.metadata),
        "created_at": m.created_at.isoformat() if m.created_at else None,
        "encoding": m.encoding,
        "text_tokens": m.text_tokens,
        "chat_tokens": m.chat_tokens,
    }
    if m.openai is not None:  # as saved: its keys' order is the message's
        record["openai"] = m.openai
    return record


# --- the session row: what the messages do not say ------------------------------
# Transfer's own two statements, run in the store's transactions (with its
# retries and schema check).


def _restore(
    conn: Connection, key: SessionKey, start: int | None, metadata: dict[str, Any] | None
) -> None:
    """Set the window's start to ``start`` (a position the session has
    reached) as ``clear()`` would have, unless the session was cleared later
    or that would bring messages back into the window (as after ``clear()``,
    tool calls left open before it are forgotten, and a pinned prompt
    running across it starts there); and the session's metadata, if given."""
    s, m = SESSIONS.c, MESSAGES.c
    if start is not None:
        floor = (
            select(func.min(m.cum_floor))
            .where(m.session_id == key.id, m.position >= start)
            .scalar_subquery()
        )
        between = exists().where(
            m.session_id == key.id, m.position >= start, m.position < s.start_position
        )
        conn.execute(
            update(SESSIONS)
            .where(
                s.id == key.id,
                s.next_position >= start,
                or_(s.start_position < start, and_(s.start_position > start, ~between)),
            )
            .values(start_position=start, start_floor=func.coalesce(floor, s.floor_total))
        )
        # clear() forgets tool calls left open before it, and ends a run of
        # system/developer messages: what goes on after it is the pinned
        # prompt (the import wrote the run as one).
        conn.execute(_forget_open(key, below=s.start_position))
        conn.execute(
            update(SESSIONS)
            .where(s.id == key.id, s.pinned_first < s.start_position)
            .where(s.pinned_last >= s.start_position)
            .values(pinned_first=s.start_position)
        )
    if metadata is not None:
        conn.execute(update(SESSIONS).where(s.id == key.id).values({"metadata": metadata}))


def _forget_open(key: SessionKey, below: Any) -> Any:
    """The statement forgetting the session's open tool-call unit if it
    starts before ``below`` (a position, or a column), as ``clear()`` does."""
    s = SESSIONS.c
    return (
        update(SESSIONS)
        .where(s.id == key.id, s.open_position < below)
        .values(open_position=None, open_floor=None, open_calls=None)
    )


def _state(store: Store, key: SessionKey) -> SessionInfo | None:
    try:
        return store.session(key.name, owner=key.owner)
    except SessionNotFound:
        return None


def _within(store: Store, owner: str | None) -> str | None:
    """The owner an import or export is confined to: ``owner``, else a scoped
    store's own; None: every owner."""
    if owner is None:
        return store.default_owner if store.scoped else None
    owner = SessionKey.of("-", owner).owner
    if store.scoped and owner != store.default_owner:
        raise ConfigurationError(
            f"this store is scoped to owner {store.default_owner!r}, not {owner!r}"
        )
    return owner


# --- export ---------------------------------------------------------------------


def export_jsonl(
    store: Store,
    out: IO[str],
    *,
    owner: str | None = None,
    sessions: Sequence[str] = (),
    progress: Progress | None = None,
) -> int:
    """Write sessions as JSON lines, each its messages in order and then its
    session line: the named ``sessions`` of ``owner`` (default: the store's
    owner), or every session (of ``owner``, or of all owners when it is None
    and the store is not scoped). Returns how many messages were written.

    Raises :class:`SessionNotFound`, before writing anything, if a named
    session does not exist."""
    scope = _within(store, owner)
    named: list[SessionKey] = []
    for name in sessions:
        key = SessionKey.of(name, store.default_owner if scope is None else scope)
        if _state(store, key) is None:
            raise SessionNotFound(key.name)
        named.append(key)
    if not sessions:
        stats = store.session_stats(owner=scope, all_owners=scope is None)
        named = [SessionKey(s.owner_id, s.session_id) for s in stats]
    written = 0
    for key in named:
        try:
            state, anchor, page = _open(store, key)
        except SessionNotFound:  # erased since it was listed
            continue
        head = anchor.digest
        for m in _pages(store, key, page):
            if m.position >= state.next_position:  # appended since: the next export's
                break
            out.write(to_json({**to_record(key.owner, key.name, m), "digest": m.digest}) + "\n")
            head, written = m.digest, written + 1
            if progress and written % _BATCH == 0:
                progress(_BATCH)
        out.write(to_json(_session_line(key, state, anchor, head)) + "\n")
    if progress:
        progress(written % _BATCH)
    return written


_PAGE = 500  # messages an export reads per statement


@dataclasses.dataclass(frozen=True)
class _Anchor:
    """Where a session's message chain starts (tokenmem.digest): the digest
    and position of the newest message a prune removed (None: none was)."""

    digest: str | None
    position: int | None


def _opening(conn: Connection, key: SessionKey) -> tuple[SessionInfo, _Anchor, list[StoredMessage]]:
    """A session's first page of messages, then its state and the anchor its
    chain starts from (SessionNotFound if there is none)."""
    page = reads.history_page(conn, key, -1, _PAGE)
    state = reads.session(conn, key)
    s = SESSIONS.c
    digest, position = conn.execute(
        select(s.anchor_digest, s.anchor_position).where(s.id == key.id)
    ).one()
    return state, _Anchor(digest, position), page


def _open(store: Store, key: SessionKey) -> tuple[SessionInfo, _Anchor, list[StoredMessage]]:
    """:func:`_opening`, again if a prune came between its statements (each
    sees the database as it is then on PostgreSQL): the anchor it read is at
    or past the first message the page holds."""
    for _ in range(3):
        state, anchor, page = store.run(functools.partial(_opening, key=key))
        if not page or anchor.position is None or page[0].position > anchor.position:
            break
    return state, anchor, page  # else messages a prune left below its anchor: not its chain


def _pages(store: Store, key: SessionKey, page: list[StoredMessage]) -> Iterator[StoredMessage]:
    """The session's messages from ``page`` (its first) on, a page at a time."""
    while True:
        yield from page
        if len(page) < _PAGE:
            return
        page = store.history_page(key.name, owner=key.owner, after=page[-1].position, limit=_PAGE)


def _session_line(
    key: SessionKey, state: SessionInfo, anchor: _Anchor, head: str | None
) -> dict[str, Any]:
    line = {
        "kind": "session",
        "owner": key.owner,
        "session_id": key.name,
        "next_position": state.next_position,
        "next_turn": state.next_turn,
        "window_start": state.window_start,
        "metadata": _sorted(state.metadata),
    }
    if anchor.digest is not None:  # a prune removed its oldest messages
        line.update(anchor_digest=anchor.digest, anchor_position=anchor.position)
    if head is not None:
        line["head_digest"] = head
    return line


# --- reading JSONL --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Line:
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


class _Reader:
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
        self.anchors: dict[int, _Anchor] = {}
        # Each session's exports in the file, as read; and as a reading
        # before this one found them (the writing pass needs to know, at
        # their first record, whether they hold items and where clear() was).
        self.exports: dict[SessionKey, list[_Export]] = {}
        self.known = exports or {}

    def read(self, lines: Iterable[str]) -> Iterator[_Line]:
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

    def _unit(self, line: _Line) -> _Line:
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

    def _line(self, number: int, text: str) -> _Line:
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
            return _Line(f"line {number}", key, record, None, number=number)
        message, kind = _message(record)
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
        return _Line(f"line {number}", key, record, message, position, number=number, kind=kind)

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
        anchor = _Anchor(
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


def _message(record: dict[str, Any]) -> tuple[StoredMessage, str]:
    """The record's message, and which kind it is (:attr:`_Line.kind`)."""
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
    content and name rebuild it. And the record's kind (:attr:`_Line.kind`)."""
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
def _twice(lines: Iterable[str]) -> Iterator[tuple[Iterable[str], Callable[[], Iterable[str]]]]:
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


# --- writing --------------------------------------------------------------------
# Each batch of one session's records is one transaction (:func:`_put`) that
# first locks the session's row and reads where the session is, so which
# records it already holds (compared, then skipped) and where the others go
# is decided under the lock: two imports of one file at once, or an import
# and the application, never write a record twice nor anywhere but at its
# own position.

_HELD = 4 * _BATCH  # records held, of all sessions, before every batch is written


@dataclasses.dataclass(frozen=True)
class _Last:
    """A session's last record written or found: what the next one's turn
    follows from."""

    field: int | None  # the record's own ``turn``
    role: str
    turn: int  # its turn in the database


def _continues(last: _Last | None, line: _Line) -> bool:
    """Whether ``line`` is in ``last``'s turn: by their ``turn`` values when the
    record has one, else as an AI reply to the human message before it."""
    if last is None:
        return False
    field = line.record.get("turn")
    if field is not None:
        return bool(field == last.field)
    return last.role == "human" and line.record["role"] == "ai"


def _lock(conn: Connection, key: SessionKey) -> tuple[int, int, str | None]:
    """Create the session if need be and lock its row until the transaction
    ends (on SQLite, the database: the first statement writes, so the lock is
    taken at once, never upgraded from a read); return its next position,
    next turn and head digest (None: its chain is empty, and has no anchor)."""
    s, now = SESSIONS.c, utcnow()
    row = {"id": key.id, "owner_id": key.owner, "name": key.name}
    upsert = session_upsert(
        conn.dialect.name,
        {**row, "created_at": now, "updated_at": now},
        {"next_position": s.next_position},  # changes nothing: only locks
    )
    position, turn, head = conn.execute(
        upsert.returning(s.next_position, s.next_turn, s.head_digest)
    ).one()
    return int(position), int(turn), head


def _anchor(conn: Connection, key: SessionKey, anchor: _Anchor) -> None:
    """Start the session's empty chain at ``anchor``, as a prune leaves it,
    so the records chained to it in the file are chained to it here."""
    conn.execute(
        update(SESSIONS)
        .where(SESSIONS.c.id == key.id)
        .values(
            anchor_digest=anchor.digest,
            anchor_position=anchor.position,
            head_digest=anchor.digest,
        )
    )


_m = MESSAGES.c
_STORED = select(_m.position, _m.turn, _m.role, _m.content, _m.name, _m.metadata, _m.message)
# A batch's positions are (nearly always) consecutive: read them as a range.
_STORED_BETWEEN = _STORED.where(
    _m.session_id == bindparam("sid"), _m.position.between(bindparam("lo"), bindparam("hi"))
)
_STORED_AT = _STORED.where(
    _m.session_id == bindparam("sid"), _m.position.in_(bindparam("positions", expanding=True))
)


@dataclasses.dataclass(frozen=True)
class _Put:
    """What :func:`_put` did, and the session's last record for the next batch."""

    imported: int
    skipped: int
    last: _Last | None


class _Stale(Exception):
    """The session is behind where it was seen before the batch was counted:
    records the batch did not count must be written (it was erased since)."""


def _put(
    conn: Connection,
    key: SessionKey,
    lines: Sequence[_Line],
    prepared: PreparedAppend | None,
    counted: int,
    last: _Last | None,
    anchors: Mapping[int, _Anchor],
) -> _Put:
    """Write a batch of one session's records (positions ascending) in the
    caller's transaction: those below the session's next position must be
    there already (compared), the others are written at their positions,
    skipping a gap (as where the source was pruned) forward. ``prepared``
    counts ``lines[counted:]`` (those the session did not hold when last
    seen): :class:`_Stale` if the session now needs more. Turns: as
    :func:`_continues` groups them, a record's own ``turn`` kept unless the
    session has passed it. A session whose chain is empty starts it at the
    anchor (``anchors``, by line) the first record's session line names."""
    have, turn, head = _lock(conn, key)
    old = bisect.bisect_left([line.position for line in lines], have)
    if old < counted:
        raise _Stale
    if old:
        last = _compare(conn, key, lines[:old])
    i = old
    while i < len(lines):  # each run of consecutive positions: one append
        j = i + 1
        while j < len(lines) and lines[j].position == lines[j - 1].position + 1:
            j += 1
        if lines[i].position > have:
            align(conn, key, lines[i].position, turn)
        if head is None and lines[i].number in anchors:
            _anchor(conn, key, anchors[lines[i].number])
            head = anchors[lines[i].number].digest
        if lines[i].forgets:  # the calls left open before it: forgotten, as by clear()
            conn.execute(_forget_open(key, below=lines[i].position))
        base, turns = turn, []
        for line in lines[i:j]:
            if not _continues(last, line):
                field = line.record.get("turn")
                last = _Last(field, line.record["role"], max(turn, field or 0))
                turn = last.turn + 1
            else:
                assert last is not None
                last = dataclasses.replace(last, role=line.record["role"])
            turns.append(last.turn)
        assert prepared is not None  # old >= counted
        cut = slice(i - counted, j - counted)
        run = PreparedAppend(
            key=key,
            encoding=prepared.encoding,
            messages=prepared.messages[cut],
            counts=prepared.counts[cut],
            turn_of=[t - base for t in turns],  # from the session's next turn
            turns=turn - base,  # 0: the run only goes on with the last turn
            counter=prepared.counter,
            created_at=prepared.created_at[cut],
            items=prepared.items,
        )
        stored = append_many(conn, run)
        if stored.start != lines[i].position:  # the lock rules this out
            raise StoreError(f"session {_label(key)} moved while locked: nothing imported")
        have, i = lines[j - 1].position + 1, j
    return _Put(len(lines) - old, old, last)


def _compare(conn: Connection, key: SessionKey, old: Sequence[_Line]) -> _Last:
    """Check that the session holds each of ``old`` as it is; return the last
    as :class:`_Last`."""
    lo, hi = old[0].position, old[-1].position
    if hi - lo < 2 * len(old):
        rows = conn.execute(_STORED_BETWEEN, {"sid": key.id, "lo": lo, "hi": hi})
    else:  # far apart: only those
        rows = conn.execute(_STORED_AT, {"sid": key.id, "positions": [x.position for x in old]})
    held = {row.position: row for row in rows}
    for line in old:
        row = held.get(line.position)
        if row is None:
            raise InvalidInputError(
                f"{line.where}: session {_label(key)} has no message at position "
                f"{line.position}, though it is past it (pruned or erased there, or another "
                "conversation): the record cannot be put back; erase the session to import "
                "it whole"
            )
        _check_same(key, line, row)
    line = old[-1]
    return _Last(line.record.get("turn"), line.record["role"], held[line.position].turn)


def _end(conn: Connection, key: SessionKey, record: dict[str, Any]) -> None:
    """A session line: move the session's next position and turn forward to
    its, then restore its window start and metadata; an empty chain starts
    at the line's anchor (its session's messages all pruned)."""
    have, turn, head = _lock(conn, key)
    position = record.get("next_position")
    if position is not None and have < position:
        align(conn, key, position, max(record.get("next_turn") or 0, turn))
    if head is None and record.get("anchor_digest") is not None:
        _anchor(conn, key, _Anchor(record["anchor_digest"], record.get("anchor_position")))
    start, metadata = record.get("window_start"), record.get("metadata")
    if start is not None or metadata is not None:
        _restore(conn, key, start, metadata)


class _Importer:
    """Writes checked lines, holding each session's records until it has a
    batch (or all sessions together hold :data:`_HELD`), so interleaved
    sessions are still written in batches."""

    def __init__(
        self,
        store: Store,
        counter: TokenCounter | None,
        encoding_of: Callable[[SessionKey], str | None],
        progress: Progress | None,
        anchors: Mapping[int, _Anchor] | None = None,
    ) -> None:
        self.store, self.counter = store, counter
        self.anchors = anchors or {}
        self.encoding_of, self.progress = encoding_of, progress
        self.imported = self.skipped = 0
        self.batches: dict[SessionKey, list[_Line]] = {}
        self.held = 0
        self.last: dict[SessionKey, _Last] = {}
        self.counters: dict[str, TokenCounter] = {}
        # Sessions that were counted with another encoding than the one the
        # import was asked for: recounted, in batches, once it is written.
        self.recount: set[SessionKey] = set()

    def add(self, line: _Line) -> None:
        if line.message is None:  # a session line: its records first
            self._flush(line.key)
            self.store.run(functools.partial(_end, key=line.key, record=line.record))
            self.last.pop(line.key, None)  # another export of it may follow
            return
        if line.forgets:  # first in its batch: the open calls are forgotten before it
            self._flush(line.key)
        batch = self.batches.setdefault(line.key, [])
        batch.append(line)
        self.held += 1
        if len(batch) >= _BATCH:
            self._flush(line.key)
        elif self.held >= _HELD:
            self.flush()

    def flush(self) -> None:
        for key in list(self.batches):
            self._flush(key)

    def finish(self) -> None:
        """Write what is held, then recount the sessions the import's
        encoding (``--model``/``--encoding``) is not yet the encoding of."""
        self.flush()
        if self.counter is not None:
            for key in sorted(self.recount, key=lambda k: (k.owner, k.name)):
                self.store.recount(key.name, self.counter, owner=key.owner)

    def _flush(self, key: SessionKey) -> None:
        lines = self.batches.pop(key, None)
        if not lines:
            return
        self.held -= len(lines)
        encoding = self.counter.encoding_name if self.counter else None
        encoding = encoding or self.encoding_of(key) or _DEFAULT_ENCODING
        if encoding not in self.counters:
            self.counters[encoding] = self.counter or TokenCounter(encoding)
        # Only records the session does not hold yet are counted (outside the
        # lock); _put checks, under it, that no others need to be.
        state = _state(self.store, key)
        seen = state.next_position if state else 0
        if self.counter and state and state.encoding not in (None, self.counter.encoding_name):
            self.recount.add(key)  # its records are counted with its encoding till then
        counted = bisect.bisect_left([line.position for line in lines], seen)
        while True:
            messages = [[line.message] for line in lines[counted:] if line.message is not None]
            try:
                # a batch is of one export of its session: all items, or none
                counter, items = self.counters[encoding], lines[0].items
                prepared = prepare_append(key, messages, counter, items=items) if messages else None
            except InvalidInputError as exc:
                raise InvalidInputError(f"{lines[0].where} to {lines[-1].where}: {exc}") from None
            work = functools.partial(
                _put,
                key=key,
                lines=lines,
                prepared=prepared,
                counted=counted,
                last=self.last.get(key),
                anchors=self.anchors,
            )
            try:
                done = self.store.run(work)  # run again, whole, if retried: no state here
            except _Stale:
                counted = 0
                continue
            break
        if done.last is not None:
            self.last[key] = done.last
        self.imported += done.imported
        self.skipped += done.skipped
        if self.progress:
            self.progress(len(lines))


def _label(key: SessionKey) -> str:
    return f"{key.name!r}" + (f" of owner {key.owner!r}" if key.owner else "")


def _check_same(key: SessionKey, line: _Line, stored: Any) -> None:
    message = line.message
    assert message is not None
    for field, mine, theirs in (
        ("role", message.type, stored.role),
        ("content", message.content, stored.content),
        ("name", message.name, stored.name),
        ("metadata", message.metadata, stored.metadata),
        # the dict exactly, its keys' order too
        ("openai", json.dumps(message.openai), json.dumps(stored.message)),
    ):
        if mine != theirs:
            raise InvalidInputError(
                f"{line.where}: session {_label(key)} already holds a different message at "
                f"position {line.position} (its {field} differs): the file is of another "
                "conversation, or the session changed since (an application wrote to it "
                "during the import?)"
            )


def import_jsonl(
    store: Store,
    lines: Iterable[str],
    counter: TokenCounter | None = None,
    *,
    owner: str | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Import JSON lines as written by :func:`export_jsonl` (of a message,
    only ``session_id``, ``role`` and ``content`` are required). Each session
    is counted with the encoding its records name (``o200k_base`` if none),
    or with ``counter``'s when given. Records go to their ``owner`` (default:
    the default owner); with ``owner=``, or on a scoped store, to that owner,
    and a record naming another is an error.

    Every line is checked before anything is written; a bad one raises
    :class:`InvalidInputError` naming it. Idempotent, also when run twice at
    once: records a session already holds are skipped, and one it is past but
    does not hold, or holds differently, is an error (naming the line):
    nothing is skipped that the database does not hold, nor written twice."""
    scope = _within(store, owner)
    check = _Reader(scope, counter)
    with _twice(lines) as (first, again):
        for _ in check.read(first):
            pass
        importer = _Importer(
            store, counter, lambda key: check.seen[key].encoding, progress, check.anchors
        )
        for line in _Reader(scope, counter, chains=False, exports=check.exports).read(again()):
            importer.add(line)
        importer.finish()
    return ImportResult(len(check.seen), importer.imported, importer.skipped)


# --- LangChain ------------------------------------------------------------------

_LC_TYPES = {"human": "human", "ai": "ai", "system": "system"}


def import_langchain(
    store: Store,
    url: str,
    counter: TokenCounter | None = None,
    *,
    table: str = "message_store",
    owner: str | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Import LangChain's ``SQLChatMessageHistory`` table (``id``,
    ``session_id``, ``message``: the JSON of a message dict, ``{"type": ...,
    "data": {"content": ...}}``) from any SQLAlchemy URL, in ``id`` order,
    into ``owner`` (default: the store's owner), counted with ``counter``
    (default ``o200k_base``). Idempotent, like :func:`import_jsonl`: a
    session's n-th row is its message at position n.

    Raises :class:`ConfigurationError` for a SQLite file that does not exist
    (it is not created) or a table the database does not have."""
    engine = source_engine(url)  # any sync SQLAlchemy URL; ConfigurationError if unusable
    try:
        path = sqlite_path(engine.url)
        if path is not None and not os.path.exists(path):  # connecting would create it
            raise ConfigurationError(f"no SQLite database at {path}: check the URL")
        try:
            source = Table(table, MetaData(), autoload_with=engine)
        except NoSuchTableError:
            raise ConfigurationError(
                f"no table {table!r} in {shown(engine.url)} (LangChain's "
                "SQLChatMessageHistory writes 'message_store' unless told another name)"
            ) from None
        c = source.c
        scope = _within(store, owner)
        importer = _Importer(store, counter, lambda key: None, progress)
        sessions, current, position = 0, None, 0
        with engine.connect() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=_BATCH).execute(
                select(c.id, c.session_id, c.message).order_by(c.session_id, c.id)
            )
            for row_id, session_id, raw in rows:
                line = _langchain_line(table, row_id, session_id, raw, scope or DEFAULT_OWNER)
                if line.key != current:
                    sessions, current, position = sessions + 1, line.key, 0
                importer.add(dataclasses.replace(line, position=position))
                position += 1
        importer.finish()
        return ImportResult(sessions, importer.imported, importer.skipped)
    except SQLAlchemyError as exc:
        where, why = shown(engine.url), scrub(str(exc), engine.url)
        raise StoreError(f"cannot read {table!r} from {where}: {why}") from exc
    finally:
        engine.dispose()


def _langchain_line(table: str, row_id: int, session_id: object, raw: object, owner: str) -> _Line:
    where = f"{table} row {row_id} (session {session_id!r})"
    try:
        message: Any = json.loads(raw) if isinstance(raw, str | bytes) else raw
        kind, data = message["type"], message["data"]
        role = _LC_TYPES[kind]
        content = data.get("content")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInputError(
            f"{where}: not a human, ai or system message in LangChain's format"
        ) from None
    record = {
        "session_id": str(session_id),
        "role": role,
        "content": content,
        "name": data.get("name"),
        "metadata": {"langchain_id": row_id},
    }
    try:
        key = SessionKey.of(str(session_id), owner)
        return _Line(where, key, record, _message(record)[0])
    except TokenmemError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None


def recount(
    store: Store,
    counter: TokenCounter | None,
    *,
    owner: str | None = None,
    session: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Count every message again with ``counter``'s encoding, session by
    session in batches (:meth:`tokenmem.Store.recount`: no transaction holds
    a lock longer than a batch), skipping sessions already counted with it
    (an interrupted run resumes where it stopped, mid-session too) unless
    they hold messages written before migration 0003 counted newlines, or
    messages recounted for another encoding (a switch abandoned halfway:
    this finishes it the other way). With ``counter=None``,
    only fill those in, each session with its own encoding. Returns sessions
    recounted.

    Every session of ``owner``, or of every owner when it is None (on a
    scoped store, its owner's); ``session``: that session of ``owner`` or,
    when it is None, of the store's owner (the default owner unless scoped),
    as every call naming a session means (:class:`SessionNotFound` if there
    is none)."""
    if session is not None:
        targets = [s for s in store.session_stats(owner=owner) if s.session_id == session]
        if not targets:
            raise SessionNotFound(session)
    else:
        targets = store.session_stats(owner=owner, all_owners=owner is None and not store.scoped)
    done = 0
    for info in targets:
        use = counter
        if use is None and info.uncounted and info.encoding is not None:
            use = TokenCounter(info.encoding)
        if use is not None and (
            info.encoding not in (None, use.encoding_name) or info.uncounted or info.recounting
        ):
            store.recount(info.session_id, use, owner=info.owner_id)
            done += 1
        if progress:
            progress(info.messages)
    return done
