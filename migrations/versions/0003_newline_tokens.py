"""Messages count their joining newline: the text window is exact in SQL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

Older rows keep NULL, which the window counts as one token (the rule they
were written with); a memory recounts the rendered string while any of them
is in its window, and ``tokenmem recount`` (no model given: each session
keeps its encoding) fills them in.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokenmem_messages") as batch:
        batch.add_column(sa.Column("newline_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tokenmem_messages") as batch:
        batch.drop_column("newline_tokens")
