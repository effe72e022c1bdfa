"""LangChain's ``ConversationTokenBufferMemory`` for LangChain's own chains
(``langchain_classic.chains.ConversationChain``, ``LLMChain``), persisted:
an existing chain keeps its chain and swaps only the memory's import.

Needs langchain-classic, which such a chain already has::

    from langchain_classic.chains import ConversationChain
    from tokenmem.langchain import ConversationTokenBufferMemory

    memory = ConversationTokenBufferMemory(llm=llm, max_token_limit=60, session_id="chat-1")
    ConversationChain(llm=llm, memory=memory).predict(input="Hi there!")
"""

from __future__ import annotations

from typing import Any

from langchain_classic.base_memory import BaseMemory
from langchain_core.messages import BaseMessage
from pydantic import PrivateAttr

from .. import memory as tokenmem_memory
from ..messages import Message
from ..window import StartOn
from .history import SQLTokenWindowHistory, to_langchain

__all__ = ["ConversationTokenBufferMemory"]


class ConversationTokenBufferMemory(BaseMemory):
    """LangChain's ``ConversationTokenBufferMemory`` — same fields, a
    ``BaseMemory`` — over tokenmem's tables: every exchange a row, the
    window one SQL query (tokenmem's
    :class:`tokenmem.ConversationTokenBufferMemory` does the work:
    :attr:`tokenmem_memory`).

    LangChain's fields: ``llm`` (a LangChain model names the model counted
    for, and its kind how: a completion model the rendered string, a chat
    model the chat formula; optional here, ``encoding=`` for a model
    tiktoken does not know), ``max_token_limit``, ``return_messages``
    (LangChain messages), ``human_prefix``, ``ai_prefix``, ``memory_key``,
    ``input_key``, ``output_key``. tokenmem's: ``store``, ``session_id``
    (generated when not given), ``owner``, ``encoding``, ``start_on``."""

    llm: Any = None
    max_token_limit: int = 2000
    return_messages: bool = False
    human_prefix: str = "Human"
    ai_prefix: str = "AI"
    memory_key: str = "history"
    input_key: str | None = None
    output_key: str | None = None
    store: Any = None
    session_id: str | None = None
    owner: str | None = None
    encoding: str | None = None
    start_on: StartOn = None

    _memory: tokenmem_memory.ConversationTokenBufferMemory = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._memory = tokenmem_memory.ConversationTokenBufferMemory(
            llm=self.llm,
            max_token_limit=self.max_token_limit,
            return_messages=self.return_messages,
            human_prefix=self.human_prefix,
            ai_prefix=self.ai_prefix,
            memory_key=self.memory_key,
            input_key=self.input_key,
            output_key=self.output_key,
            session_id=self.session_id,
            owner=self.owner,
            store=self.store,
            encoding=self.encoding,
            start_on=self.start_on,
        )
        self.session_id = self._memory.session_id

    @property
    def tokenmem_memory(self) -> tokenmem_memory.ConversationTokenBufferMemory:
        """The tokenmem memory doing the work (``history()``, ``window()``,
        ``erase()`` ...)."""
        return self._memory

    @property
    def memory_variables(self) -> list[str]:
        """``[memory_key]``."""
        return [self.memory_key]

    def _value(self, loaded: dict[str, Any]) -> dict[str, Any]:
        window = loaded[self.memory_key]
        if isinstance(window, list):
            loaded[self.memory_key] = _langchain(window)
        return loaded

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``{memory_key: window}``: a string, or LangChain messages with
        ``return_messages``."""
        return self._value(self._memory.load_memory_variables(inputs))

    async def aload_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """:meth:`load_memory_variables`, awaited."""
        return self._value(await self._memory.aload_memory_variables(inputs))

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, str]) -> None:
        """Save one exchange, its keys chosen as LangChain chooses them, in
        one transaction."""
        self._memory.save_context(inputs, outputs)

    async def asave_context(self, inputs: dict[str, Any], outputs: dict[str, str]) -> None:
        """:meth:`save_context`, awaited."""
        await self._memory.asave_context(inputs, outputs)

    def clear(self) -> None:
        """Start an empty window; the messages stay in the history."""
        self._memory.clear()

    async def aclear(self) -> None:
        """:meth:`clear`, awaited."""
        await self._memory.aclear()

    @property
    def buffer(self) -> str | list[BaseMessage]:
        """The window: a string, or LangChain messages with ``return_messages``."""
        return self.buffer_as_messages if self.return_messages else self.buffer_as_str

    @property
    def buffer_as_str(self) -> str:
        """The window as one string, counted as the model is."""
        return self._memory.buffer_as_str

    @property
    def buffer_as_messages(self) -> list[BaseMessage]:
        """The window as LangChain messages, counted as the model is."""
        return _langchain(self._memory.buffer_as_messages)

    @property
    def chat_memory(self) -> SQLTokenWindowHistory:
        """The session as a LangChain chat message history whose
        ``messages`` are this memory's window (LangChain's pruned buffer)."""
        return SQLTokenWindowHistory.from_memory(self._memory)


def _langchain(messages: list[Message]) -> list[BaseMessage]:
    return [to_langchain(m) for m in messages]
