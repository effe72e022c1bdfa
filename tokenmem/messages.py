"""Message values: what a memory returns, and what the audit history holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = ["Message", "SessionInfo", "StoredMessage"]

Role = Literal["human", "ai", "system", "developer", "tool"]


@dataclass(slots=True)
class Message:
    """A chat message; ``type`` is ``"human"``, ``"ai"`` or ``"system"`` as in
    LangChain, or OpenAI's ``"developer"`` or ``"tool"``. ``openai``: the
    Chat Completions dict (``memory.save_messages``) or Responses API item
    (``tokenmem.agents.TokenmemSession``) it was saved from, when role,
    content and name do not rebuild it exactly (tool calls, content parts,
    extra keys, any item but a plain message); ``content`` is then its
    text as a string window renders it (:mod:`tokenmem.chat`)."""

    type: Role
    content: str
    name: str | None = None
    metadata: dict[str, Any] | None = field(default=None, compare=False)
    openai: dict[str, Any] | None = field(default=None, repr=False)


@dataclass(slots=True)
class StoredMessage(Message):
    """A message as stored: its place in the session and its token counts."""

    position: int = 0
    turn: int = 0
    created_at: datetime | None = None
    encoding: str = ""
    text_tokens: int = 0
    chat_tokens: int = 0
    newline_tokens: int | None = None  # None: written before it was counted
    # The SHA-256 chaining it to the session's previous message (tokenmem.digest).
    digest: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SessionInfo:
    """A session's summary, as listed by :meth:`Store.sessions`."""

    owner_id: str
    session_id: str
    # The position the next message gets: how many were ever appended,
    # pruned ones included (positions are never reused, except the one
    # freed by popping the newest message: tokenmem.agents).
    next_position: int
    created_at: datetime
    updated_at: datetime
    encoding: str | None = None  # what its messages' token counts were made with
    next_turn: int = 0
    window_start: int = 0  # the position clear() last started the window at
    metadata: dict[str, Any] | None = None
