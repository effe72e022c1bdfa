"""The store: sessions and messages in SQLite or PostgreSQL.

A :class:`Store` wraps one SQLAlchemy engine; create one per process and share
it between memories (they are cheap to create per request)::

    store = Store("postgresql+psycopg://127.0.0.1/app")
    store.upgrade()                              # run tokenmem's migrations
    alice = store.owner("alice")                 # every call scoped to alice
    for msg in alice.history("chat-1"):          # the full audit history, in pages
        print(msg.position, msg.type, msg.content)

Appends are serialised per session by the row lock an ``INSERT .. ON CONFLICT
DO UPDATE`` takes on the session row: positions stay gapless and each
exchange's messages adjacent, and other sessions are never blocked. On SQLite
(WAL, busy timeout) a "database is locked" error is retried a bounded number
of times. The SQL itself lives in :mod:`tokenmem.ops`, shared with
:class:`tokenmem.aio.AsyncStore`.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from . import migrate
from .audit import TurnRecord, rebuild, record_turn_op, turn_op, turns_op
from .errors import ConfigurationError, SchemaError, StoreError
from .messages import Message, SessionInfo, StoredMessage
from .models import utcnow
from .ops import (
    DEFAULT_OWNER,
    Attempt,
    Erased,
    Op,
    PreparedAppend,
    SessionKey,
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
from .tokens import TokenCounter
from .urls import missing_driver, parse_source_url, parse_url, scrub, shown
from .window import Rule, window_select

__all__ = ["DEFAULT_OWNER", "Store", "StoreBase", "default_url", "make_engine", "source_engine"]

T = TypeVar("T")
RETRIES = 6
logger = logging.getLogger("tokenmem.store")


def default_url() -> str:
    """``TOKENMEM_DATABASE_URL``, else the embedded SQLite file
    ``$XDG_DATA_HOME/tokenmem/tokenmem.sqlite3`` (``~/.local/share/...``)."""
    url = os.environ.get("TOKENMEM_DATABASE_URL")
    if url:
        return url
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{data / 'tokenmem' / 'tokenmem.sqlite3'}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def tune(engine: Engine) -> Engine:
    """Set SQLite's pragmas (WAL, busy timeout, foreign keys) on new connections."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def make_engine(url: str, **options: Any) -> Engine:
    """Create an engine for ``url`` as tokenmem wants it (see :func:`parse_url`);
    ``options`` go to :func:`sqlalchemy.create_engine` (``pool_size``, ...).

    No pre-ping: a stale pooled connection fails its first statement and the
    store runs the transaction again on a fresh one, saving a round trip on
    every transaction."""
    return tune(_create(parse_url(url), options))


def source_engine(url: str) -> Engine:
    """An engine for a database tokenmem only reads (an import's source): any
    SQLAlchemy URL with a sync driver (see :func:`~tokenmem.urls.parse_source_url`)."""
    return _create(parse_source_url(url), {})


def _create(url: URL, options: Mapping[str, Any]) -> Engine:
    try:
        return create_engine(url, **options)
    except ImportError as exc:
        raise missing_driver(url, exc) from exc
    except ArgumentError as exc:  # an option create_engine does not take
        message = scrub(str(exc), url)
        raise ConfigurationError(f"cannot make an engine for {shown(url)}: {message}") from exc


def retryable(exc: SQLAlchemyError, *, committing: bool = False) -> bool:
    """Whether the transaction can simply run again: SQLite's "database is
    locked", PostgreSQL's serialization failure or deadlock (none of them
    commits), or a dropped connection (a stale one from the pool) — but not
    while committing, when the commit may or may not have happened."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return not committing
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    text = str(exc.orig).lower()
    return code in ("40001", "40P01") or "database is locked" in text or "busy" in text


def retrying(exc: SQLAlchemyError, attempt: int, url: URL) -> float:
    """Log a retry (without ``url``'s secrets) and return how long to wait before it."""
    logger.info("retrying a transaction (attempt %d) after: %s", attempt + 2, scrub(str(exc), url))
    return backoff(attempt)


def backoff(attempt: int) -> float:
    return float(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))


