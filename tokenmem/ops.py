"""Store operations, written once and run by both the sync and the async store.

An operation is a generator: it yields ``(statement, parameters)`` steps and
is sent back each step's ``Result`` (:class:`~tokenmem.direct.Rows` for a
:class:`~tokenmem.direct.Direct` statement); it returns the operation's value. The
sync :class:`~tokenmem.store.Store` runs it with :func:`run`,
:class:`~tokenmem.aio.AsyncStore` runs the same function in SQLAlchemy's
greenlet — one transaction per operation, the same SQL and the same Python on
both::

    def count_op() -> Op[int]:
        result = yield select(func.count()).select_from(MESSAGES), None
        return int(result.scalar_one())

Validation and token counting happen in :func:`prepare_append`, before any
transaction is opened, so a lock is never held while tiktoken works.
"""

from __future__ import annotations

import functools
import itertools
import json
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Executable,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .direct import Conn, Direct, RawConnection, connect
from .errors import ConfigurationError, InvalidInputError, SessionNotFound
from .messages import Message, SessionInfo, StoredMessage
from .models import MESSAGES, ROLES, SESSIONS, TURNS, session_uuid, utcnow
from .tokens import TokenCounter
from .window import Counts, Mode, Rule, count_message, fit, window_select

__all__ = [
    "Attempt",
    "Erased",
    "Op",
    "SessionKey",
    "WindowMessage",
    "check_text",
    "drive",
    "run",
    "transact",
    "window_messages",
    "window_rows_op",
]

T = TypeVar("T")
Step = tuple[Executable | Direct, Any]
# Sent back: the step's CursorResult or Rows (typed Any: rows are unpacked positionally).
Op = Generator[Step, Any, T]

DEFAULT_OWNER = ""
_RECOUNT_BATCH = 1000
_MAX_KEY = 255


def drive(conn: Conn, op: Op[T]) -> T:
    """Run ``op`` on a sync connection."""
    try:
        stmt, params = next(op)
        while True:
            if isinstance(stmt, Direct):
                stmt, params = op.send(stmt.run(conn, params))
            else:
                stmt, params = op.send(conn.execute(stmt, params))
    except StopIteration as stop:
        value: T = stop.value
        return value


class Attempt:
    """One try of a transaction: whether it got as far as COMMIT (then a lost
    connection may or may not have committed, and it must not run again)."""

    committing = False


def transact(conn: Connection | RawConnection, op: Op[T], attempt: Attempt) -> T:
    """Run ``op`` in one transaction on ``conn`` and commit it."""
    transaction = conn.begin()
    value = drive(conn, op)
    attempt.committing = True
    transaction.commit()
    return value


def run(engine: Engine, op: Op[T], attempt: Attempt) -> T:
    """Run ``op`` in one transaction on a connection of ``engine``'s pool
    (closing it without a commit rolls back). The async store runs this same
    function in SQLAlchemy's greenlet on its engine's ``sync_engine``, where
    the async driver is called as a sync one: one hop per transaction."""
    with connect(engine) as conn:
        return transact(conn, op, attempt)


# --- validation ---------------------------------------------------------------


