"""The store: sessions and messages in SQLite or PostgreSQL.

A :class:`Store` wraps one SQLAlchemy engine; create one per process and share
it between memories (they are cheap to create per request)::

    store = Store("postgresql+psycopg://127.0.0.1/app")
    store.upgrade()                              # run tokenmem's migrations
    alice = store.owner("alice")                 # every call scoped to alice
    for msg in alice.history("chat-1"):          # the full audit history, in pages
        print(msg.position, msg.type, msg.content)

Every method is an operation of :mod:`tokenmem.writes` or
:mod:`tokenmem.reads` run in one transaction by :meth:`Store.run` in
``engine.connect()`` (a recount: one per batch; an append or turn by a model
with another encoding than the session's: then one batch of its recount) —
public SQLAlchemy only. On an engine passed in every statement goes through
``Connection.execute``, so a host's ``schema_translate_map``, event
listeners, echo and tracing see all of them; a store that made its engine
runs its three hot statements on the DBAPI cursor (:mod:`tokenmem.direct`).
Appends are serialised per session by the row lock an ``INSERT ..
ON CONFLICT DO UPDATE`` takes on the session row: positions stay gapless and
each exchange's messages adjacent, and other sessions are never blocked. A
"database is locked" (SQLite), a serialization failure or deadlock
(PostgreSQL) or a stale pooled connection is retried a bounded number of
times. :class:`tokenmem.aio.AsyncStore` is the same store for asyncio.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from alembic.util import CommandError
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from . import audit, digest, migrate, reads, writes
from . import partition as partitioning
from .audit import TurnRecord, rebuild
from .digest import VERIFY_PAGE, Verified
from .engine import (
    Attempt,
    default_url,
    logger,
    make_engine,
    retry_delay,
    schema_error,
    transaction,
    without_parameters,
)
from .errors import ConfigurationError, EncodingUnavailable, StoreError, TokenmemError
from .messages import Message, SessionInfo, StoredMessage
from .models import utcnow
from .reads import SessionStats, WindowMessage, WindowRow, window_messages
from .tokens import TokenCounter
from .urls import scrub, shown
from .validate import (
    DEFAULT_OWNER,
    PreparedAppend,
    SessionKey,
    batches,
    check_counter,
    prepare_append,
    prepare_messages,
)
from .window import Rule, row_cap, window_select
from .writes import RECOUNT_BATCH, Erased

__all__ = ["DEFAULT_OWNER", "Store", "StoreBase"]

T = TypeVar("T")


Self = TypeVar("Self", bound="StoreBase")
_NONE = "None never selects an owner; owner='' is the default, unnamed one"


class StoreBase:
    """What the sync and async stores share: the engine's name, and owner scopes."""

    engine: Any
    _made_engine = False
    default_owner: str = DEFAULT_OWNER
    scoped: bool = False

    def __repr__(self) -> str:
        scope = f", owner={self.default_owner!r}" if self.scoped else ""
        return f"{type(self).__name__}({shown(self.engine.url)!r}{scope})"

    def owner(self: Self, owner: str) -> Self:
        """This store (same engine) confined to ``owner``: every call acts on
        that owner's sessions only, and naming another owner is an error.

        On a store already scoped, ``owner`` must be its owner: a scope is
        never widened nor moved (:class:`ConfigurationError`)."""
        name = SessionKey.of("-", owner).owner
        if self.scoped:
            self._owner(name)
            return self
        scoped = copy.copy(self)
        scoped.default_owner = name
        scoped.scoped = True
        return scoped

    def _key(self, session_id: str, owner: str | None) -> SessionKey:
        return SessionKey.of(session_id, self._owner(owner))

    def _owner(self, owner: str | None) -> str:
        if owner is None or owner == self.default_owner:
            return self.default_owner
        if self.scoped:
            raise ConfigurationError(
                f"this store is scoped to owner {self.default_owner!r}, not {owner!r}"
            )
        return SessionKey.of("-", owner).owner

    def _scope(self, owner: str | None, all_owners: bool) -> str | None:
        """The owner a call across sessions is limited to; None: every owner."""
        if all_owners:
            if self.scoped:
                raise ConfigurationError("a store scoped to one owner cannot reach all owners")
            if owner is not None:
                raise ConfigurationError("name an owner or all_owners=True, not both")
            return None
        return self._owner(owner)

    def _erase_scope(self, owner: str | None) -> str:
        """The owner ``erase_owner`` erases. ``None`` never selects one (a user
        id that came back None must not erase the default owner's data),
        except on a scoped store, whose owner was named."""
        if owner is None and not self.scoped:
            raise ConfigurationError(f"erase_owner needs the owner to erase ({_NONE})")
        return self._owner(owner)

    def _prune_scope(self, owner: str | None, all_owners: bool) -> str | None:
        """The owner ``prune`` prunes (None: every owner); as :meth:`_erase_scope`."""
        if owner is None and not all_owners and not self.scoped:
            raise ConfigurationError(f"prune needs owner= or all_owners=True ({_NONE})")
        return self._scope(owner, all_owners)

    def _explain_sql(
        self, session_id: str, rule: Rule, counter: TokenCounter, owner: str | None
    ) -> str:
        """``EXPLAIN`` of the window statement, with its parameters inlined."""
        key = self._key(session_id, owner)
        params = rule.params(key.id, counter.encoding_name, rule.prefix_tokens(counter))
        stmt = window_select(rule.mode, row_cap(rule), rule.start_on, rule.include_open)
        stmt = stmt.params(params)
        translate = self._schema_map
        compiled = stmt.compile(
            dialect=self.engine.dialect,
            schema_translate_map=translate,
            render_schema_translate=bool(translate),
            compile_kwargs={"literal_binds": True},
        )
        sql = str(compiled)
        return ("EXPLAIN QUERY PLAN " if self.dialect == "sqlite" else "EXPLAIN ") + sql

    def _turn(
        self,
        session_id: str,
        exchange: Sequence[Message] | None,
        counter: TokenCounter | None,
        owner: str | None,
    ) -> tuple[SessionKey, PreparedAppend | None]:
        """record_turn's session and its exchange, checked and counted."""
        key = self._key(session_id, owner)
        if exchange and counter is None:
            raise ConfigurationError("record_turn needs the counter to save an exchange")
        return key, prepare_append(key, [exchange], counter) if exchange and counter else None

    def _bulk(
        self,
        key: SessionKey,
        messages: Iterable[Message],
        counter: TokenCounter,
        encoding: str | None,
        batch_size: int,
    ) -> Callable[[Connection], range]:
        """append_many's operation: the messages checked and counted — with
        the session's ``encoding`` when it has another than ``counter``'s (as
        :func:`tokenmem.writes.append` would count them, but here before the
        transaction, not under its lock). Blocking: the async store runs it
        in a thread."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive int, not {batch_size!r}")
        check_counter(counter)
        if encoding not in (None, counter.encoding_name):
            with contextlib.suppress(EncodingUnavailable):  # else as append does
                counter = TokenCounter(encoding)
        prepared = prepare_messages(key, messages, counter)
        return functools.partial(writes.append_many, p=prepared, batch_size=batch_size)

    @staticmethod
    def _batches(batch_size: int, batches: int | None) -> None:
        """Refuse a recount's bad ``batch_size`` or ``batches``."""
        checks = [("batch_size", batch_size, 1)]
        if batches is not None:  # None: until done
            checks.append(("batches", batches, 0))
        for name, value, least in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigurationError(f"{name} must be an int >= {least}, not {value!r}")

    def _error(self, what: str, exc: BaseException) -> StoreError:
        """The driver's ``exc`` as a :class:`StoreError`, without the URL's
        secrets or the statement's parameters (chat content)."""
        return StoreError(f"{what}: {scrub(without_parameters(str(exc)), self.engine.url)}")

    @property
    def direct(self) -> bool:
        """Whether the hot statements (an append's two, the window) run on the
        DBAPI cursor (:mod:`tokenmem.direct`): on an engine the store made
        from a URL, while neither ``echo`` nor a ``schema_translate_map`` is
        set on it. An engine passed in runs every statement through
        ``Connection.execute``, where its listeners and tracing see it."""
        return self._made_engine and not self._sync_engine.echo and not self._schema_map

    @property
    def _sync_engine(self) -> Engine:
        engine: Engine = getattr(self.engine, "sync_engine", self.engine)
        return engine

    @property
    def _schema_map(self) -> dict[str | None, str | None] | None:
        """The engine's ``schema_translate_map``, if the host set one."""
        found: dict[str | None, str | None] | None = self._sync_engine.get_execution_options().get(
            "schema_translate_map"
        )
        return found

    @property
    def dialect(self) -> str:
        name: str = self.engine.dialect.name
        return name


