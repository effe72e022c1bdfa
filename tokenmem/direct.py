"""The hot statements on the DBAPI cursor, for engines tokenmem made itself.

An append's two statements and the window's one are most of a turn, and
``Connection.execute``'s per-call machinery (cache key, execution context,
result object) is most of their Python. On an engine tokenmem created from a
URL (:attr:`tokenmem.Store.direct`), an operation runs them on the cursor of
the transaction's own DBAPI connection instead: compiled once per dialect with
the public compiler API (``statement.compile(dialect=...)``: its string,
``positiontup``, ``binds`` and ``params``), parameters put through each type's
public ``bind_processor``, errors wrapped as SQLAlchemy's own
(``DBAPIError.instance``) and a lost connection invalidated
(``dialect.is_disconnect``, ``Connection.invalidate``). A bulk append's rows
(:func:`insert_many`) go by ``COPY ... FROM STDIN`` on PostgreSQL (psycopg's
public ``Cursor.copy`` on the same connection, values through the same bind
processors): 1.3 to 1.6 times the rows a second of a pipelined executemany in
``benchmarks/bulk_write.py``. The transaction itself — connect, begin,
commit, the pool — stays SQLAlchemy's.

An engine a host passes in (its listeners, ``echo``, ``schema_translate_map``,
tracing) always runs every statement through ``Connection.execute``, where
they see it; so does an engine whose ``echo`` is on. ``tests/test_engine.py``
checks that both paths write and read identical rows.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect, Executable, Insert
from sqlalchemy.exc import DBAPIError, StatementError

__all__ = ["DIRECT", "execute", "insert_many"]

# The execution option a store sets on a connection to take this path.
DIRECT = "tokenmem_direct"


@dataclass(frozen=True)
class _Compiled:
    sql: str
    positional: bool  # the driver takes a list in ``names`` order, else a dict
    # The parameters (in order, for a positional paramstyle), each with its
    # type's bind processor or None.
    plan: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    defaults: dict[str, Any]  # values the statement binds itself

    def bind(self, given: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        if self.defaults:
            given = {**self.defaults, **given}
        if self.positional:
            return [given[k] if process is None else process(given[k]) for k, process in self.plan]
        return {k: given[k] if process is None else process(given[k]) for k, process in self.plan}


# Per dialect (bind processors follow an engine's settings; a disposed
# engine's dialect may go), per statement (the hot ones live for the process).
_compiled: weakref.WeakKeyDictionary[Dialect, dict[int, tuple[Executable, _Compiled]]]
_compiled = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _compile(statement: Executable, dialect: Dialect) -> _Compiled:
    found = _compiled.get(dialect, {}).get(id(statement))
    if found is not None:
        return found[1]
    compiled: Any = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    binds = compiled.binds
    names = tuple(compiled.positiontup) if compiled.positional else tuple(binds)
    made = _Compiled(
        sql=compiled.string,
        positional=bool(compiled.positional),
        plan=tuple(
            (name, binds[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in names
        ),
        defaults={k: v for k, v in compiled.params.items() if not binds[k].required},
    )
    with _lock:  # the statement is kept, so its id stays its own
        _compiled.setdefault(dialect, {})[id(statement)] = (statement, made)
    return made


def execute(
    conn: Connection,
    statement: Executable,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> Sequence[Any]:
    """Run one of the hot statements (built once, kept for the process) and
    return its rows (none for an INSERT without RETURNING); ``params`` a
    mapping, or a list of them for an executemany. On the DBAPI cursor when
    the store set :data:`DIRECT` on ``conn``, else ``conn.execute``."""
    if not conn.get_execution_options().get(DIRECT):
        result = conn.execute(statement, params)
        return result.all() if result.returns_rows else ()
    compiled = _compile(statement, conn.dialect)
    raw = conn.connection
    cursor: Any = raw.cursor()
    try:
        if type(params) is dict or isinstance(params, Mapping):
            cursor.execute(compiled.sql, compiled.bind(params))
            return cursor.fetchall() if cursor.description else ()
        cursor.executemany(compiled.sql, [compiled.bind(p) for p in params])
        return ()
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _error(conn, raw, cursor, compiled.sql, exc) from exc
    finally:
        _close(conn, cursor)


def insert_many(conn: Connection, statement: Insert, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (each naming every column of ``statement``'s table):
    on PostgreSQL's direct path (sync) with ``COPY ... FROM STDIN`` (psycopg's
    public ``Cursor.copy``, values put through each column type's
    ``bind_processor``), else as :func:`execute`'s executemany."""
    dialect = conn.dialect  # psycopg's async connection has its own COPY, not this one
    direct = conn.get_execution_options().get(DIRECT)
    if dialect.name != "postgresql" or dialect.is_async or not direct:
        execute(conn, statement, rows)
        return
    copy = _copy_of(statement, conn.dialect)
    raw = conn.connection
    cursor: Any = raw.cursor()
    try:
        with cursor.copy(copy.sql) as writer:
            for row in rows:
                writer.write_row([process(row[name]) for name, process in copy.columns])
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _error(conn, raw, cursor, copy.sql, exc) from exc
    finally:
        _close(conn, cursor)


@dataclass(frozen=True)
class _Copy:
    sql: str
    columns: tuple[tuple[str, Callable[[Any], Any]], ...]


def _same(value: Any) -> Any:
    return value


_copies: weakref.WeakKeyDictionary[Dialect, dict[int, tuple[Insert, _Copy]]]
_copies = weakref.WeakKeyDictionary()


def _copy_of(statement: Insert, dialect: Dialect) -> _Copy:
    found = _copies.get(dialect, {}).get(id(statement))
    if found is not None:
        return found[1]
    quote = dialect.identifier_preparer.quote
    table = statement.table
    names = [c.name for c in table.columns]
    columns = tuple(
        (c.name, c.type.dialect_impl(dialect).bind_processor(dialect) or _same)
        for c in table.columns
    )
    made = _Copy(f"COPY {quote(table.name)} ({', '.join(map(quote, names))}) FROM STDIN", columns)
    with _lock:  # the statement is kept, so its id stays its own
        _copies.setdefault(dialect, {})[id(statement)] = (statement, made)
    return made


def _close(conn: Connection, cursor: Any) -> None:
    # (contextlib.suppress would cost three calls a statement)
    try:  # noqa: SIM105
        cursor.close()
    except conn.dialect.loaded_dbapi.Error:  # a lost connection's
        pass


def _error(conn: Connection, raw: Any, cursor: Any, sql: str, exc: Any) -> StatementError:
    """The driver's ``exc`` as SQLAlchemy raises it (without parameters); a
    lost connection invalidated, as SQLAlchemy does: this one, and the idle
    ones of its age."""
    lost = conn.dialect.is_disconnect(exc, raw.dbapi_connection, cursor)
    if lost:
        conn.invalidate(exc)
        conn.engine.pool.dispose()
    error: StatementError = DBAPIError.instance(
        sql,
        None,
        exc,
        conn.dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=lost,
        dialect=conn.dialect,
    )
    return error