def check_text(value: object, what: str) -> str:
    """Return ``value`` if it can be stored and read back exactly, else raise."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInputError(
            f"{what} contains a NUL character (U+0000), which SQL text cannot hold"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid Unicode: {exc.reason} at {exc.start}"
        ) from None
    return value


def _check_key(value: object, what: str) -> str:
    text = check_text(value, what)
    if not text or len(text) > _MAX_KEY:
        raise InvalidInputError(f"{what} must have 1 to {_MAX_KEY} characters")
    return text


def _check_metadata(value: object, what: str) -> None:
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
        owner = "" if owner == "" else _check_key(owner, "owner")
        return cls(str(owner), _check_key(name, "session_id"))

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

    @property
    def floor(self) -> int:
        return sum(c.floor for c in self.counts)


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
    key: SessionKey, turns: Sequence[Sequence[Message]], counter: TokenCounter
) -> PreparedAppend:
    if not turns or not all(turns):
        raise InvalidInputError("nothing to append: a turn needs at least one message")
    messages = [m for turn in turns for m in turn]
    for i, msg in enumerate(messages):
        if msg.type not in ROLES:
            raise InvalidInputError(f"message {i}: type must be one of {ROLES}, not {msg.type!r}")
        check_text(msg.content, f"message {i} content")
        if msg.name is not None:
            _check_key(msg.name, f"message {i} name")
        _check_metadata(msg.metadata, f"message {i} metadata")
        created = getattr(msg, "created_at", None)
        if created is not None and (not isinstance(created, datetime) or created.tzinfo is None):
            raise InvalidInputError(f"message {i} created_at must be a timezone-aware datetime")
    return PreparedAppend(
        key=key,
        encoding=counter.encoding_name,
        messages=messages,
        counts=[count_message(counter, m.type, m.content, m.name) for m in messages],
        turn_of=[t for t, turn in enumerate(turns) for _ in turn],
        turns=len(turns),
        counter=counter,
        created_at=[getattr(m, "created_at", None) for m in messages],
    )


def _insert(dialect: str) -> Any:
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise ConfigurationError(f"tokenmem supports SQLite and PostgreSQL, not {dialect}")


@functools.cache
def bump_session(dialect: str) -> Direct:
    """Create the session, or reserve positions and turns in it, taking its
    row lock until the transaction ends (built once per dialect; parameters
    from :func:`bump_params`).

    Returns (next_position, next_turn, floor_total) after the bump, or no row
    when the session is counted with another encoding."""
    s = SESSIONS.c
    n = bindparam("b_n", type_=BigInteger)
    turns = bindparam("b_turns", type_=BigInteger)
    floor = bindparam("b_floor", type_=BigInteger)
    encoding = bindparam("b_encoding", type_=s.encoding.type)
    now = bindparam("b_now", type_=s.updated_at.type)
    stmt = _insert(dialect)(SESSIONS).values(
        id=bindparam("b_id", type_=s.id.type),
        owner_id=bindparam("b_owner"),
        name=bindparam("b_name"),
        encoding=encoding,
        next_position=n,
        next_turn=turns,
        floor_total=floor,
        start_position=literal_column("0"),
        start_floor=literal_column("0"),
        next_call=literal_column("0"),
        created_at=now,
        updated_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[s.id],
        set_={
            "next_position": s.next_position + n,
            "next_turn": s.next_turn + turns,
            "floor_total": s.floor_total + floor,
            "encoding": encoding,
            "updated_at": now,
        },
        where=or_(s.encoding == encoding, s.encoding.is_(None)),
    )
    return Direct(stmt.returning(s.next_position, s.next_turn, s.floor_total))


def bump_params(p: PreparedAppend, now: datetime) -> dict[str, object]:
    return {
        "b_id": p.key.id,
        "b_owner": p.key.owner,
        "b_name": p.key.name,
        "b_encoding": p.encoding,
        "b_n": len(p.messages),
        "b_turns": p.turns,
        "b_floor": p.floor,
        "b_now": now,
    }


# Appends of up to this many messages insert them with one statement.
_ONE_STATEMENT = 8


_INSERT_ONE = Direct(insert(MESSAGES))  # run as executemany for long imports
_SHARED = ("session_id", "encoding")


@functools.cache
def _insert_messages(n: int) -> Direct:
    """The INSERT of ``n`` messages: one multi-row VALUES statement (one
    round trip), or for long imports the one-row statement run as executemany."""
    if n > _ONE_STATEMENT:
        return _INSERT_ONE
    binds: dict[str, Any] = {}  # the shared parameters: one bind for all rows
    rows = [
        {
            c.key: binds.setdefault(name, bindparam(name, type_=c.type))
            for c in MESSAGES.c
            for name in [_row_names(i)[c.key]]
        }
        for i in range(n)
    ]
    return Direct(insert(MESSAGES).values(rows))


def append_op(dialect: str, p: PreparedAppend) -> Op[list[StoredMessage]]:
    """Append prepared turns: all of them or, on any error, none. The rows
    are made ready before the session row is locked; only their positions
    are filled in while it is (on SQLite, while the database is)."""
    now = utcnow()
    stored = [
        StoredMessage(
            type=msg.type,
            content=msg.content,
            name=msg.name,
            metadata=msg.metadata,
            created_at=p.created_at[i] or now,
            encoding=p.encoding,
            text_tokens=c.text_tokens,
            chat_tokens=c.chat_tokens,
            newline_tokens=c.newline_tokens,
        )
        for i, (msg, c) in enumerate(zip(p.messages, p.counts, strict=True))
    ]
    # One multi-row statement (row i's parameters named by _row_names(i)),
    # or for long imports a parameter set per row.
    insert = _insert_messages(len(stored))
    one = insert is not _INSERT_ONE
    values: Any = {} if one else [{} for _ in stored]
    rows = [values] * len(stored) if one else values
    names = [_row_names(i if one else -1) for i in range(len(stored))]
    for msg, row, name in zip(stored, rows, names, strict=True):
        row[name["session_id"]], row[name["encoding"]] = p.key.id, p.encoding
        row[name["role"]], row[name["content"]] = msg.type, msg.content
        row[name["name"]], row[name["metadata"]] = msg.name, msg.metadata
        row[name["created_at"]], row[name["text_tokens"]] = msg.created_at, msg.text_tokens
        row[name["chat_tokens"]] = msg.chat_tokens
        row[name["newline_tokens"]] = msg.newline_tokens
    bump, params = bump_session(dialect), bump_params(p, now)
    bumped = (yield bump, params).first()
    if bumped is None:  # counted with another encoding: recount, then bump
        yield from recount_op(p.key.id, p.counter)
        bumped = (yield bump, params).one()
    next_position, next_turn, floor_total = bumped
    position, turn = next_position - len(stored), next_turn - p.turns
    cum = floor_total - p.floor
    for i, (msg, c, row, name) in enumerate(zip(stored, p.counts, rows, names, strict=True)):
        msg.position, msg.turn = position + i, turn + p.turn_of[i]
        row[name["position"]], row[name["turn"]] = msg.position, msg.turn
        row[name["cum_floor"]] = cum
        cum += c.floor
    yield insert, values
    return stored


@functools.cache
def _row_names(i: int) -> dict[str, str]:
    """Each column's parameter in row ``i`` of the one-statement INSERT, the
    session and encoding shared by all rows (``-1``: the one-row statement
    run as executemany)."""
    if i < 0:
        return {c.key: c.key for c in MESSAGES.c}
    return {c.key: f"{c.key}_all" if c.key in _SHARED else f"{c.key}_{i}" for c in MESSAGES.c}


def recount_op(sid: uuid.UUID, counter: TokenCounter) -> Op[None]:
    """Count every message of the session again with ``counter``'s encoding
    (the session row is locked by the caller's bump or here)."""
    s, m = SESSIONS.c, MESSAGES.c
    start = (
        yield (
            select(s.start_position).where(s.id == sid).with_for_update(),
            None,
        )
    ).scalar_one()
    cum, after, start_floor = 0, -1, None
    while True:
        batch = (
            yield (
                select(m.position, m.role, m.content, m.name)
                .where(m.session_id == sid, m.position > after)
                .order_by(m.position)
                .limit(_RECOUNT_BATCH),
                None,
            )
        ).all()
        if not batch:
            break
        params = []
        for position, role, content, name in batch:
            if start_floor is None and position >= start:  # start itself may be pruned
                start_floor = cum
            c = count_message(counter, role, content, name)
            params.append(
                {
                    "pos": position,
                    "text_tokens": c.text_tokens,
                    "chat_tokens": c.chat_tokens,
                    "newline_tokens": c.newline_tokens,
                    "cum_floor": cum,
                }
            )
            cum += c.floor
        yield (
            update(MESSAGES)
            .where(m.session_id == sid, m.position == bindparam("pos"))
            .values(encoding=counter.encoding_name),
            params,
        )
        after = batch[-1].position
    yield (
        update(SESSIONS)
        .where(s.id == sid)
        .values(
            encoding=counter.encoding_name,
            floor_total=cum,
            start_floor=cum if start_floor is None else start_floor,
        ),
        None,
    )


def align_op(dialect: str, key: SessionKey, position: int, turn: int) -> Op[None]:
    """Move the session's next position and turn forward to ``position`` and
    ``turn`` (creating it if needed), so an import keeps its source's
    positions: the skipped ones are a gap, as after :func:`prune_op`."""
    s, now = SESSIONS.c, utcnow()
    stmt = (
        _insert(dialect)(SESSIONS)
        .values(
            id=key.id,
            owner_id=key.owner,
            name=key.name,
            encoding=None,
            next_position=position,
            next_turn=turn,
            floor_total=0,
            start_position=position,
            start_floor=0,
            next_call=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_update(
            index_elements=[s.id],
            set_={"next_position": position, "next_turn": turn},
            where=s.next_position < position,
        )
    )
    yield stmt, None


def clear_op(key: SessionKey) -> Op[None]:
    s = SESSIONS.c
    yield (
        update(SESSIONS)
        .where(s.id == key.id)
        .values(start_position=s.next_position, start_floor=s.floor_total, updated_at=utcnow()),
        None,
    )


def erase_op(key: SessionKey) -> Op[int]:
    yield delete(TURNS).where(TURNS.c.session_id == key.id), None
    deleted = (yield delete(MESSAGES).where(MESSAGES.c.session_id == key.id), None).rowcount
    if not (yield delete(SESSIONS).where(SESSIONS.c.id == key.id), None).rowcount:
        raise SessionNotFound(key.name)
    return int(deleted)


@dataclass(frozen=True)
class Erased:
    """What an erase or a retention run deleted."""

    sessions: int
    messages: int
    turns: int


def erase_owner_op(owner: str) -> Op[Erased]:
    """Delete every session of ``owner`` with its messages and turns."""
    ids = select(SESSIONS.c.id).where(SESSIONS.c.owner_id == owner).scalar_subquery()
    turns = (yield delete(TURNS).where(TURNS.c.session_id.in_(ids)), None).rowcount
    messages = (yield delete(MESSAGES).where(MESSAGES.c.session_id.in_(ids)), None).rowcount
    sessions = (yield delete(SESSIONS).where(SESSIONS.c.owner_id == owner), None).rowcount
    return Erased(int(sessions), int(messages), int(turns))


def prune_op(before: datetime, owner: str | None) -> Op[Erased]:
    """Delete messages and turns created before ``before``, of ``owner``'s
    sessions or (``owner=None``) of every session. Sessions stay; their
    positions go on where they were."""
    m_where = [MESSAGES.c.created_at < before]
    t_where = [TURNS.c.created_at < before]
    if owner is not None:
        ids = select(SESSIONS.c.id).where(SESSIONS.c.owner_id == owner).scalar_subquery()
        m_where.append(MESSAGES.c.session_id.in_(ids))
        t_where.append(TURNS.c.session_id.in_(ids))
    turns = (yield delete(TURNS).where(*t_where), None).rowcount
    messages = (yield delete(MESSAGES).where(*m_where), None).rowcount
    return Erased(0, int(messages), int(turns))


# --- reads ----------------------------------------------------------------------


class WindowMessage(NamedTuple):
    """A message of the window, with its place in the session and its cost
    under the window's rule (counted at write time, not again)."""

    position: int
    turn: int
    message: Message
    tokens: int
    # False for a row written before newline_tokens existed: its cost in
    # text mode assumes its joining newline is one token.
    exact: bool = True


@functools.cache
def _window(mode: Mode) -> Direct:
    return Direct(window_select(mode))


def window_rows_op(key: SessionKey, rule: Rule, counter: TokenCounter) -> Op[Sequence[Any]]:
    """The newest messages that fit ``rule``, oldest first, as the window
    statement's rows (position, turn, role, content, name, running, counted):
    one query. A memory that only renders them needs no more; the stores'
    ``window()`` makes them :func:`window_messages`."""
    prefix_tokens = rule.prefix_tokens(counter)
    params = rule.params(key.id, counter.encoding_name, prefix_tokens)
    rows: Sequence[Any] = (yield _window(rule.mode), params).all()
    if not rows:
        rows = yield from _window_recounting(key.id, rule, counter, prefix_tokens)
    return rows


def window_messages(rows: Sequence[Any]) -> list[WindowMessage]:
    """The window's rows as messages with their positions and costs."""
    # Each row's cost: its running sum less the next (newer) row's. (Built
    # with tuple.__new__: a load makes one per message, and NamedTuple's own
    # __new__ is Python code.)
    window, after = [], 0
    for position, turn, role, content, name, running, exact in reversed(rows):
        fields = (position, turn, Message(role, content, name), running - after, bool(exact))
        window.append(tuple.__new__(WindowMessage, fields))
        after = running
    window.reverse()
    return window


def _window_recounting(
    sid: uuid.UUID, rule: Rule, counter: TokenCounter, prefix_tokens: Mapping[str, int]
) -> Op[Sequence[Any]]:
    """The window of a session counted with another encoding (the model
    changed): count its newest messages in Python — no more than the limit,
    as each costs at least one token. Rare: the next append recounts."""
    s, m = SESSIONS.c, MESSAGES.c
    session = (yield select(s.encoding, s.start_position).where(s.id == sid), None).first()
    if session is None or session.encoding is None:
        return []
    if session.encoding == counter.encoding_name:  # recounted since the first read
        params = rule.params(sid, counter.encoding_name, prefix_tokens)
        rows: Sequence[Any] = (yield _window(rule.mode), params).all()
        return rows
    tail = (
        yield (
            select(m.position, m.turn, m.role, m.content, m.name)
            .where(m.session_id == sid, m.position >= session.start_position)
            .order_by(m.position.desc())
            .limit(max(rule.limit, 0)),
            None,
        )
    ).all()[::-1]
    counts = [count_message(counter, r.role, r.content, r.name) for r in tail]
    costs = [rule.cost(r.role, c, prefix_tokens) for r, c in zip(tail, counts, strict=True)]
    start = fit(costs, rule.budget(counts[-1] if counts else None))
    running = list(itertools.accumulate(reversed(costs[start:])))[::-1]
    return [(*row, total, True) for row, total in zip(tail[start:], running, strict=True)]


_HISTORY = (
    MESSAGES.c.position,
    MESSAGES.c.turn,
    MESSAGES.c.role,
    MESSAGES.c.content,
    MESSAGES.c.name,
    MESSAGES.c.metadata,
    MESSAGES.c.created_at,
    MESSAGES.c.encoding,
    MESSAGES.c.text_tokens,
    MESSAGES.c.chat_tokens,
    MESSAGES.c.newline_tokens,
)


def history_page_op(
    key: SessionKey,
    after: int,
    limit: int,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Op[list[StoredMessage]]:
    """Up to ``limit`` messages above position ``after`` (created in
    ``[since, until)`` when given); SessionNotFound if none and the session
    does not exist."""
    m = MESSAGES.c
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise InvalidInputError("since/until must be timezone-aware datetimes")
    where = [m.session_id == key.id, m.position > after]
    if since is not None:
        where.append(m.created_at >= since)
    if until is not None:
        where.append(m.created_at < until)
    rows = (yield select(*_HISTORY).where(*where).order_by(m.position).limit(limit), None).all()
    if not rows:
        found = (yield select(SESSIONS.c.id).where(SESSIONS.c.id == key.id), None).first()
        if found is None:
            raise SessionNotFound(key.name)
    return [
        StoredMessage(
            type=role,
            content=content,
            name=name,
            metadata=metadata,
            position=position,
            turn=turn,
            created_at=created_at,
            encoding=encoding,
            text_tokens=text_tokens,
            chat_tokens=chat_tokens,
            newline_tokens=newline_tokens,
        )
        for (
            position,
            turn,
            role,
            content,
            name,
            metadata,
            created_at,
            encoding,
            text_tokens,
            chat_tokens,
            newline_tokens,
        ) in rows
    ]


def session_op(key: SessionKey) -> Op[SessionInfo]:
    s = SESSIONS.c
    row = (
        yield (
            select(
                s.owner_id, s.name, s.next_position, s.created_at, s.updated_at, s.encoding
            ).where(s.id == key.id),
            None,
        )
    ).first()
    if row is None:
        raise SessionNotFound(key.name)
    return SessionInfo(*row)


def messages_between_op(key: SessionKey, first: int, last: int) -> Op[list[Message]]:
    """Messages ``first`` to ``last`` (positions), all of them or LookupError."""
    m = MESSAGES.c
    rows = (
        yield (
            select(m.position, m.role, m.content, m.name)
            .where(m.session_id == key.id, m.position.between(first, last))
            .order_by(m.position),
            None,
        )
    ).all()
    if [r.position for r in rows] != list(range(first, last + 1)):
        raise SessionNotFound(f"{key.name}: messages {first}..{last} (pruned or erased)")
    return [Message(r.role, r.content, r.name) for r in rows]


def sessions_op(owner: str) -> Op[list[SessionInfo]]:
    s = SESSIONS.c
    rows = (
        yield (
            select(s.owner_id, s.name, s.next_position, s.created_at, s.updated_at, s.encoding)
            .where(s.owner_id == owner)
            .order_by(s.name),
            None,
        )
    ).all()
    return [SessionInfo(*r) for r in rows]


@dataclass(frozen=True)
class SessionStats:
    """A session with its message count, tokens and activity, for operators."""

    owner_id: str
    session_id: str
    messages: int
    text_tokens: int  # the sum of its messages' text_tokens
    encoding: str | None
    created_at: datetime
    updated_at: datetime
    # Messages written before newline_tokens was counted (migration 0003).
    uncounted: int = 0


def session_stats_op(owner: str | None) -> Op[list[SessionStats]]:
    """Every session of ``owner`` (all owners if None) with its stored message
    count and the sum of its messages' tokens."""
    s, m = SESSIONS.c, MESSAGES.c
    query = (
        select(
            s.owner_id,
            s.name,
            func.count(m.position),
            func.coalesce(func.sum(m.text_tokens), 0),
            s.encoding,
            s.created_at,
            s.updated_at,
            func.count(m.position) - func.count(m.newline_tokens),
        )
        .select_from(SESSIONS.outerjoin(MESSAGES, m.session_id == s.id))
        .group_by(s.id, s.owner_id, s.name, s.encoding, s.created_at, s.updated_at)
        .order_by(s.owner_id, s.name)
    )
    if owner is not None:
        query = query.where(s.owner_id == owner)
    rows = (yield query, None).all()
    return [SessionStats(*r) for r in rows]


def count_op(owner: str | None = None) -> Op[int]:
    """How many messages are stored: of ``owner``'s sessions, or of all."""
    query = select(func.count()).select_from(MESSAGES)
    if owner is not None:
        ids = select(SESSIONS.c.id).where(SESSIONS.c.owner_id == owner).scalar_subquery()
        query = query.where(MESSAGES.c.session_id.in_(ids))
    result = yield query, None
    return int(result.scalar_one())
