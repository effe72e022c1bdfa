"""Moving conversations in and out: JSONL export/import, LangChain's
``SQLChatMessageHistory`` tables, and recounting tokens for another encoding.

Exports and recounts stream, page by page; an import holds one session's
records at a time. Imports are idempotent: records keep their positions and
those a session already holds are skipped, so importing twice adds nothing
and an interrupted import resumes::

    with open("backup.jsonl", "w") as out:
        export_jsonl(store, out)                   # every session of every owner
    with open("backup.jsonl") as src:
        import_jsonl(other_store, src, TokenCounter("o200k_base"))
    import_langchain(store, "sqlite:///chat.db", TokenCounter("o200k_base"))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import MetaData, Table, create_engine, make_url, select
from sqlalchemy.exc import SQLAlchemyError

from .errors import InvalidInputError, SessionNotFound, StoreError
from .messages import StoredMessage
from .ops import SessionKey
from .store import Store, parse_url
from .tokens import TokenCounter

__all__ = [
    "ImportResult",
    "export_jsonl",
    "import_jsonl",
    "import_langchain",
    "recount",
    "to_record",
]

Progress = Callable[[int], None]
_BATCH = 500


@dataclass(frozen=True)
class ImportResult:
    sessions: int
    imported: int
    skipped: int


def to_record(owner: str, session_id: str, m: StoredMessage) -> dict[str, Any]:
    """A stored message as one JSONL record (the export format; the token
    counts are information: an import counts again)."""
    return {
        "owner": owner,
        "session_id": session_id,
        "position": m.position,
        "turn": m.turn,
        "role": m.type,
        "content": m.content,
        "name": m.name,
        "metadata": m.metadata,
        "created_at": m.created_at.isoformat() if m.created_at else None,
        "encoding": m.encoding,
        "text_tokens": m.text_tokens,
        "chat_tokens": m.chat_tokens,
    }


def export_jsonl(
    store: Store,
    out: IO[str],
    *,
    owner: str | None = None,
    sessions: Sequence[str] = (),
    progress: Progress | None = None,
) -> int:
    """Write messages as JSON lines (one message each, in session order):
    the named ``sessions`` of ``owner``, or every session (of ``owner``, or of
    all owners when it is None). Returns how many lines were written."""
    if sessions:
        keys = [SessionKey.of(s, owner or "") for s in sessions]
    else:
        keys = [
            SessionKey(s.owner_id, s.session_id)
            for s in store.session_stats(owner=owner, all_owners=owner is None and not store.scoped)
        ]
    written = 0
    for key in keys:
        for m in store.history(key.name, owner=key.owner):
            out.write(json.dumps(to_record(key.owner, key.name, m), ensure_ascii=False) + "\n")
            written += 1
            if progress and written % _BATCH == 0:
                progress(_BATCH)
    if progress:
        progress(written % _BATCH)
    return written


def _parse_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not {"session_id", "role", "content"} <= record.keys():
            raise InvalidInputError(f"line {number}: needs session_id, role and content")
        record["_line"] = number
        yield record


def _message(record: dict[str, Any]) -> StoredMessage:
    created = record.get("created_at")
    try:
        created_at = datetime.fromisoformat(created) if created else None
    except (TypeError, ValueError):
        raise InvalidInputError(f"line {record['_line']}: bad created_at {created!r}") from None
    if created_at is not None and created_at.tzinfo is None:
        raise InvalidInputError(f"line {record['_line']}: created_at needs a timezone")
    return StoredMessage(
        type=record["role"],
        content=record["content"],
        name=record.get("name"),
        metadata=record.get("metadata"),
        created_at=created_at,
    )


def _turns(records: list[dict[str, Any]]) -> list[list[StoredMessage]]:
    """Group consecutive records into turns: by their ``turn`` field when
    present, else a human message and the AI reply after it form one."""
    turns: list[list[StoredMessage]] = []
    for i, record in enumerate(records):
        message = _message(record)
        if i and "turn" in record:
            same = record["turn"] == records[i - 1].get("turn")
        else:
            same = bool(turns) and message.type == "ai" and turns[-1][-1].type == "human"
        if same:
            turns[-1].append(message)
        else:
            turns.append([message])
    return turns


def _next_position(store: Store, key: SessionKey) -> int:
    try:
        return store.session(key.name, owner=key.owner).messages
    except SessionNotFound:
        return 0


def _import_session(
    store: Store, key: SessionKey, records: list[dict[str, Any]], counter: TokenCounter
) -> tuple[int, int]:
    """Append the records the session does not hold yet; (imported, skipped).

    Records with a ``position`` keep it (the session's counter is moved up to
    the first one, leaving a gap where the source was pruned) and are skipped
    when the session is already past it; records without one are skipped by
    count."""
    have = _next_position(store, key)
    if all(isinstance(r.get("position"), int) for r in records):
        fresh = [r for r in records if r["position"] >= have]
        if fresh and fresh[0]["position"] > have:
            store.align(
                key.name, fresh[0]["position"], int(fresh[0].get("turn") or 0), owner=key.owner
            )
    else:
        fresh = records[have:]
    if not fresh:
        return 0, len(records)
    written = store.append_turns(key.name, _turns(fresh), counter, owner=key.owner)
    return written, len(records) - len(fresh)


def import_jsonl(
    store: Store,
    lines: Iterable[str],
    counter: TokenCounter,
    *,
    progress: Progress | None = None,
) -> ImportResult:
    """Import JSON lines as written by :func:`export_jsonl` (``owner`` and
    ``position`` optional; lines of one session must be consecutive and in
    order). Idempotent: messages a session already holds are skipped."""
    sessions = imported = skipped = 0
    batch: list[dict[str, Any]] = []
    current: SessionKey | None = None

    def flush() -> None:
        nonlocal sessions, imported, skipped
        if current is not None and batch:
            done, passed = _import_session(store, current, batch, counter)
            sessions, imported, skipped = sessions + 1, imported + done, skipped + passed
            if progress:
                progress(len(batch))

    for record in _parse_lines(lines):
        key = SessionKey.of(record["session_id"], record.get("owner") or "")
        if key != current:
            flush()
            current, batch = key, []
        batch.append(record)
    flush()
    return ImportResult(sessions, imported, skipped)


_LC_TYPES = {"human": "human", "ai": "ai", "system": "system"}


def import_langchain(
    store: Store,
    url: str,
    counter: TokenCounter,
    *,
    table: str = "message_store",
    owner: str = "",
    progress: Progress | None = None,
) -> ImportResult:
    """Import LangChain's ``SQLChatMessageHistory`` table (``id``,
    ``session_id``, ``message``: the JSON of a message dict, ``{"type": ...,
    "data": {"content": ...}}``) from any SQLAlchemy URL, in ``id`` order.
    Idempotent, like :func:`import_jsonl`."""
    engine = create_engine(parse_url(url))
    try:
        source = Table(table, MetaData(), autoload_with=engine)
        c = source.c
        records_by_session: dict[str, list[dict[str, Any]]] = {}
        with engine.connect() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=_BATCH).execute(
                select(c.id, c.session_id, c.message).order_by(c.session_id, c.id)
            )
            result = ImportResult(0, 0, 0)
            for row_id, session_id, raw in rows:
                records = records_by_session.setdefault(str(session_id), [])
                records.append(_langchain_record(row_id, session_id, raw))
                if len(records_by_session) > 1:  # a session ended: import it
                    done_id, done = next(iter(records_by_session.items()))
                    result = _add(result, store, done_id, done, owner, counter, progress)
                    del records_by_session[done_id]
            for session_id, records in records_by_session.items():
                result = _add(result, store, session_id, records, owner, counter, progress)
            return result
    except SQLAlchemyError as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        raise StoreError(f"cannot read {table!r} from {shown}: {exc}") from exc
    finally:
        engine.dispose()


def _langchain_record(row_id: int, session_id: object, raw: object) -> dict[str, Any]:
    try:
        message: Any = json.loads(raw) if isinstance(raw, str | bytes) else raw
        kind, data = message["type"], message["data"]
        role = _LC_TYPES[kind]
    except (ValueError, KeyError, TypeError):
        raise InvalidInputError(
            f"message_store row {row_id} (session {session_id!r}): not a human, ai or "
            "system message in LangChain's format"
        ) from None
    return {
        "session_id": str(session_id),
        "role": role,
        "content": data.get("content"),
        "name": data.get("name"),
        "metadata": {"langchain_id": row_id},
        "_line": row_id,
    }


def _add(
    result: ImportResult,
    store: Store,
    session_id: str,
    records: list[dict[str, Any]],
    owner: str,
    counter: TokenCounter,
    progress: Progress | None,
) -> ImportResult:
    done, passed = _import_session(store, SessionKey.of(session_id, owner), records, counter)
    if progress:
        progress(len(records))
    return ImportResult(result.sessions + 1, result.imported + done, result.skipped + passed)


def recount(
    store: Store,
    counter: TokenCounter | None,
    *,
    owner: str | None = None,
    session: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Count every message again with ``counter``'s encoding, one session
    per transaction, skipping sessions already counted with it (so an
    interrupted run resumes where it stopped) unless they hold messages
    written before migration 0003 counted newlines. With ``counter=None``,
    only fill those in, each session with its own encoding. Returns sessions
    recounted."""
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
        if use is not None and (info.encoding not in (None, use.encoding_name) or info.uncounted):
            store.recount(info.session_id, use, owner=info.owner_id)
            done += 1
        if progress:
            progress(info.messages)
    return done
