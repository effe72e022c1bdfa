"""ConversationChain: the token window, a prompt, a model call, the exchange saved.

    llm = ChatOpenAI(model="gpt-4o-mini")   # or OpenAI(): the completions API
    chain = ConversationChain(
        llm=llm,
        memory=ConversationTokenBufferMemory(llm=llm, max_token_limit=60),
        verbose=True,
    )
    chain.predict(input="Hi there!")      # -> the model's reply

Each call loads the window (its budget: ``max_token_limit``, lowered to what
the model's context leaves after the instructions, the input and
``reserve_tokens`` for the reply), renders the prompt, calls the model and —
only if that succeeded — saves the exchange. Every call, failed or not, is
recorded in the turn audit log (:mod:`tokenmem.audit`) with the window's
positions, so its exact prompt can be rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .audit import TurnRecord, build_prompt
from .errors import ConfigurationError, ModelError, TokenmemError
from .llm import ChatModel, Prompt, Reply
from .memory import ConversationTokenBufferMemory
from .messages import Message
from .prompt import PromptTemplate, render_chat_text
from .reads import WindowMessage
from .store import Store
from .summaries import Summary
from .summary import ConversationSummaryBufferMemory, summary_failed
from .validate import check_text
from .window import REPLY_PRIMING, chat_prompt_tokens, get_buffer_string

__all__ = ["ConversationChain"]

logger = logging.getLogger("tokenmem.chain")

_VERBOSE = {
    "en": (
        "> Entering new ConversationChain chain...",
        "Prompt after formatting:",
        "> Finished chain.",
    ),
    "zh": ("> 进入新的 ConversationChain 链...", "格式化后的提示：", "> 完成链。"),
}


# LangChain's StdOutCallbackHandler: the chain's lines in bold, the prompt in
# bold italic green (langchain_core.utils.input.get_colored_text).
_BOLD, _GREEN, _PLAIN = "\033[1m", "\u001b[32;1m\033[1;3m", "\u001b[0m"


@dataclass(frozen=True)
class _Plan:
    """One call, before it is made."""

    input: str
    window: list[WindowMessage]
    prompt: Prompt
    budget: int
    prompt_tokens: int
    summary: Summary | None = None


def _history(window: list[WindowMessage], summary: Summary | None) -> tuple[list[Message], int]:
    """The history a prompt sends — the pinned prompt, the summary (a system
    message), the rest of the window — and how many are the pinned prompt."""
    pinned = [w.message for w in window if w.pinned]
    middle = [Message("system", summary.content)] if summary else []
    return [*pinned, *middle, *(w.message for w in window if not w.pinned)], len(pinned)


def _cancelled() -> ModelError:
    return ModelError("the consumer stopped reading the stream", error_type="Cancelled")


class ConversationChain:
    """A conversation over a :class:`ConversationTokenBufferMemory`.

    ``prompt`` is a :class:`PromptTemplate` (default: tokenmem's own, in
    ``language`` ``"en"`` or ``"zh"``). ``verbose=True`` sends the start line,
    the formatted prompt and the end line to ``log`` (default: ``print``; pass
    ``logger.info`` to redirect); they are always logged at DEBUG to
    ``tokenmem.chain``.
    """

    def __init__(
        self,
        *,
        llm: ChatModel,
        memory: ConversationTokenBufferMemory,
        prompt: PromptTemplate | None = None,
        language: Literal["en", "zh"] = "en",
        verbose: bool = False,
        log: Callable[[str], None] | None = None,
        reserve_tokens: int = 256,
        input_key: str = "input",
        output_key: str = "response",
    ) -> None:
        if not isinstance(memory, ConversationTokenBufferMemory):
            raise ConfigurationError("memory must be a ConversationTokenBufferMemory")
        if prompt is not None and not isinstance(prompt, PromptTemplate):
            raise ConfigurationError(
                f"prompt must be a tokenmem PromptTemplate, not {type(prompt).__name__}"
            )
        if not isinstance(getattr(llm, "model", None), str):
            raise ConfigurationError(
                f"llm must be a tokenmem model (OpenAI(), ...) naming its .model, "
                f"not {type(llm).__name__}"
            )
        if input_key in memory.memory_variables:  # as LangChain's ConversationChain checks
            raise ConfigurationError(
                f"The input key {input_key} was also found in the memory keys "
                f"({memory.memory_variables}) - please provide keys that don't overlap."
            )
        # Checked now, not when the call is recorded after the model answered.
        check_text(llm.model, "llm.model")
        self.llm = llm
        self.memory = memory
        self.prompt = prompt or PromptTemplate.default(
            language, human_prefix=memory.human_prefix, ai_prefix=memory.ai_prefix
        )
        self.language = language
        self.verbose = verbose
        self.log = log or print
        self._prints = log is None
        self.reserve_tokens = reserve_tokens
        self.input_key = input_key
        self.output_key = output_key

    # planning: the same for every way of calling

    def _say(self, text: str, styled: str) -> None:
        """``text`` to the DEBUG log and, when verbose, to ``log`` — printed
        (the default) as LangChain's ``StdOutCallbackHandler`` prints it, in
        bold and green: ``styled``, the same bytes."""
        logger.debug(text)
        if self.verbose:
            self.log(styled if self._prints else text)

    def _limit(self, scaffold: int) -> int:
        """The window's token budget, given what the prompt costs without it."""
        limit = self.memory.max_token_limit
        context = self.llm.context_window
        if context is None:
            return limit
        free = context - self.reserve_tokens - scaffold
        if self.llm.api == "chat":
            free += 3  # the reply priming: counted in the scaffold and in the window's rule
        if free <= 0:
            raise ConfigurationError(
                f"the input needs {scaffold} tokens with the instructions; "
                f"{self.llm.model} has {context} and {self.reserve_tokens} are reserved"
            )
        return min(limit, free)

    def _render(
        self, window: list[WindowMessage], input: str, summary: Summary | None = None
    ) -> Prompt:
        memory = self.memory
        history, pinned = _history(window, summary)
        return build_prompt(
            self.llm.api,
            self.prompt,
            history,
            input,
            memory.human_prefix,
            memory.ai_prefix,
            pinned,
        )

    def _count(self, prompt: Prompt) -> int:
        counter = self.memory.counter
        return (
            counter.count(prompt)
            if isinstance(prompt, str)
            else chat_prompt_tokens(prompt, counter)
        )

    def _plan(
        self,
        loaded: tuple[list[WindowMessage], Summary | None],
        input: str,
        limit: int,
        scaffold: int,
    ) -> _Plan:
        window, summary = loaded
        context = self.llm.context_window
        while True:
            prompt = self._render(window, input, summary)
            if isinstance(prompt, str):  # counted whole: merges at the history's edges
                tokens = self._count(prompt)
            else:  # the chat formula adds up: the window's costs were counted at write time
                tokens = scaffold + sum(w.tokens for w in window)
                tokens += summary.tokens if summary else 0
                if window and window[0].pinned:  # sent instead of the template's system
                    tokens -= chat_prompt_tokens([self.prompt.system_message], self.memory.counter)
                    tokens += REPLY_PRIMING
            # Keep the exact prompt within the context, dropping the oldest unit if needed.
            rest = [w for w in window if not w.pinned]
            if not rest or context is None or tokens <= context - self.reserve_tokens:
                break
            window = [w for w in window if w.pinned or w.unit != rest[0].unit]
            if self.memory.start_on == "human":
                while (first := next((w for w in window if not w.pinned), None)) and (
                    first.message.type != "human"
                ):
                    window.remove(first)
        self._say(*self._start_text(prompt))
        return _Plan(input, window, prompt, limit, tokens, summary)

    def _start_text(self, prompt: Prompt) -> tuple[str, str]:
        start, formatted, _ = _VERBOSE[self.language]
        text = (
            prompt
            if isinstance(prompt, str)
            else render_chat_text(prompt, self.memory.human_prefix, self.memory.ai_prefix)
        )
        return (
            f"\n\n{start}\n{formatted}\n{text}",
            f"\n\n{_BOLD}{start}{_PLAIN}\n{formatted}\n{_GREEN}{text}{_PLAIN}",
        )

    def _finished(self) -> None:
        finished = _VERBOSE[self.language][2]
        self._say(f"\n{finished}", f"\n{_BOLD}{finished}{_PLAIN}")

    def _record(
        self, plan: _Plan, started: float, reply: Reply | None, error: ModelError | None
    ) -> TurnRecord:
        positions = [w.position for w in plan.window if not w.pinned]
        pinned = [w.position for w in plan.window if w.pinned]
        memory = self.memory
        return TurnRecord(
            model=self.llm.model,
            api=self.llm.api,
            system=self.prompt.system_text,
            template=self.prompt.template,
            human_prefix=memory.human_prefix,
            ai_prefix=memory.ai_prefix,
            input=plan.input,
            window_first=positions[0] if positions else None,
            window_last=positions[-1] if positions else None,
            token_budget=plan.budget,
            prompt_tokens=plan.prompt_tokens,
            latency_ms=(time.perf_counter() - started) * 1000,
            outcome="ok" if error is None else "error",
            api_prompt_tokens=reply.prompt_tokens if reply else None,
            api_completion_tokens=reply.completion_tokens if reply else None,
            error_type=error.error_type if error else None,
            error=str(error) if error else None,
            pinned_first=pinned[0] if pinned else None,
            pinned_last=pinned[-1] if pinned else None,
            summary_seq=plan.summary.seq if plan.summary else None,
        )

    def _exchange(self, plan: _Plan, reply: Reply) -> list[Message]:
        return [Message("human", plan.input), Message("ai", reply.text)]

    def _input(self, input: object) -> str:
        return check_text(input, self.input_key)

    def _sync_store(self) -> Store:
        store = self.memory.store
        if not isinstance(store, Store):
            raise ConfigurationError("the memory has an AsyncStore: use apredict/ainvoke")
        return store

    def _finish(
        self, plan: _Plan, started: float, reply: Reply | None, error: ModelError | None
    ) -> None:
        memory = self.memory
        record = self._record(plan, started, reply, error)
        exchange = self._exchange(plan, reply) if reply else None
        self._sync_store().record_turn(
            memory.session_id, record, exchange, memory.counter, owner=memory.owner
        )
        if reply:
            self._finished()
            if isinstance(memory, ConversationSummaryBufferMemory) and memory.summarize_on_save:
                try:  # after the commit, as the memory's own save_context does
                    memory.catch_up()
                except TokenmemError as exc:
                    summary_failed(memory.session_id, exc)

    # sync

    def _scaffold(self, input: object) -> tuple[str, int]:
        """The checked input, and the tokens of the prompt without a window."""
        text = self._input(input)
        return text, self._count(self._render([], text))

    def _prepare(self, input: object) -> _Plan:
        text, scaffold = self._scaffold(input)
        limit = self._limit(scaffold)
        memory, chat = self.memory, self.llm.api == "chat"
        if isinstance(memory, ConversationSummaryBufferMemory):
            found = memory.summary_window(return_messages=chat, limit=limit)
            return self._plan((found.window, found.summary), text, limit, scaffold)
        window = memory.window(return_messages=chat, limit=limit)
        return self._plan((window, None), text, limit, scaffold)

    def _call(self, input: object) -> tuple[_Plan, Reply]:
        plan = self._prepare(input)
        started = time.perf_counter()
        try:
            reply = self.llm.generate(plan.prompt)
        except ModelError as exc:
            self._finish(plan, started, None, exc)
            raise
        self._finish(plan, started, reply, None)
        return plan, reply

    def predict(self, *, input: str) -> str:
        """Call the model with the window and ``input``; return its reply.

        Raises :class:`ModelError` (nothing saved) when the call fails."""
        return self._call(input)[1].text

    @property
    def input_keys(self) -> list[str]:
        """The keys ``invoke`` reads (LangChain's ``Chain.input_keys``)."""
        return [self.input_key]

    @property
    def output_keys(self) -> list[str]:
        """The key of the reply in ``invoke``'s result (LangChain's ``Chain.output_keys``)."""
        return [self.output_key]

    def _invoke_input(self, inputs: str | Mapping[str, Any]) -> dict[str, Any]:
        """``invoke``'s input as a dict: a str is the input, as LangChain's
        ``Chain.prep_inputs`` takes it for a chain with one input key."""
        if isinstance(inputs, str):
            return {self.input_key: inputs}
        if not isinstance(inputs, Mapping) or self.input_key not in inputs:
            raise ConfigurationError(
                f"invoke needs the input as a str or a dict with the key {self.input_key!r}"
            )
        return dict(inputs)

    def _run_input(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if len(args) == 1 and not kwargs:
            return self._invoke_input(args[0])
        if kwargs and not args:
            return self._invoke_input(kwargs)
        raise ConfigurationError(
            "run takes one positional input or keyword inputs (run('hi'), "
            f"run({self.input_key}='hi')), as LangChain's Chain.run"
        )

    def _invoke_result(
        self, inputs: Mapping[str, Any], plan: _Plan, reply: Reply
    ) -> dict[str, Any]:
        window = _history(plan.window, plan.summary)[0]
        memory = self.memory
        history: str | list[Message] = window
        if not memory.return_messages:  # the type load_memory_variables gives, as in LangChain
            history = get_buffer_string(window, memory.human_prefix, memory.ai_prefix)
        return {
            self.input_key: inputs[self.input_key],
            self.memory.memory_key: history,
            self.output_key: reply.text,
        }

    def invoke(self, inputs: str | Mapping[str, Any]) -> dict[str, Any]:
        """``{input, history, response}`` like LangChain's chain.invoke; the
        history is the window the prompt was built from (messages for a chat
        model, the rendered string for a completion model). ``inputs``: a
        dict with the input key, or the input itself."""
        given = self._invoke_input(inputs)
        plan, reply = self._call(given[self.input_key])
        return self._invoke_result(given, plan, reply)

    def __call__(self, inputs: str | Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`invoke` (LangChain's older ``chain(inputs)``)."""
        return self.invoke(inputs)

    def run(self, *args: Any, **kwargs: Any) -> str:
        """The reply alone, as LangChain's ``Chain.run``: ``run("hi")`` or
        ``run(input="hi")``."""
        return str(self.invoke(self._run_input(args, kwargs))[self.output_key])

    def batch(self, inputs: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`invoke` for each input, in order: one after the other, as
        each turn's window holds the turns before it (LangChain's ``batch``
        runs them at once, which a conversation memory cannot order)."""
        return [self.invoke(one) for one in inputs]

    def stream(self, *, input: str) -> Iterator[str]:
        """Yield the reply in chunks; the exchange is saved when the stream
        completes, and nothing is saved if it breaks off."""
        plan = self._prepare(input)
        started = time.perf_counter()
        reply: Reply | None = None
        try:
            for chunk in self.llm.stream(plan.prompt):
                if isinstance(chunk, Reply):
                    reply = chunk
                else:
                    yield chunk
        except ModelError as exc:
            self._finish(plan, started, None, exc)
            raise
        except GeneratorExit:  # the consumer stopped early: audit it, save nothing
            self._finish(plan, started, None, _cancelled())
            raise
        if reply is not None:
            self._finish(plan, started, reply, None)

    # async

    async def _aprepare(self, input: object) -> _Plan:
        text, scaffold = self._scaffold(input)
        limit = self._limit(scaffold)
        memory, chat = self.memory, self.llm.api == "chat"
        if isinstance(memory, ConversationSummaryBufferMemory):
            found = await memory.asummary_window(return_messages=chat, limit=limit)
            return self._plan((found.window, found.summary), text, limit, scaffold)
        window = await memory.awindow(return_messages=chat, limit=limit)
        return self._plan((window, None), text, limit, scaffold)

    async def _afinish(
        self, plan: _Plan, started: float, reply: Reply | None, error: ModelError | None
    ) -> None:
        store = self.memory.store
        if isinstance(store, Store):
            await asyncio.to_thread(self._finish, plan, started, reply, error)
            return
        memory = self.memory
        record = self._record(plan, started, reply, error)
        exchange = self._exchange(plan, reply) if reply else None
        await store.record_turn(
            memory.session_id, record, exchange, memory.counter, owner=memory.owner
        )
        if reply:
            self._finished()
            if isinstance(memory, ConversationSummaryBufferMemory) and memory.summarize_on_save:
                try:
                    await memory.acatch_up()
                except TokenmemError as exc:
                    summary_failed(memory.session_id, exc)

    async def _acall(self, input: object) -> tuple[_Plan, Reply]:
        plan = await self._aprepare(input)
        started = time.perf_counter()
        try:
            reply = await self.llm.agenerate(plan.prompt)
        except ModelError as exc:
            await self._afinish(plan, started, None, exc)
            raise
        await self._afinish(plan, started, reply, None)
        return plan, reply

    async def apredict(self, *, input: str) -> str:
        """:meth:`predict` with the async OpenAI client."""
        return (await self._acall(input))[1].text

    async def ainvoke(self, inputs: str | Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`invoke` with the async OpenAI client."""
        given = self._invoke_input(inputs)
        plan, reply = await self._acall(given[self.input_key])
        return self._invoke_result(given, plan, reply)

    async def arun(self, *args: Any, **kwargs: Any) -> str:
        """:meth:`run` with the async OpenAI client."""
        return str((await self.ainvoke(self._run_input(args, kwargs)))[self.output_key])

    async def abatch(self, inputs: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`batch` with the async OpenAI client (in order, one by one)."""
        return [await self.ainvoke(one) for one in inputs]

    async def astream(self, *, input: str) -> AsyncIterator[str]:
        """:meth:`stream` with the async OpenAI client."""
        plan = await self._aprepare(input)
        started = time.perf_counter()
        reply: Reply | None = None
        try:
            async for chunk in self.llm.astream(plan.prompt):
                if isinstance(chunk, Reply):
                    reply = chunk
                else:
                    yield chunk
        except ModelError as exc:
            await self._afinish(plan, started, None, exc)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            await self._afinish(plan, started, None, _cancelled())
            raise
        if reply is not None:
            await self._afinish(plan, started, reply, None)
