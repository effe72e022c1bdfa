"""What reads the database: plain functions over a ``Connection``, run by a
store in one transaction (:meth:`tokenmem.Store.run`)::

    with engine.connect() as conn:
        rows = window_rows(conn, SessionKey.of("chat-1"), rule, counter)

The window is one statement (:func:`tokenmem.window.window_select`); the
history is read in pages by position.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, case, func, select

from . import direct
from .errors import InvalidInputError, SessionNotFound
from .messages import Message, Role, SessionInfo, StoredMessage
from .models import MESSAGES, SESSIONS
from .tokens import TokenCounter
from .validate import SessionKey
from .window import Rule, count_message, row_cap, window_select

__all__ = [
    "SessionStats",
    "WindowMessage",
    "WindowRow",
    "count",
    "encoding_of",
    "history_page",
    "messages_between",
    "session",
    "session_stats",
    "sessions",
    "window_messages",
    "window_rows",
]


WindowRow = tuple[int, int, Role, str, "str | None", int, bool]
"""A row of the window statement: position, turn, role, content, name,
running (the cost of the row and every newer one), counted (its
newline_tokens were counted at write time)."""


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


def window_rows(
    conn: Connection, key: SessionKey, rule: Rule, counter: TokenCounter
) -> Sequence[WindowRow]:
    """The newest messages that fit ``rule``, oldest first, as the window
    statement's rows (position, turn, role, content, name, running, counted):
    one query. A memory that only renders them needs no more;
    :func:`window_messages` makes them messages."""
    prefix_tokens = rule.prefix_tokens(counter)
    params = rule.params(key.id, counter.encoding_name, prefix_tokens)
    rows = _window(conn, rule, params)
    if not rows:
        rows = _window_recounting(conn, key.id, rule, counter, prefix_tokens)
    return rows


def _window(conn: Connection, rule: Rule, params: Mapping[str, object]) -> Sequence[WindowRow]:
    """The window statement's rows; asked again without its row cap in the
    one case the cap may have cut the window (as many rows as the cap)."""
    cap = row_cap(rule)
    rows = cast(Sequence[WindowRow], direct.execute(conn, window_select(rule.mode, cap), params))
    if len(rows) == cap:
        rows = cast(Sequence[WindowRow], direct.execute(conn, window_select(rule.mode), params))
    return rows


def window_messages(rows: Sequence[WindowRow]) -> list[WindowMessage]:
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
    conn: Connection,
    sid: uuid.UUID,
    rule: Rule,
    counter: TokenCounter,
    prefix_tokens: Mapping[str, int],
) -> Sequence[WindowRow]:
    """The window when the statement has none: counted in Python from the
    newest messages, read newest first in pages that double, so that no more
    are read and counted than the window and one page. The statement has no
    rows when the session is counted with another encoding (the model
    changed), is being recounted (writes.recount_batch), or its newest
    message alone is over the limit."""
    s, m = SESSIONS.c, MESSAGES.c
    found = conn.execute(
        select(s.encoding, s.start_position, s.next_position).where(s.id == sid)
    ).first()
    if found is None or found.encoding is None or found.next_position == found.start_position:
        return []  # no session, or nothing since it was cleared
    rows: list[Any] = []
    costs: list[int] = []
    budget, total, before, page = None, 0, found.next_position, 16
    while budget is None or total <= budget:
        newer_first = conn.execute(
            select(m.position, m.turn, m.role, m.content, m.name)
            .where(m.session_id == sid, m.position >= found.start_position, m.position < before)
            .order_by(m.position.desc())
            .limit(page)
        ).all()
        for row in newer_first:
            counts = count_message(counter, row.role, row.content, row.name)
            if budget is None:  # the newest message's counts set the budget
                budget = rule.budget(counts)
            total += rule.cost(row.role, counts, prefix_tokens)
            if total > budget:
                break
            rows.append(row)
            costs.append(total)
        if len(newer_first) < page:
            break
        before, page = newer_first[-1].position, page * 2
    return [(*row, running, True) for row, running in zip(rows[::-1], costs[::-1], strict=True)]


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
        select(m.position, m.role, m.content, m.name)
        .where(m.session_id == key.id, m.position.between(first, last))
        .order_by(m.position)
    ).all()
    if [r.position for r in rows] != list(range(first, last + 1)):
        raise SessionNotFound(f"{key.name}: messages {first}..{last} (pruned or erased)")
    return [Message(r.role, r.content, r.name) for r in rows]


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


def count(conn: Connection, owner: str | None = None) -> int:
    """How many messages are stored: of ``owner``'s sessions, or of all."""
    query = select(func.count()).select_from(MESSAGES)
    if owner is not None:
        ids = select(SESSIONS.c.id).where(SESSIONS.c.owner_id == owner).scalar_subquery()
        query = query.where(MESSAGES.c.session_id.in_(ids))
    return int(conn.execute(query).scalar_one())