class Store(StoreBase):
    """tokenmem's tables in one database.

    ``url`` is a database URL or an existing :class:`~sqlalchemy.Engine`
    (``None``: :func:`~tokenmem.engine.default_url`); ``engine_options`` go
    to ``create_engine`` (e.g. ``{"pool_size": 32}`` for 32 worker threads).
    The embedded default is migrated on first use; any other database is
    migrated explicitly with :meth:`upgrade` (or ``upgrade=True``), and a
    store on a database behind the head raises :class:`SchemaError` instead
    of failing on a missing column.

    Every method takes ``owner=``; :meth:`owner` returns the same store scoped
    to one owner. One owner can never read, write or detect another's session.
    """

    def __init__(
        self,
        url: str | Engine | None = None,
        *,
        upgrade: bool | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.engine: Engine = (
            url
            if isinstance(url, Engine)
            else make_engine(url or default_url(), **(engine_options or {}))
        )
        self._made_engine = not isinstance(url, Engine)
        self._ready = False
        if upgrade is None:  # only the embedded default migrates by itself
            upgrade = url is None and not os.environ.get("TOKENMEM_DATABASE_URL")
        if upgrade:
            self.upgrade()

    def close(self) -> None:
        """Close the engine's pooled connections (the engine stays usable)."""
        self.engine.dispose()

    # migrations

    def upgrade(self, revision: str = "head") -> None:
        """Run tokenmem's migrations up to ``revision``."""
        self._migration(functools.partial(migrate.upgrade, revision=revision))

    def downgrade(self, revision: str) -> None:
        """Run tokenmem's migrations down to ``revision`` (``"base"``: drop all)."""
        self._migration(functools.partial(migrate.downgrade, revision=revision))

    def _migration(self, run: Callable[[Connection], None]) -> None:
        try:
            with self.engine.begin() as conn:
                run(conn)
        except SQLAlchemyError as exc:
            raise self._error("migration failed", exc) from exc
        except CommandError as exc:  # an unknown revision, a database ahead of the code
            raise ConfigurationError(f"migration: {exc}") from exc
        self._ready = False

    def current_revision(self) -> str | None:
        """The migration revision tokenmem's tables are at (None: not migrated)."""
        try:
            with self.engine.connect() as conn:
                return migrate.current(conn)
        except SQLAlchemyError as exc:
            raise self._error("cannot read the schema version", exc) from exc

    def check(self) -> None:
        """Raise :class:`SchemaError` unless the database is at the migration head."""
        error = schema_error(self.current_revision())
        if error:
            raise error
        self._ready = True

    def partition(self, partitions: int) -> dict[str, int]:
        """Hash-partition ``tokenmem_messages``, ``tokenmem_turns`` and
        ``tokenmem_summaries`` by ``session_id`` into ``partitions``
        partitions each (PostgreSQL only),
        keeping every row, in one transaction that blocks the tables while it
        copies them. Returns each table's number of partitions. Raises
        :class:`ConfigurationError` on SQLite. See :mod:`tokenmem.partition`."""
        return self.run(functools.partial(partitioning.partition, partitions=partitions))

    def unpartition(self) -> dict[str, int]:
        """Make the tables plain again (the reverse of :meth:`partition`),
        keeping every row; returns each table's number of partitions (0)."""
        return self.run(partitioning.unpartition)

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work(connection)`` in one transaction on a connection of the
        store's engine, and return what it returns: committed if it returns,
        rolled back if it raises. Retried (``work`` called again, on a fresh
        transaction) after a lock timeout, a serialization failure or a stale
        connection; a database error is raised as :class:`StoreError`. The
        schema is checked first. Every method of the store is one such call."""
        if not self._ready:
            self.check()
        attempt = 0
        while True:
            state = Attempt()
            try:
                with self.engine.connect() as conn:
                    return transaction(conn, work, state, self.direct)
            except SQLAlchemyError as exc:
                delay = retry_delay(exc, attempt, state, self.engine.url)
                if delay is None:
                    raise self._error("database error", exc) from exc
                time.sleep(delay)
                attempt += 1

    # writes

    def append(
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
        stored = self.run(functools.partial(writes.append, p=prepared))
        if stored[0].encoding != counter.encoding_name:  # the model changed
            self._recount_step(session_id, counter, owner)
        return stored

    def append_many(
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

        Every message is checked and counted with ``counter`` before the
        transaction opens (a bad one raises :class:`InvalidInputError` naming
        it, and nothing is written); then one statement reserves their
        positions in the session and the rows go in statements of
        ``batch_size`` — ``COPY`` on PostgreSQL (on an engine the store made;
        on one passed in, an executemany through ``Connection.execute``), an
        executemany on SQLite. Turns are as ``save_context`` makes them: a
        human message and the AI message right after it are one turn, any
        other message a turn of its own. The session's row stays locked until
        the commit (on SQLite, the database: other writers wait), so split a
        very large backfill into several calls. Returns the positions the
        messages were stored at (``len()`` of it: how many)."""
        key = self._key(session_id, owner)
        encoding = self.run(functools.partial(reads.encoding_of, key=key))
        return self.run(self._bulk(key, messages, counter, encoding, batch_size))

    def append_turns(
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
        return sum(
            len(self.run(functools.partial(writes.append, p=prepare_append(key, batch, counter))))
            for batch in batches(turns, batch_size)
        )

    def align(self, session_id: str, position: int, turn: int, *, owner: str | None = None) -> None:
        """Let the next message be at ``position`` and turn ``turn`` (only ever
        forward): imports use it to keep their source's positions."""
        key = self._key(session_id, owner)
        self.run(functools.partial(writes.align, key=key, position=position, turn=turn))

    def clear(self, session_id: str, *, owner: str | None = None) -> None:
        """Start an empty window; every message stays in the history."""
        self.run(functools.partial(writes.clear, key=self._key(session_id, owner)))

    def erase(self, session_id: str, *, owner: str | None = None) -> int:
        """Delete the session and all its messages (turns and summaries too)
        for good; return how many messages were deleted. Raises
        :class:`SessionNotFound`."""
        return self.run(functools.partial(writes.erase, key=self._key(session_id, owner)))

    def erase_owner(self, owner: str | None = None) -> Erased:
        """Delete everything ``owner`` has — sessions, messages, turns,
        summaries — for good, in one transaction (the right to be forgotten). On a scoped store
        ``owner`` defaults to the scope's owner; on any other it must be named
        (``""`` for the default owner): ``None`` raises :class:`ConfigurationError`."""
        return self.run(functools.partial(writes.erase_owner, owner=self._erase_scope(owner)))

    def prune(
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
        return self.run(functools.partial(writes.prune, before=cutoff, owner=scope))

    def recount(
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
        at = self.run(
            functools.partial(writes.recount_start, key=key, encoding=counter.encoding_name)
        )
        work = functools.partial(writes.recount_batch, key=key, counter=counter, size=batch_size)
        done = 0
        while not at.done and (batches is None or done < batches):
            at, done = self.run(functools.partial(work, at=at)), done + 1
        return at.done

    def _recount_step(self, session_id: str, counter: TokenCounter, owner: str | None) -> None:
        """One batch of the recount a write by another model asks for, after
        the write committed: an error is logged, not raised (the write stays
        done; the next write, or ``tokenmem recount``, goes on)."""
        try:
            self.recount(session_id, counter, owner=owner, batches=1)
        except TokenmemError as exc:
            encoding = counter.encoding_name
            logger.warning("recounting session %r for %s: %s", session_id, encoding, exc)

    # reads

    def window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> list[WindowMessage]:
        """The newest messages that fit ``rule``, oldest first (one query)."""
        return window_messages(self.window_rows(session_id, rule, counter, owner=owner))

    def window_rows(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> Sequence[WindowRow]:
        """The window statement's rows (:data:`tokenmem.reads.WindowRow`: the
        pinned prompt first, then the window oldest first, each with its cost
        under ``rule``): what :meth:`window` makes messages of, for a caller
        that only renders them (the memory)."""
        key = self._key(session_id, owner)
        return self.run(functools.partial(reads.window_rows, key=key, rule=rule, counter=counter))

    def explain_window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> str:
        """The database's query plan for this window's statement, as text."""
        sql = self._explain_sql(session_id, rule, counter, owner)
        rows = self.run(lambda conn: conn.exec_driver_sql(sql).all())
        return "\n".join(" | ".join(str(v) for v in row) for row in rows)

    def history_page(
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
        return self.run(functools.partial(page, since=since, until=until))

    def history(
        self,
        session_id: str,
        *,
        owner: str | None = None,
        page_size: int = 500,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[StoredMessage]:
        """Iterate over the session's full history, oldest first, one page of
        ``page_size`` rows in memory at a time."""
        after = -1
        while True:
            page = self.history_page(
                session_id, owner=owner, after=after, limit=page_size, since=since, until=until
            )
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].position

    def session(self, session_id: str, *, owner: str | None = None) -> SessionInfo:
        """One session's summary; :class:`SessionNotFound` if there is none."""
        return self.run(functools.partial(reads.session, key=self._key(session_id, owner)))

    def sessions(self, *, owner: str | None = None) -> list[SessionInfo]:
        """The owner's sessions, by name."""
        return self.run(functools.partial(reads.sessions, owner=self._owner(owner)))

    def session_stats(
        self, *, owner: str | None = None, all_owners: bool = False
    ) -> list[SessionStats]:
        """Sessions with message counts, tokens and activity (one owner, or all)."""
        scope = self._scope(owner, all_owners)
        return self.run(functools.partial(reads.session_stats, owner=scope))

    def count(self, *, owner: str | None = None, all_owners: bool = False) -> int:
        """How many messages ``owner`` holds (default: the scope's owner, or
        the default, unnamed owner), or every owner with ``all_owners=True``."""
        return self.run(functools.partial(reads.count, owner=self._scope(owner, all_owners)))

    # the turn audit log

    def record_turn(
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
        recorded, encoding = self.run(work)
        if counter is not None and encoding not in (None, counter.encoding_name):
            self._recount_step(session_id, counter, owner)  # the model changed
        return recorded

    def turns(self, session_id: str, *, owner: str | None = None) -> list[TurnRecord]:
        """The session's recorded model calls, oldest first."""
        return self.run(functools.partial(audit.turns, key=self._key(session_id, owner)))

    def verify(
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
        return self.run(work)

    def rebuild_prompt(
        self, session_id: str, seq: int, *, owner: str | None = None
    ) -> list[dict[str, Any]] | str:
        """The exact prompt call ``seq`` sent, rebuilt from the stored history.
        Raises :class:`TurnNotFound` when the session has no such call."""
        key = self._key(session_id, owner)
        return rebuild(*self.run(functools.partial(audit.turn, key=key, seq=seq)))
