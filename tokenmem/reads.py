"""What reads the database: plain functions over a ``Connection``, run by a
store in one transaction (:meth:`tokenmem.Store.run`)::

    with engine.connect() as conn:
        rows = window_rows(conn, SessionKey.of("chat-1"), rule, counter)

The window is one statement (:func:`tokenmem.window.window_select`); the
history is read in pages by position.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, NamedTuple, cast

from sqlalchemy import BigInteger, Connection, bindparam, case, func, select, tuple_

from . import direct
from .errors import ConfigurationError, InvalidInputError, SessionNotFound
from .messages import Message, Role, SessionInfo, StoredMessage
from .models import MESSAGES, SESSIONS
from .tokens import TokenCounter
from .validate import SessionKey
from .window import REPLY_PRIMING, Rule, count_message, fit_units, row_cap, window_select

__all__ = [
    "SessionStats",
    "WindowMessage",
    "WindowRow",
    "count",
    "encoding_of",
    "history_page",
    "messages_between",
    "session",
    "session_page",
    "session_stats",
    "sessions",
    "tail",
    "window_messages",
    "window_rows",
]


WindowRow = tuple[int, int, Role, str, "str | None", int, bool, int, int, Any, int, Any]
"""A row of the window statement: position, turn, role, content, name,
cost (under the window's rule), counted (its newline_tokens were counted at
write time), pinned (1: the session's pinned prompt, sent first), unit (the
position its unit starts at), message (the OpenAI dict kept for it, or
None), newline (its newline_tokens), metadata (the message's, or None)."""

PINNED: Final = 7  # a window row's pinned flag
_UNIT: Final = 8
_MESSAGE: Final = 9
_NEWLINE: Final = 10
METADATA: Final = 11
_JSON = (_MESSAGE, METADATA)  # the columns SQLite's direct path returns as JSON text


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
    pinned: bool = False  # the session's pinned prompt, sent first
    unit: int = -1  # the position its unit starts at (its own, for most)


def window_rows(
    conn: Connection, key: SessionKey, rule: Rule, counter: TokenCounter
) -> Sequence[WindowRow]:
    """The session's pinned prompt and the newest messages that fit ``rule``
    after it, as the window statement's rows (pinned first, then oldest
    first): one query. A memory that only renders them needs no more;
    :func:`window_messages` makes them messages. Raises
    :class:`ConfigurationError` when the pinned prompt alone is over the
    limit."""
    prefix_tokens = rule.prefix_tokens(counter)
    params = rule.params(key.id, counter.encoding_name, prefix_tokens)
    rows = _window(conn, rule, params)
    if all(row[PINNED] for row in rows):
        rows = _window_recounting(conn, key.id, rule, counter, prefix_tokens)
    pinned = [row for row in rows if row[PINNED]]
    if pinned:
        cost = sum(row[5] for row in pinned)
        over = cost - pinned[-1][_NEWLINE] if rule.mode == "text" else cost + REPLY_PRIMING
        if over > rule.limit:
            raise ConfigurationError(
                f"session {key.name!r}: its pinned system prompt alone costs {over} tokens, "
                f"over the limit of {rule.limit}; raise max_token_limit or shorten the prompt"
            )
    return rows


def _window(conn: Connection, rule: Rule, params: Mapping[str, object]) -> Sequence[WindowRow]:
    """The window statement's rows; asked again without its row cap in the
    one case the cap may have cut the window (as many rows as the cap)."""
    cap = row_cap(rule)
    rows = _run(conn, window_select(rule.mode, cap, rule.start_on, rule.include_open), params)
    if sum(not row[PINNED] for row in rows) == cap:
        rows = _run(conn, window_select(rule.mode, None, rule.start_on, rule.include_open), params)
    return rows


def _run(conn: Connection, statement: Any, params: Mapping[str, object]) -> Sequence[WindowRow]:
    rows = direct.execute(conn, statement, params)
    if any(isinstance(row[k], str) for row in rows for k in _JSON):  # SQLite's JSON text
        rows = [
            tuple(
                json.loads(v) if k in _JSON and isinstance(v, str) else v for k, v in enumerate(row)
            )
            for row in rows
        ]
    return cast(Sequence[WindowRow], rows)


def window_messages(rows: Sequence[WindowRow]) -> list[WindowMessage]:
    """The window's rows as messages with their positions and costs."""
    # (Built with tuple.__new__: a load makes one per message, and
    # NamedTuple's own __new__ is Python code.)
    return [
        tuple.__new__(
            WindowMessage,
            (
                row[0],
                row[1],
                Message(row[2], row[3], row[4], row[METADATA], row[_MESSAGE]),
                row[5],
                bool(row[6]),
                bool(row[PINNED]),
                row[_UNIT],
            ),
        )
        for row in rows
    ]


def _window_recounting(
    conn: Connection,
    sid: uuid.UUID,
    rule: Rule,
    counter: TokenCounter,
    prefix_tokens: Mapping[str, int],
) -> Sequence[WindowRow]:
    """The window when the statement has no unpinned rows: counted in
    Python from the newest messages, read newest first in pages that double,
    so that no more are read and counted than the window and one page. The
    statement has none when the session is counted with another encoding
    (the model changed), is being recounted (writes.recount_batch), holds
    only its pinned prompt, or its newest message alone is over the limit.
    The rows are cut by :func:`tokenmem.window.fit_units`, the reference."""
    s, m = SESSIONS.c, MESSAGES.c
    found = conn.execute(
        select(
            s.encoding,
            s.start_position,
            s.next_position,
            s.pinned_first,
            s.pinned_last,
            s.open_position,
        ).where(s.id == sid)
    ).first()
    if found is None or found.encoding is None or found.next_position == found.start_position:
        return []  # no session, or nothing since it was cleared
    columns = (m.position, m.turn, m.role, m.content, m.name, m.unit, m.message, m.metadata)
    pin = (-1, -1)
    if found.pinned_first is not None and found.pinned_first >= found.start_position:
        pin = (found.pinned_first, found.pinned_last)

    def row_of(row: Any, pinned: int) -> tuple[WindowRow, int]:
        counts = count_message(counter, row.role, row.content, row.name, row.message)
        cost = rule.cost(row.role, counts, prefix_tokens)
        unit = row.position if row.unit is None else row.unit
        made = (
            *row[:5],
            cost,
            True,
            pinned,
            unit,
            row.message,
            counts.newline_tokens,
            row.metadata,
        )
        return cast(WindowRow, made), counts.newline_tokens

    pinned = [
        row_of(row, 1)[0]
        for row in conn.execute(
            select(*columns)
            .where(m.session_id == sid, m.position.between(*pin))
            .order_by(m.position)
        )
    ]
    rest = rule.budget(None) - sum(row[5] for row in pinned)
    newer_first: list[WindowRow] = []
    # (a unit still waiting for tool answers is not sent, unless the rule asks
    # for it: the window ends before it)
    open_at = None if rule.include_open else found.open_position
    before = found.next_position if open_at is None else open_at
    total, page = 0, 16
    while total <= rest:
        got = conn.execute(
            select(*columns)
            .where(
                m.session_id == sid,
                m.position >= found.start_position,
                m.position < before,
                ~m.position.between(*pin),
            )
            .order_by(m.position.desc())
            .limit(page)
        ).all()
        for row in got:
            made, newline = row_of(row, 0)
            if not newer_first and rule.mode == "text":  # the newest line is joined to nothing
                rest += newline
            newer_first.append(made)
            total += made[5]
            if total > rest:
                break
        if len(got) < page:
            break
        before, page = got[-1].position, page * 2
    rows = newer_first[::-1]
    start = fit_units([(r[0], r[_UNIT], r[2], r[5]) for r in rows], rest, rule.start_on)
    return [*pinned, *(r for r in rows[start:] if r[_UNIT] >= 0)]  # (orphans: never sent)


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
    MESSAGES.c.message,
    MESSAGES.c.digest,
)


