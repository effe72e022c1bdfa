"""OpenAI chat messages: developer and tool roles, the message as given,
tool calls, units, the session's pinned prompt; summaries of what fell out
of the window, and what the turn log needs to rebuild both.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Every existing row keeps NULL in the new columns: a plain message rebuilt
from its role, content and name, a unit of its own, no pinned prompt (a
session's newest run of system messages is pinned from its next save on).
The downgrade refuses a database holding what the older schema cannot
(developer or tool messages, messages kept as given): export those sessions
and erase them first.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_OLD_ROLES = "role IN ('human', 'ai', 'system')"
_NEW_ROLES = "role IN ('human', 'ai', 'system', 'developer', 'tool')"
_CHECK = "ck_tokenmem_messages_role"


def _json_b() -> sa.types.TypeEngine[object]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def upgrade() -> None:
    with op.batch_alter_table("tokenmem_messages") as batch:
        batch.drop_constraint(op.f(_CHECK), type_="check")
        batch.create_check_constraint(op.f(_CHECK), sa.text(_NEW_ROLES))
        batch.add_column(sa.Column("message", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("tool_calls", _json_b(), nullable=True))
        batch.add_column(sa.Column("tool_call_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("unit", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("tokenmem_sessions") as batch:
        batch.add_column(sa.Column("pinned_first", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("pinned_last", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("open_position", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("open_floor", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("open_calls", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("tokenmem_turns") as batch:
        batch.add_column(sa.Column("pinned_first", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("pinned_last", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("summary_seq", sa.BigInteger(), nullable=True))
    op.create_table(
        "tokenmem_summaries",
        sa.Column("session_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("first_position", sa.BigInteger(), nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("encoding", sa.String(64), nullable=False),
        sa.Column("text_tokens", sa.Integer(), nullable=False),
        sa.Column("newline_tokens", sa.Integer(), nullable=False),
        sa.Column("chat_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["tokenmem_sessions.id"],
            name=op.f("fk_tokenmem_summaries_session_id_tokenmem_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "seq", name=op.f("pk_tokenmem_summaries")),
    )


def downgrade() -> None:
    held = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT count(*) FROM tokenmem_messages WHERE role IN ('developer', 'tool') "
                "OR message IS NOT NULL OR tool_calls IS NOT NULL"
            )
        )
        .scalar()
    )
    if held:
        raise RuntimeError(
            f"cannot downgrade below 0005: {held} messages are OpenAI chat messages "
            "(developer or tool roles, tool calls, or kept as given) that the older "
            "schema cannot hold; export their sessions (tokenmem export) and erase them first"
        )
    # Not recreated on SQLite (DROP COLUMN, SQLite 3.35+): dropping the old
    # table would cascade to every message and turn.
    op.drop_table("tokenmem_summaries")
    with op.batch_alter_table("tokenmem_turns") as batch:
        batch.drop_column("summary_seq")
        batch.drop_column("pinned_last")
        batch.drop_column("pinned_first")
    with op.batch_alter_table("tokenmem_sessions", recreate="never") as batch:
        batch.drop_column("open_calls")
        batch.drop_column("open_floor")
        batch.drop_column("open_position")
        batch.drop_column("pinned_last")
        batch.drop_column("pinned_first")
    with op.batch_alter_table("tokenmem_messages") as batch:
        batch.drop_column("unit")
        batch.drop_column("tool_call_id")
        batch.drop_column("tool_calls")
        batch.drop_column("message")
        batch.drop_constraint(op.f(_CHECK), type_="check")
        batch.create_check_constraint(op.f(_CHECK), sa.text(_OLD_ROLES))
