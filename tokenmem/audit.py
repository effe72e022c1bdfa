"""The turn audit log: every model call a chain makes, and the exact prompt
it sent, rebuilt from the stored history.

A call that succeeded is recorded in the same transaction that saves its
exchange; a failed call is recorded alone, and saves nothing::

    for t in store.turns("chat-1"):
        print(t.seq, t.outcome, t.window_first, t.window_last, t.prompt_tokens)
    store.rebuild_prompt("chat-1", seq=3)   # the messages (or string) sent

Each call keeps the prompt tokens counted locally beside the ones the API
reported (``usage.prompt_tokens``); :func:`prompt_ratio` and
:func:`usage_by_model` show how far apart they are, per call and per model::

    for u in usage_by_model(store.turns("chat-1")):
        print(u.model, u.reported, u.median_ratio)
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, insert, select, update

from .digest import turn_digest
from .errors import SessionNotFound, TurnNotFound
from .messages import Message
from .models import MESSAGES, SESSIONS, SUMMARIES, TURNS, utcnow
from .prompt import PromptTemplate
from .reads import messages_between
from .validate import PreparedAppend, SessionKey
from .window import get_buffer_string
from .writes import append, session_upsert

__all__ = [
    "ModelUsage",
    "TurnRecord",
    "build_prompt",
    "prompt_ratio",
    "rebuild",
    "record_turn",
    "turn",
    "turns",
    "usage_by_model",
]


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
    # The session's pinned prompt it sent first (positions), and the summary
    # of older messages it sent (tokenmem_summaries.seq).
    pinned_first: int | None = None
    pinned_last: int | None = None
    summary_seq: int | None = None


_FIELDS = [f.name for f in dataclasses.fields(TurnRecord)]


def build_prompt(
    api: Literal["chat", "completions"],
    template: PromptTemplate,
    window: list[Message],
    input: str,
    human_prefix: str,
    ai_prefix: str,
    pinned: int = 0,
) -> list[dict[str, Any]] | str:
    """The prompt a chain sends: used both to send it and to rebuild it.
    ``window`` starts with ``pinned`` messages, the session's pinned prompt
    (sent instead of the template's instructions)."""
    if api == "chat":
        return template.render_chat(window, input, pinned=pinned)
    return template.render_text(get_buffer_string(window, human_prefix, ai_prefix), input)


def rebuild(
    record: TurnRecord, window: list[Message], pinned: int = 0
) -> list[dict[str, Any]] | str:
    """The prompt ``record``'s call sent, from its window's stored messages
    (the first ``pinned`` of them its pinned prompt, and its summary among
    them: :func:`turn`)."""
    template = PromptTemplate(record.template or "{history}{input}", system=record.system)
    return build_prompt(
        record.api,
        template,
        window,
        record.input,
        record.human_prefix,
        record.ai_prefix,
        pinned,
    )


def _bump_call(conn: Connection, key: SessionKey) -> tuple[int, str]:
    """Reserve the session's next call number (creating the session if
    needed); return it and the digest of the session's newest turn."""
    s, now = SESSIONS.c, utcnow()
    stmt = session_upsert(
        conn.dialect.name,
        {
            "id": key.id,
            "owner_id": key.owner,
            "name": key.name,
            "next_call": 1,
            "created_at": now,
            "updated_at": now,
        },
        {"next_call": s.next_call + 1, "updated_at": now},
    )
    next_call, head = conn.execute(stmt.returning(s.next_call, s.turns_head_digest)).one()
    return int(next_call) - 1, head or ""


def _newest_sent(conn: Connection, key: SessionKey, record: TurnRecord) -> str | None:
    """The digest of the newest message ``record``'s call sent."""
    sent = [p for p in (record.window_last, record.pinned_last) if p is not None]
    if not sent:
        return None
    m = MESSAGES.c
    found: str | None = conn.execute(
        select(m.digest).where(m.session_id == key.id, m.position == max(sent))
    ).scalar()
    return found


def record_turn(
    conn: Connection, key: SessionKey, record: TurnRecord, exchange: PreparedAppend | None
) -> tuple[TurnRecord, str | None]:
    """Save ``exchange`` (if any) and record the call, in the caller's
    transaction. Returns the record and the encoding the exchange was
    counted with: the session's (:func:`tokenmem.writes.append`)."""
    encoding = None
    if exchange is not None:
        stored = append(conn, exchange)
        record = dataclasses.replace(record, turn=stored[0].turn)
        encoding = stored[0].encoding
    seq, head = _bump_call(conn, key)
    record = dataclasses.replace(record, seq=seq, created_at=utcnow())
    row = {**dataclasses.asdict(record), "window_digest": _newest_sent(conn, key, record)}
    row["digest"] = turn_digest(row, head)
    conn.execute(insert(TURNS).values(session_id=key.id, **row))
    conn.execute(
        update(SESSIONS).where(SESSIONS.c.id == key.id).values(turns_head_digest=row["digest"])
    )
    return record, encoding


def turns(
    conn: Connection,
    key: SessionKey,
    seq: int | None = None,
    *,
    after: int = -1,
    limit: int | None = None,
) -> list[TurnRecord]:
    """The session's recorded calls (or the one numbered ``seq``), oldest
    first; ``after``/``limit``: a page of them, those above seq ``after``
    (keyset paging, as :func:`tokenmem.reads.history_page`)."""
    t = TURNS.c
    query = select(*(t[name] for name in _FIELDS)).where(t.session_id == key.id, t.seq > after)
    if seq is not None:
        query = query.where(t.seq == seq)
    rows = conn.execute(query.order_by(t.seq).limit(limit)).all()
    if not rows:
        found = conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == key.id)).first()
        if found is None:
            raise SessionNotFound(key.name)
        if seq is not None:
            raise TurnNotFound(key.name, seq)
    return [TurnRecord(*row) for row in rows]


