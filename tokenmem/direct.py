"""The hot statements — the append's upsert and insert, the window — run on
the DBAPI cursor: compiled once per dialect from their Core definitions, their
parameters put through SQLAlchemy's own bind processors, and errors raised as
SQLAlchemy's ``DBAPIError`` (a lost connection invalidated), as
``Connection.execute`` would. What is skipped is its per-call machinery
(cache keys, execution contexts, result objects): most of a turn's Python,
and on SQLite the Python that runs while the write lock is held. An engine
with event listeners or ``echo`` gets them through ``exec_driver_sql``
instead, so that what watches it sees them.

Only statements whose result columns need no type processing (integers and
text) may be :class:`Direct`; a step yields ``(Direct(statement), params)``,
``params`` a mapping or, for ``executemany``, a list of them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Dialect, Executable
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound

__all__ = ["Direct", "Rows"]


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
    # per dialect class and parameter style (an engine may ask for another)
    _compiled: dict[tuple[type[Dialect], str], _Compiled] = field(default_factory=dict, repr=False)

    def compiled(self, dialect: Dialect) -> _Compiled:
        key = (type(dialect), dialect.paramstyle)
        found = self._compiled.get(key)
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
            self._compiled[key] = found
        return found

    def run(
        self, conn: Connection, params: Mapping[str, Any] | list[Mapping[str, Any]]
    ) -> Any:  # Rows, or a CursorResult: both have all(), first() and one()
        """Execute on ``conn``'s DBAPI connection, in its transaction; through
        ``exec_driver_sql`` when engine events or echo are watching, so
        loggers and tracers (OpenTelemetry...) still see every statement."""
        dialect = conn.dialect
        compiled = self.compiled(dialect)
        many = isinstance(params, list)
        bound: Any = (
            [compiled.bind(p) for p in params]
            if isinstance(params, list)
            else compiled.bind(params)
        )
        # (private attributes, read defensively: if they ever go, every
        # statement takes the watched path, slower but never unseen)
        if (
            getattr(conn, "_has_events", True)
            or getattr(conn.engine, "_has_events", True)
            or getattr(conn, "_echo", True)
        ):
            result = conn.exec_driver_sql(compiled.sql, bound)
            return result if compiled.returns_rows else Rows()
        dbapi = conn.connection
        cursor = dbapi.cursor()
        try:
            if many:
                cursor.executemany(compiled.sql, bound)
                return Rows()
            cursor.execute(compiled.sql, bound)
            return Rows(cursor.fetchall() if compiled.returns_rows else ())
        except dialect.loaded_dbapi.Error as exc:
            lost = dialect.is_disconnect(exc, dbapi.dbapi_connection, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                compiled.sql,
                bound,
                exc,
                dialect.loaded_dbapi.Error,
                connection_invalidated=lost,
                dialect=dialect,
            ) from exc
        finally:
            if not conn.invalidated:
                cursor.close()
