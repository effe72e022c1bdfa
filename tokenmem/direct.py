"""The hot statements — the append's upsert and insert, the window — run on
the DBAPI cursor: compiled once per engine from their Core definitions, their
parameters put through SQLAlchemy's own bind processors, errors handed to
SQLAlchemy's own handling (wrapped as ``DBAPIError``, a lost connection
invalidating the pool). What is skipped is ``Connection.execute``'s per-call
machinery (cache keys, execution contexts, result objects): most of a turn's
Python, and on SQLite the Python that runs while the write lock is held. An
engine with event listeners or ``echo`` runs them through ``exec_driver_sql``
instead, so that what watches it sees them.

Only statements whose result columns need no type processing (integers,
text, a boolean that SQLite returns as 0/1) may be :class:`Direct`; a step
yields ``(Direct(statement), params)``, ``params`` a mapping or, for
``executemany``, a list of them, and is sent back :class:`Rows`.

:class:`RawConnection` goes one step further for both stores: a
transaction on a pooled DBAPI connection without a ``Connection`` (nor its
event dispatch, Transaction object and pool reset), which is made only if an
operation runs a Core statement or an error needs SQLAlchemy's handling.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from sqlalchemy import Connection, Dialect, Engine, Executable, PoolProxiedConnection
from sqlalchemy.engine import Result
from sqlalchemy.exc import MultipleResultsFound, NoResultFound

__all__ = ["Direct", "RawConnection", "Rows", "connect"]


class Conn(Protocol):
    """What operations run on: a ``Connection``, or a :class:`RawConnection`."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def connection(self) -> PoolProxiedConnection: ...

    def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]: ...

    def _handle_dbapi_exception(
        self, e: BaseException, statement: str | None, parameters: Any, cursor: Any, context: Any
    ) -> NoReturn: ...


class Rows(list[tuple[Any, ...]]):
    """A direct statement's rows, with the Result methods the operations use."""

    def all(self) -> Rows:
        return self

    def first(self) -> tuple[Any, ...] | None:
        return self[0] if self else None

    def one(self) -> tuple[Any, ...]:
        if not self:
            raise NoResultFound("no row was found when one was required")
        if len(self) > 1:
            raise MultipleResultsFound("multiple rows were found when one was required")
        return self[0]


