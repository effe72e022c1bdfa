"""LangChain's ConversationTokenBufferMemory, persisted.

Same parameters and methods; every message is a row, counted once when it is
saved, and the window is one SQL query::

    >>> from tokenmem import ConversationTokenBufferMemory, OpenAI
    >>> memory = ConversationTokenBufferMemory(llm=OpenAI(), max_token_limit=10)
    >>> memory.save_context({"input": "hi"}, {"output": "whats up"})
    >>> memory.save_context({"input": "not much you"}, {"output": "not much"})
    >>> memory.load_memory_variables({})
    {'history': 'Human: not much you\\nAI: not much'}
"""

from __future__ import annotations

import asyncio
import functools
import operator
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine

from .chat import as_openai, from_openai
from .errors import ConfigurationError, InvalidInputError
from .messages import Message, StoredMessage
from .reads import METADATA, PINNED, WindowMessage, WindowRow, window_messages
from .store import Store
from .tokens import TokenCounter, encoding_for_model
from .validate import check_text
from .window import Mode, Rule, StartOn, get_buffer_string, render_rows

if TYPE_CHECKING:
    from .aio import AsyncStore

__all__ = ["ChatMemory", "ConversationTokenBufferMemory", "ModelInfo", "get_buffer_string"]


class ModelInfo(Protocol):
    """What a memory needs to know of its model: its name, and optionally
    the tiktoken encoding (for models tiktoken's table does not know). A
    LangChain model, naming it ``model_name``, is taken too."""

    @property
    def model(self) -> str: ...


def _mode_of(llm: object) -> Mode | None:
    """How LangChain counts for ``llm``: a completion model the rendered
    string, a chat model OpenAI's chat formula — whatever ``return_messages``
    is. tokenmem's models say it by their ``api``; a LangChain model by its
    base class (read by name: LangChain is not imported). None: unknown."""
    api = getattr(llm, "api", None)
    if api in ("completions", "chat"):
        return "text" if api == "completions" else "messages"
    bases = {cls.__name__ for cls in type(llm).__mro__}
    if "BaseChatModel" in bases:
        return "messages"
    if "BaseLLM" in bases:
        return "text"
    return None


def _model_name(llm: object) -> str:
    """The model a memory counts for: tokenmem's ``llm.model``, or a LangChain
    model's ``model_name`` (``langchain_openai.OpenAI``, ``ChatOpenAI``: read
    without importing LangChain); gpt-4o-mini's without a model."""
    if llm is None:
        return "gpt-4o-mini"
    for attribute in ("model", "model_name"):
        name = getattr(llm, attribute, None)
        if isinstance(name, str) and name:
            return name
    raise ConfigurationError(
        f"llm must name its model (.model, or LangChain's .model_name), "
        f"not {type(llm).__name__}; or pass encoding="
    )


_PAGE = 500  # history rows read at a time
_default_store: Store | None = None
_stores: dict[object, Store] = {}
_default_lock = threading.Lock()


_counted = operator.itemgetter(6)  # of a window row: its newline_tokens were counted


@functools.lru_cache(maxsize=256)
def _rule(
    limit: int,
    mode: Mode,
    human_prefix: str,
    ai_prefix: str,
    start_on: StartOn,
    include_open: bool = False,
) -> Rule:
    """Rules, made once: a memory is made per request, and a rule remembers
    what it derives (prefix tokens, line prefixes)."""
    return Rule(
        limit=limit,
        mode=mode,
        human_prefix=human_prefix,
        ai_prefix=ai_prefix,
        start_on=start_on,
        include_open=include_open,
    )


def _messages(rows: Sequence[WindowRow]) -> list[Message]:
    return [Message(row[2], row[3], row[4], row[METADATA], row[9]) for row in rows]


def _store(store: Store | AsyncStore | Engine | str | None) -> Store | AsyncStore:
    """The Store for ``store``: one per URL or Engine per process (memories
    are made per request; engines and their pools must not be)."""
    global _default_store
    if isinstance(store, Store) or (store is not None and not isinstance(store, str | Engine)):
        return store
    with _default_lock:
        if store is None:
            if _default_store is None:
                _default_store = Store()
            return _default_store
        if store not in _stores:
            _stores[store] = Store(store, upgrade=False)
        return _stores[store]