def history_page(
    conn: Connection,
    key: SessionKey,
    after: int,
    limit: int,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[StoredMessage]:
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
    rows = conn.execute(select(*_HISTORY).where(*where).order_by(m.position).limit(limit)).all()
    if not rows:
        found = conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == key.id)).first()
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
            openai=message,
            digest=digest,
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
            message,
            digest,
        ) in rows
    ]


_SESSION = (
    SESSIONS.c.owner_id,
    SESSIONS.c.name,
    SESSIONS.c.next_position,
    SESSIONS.c.created_at,
    SESSIONS.c.updated_at,
    SESSIONS.c.encoding,
    SESSIONS.c.next_turn,
    SESSIONS.c.start_position,
    SESSIONS.c.metadata,
)


def _tail_statement() -> Any:
    m, s = MESSAGES.c, SESSIONS.c
    sid = bindparam("sid", type_=m.session_id.type)
    start = select(s.start_position).where(s.id == sid).scalar_subquery()
    return (
        select(m.role, m.content, m.name, m.message)
        .where(m.session_id == sid, m.position >= start)
        .order_by(m.position.desc())
        .limit(bindparam("n", type_=BigInteger))
    )


_TAIL = _tail_statement()  # built once


def tail(conn: Connection, key: SessionKey, limit: int) -> list[Message]:
    """The session's newest ``limit`` messages since its last clear, oldest
    first — all of them, exactly as stored, units cut or open (the Agents
    SDK's ``get_items(limit)``); none when the session does not exist."""
    rows = conn.execute(_TAIL, {"sid": key.id, "n": limit}).all()
    return [Message(r.role, r.content, r.name, openai=r.message) for r in reversed(rows)]


