"""LangChain's ConversationSummaryBufferMemory, persisted: the newest
messages that fit, and a running summary of the older ones made by the model.

    llm = ChatOpenAI()
    memory = ConversationSummaryBufferMemory(llm=llm, max_token_limit=200, session_id="s")
    memory.save_context({"input": "hi"}, {"output": "hello"})  # may summarize what fell out
    memory.load_memory_variables({})   # {'history': 'System: <summary>\\nHuman: ...'}

As LangChain's: the summary comes first — a system message, or the line
``"System: {summary}"`` before the window's lines — and is made with
LangChain's progressive-summary prompt (:data:`SUMMARY_PROMPT`; Chinese:
``language="zh"``) from the previous summary and the lines that fell out.
Unlike it:

* the summary is counted in ``max_token_limit``: the window is the newest
  messages that fit in what the summary leaves, one SQL statement;
* nothing is deleted: each summary is a row of ``tokenmem_summaries`` naming
  the positions of the messages it replaced (:mod:`tokenmem.summaries`), so
  the audit shows what every summary replaced;
* the summary is made after the save has committed, never inside its
  transaction, and only when messages fell out of the window that no
  summary replaces yet. If the model call fails, the exchange stays saved,
  the failure is logged, and the next save (or :meth:`catch_up`) catches up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from sqlalchemy import Connection, Engine

from . import summaries
from .errors import ConfigurationError, TokenmemError
from .llm import ChatModel, Prompt
from .memory import ConversationTokenBufferMemory
from .messages import Message
from .reads import PINNED, WindowMessage, WindowRow, window_messages
from .store import Store
from .summaries import Pending, Summary
from .validate import SessionKey, check_text
from .window import Rule, StartOn, count_message, get_buffer_string, render_rows

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .aio import AsyncStore

__all__ = [
    "SUMMARY_PROMPT",
    "SUMMARY_PROMPT_ZH",
    "ConversationSummaryBufferMemory",
    "Summary",
    "SummaryWindow",
    "Templated",
]

logger = logging.getLogger("tokenmem.summary")
T = TypeVar("T")

# LangChain's SUMMARY_PROMPT (libs/langchain/langchain/memory/prompt.py,
# _DEFAULT_SUMMARIZER_TEMPLATE; langchain_classic/memory/prompt.py since
# LangChain 1.0), MIT License, Copyright (c) LangChain, Inc.
SUMMARY_PROMPT = """Progressively summarize the lines of conversation provided, adding onto the previous summary returning a new summary.

EXAMPLE
Current summary:
The human asks what the AI thinks of artificial intelligence. The AI thinks artificial intelligence is a force for good.

New lines of conversation:
Human: Why do you think artificial intelligence is a force for good?
AI: Because artificial intelligence will help humans reach their full potential.

New summary:
The human asks what the AI thinks of artificial intelligence. The AI thinks artificial intelligence is a force for good because it will help humans reach their full potential.
END OF EXAMPLE

Current summary:
{summary}

New lines of conversation:
{new_lines}

New summary:"""  # noqa: E501

# The same prompt in Chinese (tokenmem's translation; LangChain has none).
SUMMARY_PROMPT_ZH = """逐步总结所提供的对话内容，在之前的摘要基础上加入新的内容，返回新的摘要。

示例
当前摘要：
人类询问 AI 对人工智能的看法。AI 认为人工智能是一股向善的力量。

新的对话内容：
人类: 你为什么认为人工智能是一股向善的力量？
AI: 因为人工智能将帮助人类充分发挥自己的潜力。

新的摘要：
人类询问 AI 对人工智能的看法。AI 认为人工智能是一股向善的力量，因为它将帮助人类充分发挥自己的潜力。
示例结束

当前摘要：
{summary}

新的对话内容：
{new_lines}

