"""The async store: the same operations as :class:`~tokenmem.store.Store`, on
SQLAlchemy's asyncio engines (aiosqlite; psycopg 3 for PostgreSQL).

Needs the ``async`` extra (``pip install 'tokenmem[async]'``)::

    store = AsyncStore("postgresql+psycopg://127.0.0.1/app")
    await store.upgrade()
    memory = ConversationTokenBufferMemory(store=store, session_id="chat-1")
    await memory.asave_context({"input": "hi"}, {"output": "hello"})
    await memory.aload_memory_variables({})
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.util import greenlet_spawn

from . import migrate
from .audit import TurnRecord, rebuild, record_turn_op, turn_op, turns_op
from .errors import ConfigurationError
from .messages import Message, SessionInfo, StoredMessage
from .models import utcnow
from .ops import (
    Attempt,
    Erased,
    Op,
    PreparedAppend,
    SessionStats,
    WindowMessage,
    align_op,
    append_op,
    batches,
    clear_op,
    count_op,
    erase_op,
    erase_owner_op,
    history_page_op,
    prepare_append,
    prune_op,
    recount_op,
    run,
    session_op,
    session_stats_op,
    sessions_op,
    window_messages,
    window_rows_op,
)
from .store import RETRIES, StoreBase, default_url, retryable, retrying, schema_error, tune
from .tokens import TokenCounter
from .urls import missing_driver, parse_url
from .window import Rule

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["AsyncStore"]

T = TypeVar("T")


def _require_asyncio() -> None:
    """SQLAlchemy's asyncio support needs greenlet: the ``async`` extra."""
    try:
        import sqlalchemy.ext.asyncio  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "AsyncStore needs SQLAlchemy's asyncio support (greenlet) and aiosqlite: "
            "pip install 'tokenmem[async]'"
        ) from exc


def make_async_engine(url: str, **options: Any) -> AsyncEngine:
    """Create an async engine for ``url`` as tokenmem wants it (see
    :func:`~tokenmem.urls.parse_url`); ``options`` go to ``create_async_engine``."""
    _require_asyncio()
    from sqlalchemy.ext.asyncio import create_async_engine

    parsed = parse_url(url, asynchronous=True)
    try:
        engine = create_async_engine(parsed, **options)
    except ImportError as exc:
        raise missing_driver(parsed, exc) from exc
    tune(engine.sync_engine)
    return engine