def turn(conn: Connection, key: SessionKey, seq: int) -> tuple[TurnRecord, list[Message], int]:
    """One recorded call, the messages it sent as history — its pinned
    prompt, its summary (a system message), its window — and how many of
    them are the pinned prompt."""
    (record,) = turns(conn, key, seq)
    pinned: list[Message] = []
    if record.pinned_first is not None and record.pinned_last is not None:
        pinned = messages_between(conn, key, record.pinned_first, record.pinned_last)
    summary: list[Message] = []
    if record.summary_seq is not None:
        content = conn.execute(
            select(SUMMARIES.c.content).where(
                SUMMARIES.c.session_id == key.id, SUMMARIES.c.seq == record.summary_seq
            )
        ).scalar()
        if content is None:
            raise SessionNotFound(f"{key.name}: summary {record.summary_seq} (pruned or erased)")
        summary = [Message("system", content)]
    window: list[Message] = []
    if record.window_first is not None and record.window_last is not None:
        window = messages_between(conn, key, record.window_first, record.window_last)
    return record, [*pinned, *summary, *window], len(pinned)


# --- local counts against the API's ---------------------------------------------


def prompt_ratio(record: TurnRecord) -> float | None:
    """The API's reported prompt tokens over the locally counted ones (1.0:
    they agree; above: the API counted more), or None when the call has no
    reported usage (a failed call, a server that sends none)."""
    if record.api_prompt_tokens is None or record.prompt_tokens <= 0:
        return None
    return record.api_prompt_tokens / record.prompt_tokens


@dataclass(frozen=True)
class ModelUsage:
    """How one model's prompts were counted: ``calls`` recorded, ``reported``
    of them with the API's usage, and :func:`prompt_ratio` over those —
    median, lowest, highest (None when none reported)."""

    model: str
    calls: int
    reported: int
    median_ratio: float | None
    min_ratio: float | None
    max_ratio: float | None


def usage_by_model(records: Iterable[TurnRecord]) -> list[ModelUsage]:
    """``records`` (one session's :meth:`Store.turns`, or many sessions')
    summed up per model, by model name."""
    calls: dict[str, int] = {}
    ratios: dict[str, list[float]] = {}
    for record in records:
        calls[record.model] = calls.get(record.model, 0) + 1
        ratio = prompt_ratio(record)
        if ratio is not None:
            ratios.setdefault(record.model, []).append(ratio)
    made = []
    for model in sorted(calls):
        got = ratios.get(model, [])
        made.append(
            ModelUsage(
                model=model,
                calls=calls[model],
                reported=len(got),
                median_ratio=statistics.median(got) if got else None,
                min_ratio=min(got, default=None),
                max_ratio=max(got, default=None),
            )
        )
    return made
