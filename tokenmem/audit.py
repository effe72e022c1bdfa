"""The turn audit log: every model call a chain makes, and the exact prompt
it sent, rebuilt from the stored history.

A call that succeeded is recorded in the same transaction that saves its
exchange; a failed call is recorded alone, and saves nothing::

    for t in store.turns("chat-1"):
        print(t.seq, t.outcome, t.window_first, t.window_last, t.prompt_tokens)
    store.rebuild_prompt("chat-1", seq=3)   # the messages (or string) sent
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Insert, insert, select

from .errors import SessionNotFound, TurnNotFound
from .messages import Message
from .models import SESSIONS, TURNS, utcnow
from .ops import Op, PreparedAppend, SessionKey, _insert, append_op, messages_between_op
from .prompt import PromptTemplate
from .window import Rule, get_buffer_string

__all__ = ["TurnRecord", "build_prompt", "rebuild", "record_turn_op", "turn_op", "turns_op"]


@dataclass(frozen=True)
class TurnRecord:
    """One model call. ``seq`` and ``created_at`` are set when it is recorded;
    ``turn`` is the exchange it saved (``None`` when it failed)."""

    model: str
    api: Literal["chat", "completions"]
    system: str | None
    template: str | None
    human_prefix: str
    ai_prefix: str
    input: str
    window_first: int | None
    window_last: int | None
    token_budget: int
    prompt_tokens: int
    latency_ms: float
    outcome: Literal["ok", "error"]
    api_prompt_tokens: int | None = None
    api_completion_tokens: int | None = None
    error_type: str | None = None
    error: str | None = None
    turn: int | None = None
    seq: int | None = None
    created_at: datetime | None = None


_FIELDS = [f.name for f in dataclasses.fields(TurnRecord)]


def build_prompt(
    api: Literal["chat", "completions"],
    template: PromptTemplate,
    window: list[Message],
    input: str,
    human_prefix: str,
    ai_prefix: str,
) -> list[dict[str, str]] | str:
    """The prompt a chain sends: used both to send it and to rebuild it."""
    if api == "chat":
        return template.render_chat(window, input)
    rule = Rule(limit=1, human_prefix=human_prefix, ai_prefix=ai_prefix)
    return template.render_text(get_buffer_string(window, rule), input)


def rebuild(record: TurnRecord, window: list[Message]) -> list[dict[str, str]] | str:
    """The prompt ``record``'s call sent, from its window's stored messages."""
    template = PromptTemplate(record.template or "{history}{input}", system=record.system)
    return build_prompt(
        record.api, template, window, record.input, record.human_prefix, record.ai_prefix
    )


def _bump_call(dialect: str, key: SessionKey) -> Insert:
    """Reserve the next call number of the session (creating it if needed)."""
    s, now = SESSIONS.c, utcnow()
    stmt = _insert(dialect)(SESSIONS).values(
        id=key.id,
        owner_id=key.owner,
        name=key.name,
        encoding=None,
        next_position=0,
        next_turn=0,
        floor_total=0,
        start_position=0,
        start_floor=0,
        next_call=1,
        created_at=now,
        updated_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[s.id], set_={"next_call": s.next_call + 1, "updated_at": now}
    )
    returning: Insert = stmt.returning(s.next_call)
    return returning


def record_turn_op(
    dialect: str, key: SessionKey, record: TurnRecord, exchange: PreparedAppend | None
) -> Op[TurnRecord]:
    """Save ``exchange`` (if any) and record the call, in one transaction."""
    if exchange is not None:
        stored = yield from append_op(dialect, exchange)
        record = dataclasses.replace(record, turn=stored[0].turn)
    seq = (yield _bump_call(dialect, key), None).scalar_one() - 1
    record = dataclasses.replace(record, seq=seq, created_at=utcnow())
    yield insert(TURNS).values(session_id=key.id, **dataclasses.asdict(record)), None
    return record


def turns_op(key: SessionKey, seq: int | None = None) -> Op[list[TurnRecord]]:
    """The session's recorded calls (or the one numbered ``seq``), oldest first."""
    t = TURNS.c
    query = select(*(t[name] for name in _FIELDS)).where(t.session_id == key.id)
    if seq is not None:
        query = query.where(t.seq == seq)
    rows = (yield query.order_by(t.seq), None).all()
    if not rows:
        found = (yield select(SESSIONS.c.id).where(SESSIONS.c.id == key.id), None).first()
        if found is None:
            raise SessionNotFound(key.name)
        if seq is not None:
            raise TurnNotFound(key.name, seq)
    return [TurnRecord(*row) for row in rows]


def turn_op(key: SessionKey, seq: int) -> Op[tuple[TurnRecord, list[Message]]]:
    """One recorded call and the window messages it sent."""
    (record,) = yield from turns_op(key, seq)
    window: list[Message] = []
    if record.window_first is not None and record.window_last is not None:
        window = yield from messages_between_op(key, record.window_first, record.window_last)
    return record, window
