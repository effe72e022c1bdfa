"""Alembic environment for tokenmem.

Run from the repository root (``alembic upgrade head``, URL from
``TOKENMEM_DATABASE_URL``) or by the library on a connection it passes in
``config.attributes["connection"]``.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from tokenmem.engine import default_url, make_engine
from tokenmem.migrate import VERSION_TABLE, schema
from tokenmem.models import Base
from tokenmem.partition import include_name


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema(connection),
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=include_name,  # a partitioned database's partitions are not drift
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url") or default_url(),
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    if (
        context.config.config_file_name
    ):  # the alembic command: log what it does, as alembic.ini says
        fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or default_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()
