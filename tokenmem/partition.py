"""Hash partitioning of the per-session tables on PostgreSQL.

``tokenmem_messages``, ``tokenmem_turns`` and ``tokenmem_summaries`` are
keyed by ``(session_id, ...)`` and every hot statement names one session, so
they can be split by ``PARTITION BY HASH (session_id)`` into ``N`` partitions
(``tokenmem_messages_p0`` ... ``_p{N-1}``): a session's window, appends,
history, turn log and summaries touch one partition of each. The
conversion runs in one transaction; the new tables are built from the models
in :mod:`tokenmem.models` (``Table.to_metadata`` with the
``postgresql_partition_by`` option, ``CreateTable``, ``CreateIndex``), so they
have the columns, constraints, indexes and foreign keys the migrations make::

    with engine.begin() as conn:
        partition(conn, 16)      # {'tokenmem_messages': 16, 'tokenmem_turns': 16, ...}
        unpartition(conn)        # back to plain tables, rows kept

It rewrites the tables (``INSERT ... SELECT``) under an ``ACCESS EXCLUSIVE``
lock: appends and reads wait until it commits. Migrations keep working on
partitioned tables (PostgreSQL applies ``ALTER TABLE`` to every partition);
one that drops and re-creates a table (a downgrade below the revision that
made it) brings it back plain. See docs/scaling.md.
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, MetaData, Table, insert, select, text
from sqlalchemy.schema import CreateIndex, CreateTable

from . import migrate
from .errors import ConfigurationError
from .models import MESSAGES, SESSIONS, SUMMARIES, TURNS, Base

__all__ = [
    "MAX_PARTITIONS",
    "TABLES",
    "checked",
    "include_name",
    "is_partition",
    "layout",
    "partition",
    "unpartition",
]

TABLES = (MESSAGES, TURNS, SUMMARIES)
MAX_PARTITIONS = 1024
_NAMES = [t.name for t in TABLES]
_PARTITION = re.compile(f"({'|'.join(_NAMES)})_p\\d+")
_LISTED = ", ".join(f"'{name}'" for name in _NAMES)

# Every relation of a table's tree (the table, its partitions, their
# indexes), to move the old tree's names out of the new one's way.
_TREE = text(
    """
    WITH RECURSIVE tree(oid) AS (
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname = :name AND n.nspname = coalesce(:schema, current_schema())
        UNION ALL
        SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid
    )
    SELECT c.oid, c.relkind, c.relname FROM pg_class c JOIN tree ON c.oid = tree.oid
    UNION ALL
    SELECT c.oid, c.relkind, c.relname
    FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid JOIN tree ON x.indrelid = tree.oid
    """
)

_LAYOUT = text(
    f"""
    SELECT c.relname, c.relkind,
           (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid) AS partitions
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relname IN ({_LISTED})
      AND n.nspname = coalesce(:schema, current_schema())
    """
)


def is_partition(name: str) -> bool:
    """Whether ``name`` is one of the partitions :func:`partition` makes: for
    alembic's ``include_name`` hook, so autogenerate compares the partitioned
    tables and not their partitions (which the models do not list)."""
    return _PARTITION.fullmatch(name) is not None


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """alembic's ``include_name`` hook: leave out the partitions (tokenmem's
    ``migrations/env.py`` passes it, so autogenerate sees no drift on a
    partitioned database)."""
    return not (type_ == "table" and name is not None and is_partition(name))


def layout(conn: Connection) -> dict[str, int]:
    """How the per-session tables (:data:`TABLES`) are stored: the number of
    hash partitions of each, 0 for a plain table (SQLite: always 0)."""
    if conn.dialect.name != "postgresql":
        return {t.name: 0 for t in TABLES}
    rows = conn.execute(_LAYOUT, {"schema": migrate.schema(conn)}).all()
    found = {name: int(n) if kind == "p" else 0 for name, kind, n in rows}
    return {t.name: found.get(t.name, 0) for t in TABLES}


def partition(conn: Connection, partitions: int) -> dict[str, int]:
    """Make the per-session tables (:data:`TABLES`) hash-partitioned by
    ``session_id`` into ``partitions`` partitions each, keeping every row, in
    the caller's transaction (plain or already partitioned tables alike).
    Returns :func:`layout`. Raises :class:`ConfigurationError` on SQLite or
    for a count outside 1..:data:`MAX_PARTITIONS`."""
    return _rebuild(conn, checked(partitions))


def checked(partitions: int) -> int:
    """``partitions``, if it is a partition count :func:`partition` takes;
    else :class:`ConfigurationError`."""
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise ConfigurationError(f"partitions must be an int, not {partitions!r}")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ConfigurationError(f"partitions must be 1 to {MAX_PARTITIONS}, not {partitions}")
    return partitions


def unpartition(conn: Connection) -> dict[str, int]:
    """Make the tables plain again, keeping every row (the reverse of
    :func:`partition`; nothing to do on plain tables). Returns :func:`layout`."""
    return _rebuild(conn, 0)


def _rebuild(conn: Connection, partitions: int) -> dict[str, int]:
    if conn.dialect.name != "postgresql":
        raise ConfigurationError(
            f"partitioning needs PostgreSQL; this database is {conn.dialect.name} "
            "(SQLite has no table partitioning)"
        )
    before, schema = layout(conn), migrate.schema(conn)
    todo = [t for t in TABLES if before[t.name] != partitions]
    if todo:
        # Appends lock the session row, then write messages: lock in that order.
        sessions = _qualified(conn, SESSIONS.name)
        conn.execute(text(f"LOCK TABLE {sessions} IN SHARE ROW EXCLUSIVE MODE"))
    for table in todo:
        _convert(conn, table, partitions, schema)
    return layout(conn)


def _qualified(conn: Connection, name: str) -> str:
    quote = conn.dialect.identifier_preparer
    schema = migrate.schema(conn)
    return f"{quote.quote_schema(schema)}.{quote.quote(name)}" if schema else quote.quote(name)


def _convert(conn: Connection, table: Table, partitions: int, schema: str | None) -> None:
    """Rebuild ``table`` as ``partitions`` hash partitions (0: plain): move
    the old tree's names aside, create the new table from the model, copy the
    rows, index them, drop the old tree."""
    quote = conn.dialect.identifier_preparer
    old_name = None
    for oid, kind, name in conn.execute(_TREE, {"name": table.name, "schema": schema}).all():
        aside = f"tokenmem_old_{oid}"
        if name == table.name:
            old_name = aside
        what = "INDEX" if kind in ("i", "I") else "TABLE"
        conn.execute(text(f"ALTER {what} {_qualified(conn, name)} RENAME TO {quote.quote(aside)}"))
    if old_name is None:
        raise ConfigurationError(f"no table {table.name}: run Store.upgrade() first")
    metadata = MetaData(naming_convention=Base.metadata.naming_convention)
    SESSIONS.to_metadata(metadata)  # what the foreign key refers to
    new = table.to_metadata(metadata)
    if partitions:
        new.dialect_kwargs["postgresql_partition_by"] = "HASH (session_id)"
    conn.execute(CreateTable(new))
    for r in range(partitions):
        conn.execute(
            text(
                f"CREATE TABLE {_qualified(conn, f'{table.name}_p{r}')} PARTITION OF "
                f"{_qualified(conn, table.name)} "
                f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {r})"
            )
        )
    old = table.to_metadata(metadata, name=old_name)
    columns = [c.name for c in new.c]
    conn.execute(insert(new).from_select(columns, select(*(old.c[c] for c in columns))))
    for index in new.indexes:  # after the copy: built once, not row by row
        conn.execute(CreateIndex(index))
    conn.execute(text(f"DROP TABLE {_qualified(conn, old_name)}"))
