"""What changes the database: plain functions over a ``Connection``, each
run by a store in one transaction (:meth:`tokenmem.Store.run`)::

    with engine.begin() as conn:
        stored = append(conn, prepare_append(key, [[Message("human", "hi")]], counter))

Statements are built once (per dialect where they differ) with bound
parameters, so SQLAlchemy compiles each once and caches it; an exchange's
messages are inserted as one executemany.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Executable,
    Insert,
    Table,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from . import direct
from .chat import OpenUnit, answered, as_openai, place_items, reopen, resume
from .digest import message_digest
from .errors import ConfigurationError, EncodingUnavailable, SessionNotFound
from .messages import Message, StoredMessage
from .models import MESSAGES, SESSIONS, SUMMARIES, TURNS, utcnow
from .reads import encoding_of
from .tokens import TokenCounter
from .validate import PreparedAppend, SessionKey
from .window import Counts, count_message

__all__ = [
    "RECOUNT_BATCH",
    "SET_HEAD",
    "Erased",
    "Recount",
    "align",
    "append",
    "append_many",
    "bump_statement",
    "clear",
    "erase",
    "erase_owner",
    "insert_params",
    "insert_statement",
    "pop",
    "prune",
    "recount_batch",
    "recount_start",
    "session_upsert",
    "sets_head",
]

# Messages a recount counts per transaction (writes.recount_batch).
RECOUNT_BATCH = 1000


def session_upsert(
    dialect: str,
    values: Mapping[str, Any],
    set_: Mapping[str, Any],
    where: ColumnElement[bool] | None = None,
) -> Insert:
    """The one statement that creates a session or, when it exists, updates
    it — taking its row lock until the transaction ends. ``values`` must name
    ``id``, ``owner_id``, ``name``, ``created_at`` and ``updated_at``; every
    counter not in it starts at 0. Appends, imports (:func:`align`) and the
    turn log (:mod:`tokenmem.audit`) all go through it."""
    zero: ColumnElement[int] = literal_column("0")  # in the SQL text: nothing to bind
    row = {
        "encoding": null(),
        "next_position": zero,
        "next_turn": zero,
        "floor_total": zero,
        "start_position": zero,
        "start_floor": zero,
        "next_call": zero,
        **values,
    }
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(SESSIONS)
    elif dialect == "sqlite":
        stmt = sqlite.insert(SESSIONS)
    else:
        raise ConfigurationError(f"tokenmem supports SQLite and PostgreSQL, not {dialect}")
    upsert: Insert = stmt.values(row).on_conflict_do_update(
        index_elements=[SESSIONS.c.id], set_=dict(set_), where=where
    )
    return upsert


@functools.cache
def bump_statement(dialect: str) -> Insert:
    """The append's first statement, built once per dialect: reserve positions
    and turns in the session (creating it) and return ``(next_position,
    next_turn, floor_total)``, or no row when its messages are counted with
    another encoding. Parameters: ``id``, ``owner``, ``name``, ``encoding``,
    ``n`` (messages), ``turns``, ``floor``, ``now``."""
    s = SESSIONS.c
    n = bindparam("n", type_=BigInteger)
    turns = bindparam("turns", type_=BigInteger)
    floor = bindparam("floor", type_=BigInteger)
    encoding = bindparam("encoding", type_=s.encoding.type)
    now = bindparam("now", type_=s.updated_at.type)
    # The append's newest run of system/developer messages (indexes in it,
    # or NULL) becomes the pinned prompt; a run going on from the session's
    # last message extends it.
    pin_first = bindparam("pin_first", type_=BigInteger)
    pin_last = bindparam("pin_last", type_=BigInteger)
    goes_on = (
        (pin_first == literal_column("0"))
        & (s.pinned_last == s.next_position - literal_column("1"))
        & (s.pinned_first >= s.start_position)
    )
    stmt = session_upsert(
        dialect,
        {
            "id": bindparam("id", type_=s.id.type),
            "owner_id": bindparam("owner"),
            "name": bindparam("name"),
            "encoding": encoding,
            "next_position": n,
            "next_turn": turns,
            "floor_total": floor,
            "created_at": now,
            "updated_at": now,
            "pinned_first": pin_first,
            "pinned_last": pin_last,
        },
        {
            "pinned_first": case(
                (pin_last.is_(None), s.pinned_first),
                (goes_on, s.pinned_first),
                else_=s.next_position + pin_first,
            ),
            "pinned_last": case(
                (pin_last.is_(None), s.pinned_last), else_=s.next_position + pin_last
            ),
            "next_position": s.next_position + n,
            "next_turn": s.next_turn + turns,
            "floor_total": s.floor_total + floor,
            "encoding": encoding,
            "updated_at": now,
        },
        where=or_(s.encoding == encoding, s.encoding.is_(None)),
    )
    return stmt.returning(
        s.next_position,
        s.next_turn,
        s.floor_total,
        s.open_position,
        s.open_floor,
        s.open_calls,
        s.head_digest,
    )


_INSERT_MESSAGES = insert(MESSAGES)  # run as an executemany: compiled once, cached


@functools.cache
def insert_statement(dialect: str) -> Executable:
    """The statement an append runs as one executemany of its rows
    (:func:`insert_params`), built once per dialect. On PostgreSQL it also
    sets the session's ``head_digest``, with no statement (no round trip) of
    its own: each row is inserted by a data-modifying ``WITH`` of an
    ``UPDATE`` of the session that takes the digest of the row the bump left
    the session's ``next_position`` just after: the append's last. (An
    ``UPDATE`` on top, not an ``INSERT``: no driver rewrites an executemany
    of it into one multi-row statement; its parameters are prefixed, as
    SQLAlchemy would take a key naming a session column for one to set.)
    SQLite has no ``INSERT`` inside ``WITH``: :data:`SET_HEAD` follows there
    (:func:`sets_head`)."""
    if not sets_head(dialect):
        return _INSERT_MESSAGES
    m, s = MESSAGES.c, SESSIONS.c
    param = {c.name: bindparam(_PREFIXED[c.name], type_=c.type) for c in m}
    return (
        update(SESSIONS)
        .where(
            s.id == param["session_id"],
            s.next_position == param["position"] + literal_column("1"),
        )
        .values(head_digest=param["digest"])
        .add_cte(insert(MESSAGES).values(param).cte("appended"))
    )


_PREFIXED = {c.name: f"m_{c.name}" for c in MESSAGES.c}


def sets_head(dialect: str) -> bool:
    """Whether :func:`insert_statement` sets the session's head digest too."""
    return dialect == "postgresql"


