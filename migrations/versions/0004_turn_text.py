"""The turn log's model, prefixes and error type are unbounded text.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

They were ``VARCHAR(255)``: PostgreSQL refused a longer prefix (which the
memory accepts, as SQLite does) when the call was recorded, after the model
had answered, and the reply was lost. The downgrade truncates longer values
to 255 characters on PostgreSQL (SQLite does not enforce the length).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_COLUMNS = ("model", "human_prefix", "ai_prefix", "error_type")


def upgrade() -> None:
    with op.batch_alter_table("tokenmem_turns") as batch:
        for name in _COLUMNS:
            batch.alter_column(name, type_=sa.Text(), existing_type=sa.String(255))


def downgrade() -> None:
    with op.batch_alter_table("tokenmem_turns") as batch:
        for name in _COLUMNS:
            batch.alter_column(
                name,
                type_=sa.String(255),
                existing_type=sa.Text(),
                postgresql_using=f"left({name}, 255)",
            )