@dataclass(frozen=True)
class _Compiled:
    sql: str
    positional: Callable[[dict[str, Any]], Any] | None  # the values in order, for "qmark"
    defaults: dict[str, Any]  # values bound in the statement itself
    processors: dict[str, Callable[[Any], Any]]
    returns_rows: bool

    def bind(self, given: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        values = {**self.defaults, **given}
        for name, process in self.processors.items():
            values[name] = process(values[name])
        if self.positional is None:
            return values
        ordered: Sequence[Any] = self.positional(values)
        return ordered


def _getter(names: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A function of a dict returning the values of ``names``, as a tuple."""
    if len(names) < 2:
        return lambda values: tuple(values[name] for name in names)
    return operator.itemgetter(*names)


@dataclass(frozen=True, eq=False)
class Direct:
    """A Core statement to run on the DBAPI cursor (see the module docstring)."""

    statement: Executable
    # per dialect instance: bind processors follow an engine's settings
    # (json_serializer...), and a disposed engine's dialect may go
    _compiled: weakref.WeakKeyDictionary[Dialect, _Compiled] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False
    )

    def compiled(self, dialect: Dialect) -> _Compiled:
        found = self._compiled.get(dialect)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)  # type: ignore[attr-defined]
            if (
                "POSTCOMPILE" in compiled.string
                or compiled.insert_prefetch
                or compiled.update_prefetch
            ):  # values SQLAlchemy would fill in at execution time
                raise TypeError(f"not a direct statement: {self.statement}")
            processors = {}
            for name, bind in compiled.binds.items():
                process = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    processors[name] = process
            found = _Compiled(
                sql=compiled.string,
                positional=_getter(compiled.positiontup) if compiled.positional else None,
                defaults={
                    name: value
                    for name, value in compiled.construct_params(_check=False).items()
                    if not compiled.binds[name].required
                },
                processors=processors,
                returns_rows=bool(compiled.effective_returning)
                or not (compiled.isinsert or compiled.isupdate or compiled.isdelete),
            )
            self._compiled[dialect] = found
        return found

    def run(
        self, conn: Conn, params: Mapping[str, Any] | list[Mapping[str, Any]]
    ) -> Any:  # Rows, or a CursorResult: both have all(), first() and one()
        """Execute on ``conn``'s DBAPI connection, in its transaction; through
        ``exec_driver_sql`` when events or SQL logging watch the engine, so
        that loggers and tracers (OpenTelemetry...) still see every statement."""
        compiled = self.compiled(conn.dialect)
        if isinstance(conn, Connection) and _watched(conn):
            bound = _bind_all(compiled, params)
            result = conn.exec_driver_sql(compiled.sql, bound)
            return result if compiled.returns_rows else Rows()
        cursor, bound = None, None
        raw = conn if isinstance(conn, RawConnection) else None  # one cursor a transaction
        try:
            bound = _bind_all(compiled, params)
            cursor = raw.cursor() if raw else conn.connection.cursor()
            if isinstance(params, list):
                cursor.executemany(compiled.sql, bound)
                rows = Rows()
            else:
                cursor.execute(compiled.sql, bound)
                rows = Rows(cursor.fetchall() if compiled.returns_rows else ())
            if raw is None:
                cursor.close()
            return rows
        except BaseException as exc:
            # SQLAlchemy's own handling: wrapped as DBAPIError or StatementError
            # (hide_parameters honoured), a lost connection invalidating the
            # whole pool, handle_error events.
            conn._handle_dbapi_exception(exc, compiled.sql, bound, cursor, None)


def _bind_all(compiled: _Compiled, params: Mapping[str, Any] | list[Mapping[str, Any]]) -> Any:
    return [compiled.bind(p) for p in params] if isinstance(params, list) else compiled.bind(params)


def _watched(conn: Connection) -> bool:
    """Whether events or echo watch ``conn``'s statements. (Private attributes,
    read defensively: should they ever go, every statement takes the watched
    path, slower but never unseen.)"""
    return bool(getattr(conn, "_has_events", True) or getattr(conn, "_echo", True)) or (
        _watched_engine(conn.engine)
    )


def _watched_engine(engine: Engine) -> bool:
    return bool(
        getattr(engine, "_has_events", True)
        or getattr(engine.dialect, "_has_events", True)
        or engine._should_log_info()
    )


def connect(engine: Engine) -> Connection | RawConnection:
    """A connection for one transaction: a :class:`RawConnection` unless
    events or SQL logging watch ``engine`` (then every statement must go
    through a ``Connection``, where they see it)."""
    return engine.connect() if _watched_engine(engine) else RawConnection(engine)


class RawConnection:
    """One transaction on a pooled DBAPI connection, for :class:`Direct`
    statements; a ``Connection`` on the same DBAPI connection (same
    transaction) is made only for a Core statement or to handle an error.
    Used like ``Connection``: ``with connect(engine) as conn``, ``conn.begin()``
    and ``commit()``; closing without a commit rolls back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        try:
            self.connection: PoolProxiedConnection = engine.raw_connection()
        except BaseException as exc:  # as engine.connect() would raise it
            Connection._handle_dbapi_exception_noconnection(exc, engine.dialect, engine)
        self._wrapped: Connection | None = None
        # One cursor for the transaction: with aiosqlite, making and closing
        # one is a trip to its thread each.
        self._cursor: Any = None
        self.committed = False

    def cursor(self) -> Any:
        if self._cursor is None:
            self._cursor = self.connection.cursor()
        return self._cursor

    def _close_cursor(self) -> None:
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            cursor.close()

    def _connection(self) -> Connection:
        if self._wrapped is None:
            self._wrapped = Connection(self.engine, self.connection)
        return self._wrapped

    def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]:
        return self._connection().execute(statement, parameters)

    def _handle_dbapi_exception(
        self, e: BaseException, statement: str | None, parameters: Any, cursor: Any, context: Any
    ) -> NoReturn:
        if cursor is not None and cursor is self._cursor:
            self._cursor = None  # SQLAlchemy closes it
        self._connection()._handle_dbapi_exception(e, statement, parameters, cursor, context)
        raise AssertionError("unreachable")  # it raises

    def begin(self) -> RawConnection:
        return self

    def commit(self) -> None:
        try:
            self._close_cursor()
            if self._wrapped is None:
                self.connection.commit()
        except BaseException as exc:
            self._handle_dbapi_exception(exc, None, None, None, None)
        if self._wrapped is not None:
            self._wrapped.commit()
        self.committed = True

    def close(self) -> None:
        """Back to the pool, which rolls back what was not committed (and,
        told so, does not roll back what was)."""
        try:
            with contextlib.suppress(Exception):  # the pool resets or discards the connection
                self._close_cursor()
        finally:
            close_special = getattr(self.connection, "_close_special", None)
            if self._wrapped is not None:
                self._wrapped.close()
            elif self.committed and close_special is not None:
                close_special(transaction_reset=True)
            else:
                self.connection.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