新的摘要："""

_PROMPTS = {"en": SUMMARY_PROMPT, "zh": SUMMARY_PROMPT_ZH}
_ROUNDS = 4  # the most summaries one catch-up makes (a backlog goes on at the next save)
_REPLY_ROOM = 1024  # tokens of the model's context left for the summary it writes


@dataclass(frozen=True)
class SummaryWindow:
    """What a model is sent as history: the ``summary`` (None when there is
    none, or it does not fit) and, after it, the ``window`` — the pinned
    prompt (sent before the summary) and the newest messages that fit in
    what the summary leaves — with their positions and costs."""

    summary: Summary | None
    window: list[WindowMessage]


class Templated(Protocol):
    """A prompt object with its text as ``template`` (LangChain's ``PromptTemplate``)."""

    @property
    def template(self) -> str: ...


def _template(prompt: str | Templated) -> str:
    """``prompt``'s text: a str, or a LangChain ``PromptTemplate``'s
    ``template``; with exactly the variables ``{summary}`` and ``{new_lines}``
    (LangChain's check)."""
    text = getattr(prompt, "template", prompt)
    if not isinstance(text, str):
        raise ConfigurationError(
            f"prompt must be a str (or a LangChain PromptTemplate), not {type(prompt).__name__}"
        )
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise ConfigurationError(f"bad prompt: {exc}") from None
    if fields != {"summary", "new_lines"}:
        raise ConfigurationError(
            f"Got unexpected prompt input variables. The prompt expects {sorted(fields)}, "
            "but it should have {'new_lines', 'summary'}."
        )
    return text


class ConversationSummaryBufferMemory(ConversationTokenBufferMemory):
    """A running summary of what fell out of the window, and the newest
    messages that fit beside it, both within ``max_token_limit``.

    ``llm`` (required) is the tokenmem model that writes the summaries and
    whose encoding counts them (``ChatOpenAI()``: one user message;
    ``OpenAI()``: the completion prompt). ``prompt``: a template with
    ``{summary}`` and ``{new_lines}`` (default LangChain's
    :data:`SUMMARY_PROMPT`, or :data:`SUMMARY_PROMPT_ZH` with
    ``language="zh"``). ``summarize_on_save=False`` leaves the summarizing
    to :meth:`catch_up`, for a service that runs it after its response
    (a background task). The other parameters are
    :class:`ConversationTokenBufferMemory`'s.

    ``chat_memory.messages``, ``buffer_as_messages``, ``buffer_as_str`` and
    :meth:`window` are the window without the summary (LangChain's buffer);
    ``buffer`` and :meth:`load_memory_variables` have the summary first.
    """

    def __init__(
        self,
        *,
        llm: ChatModel,
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
        prompt: str | Templated | None = None,
        language: Literal["en", "zh"] = "en",
        summarize_on_save: bool = True,
    ) -> None:
        if not (
            callable(getattr(llm, "generate", None))
            and callable(getattr(llm, "agenerate", None))
            and getattr(llm, "api", None) in ("chat", "completions")
        ):
            raise ConfigurationError(
                "llm must be a tokenmem model that writes the summaries (ChatOpenAI(), "
                f"OpenAI()), not {type(llm).__name__}"
            )
        if language not in _PROMPTS:
            raise ConfigurationError(f"language must be one of {sorted(_PROMPTS)}")
        super().__init__(
            llm=llm,
            max_token_limit=max_token_limit,
            return_messages=return_messages,
            human_prefix=human_prefix,
            ai_prefix=ai_prefix,
            memory_key=memory_key,
            input_key=input_key,
            output_key=output_key,
            session_id=session_id,
            owner=owner,
            store=store,
            encoding=encoding,
            system_message=system_message,
            start_on=start_on,
            include_open=include_open,
        )
        self.llm: ChatModel = llm
        self.prompt = _template(_PROMPTS[language] if prompt is None else prompt)
        self.summarize_on_save = summarize_on_save

    def __repr__(self) -> str:
        return (
            f"ConversationSummaryBufferMemory(session_id={self.session_id!r}, "
            f"max_token_limit={self.max_token_limit}, encoding={self.counter.encoding_name!r})"
        )

    # running operations: the same functions of a Connection, sync or awaited

    def _key(self) -> SessionKey:
        return self.store._key(self.session_id, self.owner)

    def _run(self, work: Callable[[Connection], T]) -> T:
        return self._sync().run(work)

    async def _arun(self, work: Callable[[Connection], T]) -> T:
        if isinstance(self.store, Store):
            return await asyncio.to_thread(self.store.run, work)
        return await self.store.run(work)

    # reading: the summary, then the window in what it leaves

    def _loading(self, rule: Rule) -> Callable[[Connection], summaries.Loaded]:
        return functools.partial(summaries.load, key=self._key(), rule=rule, counter=self.counter)

    def _shape(
        self, loaded: summaries.Loaded, limit: int
    ) -> tuple[Summary | None, Sequence[WindowRow], str]:
        """The summary and the window's rows and string, within ``limit``.
        The stored counts are exact for the rendered string but when
        :meth:`_fit` says so, or when the summary is the last line after the
        pinned prompt (the prompt's last newline was not counted as the
        summary's): then the history is counted again, and the oldest
        messages, then the summary, go while it is over the limit."""
        summary, rule = loaded.summary, loaded.rule
        rows, text = self._fit(loaded.rows, rule)
        if summary is None or rule.mode != "text":
            return summary, rows, text
        pinned, rest = _split(rows)
        exact = rule.exact_lines(self.counter) and all(row[6] for row in rows)
        if exact and (rest or not pinned):
            return summary, rows, text
        while summary is not None and self.counter.count(_history(summary, rows, rule)) > limit:
            if rest:  # the oldest unit goes (and, with start_on, up to a user message)
                unit = rest[0][8]
                rest = [row for row in rest if row[8] != unit]
                while self.start_on == "human" and rest and rest[0][2] != "human":
                    rest = rest[1:]
            else:
                summary = None
            rows = [*pinned, *rest]
        return summary, rows, render_rows(rows, rule)

    def _loaded(
        self, return_messages: bool | None = None, limit: int | None = None
    ) -> tuple[Summary | None, Sequence[WindowRow], str]:
        rule = self._rule(return_messages, limit)
        loaded = self._run(self._loading(rule))
        if not self._pinned_ok(loaded.rows):  # system_message: saved first, as the base does
            self._sync().append(
                self.session_id, self._system_turn(), self.counter, owner=self.owner
            )
            loaded = self._run(self._loading(rule))
        return self._shape(loaded, rule.limit)

    async def _aloaded(
        self, return_messages: bool | None = None, limit: int | None = None
    ) -> tuple[Summary | None, Sequence[WindowRow], str]:
        rule = self._rule(return_messages, limit)
        loaded = await self._arun(self._loading(rule))
        if not self._pinned_ok(loaded.rows):
            turn = self._system_turn()
            if isinstance(self.store, Store):
                await asyncio.to_thread(
                    self.store.append, self.session_id, turn, self.counter, owner=self.owner
                )
            else:
                await self.store.append(self.session_id, turn, self.counter, owner=self.owner)
            loaded = await self._arun(self._loading(rule))
        return self._shape(loaded, rule.limit)

    def _load(
        self, return_messages: bool | None = None, limit: int | None = None
    ) -> tuple[Sequence[WindowRow], str]:
        return self._loaded(return_messages, limit)[1:]

    async def _aload(
        self, return_messages: bool | None = None, limit: int | None = None
    ) -> tuple[Sequence[WindowRow], str]:
        return (await self._aloaded(return_messages, limit))[1:]

    def _with_summary(
        self, loaded: tuple[Summary | None, Sequence[WindowRow], str]
    ) -> str | list[Message]:
        summary, rows, _ = loaded
        if self.return_messages:
            return _messages(summary, rows)
        return _history(summary, rows, self._rule(None))

    def summary_window(
        self, *, return_messages: bool | None = None, limit: int | None = None
    ) -> SummaryWindow:
        """The summary and the window that goes with it, read in one
        transaction — what a chain sends (``limit`` overrides
        ``max_token_limit`` for this load, ``return_messages`` the rule of
        the count, as for :meth:`window`). ``summary.tokens`` is its cost
        under that rule; summary and window together never exceed the limit."""
        summary, rows, _ = self._loaded(return_messages, limit)
        return SummaryWindow(summary, window_messages(rows))

    async def asummary_window(
        self, *, return_messages: bool | None = None, limit: int | None = None
    ) -> SummaryWindow:
        """:meth:`summary_window`, awaited."""
        summary, rows, _ = await self._aloaded(return_messages, limit)
        return SummaryWindow(summary, window_messages(rows))

    @property
    def buffer(self) -> str | list[Message]:
        """The history :meth:`load_memory_variables` returns (LangChain's)."""
        return self._with_summary(self._loaded())

    def load_memory_variables(self, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{memory_key: history}``: the summary first — a system message with
        ``return_messages``, else the line ``"System: {summary}"`` — then the
        window; within ``max_token_limit`` together."""
        return {self.memory_key: self._with_summary(self._loaded())}

    async def aload_memory_variables(
        self, inputs: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """:meth:`load_memory_variables`, awaited (an AsyncStore, or a Store in a thread)."""
        return {self.memory_key: self._with_summary(await self._aloaded())}

    @property
    def moving_summary_buffer(self) -> str:
        """The current summary's text ("" when there is none, as after
        ``clear()``), as LangChain's attribute holds it; read from the
        database, not settable."""
        key, rule = self._key(), self._rule(None)
        work = functools.partial(summaries.current, key=key, rule=rule, counter=self.counter)
        return _text(self._run(work))

    def _listing(self) -> Callable[[Connection], list[Summary]]:
        return functools.partial(
            summaries.summaries, key=self._key(), rule=self._rule(None), counter=self.counter
        )

    def summaries(self) -> list[Summary]:
        """Every summary of the session, oldest first: which messages each
        replaced (positions), what the model wrote, when, and its cost."""
        return self._run(self._listing())

    async def asummaries(self) -> list[Summary]:
        """:meth:`summaries`, awaited."""
        return await self._arun(self._listing())

    # summarizing

    def _request(self, messages: Sequence[Message], existing_summary: str) -> Prompt:
        """The model's prompt: the template with the previous summary and the
        new lines (rendered as ``get_buffer_string`` does); one user message
        for a chat model, as LangChain's LLMChain sends a prompt template."""
        new_lines = get_buffer_string(messages, self.human_prefix, self.ai_prefix)
        text = self.prompt.format(summary=existing_summary, new_lines=new_lines)
        return [{"role": "user", "content": text}] if self.llm.api == "chat" else text

    def predict_new_summary(self, messages: Sequence[Message], existing_summary: str) -> str:
        """The model's new summary of ``existing_summary`` and ``messages``
        (LangChain's method). Raises :class:`ModelError`."""
        return self.llm.generate(self._request(messages, existing_summary)).text

    async def apredict_new_summary(self, messages: Sequence[Message], existing_summary: str) -> str:
        """:meth:`predict_new_summary`, awaited (the async client)."""
        return (await self.llm.agenerate(self._request(messages, existing_summary))).text

    def _pending(self) -> Callable[[Connection], Pending | None]:
        budget = None
        context = self.llm.context_window
        if context is not None:  # what the lines may take of the model's context
            scaffold = self.counter.count(self.prompt.format(summary="", new_lines=""))
            budget = context - scaffold - _REPLY_ROOM
        return functools.partial(
            summaries.pending,
            key=self._key(),
            rule=self._rule(None),
            counter=self.counter,
            budget=budget,
        )

    def _adding(self, todo: Pending, text: str) -> Callable[[Connection], int | None]:
        """The transaction that stores ``text``, checked and counted first."""
        content = check_text(text, "the model's summary")
        counts = count_message(self.counter, "system", content, None)
        return functools.partial(
            summaries.add,
            key=self._key(),
            todo=todo,
            content=content,
            counts=counts,
            encoding=self.counter.encoding_name,
            model=self.llm.model,
        )

    def catch_up(self) -> int:
        """Summarize the messages older than the window that no summary
        replaces yet, if any: the model is asked for a new summary (the
        current one and those messages' lines) and a row is added; again
        while some are left (a longer summary leaves the window less room),
        up to four summaries a call. Returns how many were added. Raises
        :class:`ModelError` (nothing added; a later call starts over).
        :meth:`save_context` calls it after its commit, logging failures.
        ``prune()`` and ``aprune()``, LangChain's names, are the same (they
        delete nothing)."""
        made = 0
        for _ in range(_ROUNDS):
            todo = self._run(self._pending())
            if todo is None:
                break
            text = self.predict_new_summary(todo.messages, _text(todo.previous))
            made += self._run(self._adding(todo, text)) is not None
        return made

    async def acatch_up(self) -> int:
        """:meth:`catch_up`, awaited (the async client)."""
        made = 0
        for _ in range(_ROUNDS):
            todo = await self._arun(self._pending())
            if todo is None:
                break
            text = await self.apredict_new_summary(todo.messages, _text(todo.previous))
            made += await self._arun(self._adding(todo, text)) is not None
        return made

    prune = catch_up
    aprune = acatch_up

    def save_context(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Save one exchange (input and output) in one transaction; then, when
        messages fell out of the window, :meth:`catch_up` (unless
        ``summarize_on_save=False``): a failure there is logged, not raised."""
        super().save_context(inputs, outputs)
        if self.summarize_on_save:
            try:
                self.catch_up()
            except TokenmemError as exc:
                summary_failed(self.session_id, exc)

    async def asave_context(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """:meth:`save_context`, awaited."""
        await super().asave_context(inputs, outputs)
        if self.summarize_on_save:
            try:
                await self.acatch_up()
            except TokenmemError as exc:
                summary_failed(self.session_id, exc)


def summary_failed(session_id: str, exc: TokenmemError) -> None:
    """Log a catch-up that failed after a save (the exchange stays saved)."""
    logger.warning(
        "session %r: no summary made (%s); the exchange is saved, the next save catches up",
        session_id,
        exc,
    )


def _text(summary: Summary | None) -> str:
    return "" if summary is None else summary.content


def _split(rows: Sequence[WindowRow]) -> tuple[list[WindowRow], list[WindowRow]]:
    return [r for r in rows if r[PINNED]], [r for r in rows if not r[PINNED]]


def _history(summary: Summary | None, rows: Sequence[WindowRow], rule: Rule) -> str:
    """The history string: the pinned prompt's lines, the summary's line, the rest."""
    pinned, rest = _split(rows)
    lines = [render_rows(pinned, rule)] if pinned else []
    if summary is not None:
        lines.append(rule.line_prefixes["system"] + summary.content)
    if rest:
        lines.append(render_rows(rest, rule))
    return "\n".join(lines)


def _messages(summary: Summary | None, rows: Sequence[WindowRow]) -> list[Message]:
    """The history as messages: the pinned prompt, the summary (a system message), the rest."""
    pinned, rest = _split(rows)
    found = [Message(r[2], r[3], r[4], openai=r[9]) for r in pinned]
    if summary is not None:
        found.append(Message("system", summary.content))
    return found + [Message(r[2], r[3], r[4], openai=r[9]) for r in rest]
