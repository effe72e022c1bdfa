"""The running summaries of :class:`~tokenmem.summary.ConversationSummaryBufferMemory`:
plain functions over a ``Connection``, run by a store in one transaction
(:meth:`tokenmem.Store.run`), as :mod:`tokenmem.reads` and
:mod:`tokenmem.writes` are.

A row of ``tokenmem_summaries`` replaces the messages ``first_position`` to
``last_position``: those that fell out of the window since the row before
it. Its text condenses them and the previous summary, so the newest row
stands for every message from where the running summary started (the
window's start, where ``clear()`` put it) to its ``last_position``. Rows are
never changed; each starts right after the previous one, so their ranges are
contiguous and never overlap. Making one takes three steps, and no
transaction is open while the model works::

    with engine.begin() as conn:
        todo = pending(conn, key, rule, counter)     # None: nothing to summarize
    text = ...  # the model, given todo.previous and todo.messages
    with engine.begin() as conn:
        seq = add(conn, key, todo, text, counts, "o200k_base", "gpt-4o-mini")  # None: lost a race

A summary is sent, as a system message or the line ``"System: {content}"``,
when it fits in the window's limit with room to spare; the window is then
the newest messages that fit in what it leaves (:func:`load`).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import BindParameter, Connection, bindparam, func, insert, select, update

from .errors import ConfigurationError
from .messages import Message
from .models import MESSAGES, SESSIONS, SUMMARIES, TURNS, utcnow
from .reads import PINNED, WindowRow, window_rows
from .tokens import TokenCounter
from .validate import SessionKey
from .window import REPLY_PRIMING, Counts, Rule, count_message

__all__ = [
    "BATCH",
    "Loaded",
    "Pending",
    "Summary",
    "add",
    "current",
    "load",
    "pending",
    "summaries",
]

logger = logging.getLogger("tokenmem.summary")

BATCH = 100  # the most messages one summary replaces (a backlog takes several)


@dataclass(frozen=True)
class Summary:
    """Row ``seq`` of a session's summaries: it replaces the messages
    ``first_position`` to ``last_position`` (the summaries before it, the
    older ones). ``tokens``: what it costs under the rule it was read for —
    the line ``"System: {content}"`` with its newline, or a system message
    (3 + role + content) — from the counts stored with it, or counted again
    when the memory reading it counts with another encoding."""

    seq: int
    first_position: int
    last_position: int
    content: str
    tokens: int
    model: str
    created_at: datetime


@dataclass(frozen=True)
class Pending:
    """What fell out of the window and no summary replaces yet, as far as the
    next summary takes it: the positions ``first`` to ``last`` (with any
    pinned prompt or pruned messages among them: not summarized), the
    ``messages`` to summarize, and the ``previous`` summary to add them to
    (None: a new running summary)."""

    previous: Summary | None
    first: int
    last: int
    messages: list[Message]


class Loaded(NamedTuple):
    """A load: the summary sent (None: none, or it did not fit), the window
    statement's rows, and the rule they were cut by (the limit less the
    summary's cost)."""

    summary: Summary | None
    rows: Sequence[WindowRow]
    rule: Rule