def encoding_of(conn: Connection, key: SessionKey) -> str | None:
    """The encoding the session's messages are counted with (None: no session)."""
    return conn.execute(select(SESSIONS.c.encoding).where(SESSIONS.c.id == key.id)).scalar()


def session(conn: Connection, key: SessionKey) -> SessionInfo:
    """One session's summary; :class:`SessionNotFound` if there is none."""
    row = conn.execute(select(*_SESSION).where(SESSIONS.c.id == key.id)).first()
    if row is None:
        raise SessionNotFound(key.name)
    return SessionInfo(*row)


def sessions(conn: Connection, owner: str) -> list[SessionInfo]:
    """The owner's sessions, by name."""
    s = SESSIONS.c
    rows = conn.execute(select(*_SESSION).where(s.owner_id == owner).order_by(s.name)).all()
    return [SessionInfo(*r) for r in rows]


def messages_between(conn: Connection, key: SessionKey, first: int, last: int) -> list[Message]:
    """Messages ``first`` to ``last`` (positions), all of them or :class:`SessionNotFound`."""
    m = MESSAGES.c
    rows = conn.execute(
        select(m.position, m.role, m.content, m.name, m.message)
        .where(m.session_id == key.id, m.position.between(first, last))
        .order_by(m.position)
    ).all()
    if [r.position for r in rows] != list(range(first, last + 1)):
        raise SessionNotFound(f"{key.name}: messages {first}..{last} (pruned or erased)")
    return [Message(r.role, r.content, r.name, openai=r.message) for r in rows]


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
    # Messages counted with another encoding than the session's: a recount
    # to it is under way (or was abandoned halfway).
    recounting: int = 0


def session_stats(conn: Connection, owner: str | None) -> list[SessionStats]:
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
            func.count(case((m.encoding != s.encoding, m.position))),
        )
        .select_from(SESSIONS.outerjoin(MESSAGES, m.session_id == s.id))
        .group_by(s.id, s.owner_id, s.name, s.encoding, s.created_at, s.updated_at)
        .order_by(s.owner_id, s.name)
    )
    if owner is not None:
        query = query.where(s.owner_id == owner)
    return [SessionStats(*r) for r in conn.execute(query).all()]


def session_page(
    conn: Connection,
    owner: str | None,
    after: tuple[str, str] | None = None,
    limit: int = 50,
    search: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[SessionStats]:
    """Up to ``limit`` sessions of ``owner`` (all owners if None) after the
    ``(owner_id, session_id)`` ``after``, by owner and name (keyset paging:
    no OFFSET), whose id contains ``search`` and whose last activity is in
    ``[since, until)``, each with its message count and tokens — summed for
    this page's sessions only, so a page costs what its sessions hold, not
    what the database does."""
    s, m = SESSIONS.c, MESSAGES.c
    query = select(s.id, s.owner_id, s.name, s.encoding, s.created_at, s.updated_at)
    if owner is not None:
        query = query.where(s.owner_id == owner)
    if after is not None:
        query = query.where(tuple_(s.owner_id, s.name) > tuple_(*after))
    if search:
        query = query.where(s.name.contains(search, autoescape=True))
    if since is not None:
        query = query.where(s.updated_at >= since)
    if until is not None:
        query = query.where(s.updated_at < until)
    found = conn.execute(query.order_by(s.owner_id, s.name).limit(limit)).all()
    totals: dict[Any, tuple[int, int]] = {}
    if found:
        sums = select(m.session_id, func.count(), func.coalesce(func.sum(m.text_tokens), 0))
        sums = sums.where(m.session_id.in_([row.id for row in found])).group_by(m.session_id)
        totals = {sid: (int(n), int(tokens)) for sid, n, tokens in conn.execute(sums)}
    return [
        SessionStats(
            row.owner_id,
            row.name,
            *totals.get(row.id, (0, 0)),
            row.encoding,
            row.created_at,
            row.updated_at,
        )
        for row in found
    ]


def count(conn: Connection, owner: str | None = None) -> int:
    """How many messages are stored: of ``owner``'s sessions, or of all."""
    query = select(func.count()).select_from(MESSAGES)
    if owner is not None:
        ids = select(SESSIONS.c.id).where(SESSIONS.c.owner_id == owner).scalar_subquery()
        query = query.where(MESSAGES.c.session_id.in_(ids))
    return int(conn.execute(query).scalar_one())