def schema_error(current: str | None) -> SchemaError | None:
    head = migrate.head()
    if current == head:
        return None
    if current is not None and not migrate.known(current):
        return SchemaError(
            f"tokenmem's tables are at revision {current}, which this tokenmem does not "
            f"know (its head is {head}): a newer tokenmem migrated them; upgrade tokenmem",
            current=current,
            head=head,
        )
    state = "not migrated" if current is None else f"at revision {current}"
    return SchemaError(
        f"tokenmem's tables are {state}, the code needs {head}: run "
        "Store.upgrade(), `tokenmem db upgrade` or `alembic upgrade head`",
        current=current,
        head=head,
    )


Self = TypeVar("Self", bound="StoreBase")
_NONE = "None never selects an owner; owner='' is the default, unnamed one"


class StoreBase:
    """What the sync and async stores share: the engine's name, and owner scopes."""

    engine: Any
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
        stmt = window_select(rule.mode).params(params)
        sql = str(stmt.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True}))
        return ("EXPLAIN QUERY PLAN " if self.dialect == "sqlite" else "EXPLAIN ") + sql

    def _error(self, what: str, exc: BaseException) -> StoreError:
        """The driver's ``exc`` as a :class:`StoreError`, without the URL's secrets."""
        return StoreError(f"{what}: {scrub(str(exc), self.engine.url)}")

    @property
    def dialect(self) -> str:
        name: str = self.engine.dialect.name
        return name