_S = SUMMARIES.c
_SID: BindParameter[uuid.UUID] = bindparam("sid")
_COLUMNS = (
    _S.seq,
    _S.first_position,
    _S.last_position,
    _S.content,
    _S.model,
    _S.created_at,
    _S.encoding,
    _S.text_tokens,
    _S.chat_tokens,
    _S.newline_tokens,
)
_START = select(SESSIONS.c.start_position).where(SESSIONS.c.id == _SID).scalar_subquery()
# The newest summary and the session's window start: it is current when it
# starts at or after the window (clear() moved the start past older ones).
# One probe of the primary key, however many summaries the session has.
_NEWEST = (
    select(*_COLUMNS, _START.label("start"))
    .where(_S.session_id == _SID)
    .order_by(_S.seq.desc())
    .limit(1)
)
_ALL = select(*_COLUMNS).where(_S.session_id == _SID).order_by(_S.seq)
_SESSION = select(
    SESSIONS.c.start_position,
    SESSIONS.c.next_position,
    SESSIONS.c.pinned_first,
    SESSIONS.c.pinned_last,
).where(SESSIONS.c.id == _SID)
_M = MESSAGES.c
# The messages of first..last but the pinned prompt's, oldest first; one
# more than a batch, to tell whether the batch took them all.
_FELL_OUT = (
    select(
        _M.position,
        _M.role,
        _M.content,
        _M.name,
        _M.message,
        _M.text_tokens,
        func.coalesce(_M.newline_tokens, 1).label("newline"),
    )
    .where(
        _M.session_id == _SID,
        _M.position.between(bindparam("first"), bindparam("last")),
        ~_M.position.between(bindparam("pin_first"), bindparam("pin_last")),
    )
    .order_by(_M.position)
    .limit(BATCH + 1)
)
# Takes the session's row lock (on SQLite, the database's write lock) until
# the commit, as an append does: summaries are numbered under it.
_LOCK = (
    update(SESSIONS)
    .where(SESSIONS.c.id == _SID)
    .values(updated_at=SESSIONS.c.updated_at)
    .returning(SESSIONS.c.start_position, SESSIONS.c.next_position)
)
_LAST_SENT = select(func.max(TURNS.c.summary_seq)).where(TURNS.c.session_id == _SID)
_INSERT = insert(SUMMARIES)


def _summary(row: Any, rule: Rule, counter: TokenCounter) -> Summary:
    counts = (
        Counts(row.text_tokens, row.chat_tokens, row.newline_tokens)
        if row.encoding == counter.encoding_name
        else count_message(counter, "system", row.content, None)  # the model changed
    )
    tokens = rule.cost("system", counts, rule.prefix_tokens(counter))
    return Summary(
        seq=row.seq,
        first_position=row.first_position,
        last_position=row.last_position,
        content=row.content,
        tokens=tokens,
        model=row.model,
        created_at=row.created_at,
    )


def _current(conn: Connection, key: SessionKey) -> Any:
    """The session's current summary row (None: none since the window's start)."""
    row = conn.execute(_NEWEST, {"sid": key.id}).first()
    return row if row is not None and row.first_position >= row.start else None


def current(conn: Connection, key: SessionKey, rule: Rule, counter: TokenCounter) -> Summary | None:
    """The session's current summary, its cost under ``rule`` (None: none
    since the window's start), whether or not it fits."""
    row = _current(conn, key)
    return None if row is None else _summary(row, rule, counter)


def summaries(
    conn: Connection, key: SessionKey, rule: Rule, counter: TokenCounter
) -> list[Summary]:
    """Every summary of the session, oldest first (the audit: which messages
    each replaced), their costs under ``rule``."""
    return [_summary(row, rule, counter) for row in conn.execute(_ALL, {"sid": key.id})]


def load(conn: Connection, key: SessionKey, rule: Rule, counter: TokenCounter) -> Loaded:
    """The session's current summary and the window that goes with it: the
    pinned prompt and the newest messages that fit in ``rule.limit`` less
    the summary's cost (the window statement, once). The summary is left
    out, and the window gets the whole limit, when it does not fit with room
    to spare (its cost, plus the reply priming as messages, is not below
    the limit), or when the pinned prompt does not fit beside it: the pinned
    prompt goes first. Both are logged."""
    loaded, left_out = _load(conn, key, rule, counter, _current(conn, key))
    if left_out:
        logger.warning("session %r: %s", key.name, left_out)
    return loaded


def _load(
    conn: Connection, key: SessionKey, rule: Rule, counter: TokenCounter, row: Any
) -> tuple[Loaded, str | None]:
    """:func:`load`, and why the summary was left out (None: it was not)."""
    if row is None:
        return Loaded(None, window_rows(conn, key, rule, counter), rule), None
    summary = _summary(row, rule, counter)
    room = rule.limit - summary.tokens - (REPLY_PRIMING if rule.mode == "messages" else 0)
    if room > 0:
        narrower = dataclasses.replace(rule, limit=rule.limit - summary.tokens)
        try:
            rows = window_rows(conn, key, narrower, counter)
        except ConfigurationError:  # the pinned prompt alone is over what is left
            why = "the pinned prompt does not fit beside it"
        else:
            # Nothing the summary replaced (a memory with a higher limit than
            # the one it was made for would reach back into its range).
            after = summary.last_position
            rows = [row for row in rows if row[PINNED] or row[0] > after]
            return Loaded(summary, rows, narrower), None
    else:
        why = f"it costs {summary.tokens} tokens of the {rule.limit}"
    loaded = Loaded(None, window_rows(conn, key, rule, counter), rule)
    return loaded, f"summary {summary.seq} left out: {why}"


