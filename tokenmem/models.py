"""The schema: tokenmem's single source of truth for its tables.

Migrations in ``migrations/versions`` create exactly these tables; a test
compares them with alembic's autogenerate so the two never drift.

Every hot query is scoped to one session, and every message key starts with
``session_id``, so ``tokenmem_messages`` can be hash-partitioned or
distributed (Citus) by ``session_id`` without a rewrite. A session's id is a
UUID derived from ``(owner_id, name)`` (:func:`session_uuid`), so finding a
session never needs a secondary index and two owners can never collide.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "MESSAGES",
    "ROLES",
    "SESSIONS",
    "SUMMARIES",
    "TURNS",
    "Base",
    "MessageRow",
    "SessionRow",
    "SummaryRow",
    "TurnRow",
    "session_uuid",
    "utcnow",
]

# LangChain's names for the roles it has; OpenAI's user/assistant map to
# human/ai at the edges (tokenmem.chat), developer and tool are OpenAI's.
ROLES = ("human", "ai", "system", "developer", "tool")
_SESSION_NAMESPACE = uuid.UUID("5b0f3a52-6d4e-4c1e-9a57-7f1d2e3c4b5a")


@functools.lru_cache(maxsize=4096)  # SHA-1 per call: remembered for busy sessions
def session_uuid(owner_id: str, name: str) -> uuid.UUID:
    """Return the primary key of the session ``name`` of ``owner_id``."""
    return uuid.uuid5(_SESSION_NAMESPACE, f"{len(owner_id)}:{owner_id}\x00{name}")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("tokenmem stores timezone-aware datetimes only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        utc = self.process_bind_param

        def process(value: datetime | None) -> str | None:
            # SQLAlchemy's SQLite text ("2026-01-02 03:04:05.000006") in one C
            # call, not its %-format: each append binds three of these
            naive = utc(value, dialect)
            return None if naive is None else naive.isoformat(" ", "microseconds")

        return process

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


# No metadata is SQL NULL, not the JSON text 'null' (both read back as None).
_Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SessionRow(Base):
    """A conversation. Its counters are bumped, under a row lock, by every append."""

    __tablename__ = "tokenmem_sessions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    # The tiktoken encoding the messages' counts were made with.
    encoding: Mapped[str | None] = mapped_column(String(64))
    next_position: Mapped[int] = mapped_column(BigInteger, default=0)
    next_turn: Mapped[int] = mapped_column(BigInteger, default=0)
    # Sum of every message's floor cost (see window.py): where the next
    # message's cum_floor starts.
    floor_total: Mapped[int] = mapped_column(BigInteger, default=0)
    # clear() moves the window's start past the last message (older rows stay
    # for audit): as a position, and as the cum_floor of that position, which
    # lets the window query use one index range (a recount's last batch
    # keeps it in step).
    start_position: Mapped[int] = mapped_column(BigInteger, default=0)
    start_floor: Mapped[int] = mapped_column(BigInteger, default=0)
    # Model calls recorded in tokenmem_turns (migration 0002).
    next_call: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", _Json)
    # The pinned prompt (migration 0005): positions of the newest run of
    # system/developer messages, always sent first (tokenmem.window).
    pinned_first: Mapped[int | None] = mapped_column(BigInteger)
    pinned_last: Mapped[int | None] = mapped_column(BigInteger)
    # A unit whose tool calls are not all answered yet (tokenmem.chat.OpenUnit):
    # its first position and cum_floor, and the call ids it waits for.
    # Windows end before it.
    open_position: Mapped[int | None] = mapped_column(BigInteger)
    open_floor: Mapped[int | None] = mapped_column(BigInteger)
    open_calls: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    # The tamper-evident chains (migration 0006, tokenmem.digest): the digest
    # of the newest message and of the newest turn-log row, and where each
    # chain starts after a prune (the digest and key of the last row removed).
    head_digest: Mapped[str | None] = mapped_column(String(64))
    anchor_digest: Mapped[str | None] = mapped_column(String(64))
    anchor_position: Mapped[int | None] = mapped_column(BigInteger)
    turns_head_digest: Mapped[str | None] = mapped_column(String(64))
    turns_anchor_digest: Mapped[str | None] = mapped_column(String(64))
    turns_anchor_seq: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "owner_id", "name"),)


class MessageRow(Base):
    """One message, counted once at write time."""

    __tablename__ = "tokenmem_messages"

    session_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey(SessionRow.id, ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    turn: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", _Json)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    encoding: Mapped[str] = mapped_column(String(64))
    # Tokens of " " + content: a rendered line "{prefix}: {content}" costs
    # tokens(prefix + ":") + text_tokens (checked by tests/test_tokens.py).
    text_tokens: Mapped[int] = mapped_column(Integer)
    # Tokens the newline joining the line to the next adds: tokens(" " +
    # content + "\n") - text_tokens (migration 0003; NULL in older rows).
    newline_tokens: Mapped[int | None] = mapped_column(Integer)
    # Tokens of the chat role, the content and the name (+1 with a name).
    chat_tokens: Mapped[int] = mapped_column(Integer)
    # Sum of the floor costs of this session's earlier messages.
    cum_floor: Mapped[int] = mapped_column(BigInteger)
    # Migration 0005, for OpenAI chat messages (tokenmem.chat). The message
    # exactly as given, as JSON text (PostgreSQL's json, not jsonb, keeps
    # its keys' order): NULL when role, content and name rebuild it exactly.
    message: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    # An assistant message's tool calls and a tool message's answer key,
    # queryable (jsonb on PostgreSQL).
    tool_calls: Mapped[list[Any] | None] = mapped_column(_Json)
    tool_call_id: Mapped[str | None] = mapped_column(Text)
    # The position of the first message of the message's unit: an assistant
    # message with tool calls and the tool messages answering it are one,
    # all in a window or none. NULL: a unit of its own (or the first of
    # one). Negative: an orphan of the unit starting at -1 - unit, never
    # sent (Responses API items whose unit was never completed: tokenmem.chat).
    unit: Mapped[int | None] = mapped_column(BigInteger)
    # SHA-256 chaining it to the session's previous message (tokenmem.digest).
    digest: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint(f"role IN {ROLES!r}".replace('"', "'"), name="role"),
        Index(None, "session_id", "cum_floor"),
    )


# The tables, for Core statements (the stores run Core, not ORM sessions).
SESSIONS = cast(Table, SessionRow.__table__)
MESSAGES = cast(Table, MessageRow.__table__)


class TurnRow(Base):
    """One model call of a chain, for audit: enough to rebuild its exact prompt.

    The window it sent is the session's messages ``window_first`` to
    ``window_last`` (positions); with ``system``, ``template``, the prefixes and
    ``input`` the prompt is rebuilt exactly (:meth:`Store.rebuild_prompt`).
    """

    __tablename__ = "tokenmem_turns"

    session_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey(SessionRow.id, ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Text, not String(255): what the memory and the model accepted must be
    # recordable after the call on every backend (migration 0004).
    model: Mapped[str] = mapped_column(Text)
    api: Mapped[str] = mapped_column(String(16))  # "chat" or "completions"
    system: Mapped[str | None] = mapped_column(Text)
    template: Mapped[str | None] = mapped_column(Text)
    human_prefix: Mapped[str] = mapped_column(Text)
    ai_prefix: Mapped[str] = mapped_column(Text)
    input: Mapped[str] = mapped_column(Text)
    window_first: Mapped[int | None] = mapped_column(BigInteger)
    window_last: Mapped[int | None] = mapped_column(BigInteger)
    token_budget: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer)  # counted locally
    api_prompt_tokens: Mapped[int | None] = mapped_column(Integer)  # usage reported
    api_completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))  # "ok" or "error"
    error_type: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    # The exchange saved by this call (tokenmem_messages.turn), when it succeeded.
    turn: Mapped[int | None] = mapped_column(BigInteger)
    # Migration 0005: the pinned prompt it sent first (positions), and the
    # summary of older messages it sent (tokenmem_summaries.seq).
    pinned_first: Mapped[int | None] = mapped_column(BigInteger)
    pinned_last: Mapped[int | None] = mapped_column(BigInteger)
    summary_seq: Mapped[int | None] = mapped_column(BigInteger)
    # Migration 0006 (tokenmem.digest): chaining it to the session's previous
    # turn, and the digest of the newest message it sent.
    digest: Mapped[str | None] = mapped_column(String(64))
    window_digest: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (CheckConstraint("outcome IN ('ok', 'error')", name="outcome"),)


TURNS = cast(Table, TurnRow.__table__)


class SummaryRow(Base):
    """A running summary of a session's messages that fell out of the window
    (ConversationSummaryBufferMemory, migration 0005): each row replaces the
    messages ``first_position`` to ``last_position`` and is never changed;
    the newest is the one sent."""

    __tablename__ = "tokenmem_summaries"

    session_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey(SessionRow.id, ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    first_position: Mapped[int] = mapped_column(BigInteger)
    last_position: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    encoding: Mapped[str] = mapped_column(String(64))
    text_tokens: Mapped[int] = mapped_column(Integer)
    newline_tokens: Mapped[int] = mapped_column(Integer)
    chat_tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


SUMMARIES = cast(Table, SummaryRow.__table__)