def insert_params(dialect: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (each naming every column) as :func:`insert_statement` takes them."""
    if not sets_head(dialect):
        return rows
    named = _PREFIXED
    return [{named[k]: v for k, v in row.items()} for row in rows]


BULK_BATCH = 2000  # rows a bulk append sends per statement (COPY or executemany)


@dataclass(frozen=True)
class _Placed:
    """Where an append goes: its first position and turn, the ``cum_floor``
    of its first message, each message's ``unit`` column, the session's
    open tool-call unit before and after it (tokenmem.chat.resume), and the
    digest its first message chains to (the session's head)."""

    first: int
    turn: int
    cum: int
    units: list[int | None]
    open_before: OpenUnit | None
    open_after: OpenUnit | None
    head: str


def _reserve(conn: Connection, p: PreparedAppend, now: datetime) -> tuple[PreparedAppend, _Placed]:
    """Bump the session (locking its row until the transaction ends) for all
    of ``p``; return ``p`` as it is stored and where it goes. Its tool-call
    units are checked against the unit the session left open (an error rolls
    the transaction back: nothing written); items are placed in theirs
    (:func:`tokenmem.chat.place_items`), the rows of an open unit they
    orphan marked as such.

    A session counted with another encoding than ``p``'s (the model
    changed) keeps its own until :func:`recount_batch` has counted every
    message again: ``p``'s messages are then counted with the session's
    encoding (a few, not the whole session, inside this transaction)."""
    bumped = direct.execute(conn, bump_statement(conn.dialect.name), _bump_params(p, now))
    if not bumped:  # the session has another encoding: count these with it
        p = _in_session_encoding(conn, p)
        bumped = direct.execute(conn, bump_statement(conn.dialect.name), _bump_params(p, now))
        if not bumped:
            raise ConfigurationError(
                f"session {p.key.name!r} changed its encoding during an append"
            )
    ((next_position, next_turn, floor_total, open_position, open_floor, open_calls, head),) = bumped
    n = len(p.messages)
    first, cum = next_position - n, floor_total - p.floor
    before = None
    if open_position is not None:
        calls = json.loads(open_calls) if isinstance(open_calls, str) else open_calls
        before = OpenUnit(open_position, open_floor, list(calls))
    if p.items:
        placed = place_items(p.messages, before, first)
        units, after = placed.units, placed.after
        if placed.orphaned is not None:  # its stored rows: never sent now
            conn.execute(
                _ORPHANED,
                {
                    "sid": p.key.id,
                    "start": placed.orphaned,
                    "end": first,
                    "unit": -1 - placed.orphaned,
                },
            )
    else:
        after = resume(p.units, before, first, p.key.name)
        continued = len(p.units.continues)  # its first messages answer the open unit
        units = [
            (before.position if before else None)
            if i < continued
            else (first + i + back if back else None)
            for i, back in enumerate(p.units.back)
        ]
    if after is not None and after.floor < 0:  # opened by p: its cum_floor
        at = after.position - first
        after = OpenUnit(after.position, cum + sum(c.floor for c in p.counts[:at]), after.calls)
    if after != before:
        conn.execute(
            _SET_OPEN,
            {
                "sid": p.key.id,
                "position": after and after.position,
                "floor": after and after.floor,
                "calls": after and after.calls,
            },
        )
    return p, _Placed(first, next_turn - p.turns, cum, units, before, after, head or "")


_ORPHANED = (
    update(MESSAGES)
    .where(
        MESSAGES.c.session_id == bindparam("sid"),
        MESSAGES.c.position >= bindparam("start"),
        MESSAGES.c.position < bindparam("end"),
    )
    .values(unit=bindparam("unit"))
)
_SET_OPEN = (
    update(SESSIONS)
    .where(SESSIONS.c.id == bindparam("sid"))
    .values(
        open_position=bindparam("position"),
        open_floor=bindparam("floor"),
        open_calls=bindparam("calls", type_=SESSIONS.c.open_calls.type),
    )
)


def _bump_params(p: PreparedAppend, now: datetime) -> dict[str, Any]:
    return {
        "id": p.key.id,
        "owner": p.key.owner,
        "name": p.key.name,
        "encoding": p.encoding,
        "n": len(p.messages),
        "turns": p.turns,
        "floor": p.floor,
        "now": now,
        "pin_first": None if p.pinned is None else p.pinned[0],
        "pin_last": None if p.pinned is None else p.pinned[1],
    }


SET_HEAD = (
    update(SESSIONS).where(SESSIONS.c.id == bindparam("sid")).values(head_digest=bindparam("head"))
)


def _rows(
    p: PreparedAppend, lo: int, hi: int, at: _Placed, cum: int, now: datetime, previous: str
) -> list[dict[str, Any]]:
    """Messages ``lo`` to ``hi`` of ``p`` as rows, placed as ``at`` says,
    ``cum`` being the ``cum_floor`` of message ``lo`` and ``previous`` the
    digest it chains to (tokenmem.digest)."""
    sid, encoding = p.key.id, p.encoding
    position, turn = at.first, at.turn
    rows = []
    for i in range(lo, hi):
        msg, c, created = p.messages[i], p.counts[i], p.created_at[i]
        openai = msg.openai or {}
        row = {
            "session_id": sid,
            "position": position + i,
            "turn": turn + p.turn_of[i],
            "role": msg.type,
            "content": msg.content,
            "name": msg.name,
            "metadata": msg.metadata,
            "created_at": created or now,
            "encoding": encoding,
            "text_tokens": c.text_tokens,
            "newline_tokens": c.newline_tokens,
            "chat_tokens": c.chat_tokens,
            "cum_floor": cum,
            "message": msg.openai,
            "tool_calls": openai.get("tool_calls"),
            "tool_call_id": answered(openai),
            "unit": at.units[i],
        }
        row["digest"] = previous = message_digest(row, previous)
        rows.append(row)
        cum += c.floor
    return rows


def append(conn: Connection, p: PreparedAppend) -> list[StoredMessage]:
    """Append prepared turns: all of them or, on any error, none (the
    caller's transaction). The messages were counted before; only their
    positions are filled in while the session row is locked (on SQLite,
    while the database is). Returns the messages as stored."""
    now = utcnow()
    p, at = _reserve(conn, p, now)
    rows = _rows(p, 0, len(p.messages), at, at.cum, now, at.head)
    dialect = conn.dialect.name
    direct.execute(conn, insert_statement(dialect), insert_params(dialect, rows))
    if rows and not sets_head(dialect):
        direct.execute(conn, SET_HEAD, {"sid": p.key.id, "head": rows[-1]["digest"]})
    return [
        StoredMessage(
            type=row["role"],
            content=row["content"],
            name=row["name"],
            metadata=row["metadata"],
            created_at=row["created_at"],
            encoding=row["encoding"],
            text_tokens=row["text_tokens"],
            chat_tokens=row["chat_tokens"],
            newline_tokens=row["newline_tokens"],
            position=row["position"],
            turn=row["turn"],
            openai=row["message"],
            digest=row["digest"],
        )
        for row in rows
    ]


def append_many(conn: Connection, p: PreparedAppend, batch_size: int = BULK_BATCH) -> range:
    """Append many prepared messages in the caller's transaction (all or
    none): one bump of the session for all of them, then the rows in
    statements of ``batch_size`` (COPY on PostgreSQL on the direct path, else
    an executemany). Returns the positions they were stored at."""
    now = utcnow()
    p, at = _reserve(conn, p, now)
    n, cum, head = len(p.messages), at.cum, at.head
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        rows = _rows(p, lo, hi, at, cum, now, head)
        direct.insert_many(conn, _INSERT_MESSAGES, rows)
        cum += sum(c.floor for c in p.counts[lo:hi])
        head = rows[-1]["digest"]
    if n:
        direct.execute(conn, SET_HEAD, {"sid": p.key.id, "head": head})
    return range(at.first, at.first + n)


def _in_session_encoding(conn: Connection, p: PreparedAppend) -> PreparedAppend:
    """``p`` counted with the encoding its session has now."""
    encoding = encoding_of(conn, p.key)
    if encoding is None or encoding == p.encoding:  # the bump's WHERE admits these
        raise ConfigurationError(f"session {p.key.name!r} changed its encoding during an append")
    try:
        return p.counted_with(TokenCounter(encoding))
    except EncodingUnavailable:  # not on this machine: the whole session goes over now
        recount_batch(conn, p.key, p.counter, Recount(p.encoding, whole=True), RECOUNT_BATCH)
        return p


# --- recounting: a model with another encoding, in bounded batches -------------


@dataclass(frozen=True)
class Recount:
    """How far a recount of one session to ``encoding`` has come: the
    messages up to position ``after`` (-1: none yet) are counted with it, and
    their floors sum to ``cum``. ``done``: the session now is. ``whole``:
    the session already has ``encoding`` (rows from before migration 0003
    get their newline counts): one transaction, as the window statement
    cannot tell its recounted rows from the others."""

    encoding: str
    after: int = -1
    cum: int = 0
    done: bool = False
    whole: bool = False


def recount_start(conn: Connection, key: SessionKey, encoding: str) -> Recount:
    """Where a recount of the session to ``encoding`` goes on. Batches count
    the oldest messages first, so the messages already counted with it are
    the oldest ones (while the session itself, and every message appended
    meanwhile, keeps the old encoding until the last batch): found by a
    binary search over positions, one index probe each (the last batch
    checks that the search was right). A session already counted with
    ``encoding`` is counted again whole (:attr:`Recount.whole`)."""
    s, m = SESSIONS.c, MESSAGES.c
    sid = key.id
    found = conn.execute(select(s.encoding, s.next_position).where(s.id == sid)).first()
    if found is None:
        raise SessionNotFound(key.name)
    if found.encoding in (None, encoding):
        return Recount(encoding, whole=True)

    def at_or_after(position: int) -> Any:
        return conn.execute(
            select(m.position, m.encoding, m.cum_floor, *_COUNTS)
            .where(m.session_id == sid, m.position >= position)
            .order_by(m.position)
            .limit(1)
        ).first()

    first = at_or_after(0)
    if first is None or first.encoding != encoding:
        return Recount(encoding)
    # the last message counted with `encoding`: in [first, next_position)
    done, lo, hi = first, first.position + 1, int(found.next_position)
    while lo < hi:
        mid = (lo + hi) // 2
        row = at_or_after(mid)
        if row is not None and row.encoding == encoding:
            done, lo = row, row.position + 1
        else:
            hi = mid
    floor = Counts(done.text_tokens, done.chat_tokens, _newline_of(done)).floor
    return Recount(encoding, after=done.position, cum=done.cum_floor + floor)


_COUNTS = (MESSAGES.c.text_tokens, MESSAGES.c.chat_tokens, MESSAGES.c.newline_tokens)


def _newline_of(row: Any) -> int:
    return 1 if row.newline_tokens is None else int(row.newline_tokens)


def recount_batch(
    conn: Connection, key: SessionKey, counter: TokenCounter, at: Recount, size: int
) -> Recount:
    """Count the next ``size`` messages after ``at`` again with ``counter``
    (its encoding is ``at.encoding``) and return how far the recount has
    come. The last batch — when no more than ``size`` messages are left —
    takes the session's row lock, counts what is left (with the messages
    appended meanwhile) and switches the session to the new encoding, its
    floor total and its window start with it: no transaction holds a lock
    for more than a batch. If another recount rewrote some of the messages
    this one had counted (two at once, to two encodings), the last batch
    finds them and the recount starts again instead."""
    s, m = SESSIONS.c, MESSAGES.c
    sid = key.id
    if at.whole:
        size = _ALL

    def rows_after(limit: int | None) -> list[Any]:
        stmt = (
            select(m.position, m.role, m.content, m.name, m.message)
            .where(m.session_id == sid, m.position > at.after)
            .order_by(m.position)
        )
        return list(conn.execute(stmt if limit is None else stmt.limit(limit)).all())

    batch = rows_after(size + 1)
    last = len(batch) <= size
    start = None
    if last:  # appends wait from here on (a write: SQLite has no FOR UPDATE)
        start = conn.execute(
            update(SESSIONS)
            .where(s.id == sid)
            .values(updated_at=s.updated_at)
            .returning(s.start_position)
        ).scalar()
        if start is None:
            raise SessionNotFound(key.name)
        if (
            at.after >= 0
            and conn.execute(
                select(m.position)
                .where(m.session_id == sid, m.position <= at.after, m.encoding != at.encoding)
                .limit(1)
            ).first()
        ):
            return Recount(at.encoding)  # from the oldest again: done is False
        batch = rows_after(None)
    else:
        batch = batch[:size]
    cum, params = at.cum, []
    for position, role, content, name, openai in batch:
        c = count_message(counter, role, content, name, openai)
        params.append(
            {
                "sid": sid,
                "pos": position,
                "enc": counter.encoding_name,
                "text": c.text_tokens,
                "chat": c.chat_tokens,
                "newline": c.newline_tokens,
                "cum": cum,
            }
        )
        cum += c.floor
    if params:
        conn.execute(_RECOUNTED, params)
    if start is None:
        return Recount(at.encoding, after=batch[-1].position, cum=cum)
    start_floor = conn.execute(
        select(m.cum_floor)
        .where(m.session_id == sid, m.position >= start)
        .order_by(m.position)
        .limit(1)
    ).scalar()
    # an open tool-call unit's start moved too (NULL stays NULL)
    open_floor = (
        select(m.cum_floor)
        .where(m.session_id == sid, m.position == s.open_position)
        .scalar_subquery()
    )
    conn.execute(
        update(SESSIONS)
        .where(s.id == sid)
        .values(
            encoding=counter.encoding_name,
            floor_total=cum,
            start_floor=cum if start_floor is None else start_floor,
            open_floor=open_floor,
        )
    )
    return Recount(at.encoding, after=batch[-1].position if batch else at.after, cum=cum, done=True)


_ALL = 2**62  # a batch with no bound

_RECOUNTED = (
    update(MESSAGES)
    .where(MESSAGES.c.session_id == bindparam("sid"), MESSAGES.c.position == bindparam("pos"))
    .values(
        encoding=bindparam("enc"),
        text_tokens=bindparam("text"),
        chat_tokens=bindparam("chat"),
        newline_tokens=bindparam("newline"),
        cum_floor=bindparam("cum"),
    )
)


def align(conn: Connection, key: SessionKey, position: int, turn: int) -> None:
    """Move the session's next position and turn forward to ``position`` and
    ``turn`` (creating it if needed), so an import keeps its source's
    positions: the skipped ones are a gap, as after :func:`prune`."""
    s, now = SESSIONS.c, utcnow()
    values = {"id": key.id, "owner_id": key.owner, "name": key.name}
    conn.execute(
        session_upsert(
            conn.dialect.name,
            {
                **values,
                "next_position": position,
                "next_turn": turn,
                "start_position": position,
                "created_at": now,
                "updated_at": now,
            },
            {"next_position": position, "next_turn": turn},
            where=s.next_position < position,
        )
    )


def clear(conn: Connection, key: SessionKey) -> None:
    """Start an empty window: the history stays."""
    s = SESSIONS.c
    conn.execute(
        update(SESSIONS)
        .where(s.id == key.id)
        .values(
            start_position=s.next_position,
            start_floor=s.floor_total,
            open_position=None,
            open_floor=None,
            open_calls=None,
            updated_at=utcnow(),
        )
    )


def pop(conn: Connection, key: SessionKey) -> Message | None:
    """Remove the session's newest message since its last clear and return
    it (None when there is none): the Agents SDK's ``pop_item``, which the
    Runner uses to take back what it saved for a turn it retries. Under the
    session's row lock, the session is left as it was before that message
    was appended: its next position (reused) and turn, floor total, pinned
    prompt and open unit — the unit of the newest message left is open
    again if its items are not whole without the popped one (popping an
    answer re-opens its call; popping the message that made an orphan of
    the unit before it makes that unit open again), and none is open when
    the popped message opened it."""
    s, m = SESSIONS.c, MESSAGES.c
    sid = key.id
    state = conn.execute(_LOCKED, {"sid": sid}).first()
    if state is None:
        return None
    newest = conn.execute(
        select(m.position, m.turn, m.role, m.content, m.name, m.message, m.cum_floor)
        .where(m.session_id == sid, m.position >= state.start_position)
        .order_by(m.position.desc())
        .limit(1)
    ).first()
    if newest is None:
        return None
    conn.execute(delete(MESSAGES).where(m.session_id == sid, m.position == newest.position))
    previous = conn.execute(
        select(m.position, m.turn, m.unit, m.digest)
        .where(m.session_id == sid, m.position < newest.position)
        .order_by(m.position.desc())
        .limit(1)
    ).first()
    values: dict[str, Any] = {
        "next_position": newest.position,
        "floor_total": newest.cum_floor,
        "updated_at": utcnow(),
        # the chain ends where it did before (tokenmem.digest): at the
        # message before, or at the anchor a prune left
        "head_digest": s.anchor_digest if previous is None else previous.digest,
    }
    if newest.turn == state.next_turn - 1 and (previous is None or previous.turn != newest.turn):
        values["next_turn"] = newest.turn  # its turn had no other message
    if state.pinned_last == newest.position:
        values.update(_pinned_before(conn, sid, newest.position, state.pinned_first, previous))
    after = None
    if previous is not None and previous.position >= state.start_position:
        after = _reopened(conn, sid, previous.position, previous.unit, state.start_position)
    values.update(
        open_position=after and after.position,
        open_floor=after and after.floor,
        open_calls=after and after.calls,
    )
    conn.execute(update(SESSIONS).where(s.id == sid).values(**values))
    return Message(newest.role, newest.content, newest.name, openai=newest.message)


# Takes the session's row lock (a write: SQLite has no FOR UPDATE), changing nothing.
_LOCKED = (
    update(SESSIONS)
    .where(SESSIONS.c.id == bindparam("sid"))
    .values(updated_at=SESSIONS.c.updated_at)
    .returning(
        SESSIONS.c.start_position,
        SESSIONS.c.next_turn,
        SESSIONS.c.pinned_first,
        SESSIONS.c.pinned_last,
    )
)
_PINNED_ROLES = ("system", "developer")


def _pinned_before(
    conn: Connection, sid: Any, popped: int, first: int, previous: Any
) -> dict[str, int | None]:
    """The pinned prompt once the newest message, the last of it, is popped:
    the rest of its run, or the run of system/developer messages before."""
    m = MESSAGES.c
    if first < popped:
        return {"pinned_last": previous.position}
    last = conn.execute(
        select(func.max(m.position)).where(
            m.session_id == sid, m.role.in_(_PINNED_ROLES), m.position < popped
        )
    ).scalar()
    if last is None:
        return {"pinned_first": None, "pinned_last": None}
    other = conn.execute(
        select(func.max(m.position)).where(
            m.session_id == sid, m.role.not_in(_PINNED_ROLES), m.position < last
        )
    ).scalar()
    start = conn.execute(
        select(func.min(m.position)).where(
            m.session_id == sid, m.position > (-1 if other is None else other), m.position <= last
        )
    ).scalar()
    return {"pinned_first": start, "pinned_last": last}


def _reopened(
    conn: Connection, sid: Any, last: int, unit: int | None, start: int
) -> OpenUnit | None:
    """The open unit once the message after ``last`` is popped: the unit of
    ``last`` if its messages are not whole (:func:`tokenmem.chat.reopen`),
    its rows no longer orphans; else None."""
    m = MESSAGES.c
    first = last if unit is None else (unit if unit >= 0 else -1 - unit)
    if first < start:
        return None
    rows = conn.execute(
        select(m.position, m.role, m.content, m.name, m.message, m.cum_floor)
        .where(m.session_id == sid, m.position.between(first, last))
        .order_by(m.position)
    ).all()
    if not rows or rows[0].position != first:
        return None
    waiting = reopen(
        [as_openai(Message(r.role, r.content, r.name, openai=r.message)) for r in rows]
    )
    if waiting is None:
        return None
    if unit is not None and unit < 0:
        conn.execute(_UNORPHANED, {"sid": sid, "first": first, "last": last})
    return OpenUnit(first, rows[0].cum_floor, waiting)


_UNORPHANED = (
    update(MESSAGES)
    .where(
        MESSAGES.c.session_id == bindparam("sid"),
        MESSAGES.c.position.between(bindparam("first"), bindparam("last")),
    )
    .values(
        unit=case((MESSAGES.c.position == bindparam("first"), null()), else_=bindparam("first"))
    )
)


def erase(conn: Connection, key: SessionKey) -> int:
    """Delete the session, its messages, turns and summaries; return how many messages."""
    conn.execute(delete(TURNS).where(TURNS.c.session_id == key.id))
    conn.execute(delete(SUMMARIES).where(SUMMARIES.c.session_id == key.id))
    deleted = conn.execute(delete(MESSAGES).where(MESSAGES.c.session_id == key.id)).rowcount
    if not conn.execute(delete(SESSIONS).where(SESSIONS.c.id == key.id)).rowcount:
        raise SessionNotFound(key.name)
    return int(deleted)


@dataclass(frozen=True)
class Erased:
    """What an erase or a retention run deleted."""

    sessions: int
    messages: int
    turns: int
    summaries: int = 0  # rows of tokenmem_summaries (ConversationSummaryBufferMemory)


def erase_owner(conn: Connection, owner: str) -> Erased:
    """Delete every session of ``owner`` with its messages, turns and summaries."""
    ids = select(SESSIONS.c.id).where(SESSIONS.c.owner_id == owner).scalar_subquery()
    turns = conn.execute(delete(TURNS).where(TURNS.c.session_id.in_(ids))).rowcount
    summaries = conn.execute(delete(SUMMARIES).where(SUMMARIES.c.session_id.in_(ids))).rowcount
    messages = conn.execute(delete(MESSAGES).where(MESSAGES.c.session_id.in_(ids))).rowcount
    sessions = conn.execute(delete(SESSIONS).where(SESSIONS.c.owner_id == owner)).rowcount
    return Erased(int(sessions), int(messages), int(turns), int(summaries))


def prune(conn: Connection, before: datetime, owner: str | None) -> Erased:
    """Delete messages, turns and summaries created before ``before``, of
    ``owner``'s sessions or (``owner=None``) of every session. Sessions
    stay; their positions go on where they were. A summary is made after
    the messages it replaced, so one pruned replaced only pruned messages;
    a newer one stays, with what it condenses (erase the session to forget
    that too). The next summary of a session left without one starts a new
    running summary (tokenmem.summaries).

    Each session's chains start again after what was removed: the digest
    and key of the newest message (and turn) deleted become its anchor
    (tokenmem.digest.verify starts there)."""
    ids = None
    if owner is not None:
        ids = select(SESSIONS.c.id).where(SESSIONS.c.owner_id == owner).scalar_subquery()

    def older(table: Table) -> int:
        where = [table.c.created_at < before]
        if ids is not None:
            where.append(table.c.session_id.in_(ids))
        return int(conn.execute(delete(table).where(*where)).rowcount)

    def anchor(table: Table, key: str, digest: str, at: str) -> None:
        t = table.c
        removed = select(t[key], t.digest).where(
            t.session_id == SESSIONS.c.id, t.created_at < before
        )
        newest = removed.order_by(t[key].desc()).limit(1)
        where: list[ColumnElement[bool]] = [removed.exists()]
        if owner is not None:
            where.append(SESSIONS.c.owner_id == owner)
        conn.execute(
            update(SESSIONS)
            .where(*where)
            .values(
                {
                    at: newest.with_only_columns(t[key]).scalar_subquery(),
                    digest: newest.with_only_columns(t.digest).scalar_subquery(),
                }
            )
        )

    anchor(MESSAGES, "position", "anchor_digest", "anchor_position")
    anchor(TURNS, "seq", "turns_anchor_digest", "turns_anchor_seq")
    turns, summaries = older(TURNS), older(SUMMARIES)
    return Erased(0, older(MESSAGES), turns, summaries)
