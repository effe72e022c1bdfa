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

__all__ = ["VERSION_TABLE", "config", "current", "downgrade", "head", "upgrade"]

VERSION_TABLE = "tokenmem_alembic_version"


def config(connection: Connection | None = None) -> Config:
    """An alembic Config for tokenmem's scripts; with ``connection``, env.py runs on it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("tokenmem.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def current(connection: Connection) -> str | None:
    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(config(connection), revision)


def downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(config(connection), revision)