class Store(StoreBase):
    """tokenmem's tables in one database.

    ``url`` is a database URL or an existing :class:`~sqlalchemy.Engine`
    (``None``: :func:`default_url`); ``engine_options`` go to
    ``create_engine`` (e.g. ``{"pool_size": 32}`` for 32 worker threads).
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
        self._migration(lambda conn: migrate.upgrade(conn, revision))

    def downgrade(self, revision: str) -> None:
        """Run tokenmem's migrations down to ``revision`` (``"base"``: drop all)."""
        self._migration(lambda conn: migrate.downgrade(conn, revision))

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

    def _run(self, make: Callable[[], Op[T]]) -> T:
        """Run a fresh ``make()`` in one transaction, retrying on lock errors."""
        if not self._ready:
            self.check()
        for attempt in range(RETRIES):
            state = Attempt()
            try:
                return run(self.engine, make(), state)
            except SQLAlchemyError as exc:
                if attempt + 1 < RETRIES and retryable(exc, committing=state.committing):
                    time.sleep(retrying(exc, attempt, self.engine.url))
                    continue
                raise self._error("database error", exc) from exc
        raise AssertionError("unreachable")

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

        Returns them as stored, with positions and token counts."""
        return self._append(prepare_append(self._key(session_id, owner), [messages], counter))

    def _append(self, prepared: PreparedAppend) -> list[StoredMessage]:
        return self._run(lambda: append_op(self.dialect, prepared))

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
            len(self._append(prepare_append(key, batch, counter)))
            for batch in batches(turns, batch_size)
        )

    def align(self, session_id: str, position: int, turn: int, *, owner: str | None = None) -> None:
        """Let the next message be at ``position`` and turn ``turn`` (only ever
        forward): imports use it to keep their source's positions."""
        key = self._key(session_id, owner)
        self._run(lambda: align_op(self.dialect, key, position, turn))

    def clear(self, session_id: str, *, owner: str | None = None) -> None:
        """Start an empty window; every message stays in the history."""
        key = self._key(session_id, owner)
        self._run(lambda: clear_op(key))

    def erase(self, session_id: str, *, owner: str | None = None) -> int:
        """Delete the session and all its messages for good; return how many
        messages were deleted. Raises :class:`SessionNotFound`."""
        key = self._key(session_id, owner)
        return self._run(lambda: erase_op(key))

    def erase_owner(self, owner: str | None = None) -> Erased:
        """Delete everything ``owner`` has — sessions, messages, turns — for
        good, in one transaction (the right to be forgotten). On a scoped store
        ``owner`` defaults to the scope's owner; on any other it must be named
        (``""`` for the default owner): ``None`` raises :class:`ConfigurationError`."""
        scope = self._erase_scope(owner)
        return self._run(lambda: erase_owner_op(scope))

    def prune(
        self, older_than: timedelta, *, owner: str | None = None, all_owners: bool = False
    ) -> Erased:
        """Retention: hard-delete messages and turn records older than
        ``older_than``, of ``owner``'s sessions, or of every owner's with
        ``all_owners=True``. On a scoped store ``owner`` defaults to the
        scope's owner; on any other, one of the two must be given (``""`` for
        the default owner), else :class:`ConfigurationError`. Turns whose
        window was pruned can no longer be rebuilt."""
        cutoff, scope = utcnow() - older_than, self._prune_scope(owner, all_owners)
        return self._run(lambda: prune_op(cutoff, scope))

    # reads

    def window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> list[WindowMessage]:
        """The newest messages that fit ``rule``, oldest first (one query)."""
        return window_messages(self._window_rows(session_id, rule, counter, owner))

    def _window_rows(
        self, session_id: str, rule: Rule, counter: TokenCounter, owner: str | None
    ) -> Sequence[Any]:
        """The window statement's rows, for a memory that only renders them."""
        key = self._key(session_id, owner)
        return self._run(lambda: window_rows_op(key, rule, counter))

    def explain_window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str | None = None
    ) -> str:
        """The database's query plan for this window's statement, as text."""
        sql = self._explain_sql(session_id, rule, counter, owner)
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql).all()
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
        return self._run(lambda: history_page_op(key, after, limit, since, until))

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
        ``counter``) in one transaction. Returns the record with its ``seq``."""
        key = self._key(session_id, owner)
        if exchange and counter is None:
            raise ConfigurationError("record_turn needs the counter to save an exchange")
        prepared = prepare_append(key, [exchange], counter) if exchange and counter else None
        return self._run(lambda: record_turn_op(self.dialect, key, record, prepared))

    def turns(self, session_id: str, *, owner: str | None = None) -> list[TurnRecord]:
        """The session's recorded model calls, oldest first."""
        key = self._key(session_id, owner)
        return self._run(lambda: turns_op(key))

    def rebuild_prompt(
        self, session_id: str, seq: int, *, owner: str | None = None
    ) -> list[dict[str, str]] | str:
        """The exact prompt call ``seq`` sent, rebuilt from the stored history."""
        key = self._key(session_id, owner)
        record, window = self._run(lambda: turn_op(key, seq))
        return rebuild(record, window)

    def session(self, session_id: str, *, owner: str | None = None) -> SessionInfo:
        """One session's summary; :class:`SessionNotFound` if there is none."""
        key = self._key(session_id, owner)
        return self._run(lambda: session_op(key))

    def recount(self, session_id: str, counter: TokenCounter, *, owner: str | None = None) -> None:
        """Count the session's messages again with ``counter``'s encoding, in
        one transaction (appends do this by themselves when the encoding
        changes; this does it ahead of time)."""
        key = self._key(session_id, owner)
        self._run(lambda: recount_op(key.id, counter))

    def sessions(self, *, owner: str | None = None) -> list[SessionInfo]:
        """The owner's sessions, by name."""
        key = self._key("-", owner)
        return self._run(lambda: sessions_op(key.owner))

    def session_stats(
        self, *, owner: str | None = None, all_owners: bool = False
    ) -> list[SessionStats]:
        """Sessions with message counts, tokens and activity (one owner, or all)."""
        scope = self._scope(owner, all_owners)
        return self._run(lambda: session_stats_op(scope))

    def count(self, *, owner: str | None = None, all_owners: bool = False) -> int:
        """How many messages ``owner`` holds (default: the scope's owner, or
        the default, unnamed owner), or every owner with ``all_owners=True``."""
        scope = self._scope(owner, all_owners)
        return self._run(lambda: count_op(scope))