class ConversationTokenBufferMemory:
    """The newest messages of a session that fit in ``max_token_limit`` tokens.

    ``store`` is a :class:`Store`, an Engine or a URL (default: the embedded
    SQLite file, or ``TOKENMEM_DATABASE_URL``). ``session_id`` names the
    conversation; without one a new session is started. ``llm`` (anything with
    a ``model``) picks the tiktoken encoding, unless ``encoding`` is given.
    ``include_open=True``: tool calls still waiting for their answers end the
    window (with the answers saved so far), for a caller whose next request
    sends the answers after it (LangChain's ``RunnableWithMessageHistory``);
    by default they are left out until the last answer is saved.
    """

    def __init__(
        self,
        *,
        llm: ModelInfo | None = None,
        max_token_limit: int = 2000,
        return_messages: bool = False,
        human_prefix: str = "Human",
        ai_prefix: str = "AI",
        memory_key: str = "history",
        input_key: str | None = None,
        output_key: str | None = None,
        session_id: str | None = None,
        owner: str | None = None,
        store: Store | AsyncStore | Engine | str | None = None,
        encoding: str | None = None,
        system_message: str | None = None,
        start_on: StartOn = None,
        include_open: bool = False,
    ) -> None:
        if isinstance(max_token_limit, bool) or not isinstance(max_token_limit, int):
            raise ConfigurationError("max_token_limit must be an int")
        if max_token_limit <= 0:
            raise ConfigurationError(f"max_token_limit must be positive, not {max_token_limit}")
        for what, value in (("human_prefix", human_prefix), ("ai_prefix", ai_prefix)):
            check_text(value, what)
        if system_message is not None:
            check_text(system_message, "system_message")
        if start_on not in (None, "human"):
            raise ConfigurationError(f"start_on must be None or 'human', not {start_on!r}")
        if encoding is None:
            encoding = getattr(llm, "encoding", None)
        if encoding is None:
            encoding = encoding_for_model(_model_name(llm))
        self.llm = llm
        self._mode = None if llm is None else _mode_of(llm)
        self.counter = TokenCounter(encoding)
        self.max_token_limit = max_token_limit
        self.return_messages = return_messages
        self.human_prefix = human_prefix
        self.ai_prefix = ai_prefix
        self.memory_key = memory_key
        self.input_key = input_key
        self.output_key = output_key
        self.owner = owner
        self.session_id = session_id if session_id is not None else uuid.uuid4().hex
        self.store = _store(store)
        self.system_message = system_message
        self.start_on = start_on
        self.include_open = include_open

    def __repr__(self) -> str:
        return (
            f"ConversationTokenBufferMemory(session_id={self.session_id!r}, "
            f"max_token_limit={self.max_token_limit}, encoding={self.counter.encoding_name!r})"
        )

    @property
    def rule(self) -> Rule:
        return self._rule(None)

    def _rule(self, return_messages: bool | None, limit: int | None = None) -> Rule:
        """The rule of a load: counted as ``return_messages`` asks when given
        (the chain asks for its API's), else as the model is counted (as in
        LangChain: one window, as a string or as messages), else — no model
        known — as ``self.return_messages`` says."""
        if return_messages is not None:
            mode: Mode = "messages" if return_messages else "text"
        elif self._mode is not None:
            mode = self._mode
        else:
            mode = "messages" if self.return_messages else "text"
        limit = self.max_token_limit if limit is None else limit
        return _rule(
            limit, mode, self.human_prefix, self.ai_prefix, self.start_on, self.include_open
        )

    def _as(self, messages: bool) -> bool | None:
        """How ``buffer_as_messages``/``buffer_as_str`` load: the model's one
        window when the model is known, else counted as its format."""
        return None if self._mode is not None else messages

    @property
    def memory_variables(self) -> list[str]:
        return [self.memory_key]

    def _sync(self) -> Store:
        if not isinstance(self.store, Store):
            raise ConfigurationError(
                "this memory has an AsyncStore: use its a-methods (aload_memory_variables, "
                "asave_context, ...)"
            )
        return self.store

    # reading

    def _fit(self, rows: Sequence[WindowRow], rule: Rule) -> tuple[Sequence[WindowRow], str]:
        """The window statement's rows and their rendered string. The SQL
        counts the string exactly in text mode unless a prefix does not start
        with a letter or digit, the encoding is not cl100k_base or o200k_base,
        or a row predates newline_tokens (window.py): then the string is
        counted again and the oldest unit is dropped while it is over the
        limit (the pinned prompt stays; with ``start_on``, the window then
        starts at its next user message)."""
        text = render_rows(rows, rule)
        if rule.mode != "text" or (rule.exact_lines(self.counter) and all(map(_counted, rows))):
            return rows, text
        pinned = [row for row in rows if row[PINNED]]
        rest = [row for row in rows if not row[PINNED]]
        while rest and self.counter.count(text) > rule.limit:
            unit = rest[0][8]
            rest = [row for row in rest if row[8] != unit]
            if rule.start_on == "human":
                while rest and rest[0][2] != "human":
                    rest = rest[1:]
            rows = [*pinned, *rest]
            text = render_rows(rows, rule)
        return rows, text

    def _pinned_ok(self, rows: Sequence[WindowRow]) -> bool:
        """Whether the session's pinned prompt is ``system_message`` (when set)."""
        if self.system_message is None:
            return True
        pinned = [(row[2], row[3], row[9]) for row in rows if row[PINNED]]
        return pinned == [("system", self.system_message, None)]

    def _system_turn(self) -> list[Message]:
        return [Message("system", self.system_message or "")]

    def _load(
        self, return_messages: bool | None = None, limit: int | None = None
    ) -> tuple[Sequence[WindowRow], str]:
        rule = self._rule(return_messages, limit)
        store = self._sync()
        rows = store.window_rows(self.session_id, rule, self.counter, owner=self.owner)
        if not self._pinned_ok(rows):  # a new session, or a new system_message: saved first
            store.append(self.session_id, self._system_turn(), self.counter, owner=self.owner)
            rows = store.window_rows(self.session_id, rule, self.counter, owner=self.owner)
        return self._fit(rows, rule)

    async def _aload(
        self, return_messages: bool | None = None, limit: int | None = None
    ) -> tuple[Sequence[WindowRow], str]:
        if isinstance(self.store, Store):
            return await asyncio.to_thread(self._load, return_messages, limit)
        rule = self._rule(return_messages, limit)
        store = self.store
        rows = await store.window_rows(self.session_id, rule, self.counter, owner=self.owner)
        if not self._pinned_ok(rows):
            await store.append(self.session_id, self._system_turn(), self.counter, owner=self.owner)
            rows = await store.window_rows(self.session_id, rule, self.counter, owner=self.owner)
        return self._fit(rows, rule)

    def window(
        self, *, return_messages: bool | None = None, limit: int | None = None
    ) -> list[WindowMessage]:
        """The window with its positions, oldest first; ``limit`` overrides
        ``max_token_limit`` for this load (the chain's model-derived budget)."""
        return window_messages(self._load(return_messages, limit)[0])

    async def awindow(
        self, *, return_messages: bool | None = None, limit: int | None = None
    ) -> list[WindowMessage]:
        """:meth:`window`, awaited (an AsyncStore, or a Store in a thread)."""
        return window_messages((await self._aload(return_messages, limit))[0])

    def _value(self, loaded: tuple[Sequence[WindowRow], str]) -> str | list[Message]:
        return _messages(loaded[0]) if self.return_messages else loaded[1]

    @property
    def buffer_as_messages(self) -> list[Message]:
        """The window as messages: counted as the model is (LangChain's
        rule), or with the chat formula when no model is known."""
        return _messages(self._load(self._as(True))[0])

    @property
    def buffer_as_str(self) -> str:
        """The window as one string: counted as the model is (LangChain's
        rule), or as rendered when no model is known."""
        return self._load(self._as(False))[1]

    @property
    def buffer(self) -> str | list[Message]:
        return self._value(self._load())

    def load_memory_variables(self, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{memory_key: window}``: a string, or messages with ``return_messages``."""
        return {self.memory_key: self.buffer}

    async def aload_memory_variables(
        self, inputs: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """:meth:`load_memory_variables`, awaited (an AsyncStore, or a Store in a thread)."""
        return {self.memory_key: self._value(await self._aload())}

    def history(self) -> Iterator[StoredMessage]:
        """The session's full stored history, oldest first (nothing is pruned)."""
        return self._sync().history(self.session_id, owner=self.owner)

    async def ahistory(self) -> AsyncIterator[StoredMessage]:
        """:meth:`history`, awaited: one page at a time from an AsyncStore, or
        from a Store in a thread."""
        if isinstance(self.store, Store):
            store, after = self.store, -1
            while True:
                page = await asyncio.to_thread(
                    store.history_page, self.session_id, owner=self.owner, after=after, limit=_PAGE
                )
                for message in page:
                    yield message
                if len(page) < _PAGE:
                    return
                after = page[-1].position
        else:
            async for message in self.store.history(self.session_id, owner=self.owner):
                yield message

    # writing

    def _one(self, values: Mapping[str, Any], key: str | None, what: str) -> str:
        """The input or output to save, its key chosen as LangChain's
        ``BaseChatMemory._get_input_output`` does: an input is the one key
        that is neither the memory's nor ``"stop"``; an output is the only
        key or, among several (an agent's ``output`` and
        ``intermediate_steps``), ``"output"``, with LangChain's warning."""
        if not isinstance(values, Mapping):
            raise InvalidInputError(f"{what} must be a dict, not {type(values).__name__}")
        if key is None and what == "outputs" and len(values) > 1 and "output" in values:
            key = "output"
            warnings.warn(
                f"'{type(self).__name__}' got multiple output keys: {values.keys()}. The "
                "default 'output' key is being used. If this is not desired, please "
                "manually set 'output_key'.",
                stacklevel=4,
            )
        if key is None:
            ignored = (self.memory_key, "stop") if what == "inputs" else ()
            keys = [k for k in values if k not in ignored]
            if len(keys) != 1:
                raise InvalidInputError(
                    f"{what} has {len(keys)} keys {keys}; set {what[:-1]}_key= to choose one"
                )
            key = keys[0]
        if key not in values:
            raise InvalidInputError(f"{what} has no key {key!r}")
        return check_text(values[key], f"{what}[{key!r}]")

    def _exchange(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> list[Message]:
        human = self._one(inputs, self.input_key, "inputs")
        ai = self._one(outputs, self.output_key, "outputs")
        return [Message("human", human), Message("ai", ai)]

    def save_context(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Save one exchange (input and output) in one transaction."""
        exchange = self._exchange(inputs, outputs)
        self._sync().append(self.session_id, exchange, self.counter, owner=self.owner)

    async def asave_context(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """:meth:`save_context`, awaited."""
        exchange = self._exchange(inputs, outputs)
        if isinstance(self.store, Store):
            await asyncio.to_thread(
                self.store.append, self.session_id, exchange, self.counter, owner=self.owner
            )
        else:
            await self.store.append(self.session_id, exchange, self.counter, owner=self.owner)

    def save_messages(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Save OpenAI Chat Completions message dicts as one turn, in one
        transaction: checked first (:func:`tokenmem.chat.from_openai`: roles,
        content, tool calls each answered by tool messages right after),
        nothing written if any is refused. A system or developer message
        among them becomes the session's pinned prompt."""
        self._sync().append_turns(
            self.session_id, [from_openai(messages)], self.counter, owner=self.owner
        )

    async def asave_messages(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`save_messages`, awaited."""
        turn = [from_openai(messages)]
        if isinstance(self.store, Store):
            await asyncio.to_thread(
                self.store.append_turns, self.session_id, turn, self.counter, owner=self.owner
            )
        else:
            await self.store.append_turns(self.session_id, turn, self.counter, owner=self.owner)

    def load_messages(self) -> list[dict[str, Any]]:
        """The window as Chat Completions message dicts, ready for
        ``client.chat.completions.create(messages=...)``: the pinned
        system/developer prompt first, then the newest messages that fit
        (counted with the chat formula; tool calls and their answers whole),
        each exactly as it was saved."""
        return [as_openai(m) for m in _messages(self._load(True)[0])]

    async def aload_messages(self) -> list[dict[str, Any]]:
        """:meth:`load_messages`, awaited."""
        return [as_openai(m) for m in _messages((await self._aload(True))[0])]

    def clear(self) -> None:
        """Start an empty window; the old messages stay in the history."""
        self._sync().clear(self.session_id, owner=self.owner)

    @property
    def chat_memory(self) -> ChatMemory:
        """LangChain's ``memory.chat_memory``: ``messages`` (the window, as
        LangChain's buffer holds it after pruning), ``add_user_message``,
        ``add_ai_message``, ``add_message``, ``clear``."""
        return ChatMemory(self)

    async def aclear(self) -> None:
        """:meth:`clear`, awaited."""
        if isinstance(self.store, Store):
            await asyncio.to_thread(self.clear)
        else:
            await self.store.clear(self.session_id, owner=self.owner)

    def erase(self) -> int:
        """Delete this session's messages for good; return how many."""
        return self._sync().erase(self.session_id, owner=self.owner)

    async def aerase(self) -> int:
        """:meth:`erase`, awaited."""
        if isinstance(self.store, Store):
            return await asyncio.to_thread(self.erase)
        return await self.store.erase(self.session_id, owner=self.owner)


class ChatMemory:
    """The memory's session as LangChain's ``BaseChatMessageHistory`` surface
    (:attr:`ConversationTokenBufferMemory.chat_memory`). A message added here
    is a turn of its own, saved in its own transaction."""

    def __init__(self, memory: ConversationTokenBufferMemory) -> None:
        self.memory = memory

    @property
    def messages(self) -> list[Message]:
        """The window, as messages (what LangChain's buffer keeps)."""
        return self.memory.buffer_as_messages

    def add_message(self, message: Message) -> None:
        memory = self.memory
        memory._sync().append(memory.session_id, [message], memory.counter, owner=memory.owner)

    def add_user_message(self, message: str) -> None:
        self.add_message(Message("human", check_text(message, "message")))

    def add_ai_message(self, message: str) -> None:
        self.add_message(Message("ai", check_text(message, "message")))

    def clear(self) -> None:
        self.memory.clear()
