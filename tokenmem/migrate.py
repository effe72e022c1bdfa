"""Alembic migrations, run by the library on a connection it is handed.

tokenmem keeps its own version table, so a host application's alembic
history is never touched::

    with engine.begin() as conn:
        upgrade(conn)
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

__all__ = ["VERSION_TABLE", "config", "current", "downgrade", "head", "schema", "upgrade"]

VERSION_TABLE = "tokenmem_alembic_version"


def config(connection: Connection | None = None) -> Config:
    """An alembic Config for tokenmem's scripts; with ``connection``, env.py runs on it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("tokenmem.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


_LOCK_KEY = 0x746F6B656E6D656D  # "tokenmem": one PostgreSQL advisory lock for migrations


def _lock(connection: Connection) -> None:
    """Serialise migrations between processes (the lock ends with the
    transaction): alembic then reads the version another process just wrote."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
    elif connection.dialect.name == "sqlite":
        dbapi = connection.connection.dbapi_connection
        if not getattr(dbapi, "in_transaction", True):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def known(revision: str) -> bool:
    """Whether this tokenmem has a migration script for ``revision``."""
    try:
        return ScriptDirectory.from_config(config()).get_revision(revision) is not None
    except Exception:
        return False


def head() -> str:
    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def schema(connection: Connection) -> str | None:
    """The schema a host's ``schema_translate_map`` puts tokenmem's tables in."""
    translate = connection.get_execution_options().get("schema_translate_map") or {}
    found: str | None = translate.get(None)
    return found


def current(connection: Connection) -> str | None:
    opts = {"version_table": VERSION_TABLE, "version_table_schema": schema(connection)}
    return MigrationContext.configure(connection, opts=opts).get_current_revision()


def _in_schema(connection: Connection) -> None:
    """Alembic's ALTERs name tables unqualified and a ``schema_translate_map``
    does not reach them: on PostgreSQL the transaction's search_path does."""
    name = schema(connection)
    if name and connection.dialect.name == "postgresql":
        quoted = connection.dialect.identifier_preparer.quote_schema(name)
        connection.exec_driver_sql(f"SET LOCAL search_path TO {quoted}")


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade tokenmem's tables on ``connection`` (in its transaction).

    Call it from a host application's ``env.py`` (after its own
    migrations), not from inside one of its migration scripts: alembic's
    ``op`` proxies are global."""
    _lock(connection)
    _in_schema(connection)
    command.upgrade(config(connection), revision)


def downgrade(connection: Connection, revision: str) -> None:
    _lock(connection)
    _in_schema(connection)
    command.downgrade(config(connection), revision)
