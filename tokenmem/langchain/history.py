"""LangChain's chat message history over tokenmem's tables: what
``RunnableWithMessageHistory`` reads and writes, the token window selected
in SQL.

Messages go in as LangChain's own OpenAI conversion makes them
(``langchain_core.messages.convert_to_openai_messages``): that dict is what
tokenmem checks, counts (its chat formula) and keeps, so a session written
here is read by ``memory.load_messages()`` too, and the other way round.
What the dict does not carry — ids, ``additional_kwargs``,
``response_metadata``, ``usage_metadata``, a content the conversion joined —
is kept in the message's metadata as LangChain serialises the message
(``message_to_dict``, under :data:`METADATA_KEY`), only when the dict does
not rebuild the message exactly; reading gives back an equal message::

    >>> from langchain_core.messages import HumanMessage
    >>> made = from_langchain([HumanMessage("hi", id="m-1")])
    >>> to_langchain(made[0]) == HumanMessage("hi", id="m-1")
    True
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    BaseMessage,
    convert_to_messages,
    convert_to_openai_messages,
    message_to_dict,
    messages_from_dict,
)
from sqlalchemy import Engine

from ..chat import as_openai, from_openai
from ..errors import ConfigurationError, InvalidInputError, SessionNotFound
from ..memory import ConversationTokenBufferMemory, ModelInfo
from ..messages import Message, StoredMessage
from ..store import Store
from ..window import StartOn

if TYPE_CHECKING:
    from ..aio import AsyncStore

__all__ = ["METADATA_KEY", "SQLTokenWindowHistory", "from_langchain", "to_langchain"]

# The key of Message.metadata holding a LangChain message (message_to_dict).
METADATA_KEY = "langchain"
_PAGE = 500  # history rows read at a time (history_page's default limit)


def from_langchain(messages: Sequence[BaseMessage]) -> list[Message]:
    """LangChain messages as tokenmem messages: each one's OpenAI dict
    (LangChain's conversion), checked by :func:`tokenmem.chat.from_openai`
    (a model's tool calls may come without their answers, and answers
    without their calls: an append checks them against the session's open
    unit), and, when that dict does not rebuild it
    exactly, the message itself in ``metadata``. Raises
    :class:`InvalidInputError` for a message OpenAI has no role for
    (``FunctionMessage``, a ``ChatMessage`` with another role) or that
    converts to several (a ``HumanMessage`` holding ``tool_result`` blocks)."""
    dicts = []
    for i, message in enumerate(messages):
        if not isinstance(message, BaseMessage):
            raise InvalidInputError(
                f"messages[{i}] must be a LangChain message, not {type(message).__name__}"
            )
        try:
            converted = convert_to_openai_messages([message])
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"messages[{i}] ({message.type}): {exc}") from exc
        if len(converted) != 1:
            raise InvalidInputError(
                f"messages[{i}] ({message.type}) is {len(converted)} OpenAI messages (tool "
                "results inside it?): add each as a message of its own (ToolMessage)"
            )
        dicts.append(converted[0])
    made = from_openai(dicts)
    for message, m in zip(messages, made, strict=True):
        if _rebuilt(m) != message:
            m.metadata = {METADATA_KEY: message_to_dict(message)}
    return made


def _rebuilt(message: Message) -> BaseMessage:
    return convert_to_messages([as_openai(message)])[0]


def to_langchain(message: Message) -> BaseMessage:
    """A tokenmem message as a LangChain message: the one kept in its
    metadata (:func:`from_langchain`), else LangChain's own conversion of
    its OpenAI dict (a message saved by ``save_context`` or
    ``save_messages``: a ``developer`` message is a ``SystemMessage`` with
    LangChain's ``__openai_role__``)."""
    kept = (message.metadata or {}).get(METADATA_KEY)
    if kept is not None:
        return messages_from_dict([kept])[0]
    return _rebuilt(message)


class SQLTokenWindowHistory(BaseChatMessageHistory):
    """A LangChain ``BaseChatMessageHistory`` over a tokenmem session: the
    drop-in for ``RunnableWithMessageHistory(chain, get_session_history)``
    that replaces ``SQLChatMessageHistory`` and ``trim_messages``.

    ``messages`` is the session's token window, selected in SQL, when
    ``max_token_limit`` is given — the newest messages that fit, a model's
    tool calls and their answers whole, the session's pinned system (or
    developer) prompt first, from a human message with
    ``start_on="human"`` — counted as the model is (``llm``: the chat
    formula unless it is a completion model; ``encoding`` for one tiktoken
    does not know); without a limit, the whole history since the last
    :meth:`clear`. ``add_messages`` saves its messages as one turn, in one
    transaction; tool calls may come before their answers (LangChain adds a
    call with the model's output and its answers with the next input): the
    call ends the window (``include_open``) until the next ``add_messages``
    answers it, and one that does not is refused. ``clear`` starts an empty window; the
    history stays for audit (``history.memory.history()``).

    ``store``, ``session_id`` and ``owner`` are as for tokenmem's
    :class:`~tokenmem.ConversationTokenBufferMemory`, which does the work:
    :attr:`memory`. A ``Store`` serves the sync and async methods (the
    async ones in a thread), an ``AsyncStore`` the async ones only."""

    def __init__(
        self,
        session_id: str,
        *,
        store: Store | AsyncStore | Engine | str | None = None,
        owner: str | None = None,
        max_token_limit: int | None = None,
        llm: ModelInfo | None = None,
        encoding: str | None = None,
        start_on: StartOn = None,
    ) -> None:
        self.max_token_limit = max_token_limit
        self.memory = ConversationTokenBufferMemory(
            llm=llm,
            max_token_limit=2000 if max_token_limit is None else max_token_limit,
            return_messages=True,
            session_id=session_id,
            owner=owner,
            store=store,
            encoding=encoding,
            start_on=start_on,
            include_open=True,  # the next request sends the answers after the window
        )
        self.session_id = session_id
        self.owner = owner

    @classmethod
    def from_memory(cls, memory: ConversationTokenBufferMemory) -> SQLTokenWindowHistory:
        """The history of a tokenmem memory's session, whose ``messages``
        are that memory's window (its limit, counted as it counts)."""
        limit = memory.max_token_limit
        history = cls(
            memory.session_id, store=memory.store, owner=memory.owner, max_token_limit=limit
        )
        history.memory = memory
        return history

    def __repr__(self) -> str:
        return (
            f"SQLTokenWindowHistory(session_id={self.session_id!r}, "
            f"max_token_limit={self.max_token_limit})"
        )

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]  # (an attribute there)
        """The token window (``max_token_limit``), or every message since
        the last :meth:`clear`, oldest first."""
        if self.max_token_limit is None:
            return [to_langchain(m) for m in self._since_clear()]
        return [to_langchain(w.message) for w in self.memory.window()]

    async def aget_messages(self) -> list[BaseMessage]:
        """:attr:`messages`, awaited."""
        store = self.memory.store
        if isinstance(store, Store):
            return await asyncio.to_thread(lambda: self.messages)
        if self.max_token_limit is None:
            return [to_langchain(m) for m in await self._asince_clear(store)]
        return [to_langchain(w.message) for w in await self.memory.awindow()]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Save ``messages`` as one turn, in one transaction: all or none.
        Raises :class:`InvalidInputError` for a message tokenmem cannot
        keep, and for tool messages that answer no call left open (or a
        message coming while calls wait for their answers)."""
        if messages:
            memory = self.memory
            store = self._store()
            made = from_langchain(messages)
            store.append(memory.session_id, made, memory.counter, owner=memory.owner)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """:meth:`add_messages`, awaited."""
        memory = self.memory
        store = memory.store
        if isinstance(store, Store):
            await asyncio.to_thread(self.add_messages, messages)
        elif messages:
            made = from_langchain(messages)
            await store.append(memory.session_id, made, memory.counter, owner=memory.owner)

    def clear(self) -> None:
        """Start an empty window; the messages stay in the history."""
        self.memory.clear()

    async def aclear(self) -> None:
        """:meth:`clear`, awaited."""
        await self.memory.aclear()

    def _store(self) -> Store:
        if not isinstance(self.memory.store, Store):
            raise ConfigurationError(
                "this history has an AsyncStore: use its a-methods (aget_messages, "
                "aadd_messages, aclear)"
            )
        return self.memory.store

    def _since_clear(self) -> list[Message]:
        store, memory = self._store(), self.memory
        try:
            info = store.session(memory.session_id, owner=memory.owner)
        except SessionNotFound:
            return []
        found: list[Message] = []
        after: int | None = info.window_start - 1
        while after is not None:
            page = store.history_page(memory.session_id, owner=memory.owner, after=after)
            after = _more(found, page)
        return found

    async def _asince_clear(self, store: AsyncStore) -> list[Message]:
        memory = self.memory
        try:
            info = await store.session(memory.session_id, owner=memory.owner)
        except SessionNotFound:
            return []
        found: list[Message] = []
        after: int | None = info.window_start - 1
        while after is not None:
            page = await store.history_page(memory.session_id, owner=memory.owner, after=after)
            after = _more(found, page)
        return found


def _more(found: list[Message], page: Sequence[StoredMessage]) -> int | None:
    """Add a history page to ``found``; return the position to read the
    next page after, or None after the last page."""
    found.extend(page)
    return page[-1].position if len(page) == _PAGE else None
