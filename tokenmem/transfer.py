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
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from .engine import source_engine
from .errors import (
    ConfigurationError,
    InvalidInputError,
    SessionNotFound,
    StoreError,
    TokenmemError,
)
from .jsonl import Anchor, Line, Reader, record_message, twice
from .messages import SessionInfo, StoredMessage
from .models import MESSAGES, SESSIONS, utcnow
from .store import Store
from .tokens import TokenCounter
from .urls import scrub, shown, sqlite_path
from .validate import (
    DEFAULT_OWNER,
    PreparedAppend,
    SessionKey,
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


def _opening(conn: Connection, key: SessionKey) -> tuple[SessionInfo, Anchor, list[StoredMessage]]:
    """A session's first page of messages, then its state and the anchor its
    chain starts from (SessionNotFound if there is none)."""
    page = reads.history_page(conn, key, -1, _PAGE)
    state = reads.session(conn, key)
    s = SESSIONS.c
    digest, position = conn.execute(
        select(s.anchor_digest, s.anchor_position).where(s.id == key.id)
    ).one()
    return state, Anchor(digest, position), page


def _open(store: Store, key: SessionKey) -> tuple[SessionInfo, Anchor, list[StoredMessage]]:
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
    key: SessionKey, state: SessionInfo, anchor: Anchor, head: str | None
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


def _continues(last: _Last | None, line: Line) -> bool:
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


def _anchor(conn: Connection, key: SessionKey, anchor: Anchor) -> None:
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
    lines: Sequence[Line],
    prepared: PreparedAppend | None,
    counted: int,
    last: _Last | None,
    anchors: Mapping[int, Anchor],
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


def _compare(conn: Connection, key: SessionKey, old: Sequence[Line]) -> _Last:
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
        _anchor(conn, key, Anchor(record["anchor_digest"], record.get("anchor_position")))
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
        anchors: Mapping[int, Anchor] | None = None,
    ) -> None:
        self.store, self.counter = store, counter
        self.anchors = anchors or {}
        self.encoding_of, self.progress = encoding_of, progress
        self.imported = self.skipped = 0
        self.batches: dict[SessionKey, list[Line]] = {}
        self.held = 0
        self.last: dict[SessionKey, _Last] = {}
        self.counters: dict[str, TokenCounter] = {}
        # Sessions that were counted with another encoding than the one the
        # import was asked for: recounted, in batches, once it is written.
        self.recount: set[SessionKey] = set()

    def add(self, line: Line) -> None:
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


def _check_same(key: SessionKey, line: Line, stored: Any) -> None:
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
    check = Reader(scope, counter)
    with twice(lines) as (first, again):
        for _ in check.read(first):
            pass
        importer = _Importer(
            store, counter, lambda key: check.seen[key].encoding, progress, check.anchors
        )
        for line in Reader(scope, counter, chains=False, exports=check.exports).read(again()):
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


def _langchain_line(table: str, row_id: int, session_id: object, raw: object, owner: str) -> Line:
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
        return Line(where, key, record, record_message(record)[0])
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
