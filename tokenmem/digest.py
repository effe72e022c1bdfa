"""The tamper-evident history: every message row, and every turn-log row,
carries a SHA-256 digest chaining it to the previous one of its session::

    report = store.verify("chat-1")
    report.ok, report.head_digest          # anchor the head elsewhere
    report.position, report.problem        # where the chain first breaks

A digest is ``sha256(canonical(row) + b"\\n" + previous digest)`` as
lowercase hex; the first row of a session chains to ``""`` (or, after a
prune, to the digest of the last message removed: the session's anchor).
``canonical`` is JSON with sorted keys, no whitespace (``,`` and ``:``), not
ASCII-escaped, encoded as UTF-8; ``created_at`` an ISO string in UTC with
microseconds (``2026-11-29T20:31:45.000123+00:00``); a float with no
fractional part written as an integer (PostgreSQL's jsonb keeps a number, not
its spelling). This encoding is fixed forever: changing it breaks every
stored chain. Token counts are not in it, so a recount never breaks a chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from json.encoder import encode_basestring
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from .errors import SessionNotFound
from .models import MESSAGES, SESSIONS, TURNS
from .validate import SessionKey

__all__ = [
    "MESSAGE_FIELDS",
    "TURN_FIELDS",
    "VERIFY_PAGE",
    "Verified",
    "backfill",
    "chain",
    "message_digest",
    "turn_digest",
    "verify",
]

# The fields of a message row, and of a turn-log row, that its digest covers.
MESSAGE_FIELDS = (
    "position",
    "turn",
    "role",
    "content",
    "name",
    "metadata",
    "message",
    "tool_calls",
    "tool_call_id",
    "created_at",
)
TURN_FIELDS = (
    "seq",
    "created_at",
    "model",
    "api",
    "system",
    "template",
    "human_prefix",
    "ai_prefix",
    "input",
    "window_first",
    "window_last",
    "token_budget",
    "prompt_tokens",
    "api_prompt_tokens",
    "api_completion_tokens",
    "latency_ms",
    "outcome",
    "error_type",
    "error",
    "turn",
    "pinned_first",
    "pinned_last",
    "summary_seq",
    "window_digest",
)
VERIFY_PAGE = 1000  # rows verify reads per statement
_BROKEN = "its digest does not match: changed, or a row before it deleted, inserted or moved"
_SHORT = "the chain ends before the session's head: its newest rows deleted"


_SIMPLE = (str, int, type(None), bool)
# One encoder for every digest: json.dumps with options builds one per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_text = encode_basestring  # a str as that encoder writes it


def _plain(value: Any) -> Any:
    if type(value) in _SIMPLE:
        return value
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def chain(fields: Mapping[Any, Any], names: tuple[str, ...], previous: str) -> str:
    """The digest of a row holding ``fields`` (those in ``names``) after
    the row whose digest is ``previous``."""
    canonical = _ENCODER.encode({name: _plain(fields[name]) for name in names})
    data = canonical.encode("utf-8") + b"\n" + previous.encode("ascii")
    return hashlib.sha256(data).hexdigest()


def message_digest(row: Mapping[str, Any], previous: str) -> str:
    """The digest of a message row (its :data:`MESSAGE_FIELDS`): as
    :func:`chain` gives it, the keys written in their sorted order here
    (an append's hot path; a test keeps the two equal)."""
    text, name = _text, row["name"]
    json_of = _ENCODER.encode
    meta, message, calls, call_id = (
        row["metadata"],
        row["message"],
        row["tool_calls"],
        row["tool_call_id"],
    )
    canonical = "".join(
        (
            '{"content":',
            text(row["content"]),
            ',"created_at":"',
            row["created_at"].astimezone(timezone.utc).isoformat(timespec="microseconds"),
            '","message":',
            "null" if message is None else json_of(_plain(message)),
            ',"metadata":',
            "null" if meta is None else json_of(_plain(meta)),
            ',"name":',
            "null" if name is None else text(name),
            ',"position":',
            str(int(row["position"])),
            ',"role":',
            text(row["role"]),
            ',"tool_call_id":',
            "null" if call_id is None else text(call_id),
            ',"tool_calls":',
            "null" if calls is None else json_of(_plain(calls)),
            ',"turn":',
            str(int(row["turn"])),
            "}",
        )
    )
    data = canonical.encode("utf-8") + b"\n" + previous.encode("ascii")
    return hashlib.sha256(data).hexdigest()


def turn_digest(row: Mapping[str, Any], previous: str) -> str:
    """The digest of a turn-log row (its :data:`TURN_FIELDS`)."""
    return chain(row, TURN_FIELDS, previous)


@dataclass(frozen=True)
class Verified:
    """What :func:`verify` found in one session. ``ok``: both chains are
    intact. Otherwise ``table`` (``"messages"`` or ``"turns"``) and
    ``position`` (a message's position or a turn's seq) name the first row
    where a chain breaks — that row was changed, or a row before it deleted,
    inserted or moved — and ``problem`` says what. ``head_digest`` is the
    digest of the session's newest message (``None`` before the first).
    ``expected_at``: where the digest ``expect_head`` was found (a position)."""

    session: str
    ok: bool
    head_digest: str | None
    turns_head_digest: str | None
    messages: int
    turns: int
    table: str | None = None
    position: int | None = None
    problem: str | None = None
    expected_at: int | None = None


@dataclass(frozen=True)
class _Chain:
    """One chain of a session: its table, key column and fields, where it
    starts (the anchor's key and digest) and where it should end."""

    table: Any
    key: str
    names: tuple[str, ...]
    after: int
    previous: str
    head: str | None
    end: int  # keys from here on were never handed out


def _walk(
    conn: Connection, sid: Any, c: _Chain, page: int, expect: str | None = None
) -> tuple[int, int | None, str | None, int | None]:
    """Walk one chain in pages; return how many rows were checked, the
    first broken row's key and what is wrong with it (``None``: intact),
    and the key of the row whose digest is ``expect`` (if any)."""
    t = c.table.c
    key = t[c.key]
    query = (
        select(*(t[name] for name in c.names), t.digest)
        .where(t.session_id == sid, key > bindparam("after"))
        .order_by(key)
        .limit(page)
    )
    previous, after, checked, found = c.previous, c.after, 0, None
    if expect is not None and expect == previous:
        found = after  # the anchor: the last row a prune removed
    while True:
        rows = conn.execute(query, {"after": after}).mappings().all()
        for row in rows:
            at = int(row[c.key])
            if at >= c.end:
                return checked, at, "a row after the session's newest (inserted)", found
            if row["digest"] is None or chain(row, c.names, previous) != row["digest"]:
                return checked, at, _BROKEN, found
            previous, after, checked = row["digest"], at, checked + 1
            if previous == expect:
                found = at
        if len(rows) < page:
            break
    if previous != (c.head or ""):
        return checked, after + 1, _SHORT, found
    return checked, None, None, found


def verify(
    conn: Connection, key: SessionKey, page: int = VERIFY_PAGE, expect_head: str | None = None
) -> Verified:
    """Walk the session's message chain, then its turn-log chain, ``page``
    rows per statement (constant memory), from each chain's anchor to its
    head. ``expect_head``: a head digest recorded earlier; the history is
    intact only if it is still the digest of a message in the chain (the
    history up to it unchanged). Raises :class:`SessionNotFound`."""
    s = SESSIONS.c
    found = (
        conn.execute(
            select(
                s.head_digest,
                s.anchor_digest,
                s.anchor_position,
                s.next_position,
                s.turns_head_digest,
                s.turns_anchor_digest,
                s.turns_anchor_seq,
                s.next_call,
            ).where(s.id == key.id)
        )
        .mappings()
        .first()
    )
    if found is None:
        raise SessionNotFound(key.name)

    def chain_of(table: Any, key: str, names: tuple[str, ...], prefix: str, end: int) -> _Chain:
        at, anchor = (
            found[f"{prefix}anchor_{key}"],
            found[f"{prefix}anchor_digest"],
        )
        head = found[f"{prefix}head_digest"]
        return _Chain(table, key, names, -1 if at is None else int(at), anchor or "", head, end)

    messages = chain_of(MESSAGES, "position", MESSAGE_FIELDS, "", int(found["next_position"]))
    n, at, problem, expected_at = _walk(conn, key.id, messages, page, expect_head)
    if problem is None and expect_head is not None and expected_at is None:
        problem = f"the expected head {expect_head} is not in the chain: changed, or pruned"
    table, t = "messages", 0
    if problem is None:
        turns = chain_of(TURNS, "seq", TURN_FIELDS, "turns_", int(found["next_call"]))
        table, (t, at, problem, _) = "turns", _walk(conn, key.id, turns, page)
    return Verified(
        key.name,
        problem is None,
        found["head_digest"],
        found["turns_head_digest"],
        messages=n,
        turns=t,
        table=None if problem is None else table,
        position=at,
        problem=problem,
        expected_at=expected_at,
    )


def backfill(conn: Connection, batch: int = VERIFY_PAGE) -> None:
    """Digest every row written before the digests (migration 0006): each
    session's messages, then its turns, in key order, ``batch`` rows per
    statement, and set the session's heads."""
    s = SESSIONS.c
    after = None
    while True:
        query = select(s.id).order_by(s.id).limit(batch)
        if after is not None:
            query = query.where(s.id > after)
        ids = conn.execute(query).scalars().all()
        for sid in ids:
            head = _backfill_chain(conn, MESSAGES, "position", MESSAGE_FIELDS, sid, batch)
            turns_head = _backfill_chain(conn, TURNS, "seq", TURN_FIELDS, sid, batch)
            conn.execute(
                update(SESSIONS)
                .where(s.id == sid)
                .values(head_digest=head, turns_head_digest=turns_head)
            )
        if len(ids) < batch:
            return
        after = ids[-1]


def _backfill_chain(
    conn: Connection, table: Any, key_column: str, names: tuple[str, ...], sid: Any, batch: int
) -> str | None:
    t = table.c
    key = t[key_column]
    cols = [t[name] for name in names]  # an older turn's window_digest is NULL
    query = (
        select(*cols)
        .where(t.session_id == sid, key > bindparam("after"))
        .order_by(key)
        .limit(batch)
    )
    set_digest = (
        update(table)
        .where(t.session_id == bindparam("sid"), key == bindparam("at"))
        .values(digest=bindparam("d"))
    )
    previous, after, head = "", -1, None
    while True:
        rows = conn.execute(query, {"after": after}).mappings().all()
        params = []
        for row in rows:
            previous = chain(row, names, previous)
            after = int(row[key_column])
            params.append({"sid": sid, "at": after, "d": previous})
        if params:
            conn.execute(set_digest, params)
            head = previous
        if len(rows) < batch:
            return head