async def _to_completion(work: Awaitable[T]) -> T:
    """Await ``work`` in a task of its own, to its end even if the caller is
    cancelled meanwhile; then a cancelled caller gets its CancelledError
    (whatever the work returned or raised), any other its result."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})  # being cancelled does not cancel the task
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller is told it was cancelled
        raise cancelled
    return task.result()


class AsyncStore(StoreBase):
    """tokenmem's tables in one database, for asyncio services.

    ``url`` is a database URL or an existing ``AsyncEngine``. Behaves like
    :class:`~tokenmem.store.Store` (same methods, awaited); the SQL is the
    same, built once in :mod:`tokenmem.ops`.
    """

    def __init__(
        self,
        url: str | AsyncEngine | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        _require_asyncio()
        from sqlalchemy.ext.asyncio import AsyncEngine

        self.engine: AsyncEngine = (
            url
            if isinstance(url, AsyncEngine)
            else make_async_engine(url or default_url(), **(engine_options or {}))
        )
        self._ready = False

    async def upgrade(self, revision: str = "head") -> None:
        """Run tokenmem's migrations up to ``revision``."""
        await self._migration(lambda conn: migrate.upgrade(conn, revision))

    async def downgrade(self, revision: str) -> None:
        """Run tokenmem's migrations down to ``revision`` (``"base"``: drop all)."""
        await self._migration(lambda conn: migrate.downgrade(conn, revision))

    async def _migration(self, run: Callable[[Connection], None]) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(run)
        except SQLAlchemyError as exc:
            raise self._error("migration failed", exc) from exc
        except CommandError as exc:
            raise ConfigurationError(f"migration: {exc}") from exc
        self._ready = False

    async def current_revision(self) -> str | None:
        """The migration revision tokenmem's tables are at (None: not migrated)."""
        try:
            async with self.engine.connect() as conn:
                return await conn.run_sync(migrate.current)
        except SQLAlchemyError as exc:
            raise self._error("cannot read the schema version", exc) from exc

    async def check(self) -> None:
        """Raise :class:`SchemaError` unless the database is at the migration head."""
        error = schema_error(await self.current_revision())
        if error:
            raise error
        self._ready = True

    async def _run(self, make: Callable[[], Op[T]]) -> T:
        if not self._ready:
            await self.check()
        for attempt in range(RETRIES):
            state = Attempt()
            try:
                # A transaction, once begun, runs to its commit or rollback
                # even if the caller is cancelled: a cancelled statement goes
                # on in the driver (aiosqlite's thread), and abandoning it left
                # connections holding SQLite's write lock.
                # The sync store's function, in one hop into SQLAlchemy's
                # greenlet (no AsyncConnection: see direct.RawConnection).
                transaction = greenlet_spawn(run, self.engine.sync_engine, make(), state)
                return await _to_completion(transaction)
            except SQLAlchemyError as exc:
                if attempt + 1 < RETRIES and retryable(exc, committing=state.committing):
                    await asyncio.sleep(retrying(exc, attempt, self.engine.url))
                    continue
                raise self._error("database error", exc) from exc
        raise AssertionError("unreachable")

    async def dispose(self) -> None:
        """Close the engine's pooled connections (as :meth:`close`)."""
        await self.engine.dispose()

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        counter: TokenCounter,
        *,
        owner: str | None = None,
    ) -> list[StoredMessage]:
        """Append ``messages`` as one turn, in one transaction: all or nothing.

        Returns them as stored, with positions and token counts."""
        return await self._append(prepare_append(self._key(session_id, owner), [messages], counter))

    async def _append(self, prepared: PreparedAppend) -> list[StoredMessage]:
        return await self._run(lambda: append_op(self.dialect, prepared))

    async def append_turns(
        self,
        session_id: str,
        turns: Iterable[Sequence[Message]],
        counter: TokenCounter,
        *,
        owner: str | None = None,
        batch_size: int = 500,
    ) -> int:
        """Append many turns (imports, benchmarks), ``batch_size`` turns per
        transaction; return how many messages were written."""
        key, written = self._key(session_id, owner), 0
        for batch in batches(turns, batch_size):
            written += len(await self._append(prepare_append(key, batch, counter)))
        return written

    async def align(
        self, session_id: str, position: int, turn: int, *, owner: str | None = None
    ) -> None:
        """Let the next message be at ``position`` and turn ``turn`` (only ever
        forward): imports use it to keep their source's positions."""
        key = self._key(session_id, owner)
        await self._run(lambda: align_op(self.dialect, key, position, turn))

    async def clear(self, session_id: str, *, owner: str | None = None) -> None:
        """Start an empty window; every message stays in the history."""
        key = self._key(session_id, owner)
        await self._run(lambda: clear_op(key))

    async def erase(self, session_id: str, *, owner: str | None = None) -> int:
        """Delete the session and all its messages for good; return how many
        messages were deleted. Raises :class:`SessionNotFound`."""
        key = self._key(session_id, owner)
        return await self._run(lambda: erase_op(key))

    async def erase_owner(self, owner: str | None = None) -> Erased:
        """Delete everything ``owner`` has — sessions, messages, turns — for
        good, in one transaction (the right to be forgotten). On a scoped store
        ``owner`` defaults to the scope's owner; on any other it must be named
        (``""`` for the default owner): ``None`` raises :class:`ConfigurationError`."""
        scope = self._erase_scope(owner)
        return await self._run(lambda: erase_owner_op(scope))

    async def prune(
        self, older_than: timedelta, *, owner: str | None = None, all_owners: bool = False
    ) -> Erased:
        """Retention: hard-delete messages and turn records older than
        ``older_than``, of ``owner``'s sessions, or of every owner's with
        ``all_owners=True``. On a scoped store ``owner`` defaults to the
        scope's owner; on any other, one of the two must be given (``""`` for
        the default owner), else :class:`ConfigurationError`. Turns whose
        window was pruned can no longer be rebuilt."""
        cutoff, scope = utcnow() - older_than, self._prune_scope(owner, all_owners)
        return await self._run(lambda: prune_op(cutoff, scope))

    async def window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> list[WindowMessage]:
        """The newest messages that fit ``rule``, oldest first (one query)."""
        return window_messages(await self._window_rows(session_id, rule, counter, owner))

    async def _window_rows(
        self, session_id: str, rule: Rule, counter: TokenCounter, owner: str | None
    ) -> Sequence[Any]:
        key = self._key(session_id, owner)
        return await self._run(lambda: window_rows_op(key, rule, counter))

    async def explain_window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> str:
        """The database's query plan for this window's statement, as text."""
        sql = self._explain_sql(session_id, rule, counter, owner)
        async with self.engine.connect() as conn:
            rows = (await conn.exec_driver_sql(sql)).all()
        return "\n".join(" | ".join(str(v) for v in row) for row in rows)

    async def history_page(
        self,
        session_id: str,
        *,
        owner: str | None = None,
        after: int = -1,
        limit: int = 500,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with a position above ``after`` (created in
        ``[since, until)`` when given), in order.

        Raises :class:`SessionNotFound` for a session that does not exist."""
        key = self._key(session_id, owner)
        return await self._run(lambda: history_page_op(key, after, limit, since, until))

    async def history(
        self,
        session_id: str,
        *,
        owner: str | None = None,
        page_size: int = 500,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncIterator[StoredMessage]:
        """Iterate over the session's full history, oldest first, one page of
        ``page_size`` rows in memory at a time."""
        after = -1
        while True:
            page = await self.history_page(
                session_id, owner=owner, after=after, limit=page_size, since=since, until=until
            )
            for message in page:
                yield message
            if len(page) < page_size:
                return
            after = page[-1].position

    async def record_turn(
        self,
        session_id: str,
        record: TurnRecord,
        exchange: Sequence[Message] | None = None,
        counter: TokenCounter | None = None,
        *,
        owner: str | None = None,
    ) -> TurnRecord:
        """Record a model call and save its ``exchange`` (if any, counted with
        ``counter``) in one transaction. Returns the record with its ``seq``."""
        key = self._key(session_id, owner)
        if exchange and counter is None:
            raise ConfigurationError("record_turn needs the counter to save an exchange")
        prepared = prepare_append(key, [exchange], counter) if exchange and counter else None
        return await self._run(lambda: record_turn_op(self.dialect, key, record, prepared))

    async def turns(self, session_id: str, *, owner: str | None = None) -> list[TurnRecord]:
        """The session's recorded model calls, oldest first."""
        key = self._key(session_id, owner)
        return await self._run(lambda: turns_op(key))

    async def rebuild_prompt(
        self, session_id: str, seq: int, *, owner: str | None = None
    ) -> list[dict[str, str]] | str:
        """The exact prompt call ``seq`` sent, rebuilt from the stored history."""
        key = self._key(session_id, owner)
        record, window = await self._run(lambda: turn_op(key, seq))
        return rebuild(record, window)

    async def session(self, session_id: str, *, owner: str | None = None) -> SessionInfo:
        """One session's summary; :class:`SessionNotFound` if there is none."""
        key = self._key(session_id, owner)
        return await self._run(lambda: session_op(key))

    async def recount(
        self, session_id: str, counter: TokenCounter, *, owner: str | None = None
    ) -> None:
        """Count the session's messages again with ``counter``'s encoding, in
        one transaction (appends do this by themselves when the encoding
        changes; this does it ahead of time)."""
        key = self._key(session_id, owner)
        await self._run(lambda: recount_op(key.id, counter))

    async def sessions(self, *, owner: str | None = None) -> list[SessionInfo]:
        """The owner's sessions, by name."""
        key = self._key("-", owner)
        return await self._run(lambda: sessions_op(key.owner))

    async def session_stats(
        self, *, owner: str | None = None, all_owners: bool = False
    ) -> list[SessionStats]:
        """Sessions with message counts, tokens and activity (one owner, or all)."""
        scope = self._scope(owner, all_owners)
        return await self._run(lambda: session_stats_op(scope))

    async def count(self, *, owner: str | None = None, all_owners: bool = False) -> int:
        """How many messages ``owner`` holds (default: the scope's owner, or
        the default, unnamed owner), or every owner with ``all_owners=True``."""
        scope = self._scope(owner, all_owners)
        return await self._run(lambda: count_op(scope))

    async def close(self) -> None:
        """Close the engine's pooled connections."""
        await self.engine.dispose()
