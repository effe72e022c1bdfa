"""The tamper-evident history: a SHA-256 digest on every message and
turn-log row, chaining it to the previous one of its session
(tokenmem.digest), the sessions' heads, and the anchors a prune leaves.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

The upgrade digests every existing row, per session in position (seq)
order, in batches of a thousand rows per statement; the downgrade drops the
columns (and with them the evidence).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tokenmem.digest import backfill

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_SESSION_COLUMNS = (
    ("head_digest", sa.String(64)),
    ("anchor_digest", sa.String(64)),
    ("anchor_position", sa.BigInteger()),
    ("turns_head_digest", sa.String(64)),
    ("turns_anchor_digest", sa.String(64)),
    ("turns_anchor_seq", sa.BigInteger()),
)


def upgrade() -> None:
    with op.batch_alter_table("tokenmem_messages") as batch:
        batch.add_column(sa.Column("digest", sa.String(64), nullable=True))
    with op.batch_alter_table("tokenmem_turns") as batch:
        batch.add_column(sa.Column("digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("window_digest", sa.String(64), nullable=True))
    with op.batch_alter_table("tokenmem_sessions") as batch:
        for name, type_ in _SESSION_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    backfill(op.get_bind())


def downgrade() -> None:
    # Not recreated on SQLite (DROP COLUMN, SQLite 3.35+): dropping the old
    # table would cascade to every message and turn.
    with op.batch_alter_table("tokenmem_sessions", recreate="never") as batch:
        for name, _ in reversed(_SESSION_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("tokenmem_turns", recreate="never") as batch:
        batch.drop_column("window_digest")
        batch.drop_column("digest")
    with op.batch_alter_table("tokenmem_messages", recreate="never") as batch:
        batch.drop_column("digest")
