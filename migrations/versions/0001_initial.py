"""Sessions and messages.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from tokenmem.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "tokenmem_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("encoding", sa.String(64), nullable=True),
        sa.Column("next_position", sa.BigInteger(), nullable=False),
        sa.Column("next_turn", sa.BigInteger(), nullable=False),
        sa.Column("floor_total", sa.BigInteger(), nullable=False),
        sa.Column("start_position", sa.BigInteger(), nullable=False),
        sa.Column("start_floor", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("metadata", _json, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokenmem_sessions")),
    )
    op.create_index(
        op.f("ix_tokenmem_sessions_owner_id_name"), "tokenmem_sessions", ["owner_id", "name"]
    )
    op.create_table(
        "tokenmem_messages",
        sa.Column("session_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("turn", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("metadata", _json, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("encoding", sa.String(64), nullable=False),
        sa.Column("text_tokens", sa.Integer(), nullable=False),
        sa.Column("chat_tokens", sa.Integer(), nullable=False),
        sa.Column("cum_floor", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "role IN ('human', 'ai', 'system')", name=op.f("ck_tokenmem_messages_role")
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["tokenmem_sessions.id"],
            name=op.f("fk_tokenmem_messages_session_id_tokenmem_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "position", name=op.f("pk_tokenmem_messages")),
    )
    op.create_index(
        op.f("ix_tokenmem_messages_session_id_cum_floor"),
        "tokenmem_messages",
        ["session_id", "cum_floor"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_tokenmem_messages_session_id_cum_floor"), "tokenmem_messages")
    op.drop_table("tokenmem_messages")
    op.drop_index(op.f("ix_tokenmem_sessions_owner_id_name"), "tokenmem_sessions")
    op.drop_table("tokenmem_sessions")
