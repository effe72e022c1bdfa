"""Turn audit log: every model call of a chain.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tokenmem.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokenmem_sessions") as batch:
        batch.add_column(
            sa.Column("next_call", sa.BigInteger(), server_default="0", nullable=False)
        )
    op.create_table(
        "tokenmem_turns",
        sa.Column("session_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("api", sa.String(16), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("template", sa.Text(), nullable=True),
        sa.Column("human_prefix", sa.String(255), nullable=False),
        sa.Column("ai_prefix", sa.String(255), nullable=False),
        sa.Column("input", sa.Text(), nullable=False),
        sa.Column("window_first", sa.BigInteger(), nullable=True),
        sa.Column("window_last", sa.BigInteger(), nullable=True),
        sa.Column("token_budget", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("api_prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("api_completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error_type", sa.String(255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("turn", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("outcome IN ('ok', 'error')", name=op.f("ck_tokenmem_turns_outcome")),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["tokenmem_sessions.id"],
            name=op.f("fk_tokenmem_turns_session_id_tokenmem_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "seq", name=op.f("pk_tokenmem_turns")),
    )


def downgrade() -> None:
    op.drop_table("tokenmem_turns")
    with op.batch_alter_table("tokenmem_sessions") as batch:
        batch.drop_column("next_call")