def pending(
    conn: Connection,
    key: SessionKey,
    rule: Rule,
    counter: TokenCounter,
    budget: int | None = None,
) -> Pending | None:
    """What the next summary replaces: the messages older than the window
    (as :func:`load` cuts it) that no summary replaces yet, from the current
    summary's end (or the window's start) on; at most :data:`BATCH` of them
    and, when ``budget`` is given, those whose lines (``"{prefix}:
    {content}"``) fit in it less the previous summary's tokens (always one
    at least). None when there are none (the pinned prompt is never
    summarized: it is sent as itself)."""
    session = conn.execute(_SESSION, {"sid": key.id}).first()
    if session is None:
        return None
    row = _current(conn, key)
    loaded = _load(conn, key, rule, counter, row)[0]
    window = [r[0] for r in loaded.rows if not r[PINNED]]
    end = window[0] if window else session.next_position  # the window's oldest message
    previous = None if row is None else _summary(row, rule, counter)
    first = session.start_position if previous is None else previous.last_position + 1
    if first >= end:
        return None
    pin = (session.pinned_first, session.pinned_last)
    found = conn.execute(
        _FELL_OUT,
        {
            "sid": key.id,
            "first": first,
            "last": end - 1,
            "pin_first": -1 if pin[0] is None else pin[0],
            "pin_last": -1 if pin[1] is None else pin[1],
        },
    ).all()
    taken = found[:BATCH]
    if budget is not None:
        left = budget - (0 if row is None else row.text_tokens)
        tokens = rule.prefix_tokens(counter)
        for i, m in enumerate(taken):
            left -= tokens[m.role] + m.text_tokens + m.newline
            if left < 0 and i:
                taken = taken[:i]
                break
    if not taken:
        return None
    last = taken[-1].position if len(taken) < len(found) else end - 1
    messages = [Message(m.role, m.content, m.name, openai=m.message) for m in taken]
    return Pending(previous, first, last, messages)


def add(
    conn: Connection,
    key: SessionKey,
    todo: Pending,
    content: str,
    counts: Counts,
    encoding: str,
    model: str,
) -> int | None:
    """Add ``content``, the summary of ``todo`` that ``model`` made (its
    ``counts`` made with ``encoding`` before the transaction), under the
    session's row lock, numbered after the newest; return its ``seq``.
    None, adding nothing, when ``todo`` is no longer what is pending:
    another writer added a summary since (it replaces these messages),
    ``clear()`` moved the window's start, or the session was erased. So no
    two summaries of a session share a number or a message."""
    locked = conn.execute(_LOCK, {"sid": key.id}).first()
    if locked is None:
        return None
    newest = conn.execute(_NEWEST, {"sid": key.id}).first()
    previous = todo.previous
    if previous is None:  # a new running summary, from the window's start
        still = todo.first == locked.start_position and (
            newest is None or newest.first_position < locked.start_position
        )
    else:
        still = (
            newest is not None
            and newest.seq == previous.seq
            and previous.first_position >= locked.start_position
        )
    if not still or todo.last >= locked.next_position:
        return None
    if newest is not None:
        seq = newest.seq + 1
    else:  # none left (pruned, or never made): never reuse a number the turn log holds
        sent = conn.execute(_LAST_SENT, {"sid": key.id}).scalar()
        seq = 0 if sent is None else sent + 1
    conn.execute(
        _INSERT,
        {
            "session_id": key.id,
            "seq": seq,
            "first_position": todo.first,
            "last_position": todo.last,
            "content": content,
            "model": model,
            "encoding": encoding,
            "text_tokens": counts.text_tokens,
            "newline_tokens": counts.newline_tokens,
            "chat_tokens": counts.chat_tokens,
            "created_at": utcnow(),
        },
    )
    return int(seq)
