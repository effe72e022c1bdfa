"""Engines and transactions: how tokenmem connects, and how one store
operation becomes one transaction, retried when the database says it may be.

Both stores run an operation — a function of a ``Connection``, see
:mod:`tokenmem.writes` and :mod:`tokenmem.reads` — with :func:`transaction`,
the sync one directly, the async one through ``AsyncConnection.run_sync``;
:func:`retry_delay` decides, for both, whether a failed try runs again::

    engine = make_engine("sqlite:///chat.db")
    with engine.connect() as conn:
        transaction(conn, lambda c: c.exec_driver_sql("select 1").scalar(), Attempt())
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from . import migrate
from .direct import DIRECT
from .errors import ConfigurationError, SchemaError
from .urls import missing_driver, parse_source_url, parse_url, scrub, shown

__all__ = [
    "RETRIES",
    "Attempt",
    "default_url",
    "make_engine",
    "retry_delay",
    "schema_error",
    "source_engine",
    "transaction",
    "tune",
    "without_parameters",
]

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
    except (ArgumentError, TypeError) as exc:  # an option create_engine does not take
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


def without_parameters(text: str) -> str:
    """A SQLAlchemy error's text less its ``[parameters: ...]`` part and the
    row PostgreSQL quotes in the context of a failed ``COPY`` (``COPY t,
    line 2: "..."``): the values sent are users' messages, which errors and
    logs must not carry."""
    text = _COPY_ROW.sub(r"\1", text)
    head, found, rest = text.partition("\n[parameters: ")
    if not found:
        return text
    _, background, tail = rest.partition("\n(Background on this error")
    return head + (background + tail if background else "")


_COPY_ROW = re.compile(r"(COPY [^\n,]+, line \d+(?:, column [^\n:]+)?): [^\n]*")


def retrying(exc: SQLAlchemyError, attempt: int, url: URL) -> float:
    """Log a retry (without ``url``'s secrets or the statement's parameters)
    and return how long to wait before it."""
    message = scrub(without_parameters(str(exc)), url)
    logger.info("retrying a transaction (attempt %d) after: %s", attempt + 2, message)
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


class Attempt:
    """One try of a transaction: whether it got as far as COMMIT (then a lost
    connection may or may not have committed, and it must not run again)."""

    committing = False


def transaction(
    conn: Connection, work: Callable[[Connection], T], attempt: Attempt, direct: bool = False
) -> T:
    """Run ``work(conn)`` in one transaction and commit it (roll back if it
    raises); with ``direct``, its hot statements on the DBAPI cursor
    (:mod:`tokenmem.direct`)."""
    if direct:
        conn.execution_options(**{DIRECT: True})
    with conn.begin():
        value = work(conn)
        attempt.committing = True
    return value


def retry_delay(exc: SQLAlchemyError, attempt: int, state: Attempt, url: URL) -> float | None:
    """How long to wait before running a failed transaction again, or None
    when it must not run again (the error is then the caller's)."""
    if attempt + 1 >= RETRIES or not retryable(exc, committing=state.committing):
        return None
    return retrying(exc, attempt, url)
