"""The async store: :class:`~tokenmem.store.Store` for asyncio services, on
SQLAlchemy's asyncio engines (aiosqlite; psycopg 3 for PostgreSQL).

Needs the ``async`` extra (``pip install 'tokenmem[async]'``)::

    store = AsyncStore("postgresql+psycopg://127.0.0.1/app")
    await store.upgrade()
    memory = ConversationTokenBufferMemory(store=store, session_id="chat-1")
    await memory.asave_context({"input": "hi"}, {"output": "hello"})
    await memory.aload_memory_variables({})

The same methods as :class:`~tokenmem.store.Store`, awaited, running the same
operations: each in ``AsyncConnection.run_sync``, in one transaction that,
once begun, runs to its commit or rollback even if its caller is cancelled (a
cancelled statement goes on in the driver — aiosqlite's thread — and
abandoning it left connections holding SQLite's write lock).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from . import audit, digest, migrate, reads, writes
from . import partition as partitioning
from .audit import TurnRecord, rebuild
from .digest import VERIFY_PAGE, Verified
from .engine import (
    Attempt,
    default_url,
    logger,
    retry_delay,
    schema_error,
    transaction,
    tune,
)
from .errors import ConfigurationError, TokenmemError
from .messages import Message, SessionInfo, StoredMessage
from .models import utcnow
from .reads import SessionStats, WindowMessage, WindowRow, window_messages
from .store import StoreBase
from .tokens import TokenCounter
from .urls import missing_driver, parse_url, shown
from .validate import batches, prepare_append
from .window import Rule
from .writes import RECOUNT_BATCH, Erased

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["AsyncStore", "make_async_engine"]

T = TypeVar("T")


def _require_asyncio() -> None:
    """SQLAlchemy's asyncio support needs greenlet: the ``async`` extra."""
    try:
        import sqlalchemy.ext.asyncio  # noqa: F401

        # SQLAlchemy 2.0 imports greenlet only on first use: ask now.
        if importlib.util.find_spec("greenlet") is None:
            raise ImportError("No module named 'greenlet'", name="greenlet")
    except (ImportError, ValueError) as exc:
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
    except (ArgumentError, TypeError) as exc:  # an option create_async_engine does not take
        raise ConfigurationError(f"cannot make an engine for {shown(parsed)}: {exc}") from exc
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
    :class:`~tokenmem.store.Store` (same methods, awaited): the embedded
    default, or ``upgrade=True``, is migrated before the first operation.
    """

    def __init__(
        self,
        url: str | AsyncEngine | None = None,
        *,
        upgrade: bool | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        _require_asyncio()
        from sqlalchemy.ext.asyncio import AsyncEngine

        self.engine: AsyncEngine = (
            url
            if isinstance(url, AsyncEngine)
            else make_async_engine(url or default_url(), **(engine_options or {}))
        )
        self._made_engine = not isinstance(url, AsyncEngine)
        self._ready = False
        if upgrade is None:  # only the embedded default migrates by itself
            upgrade = url is None and not os.environ.get("TOKENMEM_DATABASE_URL")
        self._upgrade_first = upgrade  # no I/O in a constructor: before the first operation

    async def close(self) -> None:
        """Close the engine's pooled connections (the engine stays usable)."""
        await self.engine.dispose()

    # migrations

    async def upgrade(self, revision: str = "head") -> None:
        """Run tokenmem's migrations up to ``revision``."""
        await self._migration(functools.partial(migrate.upgrade, revision=revision))

    async def downgrade(self, revision: str) -> None:
        """Run tokenmem's migrations down to ``revision`` (``"base"``: drop all)."""
        await self._migration(functools.partial(migrate.downgrade, revision=revision))

    async def _migration(self, run: Callable[[Connection], None]) -> None:
        self._upgrade_first = False
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(run)
        except SQLAlchemyError as exc:
            raise self._error("migration failed", exc) from exc
        except CommandError as exc:  # an unknown revision, a database ahead of the code
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

    async def partition(self, partitions: int) -> dict[str, int]:
        """Hash-partition ``tokenmem_messages``, ``tokenmem_turns`` and
        ``tokenmem_summaries`` by ``session_id`` into ``partitions``
        partitions each (PostgreSQL only),
        keeping every row, in one transaction that blocks the tables while it
        copies them. Returns each table's number of partitions. Raises
        :class:`ConfigurationError` on SQLite. See :mod:`tokenmem.partition`."""
        return await self.run(functools.partial(partitioning.partition, partitions=partitions))

    async def unpartition(self) -> dict[str, int]:
        """Make the tables plain again (the reverse of :meth:`partition`),
        keeping every row; returns each table's number of partitions (0)."""
        return await self.run(partitioning.unpartition)

    async def run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work(connection)`` in one transaction on a connection of the
        store's engine, and return what it returns: committed if it returns,
        rolled back if it raises. Retried (``work`` called again, on a fresh
        transaction) after a lock timeout, a serialization failure or a stale
        connection; a database error is raised as :class:`StoreError`. The
        schema is checked first. Every method of the store is one such call.

        ``work`` is a sync function (run with ``AsyncConnection.run_sync``), and
        runs to its end even if the caller is cancelled."""
        if self._upgrade_first:
            await self.upgrade()
        if not self._ready:
            await self.check()
        attempt = 0
        while True:
            state = Attempt()
            try:
                return await _to_completion(self._transaction(work, state))
            except SQLAlchemyError as exc:
                delay = retry_delay(exc, attempt, state, self.engine.url)
                if delay is None:
                    raise self._error("database error", exc) from exc
                await asyncio.sleep(delay)
                attempt += 1

    async def _transaction(self, work: Callable[[Connection], T], state: Attempt) -> T:
        async with self.engine.connect() as conn:
            return await conn.run_sync(transaction, work, state, self.direct)

    # writes

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        counter: TokenCounter,
        *,
        owner: str | None = None,
    ) -> list[StoredMessage]:
        """Append ``messages`` as one turn, in one transaction: all or nothing.

        Returns them as stored, with positions and token counts. A session
        counted with another encoding than ``counter``'s counts them with its
        own, and one batch of its recount runs after the commit (an error in
        it is logged, not raised: the messages are saved)."""
        prepared = prepare_append(self._key(session_id, owner), [messages], counter)
        stored = await self.run(functools.partial(writes.append, p=prepared))
        if stored[0].encoding != counter.encoding_name:  # the model changed
            await self._recount_step(session_id, counter, owner)
        return stored

    async def append_many(
        self,
        session_id: str,
        messages: Iterable[Message],
        counter: TokenCounter,
        *,
        owner: str | None = None,
        batch_size: int = writes.BULK_BATCH,
    ) -> range:
        """Append many messages at once (a backfill, a migration from another
        store), in one transaction: all of them or, on any error, none.

        As :meth:`tokenmem.Store.append_many`; the checking and counting (CPU
        work: seconds for 100,000 messages) run in a worker thread, off the
        event loop."""
        key = self._key(session_id, owner)
        encoding = await self.run(functools.partial(reads.encoding_of, key=key))
        work = await asyncio.to_thread(self._bulk, key, messages, counter, encoding, batch_size)
        return await self.run(work)

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
        key = self._key(session_id, owner)
        written = 0
        for batch in batches(turns, batch_size):
            prepared = prepare_append(key, batch, counter)
            written += len(await self.run(functools.partial(writes.append, p=prepared)))
        return written

    async def align(
        self, session_id: str, position: int, turn: int, *, owner: str | None = None
    ) -> None:
        """Let the next message be at ``position`` and turn ``turn`` (only ever
        forward): imports use it to keep their source's positions."""
        key = self._key(session_id, owner)
        await self.run(functools.partial(writes.align, key=key, position=position, turn=turn))

    async def clear(self, session_id: str, *, owner: str | None = None) -> None:
        """Start an empty window; every message stays in the history."""
        await self.run(functools.partial(writes.clear, key=self._key(session_id, owner)))

    async def erase(self, session_id: str, *, owner: str | None = None) -> int:
        """Delete the session and all its messages (turns and summaries too)
        for good; return how many messages were deleted. Raises
        :class:`SessionNotFound`."""
        return await self.run(functools.partial(writes.erase, key=self._key(session_id, owner)))

    async def erase_owner(self, owner: str | None = None) -> Erased:
        """Delete everything ``owner`` has — sessions, messages, turns,
        summaries — for good, in one transaction (the right to be forgotten). On a scoped store
        ``owner`` defaults to the scope's owner; on any other it must be named
        (``""`` for the default owner): ``None`` raises :class:`ConfigurationError`."""
        return await self.run(functools.partial(writes.erase_owner, owner=self._erase_scope(owner)))

    async def prune(
        self, older_than: timedelta, *, owner: str | None = None, all_owners: bool = False
    ) -> Erased:
        """Retention: hard-delete messages, turn records and summaries older
        than ``older_than``, of ``owner``'s sessions, or of every owner's with
        ``all_owners=True``. On a scoped store ``owner`` defaults to the
        scope's owner; on any other, one of the two must be given (``""`` for
        the default owner), else :class:`ConfigurationError`. Turns whose
        window was pruned can no longer be rebuilt; a newer summary stays
        (see :func:`tokenmem.writes.prune`)."""
        cutoff, scope = utcnow() - older_than, self._prune_scope(owner, all_owners)
        return await self.run(functools.partial(writes.prune, before=cutoff, owner=scope))

    async def recount(
        self,
        session_id: str,
        counter: TokenCounter,
        *,
        owner: str | None = None,
        batch_size: int = RECOUNT_BATCH,
        batches: int | None = None,
    ) -> bool:
        """Count the session's messages again with ``counter``'s encoding,
        oldest first, ``batch_size`` messages per transaction; the last batch
        switches the session to it (until then it keeps its own, and so does
        every message appended meanwhile). ``batches``: stop after that many;
        a later call goes on where this one stopped. Returns whether the
        session is now counted with ``counter``'s encoding. An ``append`` or
        ``record_turn`` with another encoding than the session's runs one
        batch after its own transaction. A session that already has
        ``counter``'s encoding (rows from before migration 0003, or a switch
        abandoned halfway) is counted again in one transaction."""
        self._batches(batch_size, batches)
        key = self._key(session_id, owner)
        at = await self.run(
            functools.partial(writes.recount_start, key=key, encoding=counter.encoding_name)
        )
        work = functools.partial(writes.recount_batch, key=key, counter=counter, size=batch_size)
        done = 0
        while not at.done and (batches is None or done < batches):
            at, done = await self.run(functools.partial(work, at=at)), done + 1
        return at.done

    async def _recount_step(
        self, session_id: str, counter: TokenCounter, owner: str | None
    ) -> None:
        """One batch of the recount a write by another model asks for, after
        the write committed: an error is logged, not raised (the write stays
        done; the next write, or ``tokenmem recount``, goes on)."""
        try:
            await self.recount(session_id, counter, owner=owner, batches=1)
        except TokenmemError as exc:
            encoding = counter.encoding_name
            logger.warning("recounting session %r for %s: %s", session_id, encoding, exc)

    # reads

    async def window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> list[WindowMessage]:
        """The newest messages that fit ``rule``, oldest first (one query)."""
        return window_messages(await self.window_rows(session_id, rule, counter, owner=owner))

    async def window_rows(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> Sequence[WindowRow]:
        """The window statement's rows (:data:`tokenmem.reads.WindowRow`: the
        pinned prompt first, then the window oldest first, each with its cost
        under ``rule``): what :meth:`window` makes messages of, for a caller
        that only renders them (the memory)."""
        key = self._key(session_id, owner)
        return await self.run(
            functools.partial(reads.window_rows, key=key, rule=rule, counter=counter)
        )

    async def explain_window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> str:
        """The database's query plan for this window's statement, as text."""
        sql = self._explain_sql(session_id, rule, counter, owner)
        rows = await self.run(lambda conn: conn.exec_driver_sql(sql).all())
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
        page = functools.partial(reads.history_page, key=key, after=after, limit=limit)
        return await self.run(functools.partial(page, since=since, until=until))

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

    async def session(self, session_id: str, *, owner: str | None = None) -> SessionInfo:
        """One session's summary; :class:`SessionNotFound` if there is none."""
        return await self.run(functools.partial(reads.session, key=self._key(session_id, owner)))

    async def sessions(self, *, owner: str | None = None) -> list[SessionInfo]:
        """The owner's sessions, by name."""
        return await self.run(functools.partial(reads.sessions, owner=self._owner(owner)))

    async def session_stats(
        self, *, owner: str | None = None, all_owners: bool = False
    ) -> list[SessionStats]:
        """Sessions with message counts, tokens and activity (one owner, or all)."""
        scope = self._scope(owner, all_owners)
        return await self.run(functools.partial(reads.session_stats, owner=scope))

    async def count(self, *, owner: str | None = None, all_owners: bool = False) -> int:
        """How many messages ``owner`` holds (default: the scope's owner, or
        the default, unnamed owner), or every owner with ``all_owners=True``."""
        return await self.run(functools.partial(reads.count, owner=self._scope(owner, all_owners)))

    # the turn audit log

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
        ``counter``) in one transaction. Returns the record with its ``seq``.
        As :meth:`append`, a batch of the recount may follow the commit."""
        key, prepared = self._turn(session_id, exchange, counter, owner)
        work = functools.partial(audit.record_turn, key=key, record=record, exchange=prepared)
        recorded, encoding = await self.run(work)
        if counter is not None and encoding not in (None, counter.encoding_name):
            await self._recount_step(session_id, counter, owner)  # the model changed
        return recorded

    async def turns(self, session_id: str, *, owner: str | None = None) -> list[TurnRecord]:
        """The session's recorded model calls, oldest first."""
        return await self.run(functools.partial(audit.turns, key=self._key(session_id, owner)))

    async def verify(
        self,
        session_id: str,
        *,
        owner: str | None = None,
        expect_head: str | None = None,
        page: int = VERIFY_PAGE,
    ) -> Verified:
        """Walk the session's tamper-evident chains — its messages, then its
        turn log — from their anchors to their heads, ``page`` rows per
        statement, and say whether they are intact and, if not, the first
        row where one breaks (:class:`Verified`; see :mod:`tokenmem.digest`).
        ``expect_head``: a head digest recorded earlier (in a ticket, an
        external log); the history is intact only if it is still in the
        chain, i.e. nothing up to it changed. Raises :class:`SessionNotFound`."""
        key = self._key(session_id, owner)
        work = functools.partial(digest.verify, key=key, page=page, expect_head=expect_head)
        return await self.run(work)

    async def rebuild_prompt(
        self, session_id: str, seq: int, *, owner: str | None = None
    ) -> list[dict[str, Any]] | str:
        """The exact prompt call ``seq`` sent, rebuilt from the stored history.
        Raises :class:`TurnNotFound` when the session has no such call."""
        key = self._key(session_id, owner)
        return rebuild(*await self.run(functools.partial(audit.turn, key=key, seq=seq)))
