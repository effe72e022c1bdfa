"""The model client: a thin wrapper over the official ``openai`` SDK.

Constructing it needs neither network nor API key; the SDK clients are made
at the first call, which is where a missing ``OPENAI_API_KEY`` is reported.
``OPENAI_BASE_URL`` (or ``base_url=``) points it at any OpenAI-compatible
server (vLLM, Ollama, a gateway)::

    ChatOpenAI(model="gpt-4o-mini").generate([{"role": "user", "content": "hi"}]).text
    OpenAI().generate("Say hi:")    # completions, gpt-3.5-turbo-instruct (LangChain's)

A prompt that is a list of messages goes to chat completions, a string to the
legacy completions endpoint. Every failure is raised as :class:`ModelError`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import ModelError

if TYPE_CHECKING:
    import openai

__all__ = ["ChatModel", "ChatOpenAI", "OpenAI", "Prompt", "Reply", "context_window"]

Prompt = list[dict[str, Any]] | str

# Context sizes in tokens, matched by the longest prefix of the model name.
_CONTEXT = {
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-4o": 128_000,
    "chatgpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4-32k": 32_768,
    "gpt-4": 8_192,
    "gpt-3.5-turbo-instruct": 4_096,
    "gpt-3.5-turbo": 16_385,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
}


def context_window(model: str) -> int | None:
    """The context size of ``model`` in tokens, if tokenmem knows it."""
    for prefix in sorted(_CONTEXT, key=len, reverse=True):
        if model.startswith(prefix):
            return _CONTEXT[prefix]
    return None


@dataclass(frozen=True)
class Reply:
    """A model's answer, with the usage the API reported (``None`` if not)."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatModel(Protocol):
    """What a chain needs of a model. :class:`OpenAI` is one; the demo's
    offline responder is another."""

    model: str
    api: Literal["chat", "completions"]

    @property
    def context_window(self) -> int | None: ...

    def generate(self, prompt: Prompt) -> Reply: ...

    async def agenerate(self, prompt: Prompt) -> Reply: ...

    def stream(self, prompt: Prompt) -> Iterator[str | Reply]: ...

    def astream(self, prompt: Prompt) -> AsyncIterator[str | Reply]: ...


def _sdk() -> ModuleType:
    # The SDK takes about a second to import: only a process that calls a
    # model pays for it.
    import openai

    return openai


def _fail(model: str, exc: Exception) -> ModelError:
    return ModelError(f"{model}: {type(exc).__name__}: {exc}", error_type=type(exc).__name__)


@dataclass
class OpenAI:
    """An OpenAI (or OpenAI-compatible) completion model, as LangChain's
    ``OpenAI``: the completions API and its default model,
    ``gpt-3.5-turbo-instruct``; :class:`ChatOpenAI` is the chat one.

    ``api`` is ``"completions"`` (the default here) or ``"chat"``.
    ``encoding`` names the tiktoken encoding and ``context_size`` the context
    window for models tokenmem's tables do not know (local servers).
    """

    model: str = "gpt-3.5-turbo-instruct"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    max_retries: int = 2
    temperature: float | None = None
    max_tokens: int | None = None
    api: Literal["chat", "completions"] = "completions"
    encoding: str | None = None
    context_size: int | None = None
    _clients: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def context_window(self) -> int | None:
        return self.context_size or context_window(self.model)

    def _options(self) -> dict[str, Any]:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ModelError(
                "no API key: set OPENAI_API_KEY or pass OpenAI(api_key=...)",
                error_type="NoAPIKey",
            )
        return {
            "api_key": key,
            "base_url": self.base_url or os.environ.get("OPENAI_BASE_URL") or None,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
        }

    @property
    def client(self) -> openai.OpenAI:
        if "sync" not in self._clients:
            self._clients["sync"] = _sdk().OpenAI(**self._options())
        client: openai.OpenAI = self._clients["sync"]
        return client

    @property
    def aclient(self) -> openai.AsyncOpenAI:
        if "async" not in self._clients:
            self._clients["async"] = _sdk().AsyncOpenAI(**self._options())
        client: openai.AsyncOpenAI = self._clients["async"]
        return client

    def close(self) -> None:
        """Close the sync client's connections."""
        client = self._clients.pop("sync", None)
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the async client's connections (before its event loop ends)."""
        client = self._clients.pop("async", None)
        if client is not None:
            await client.close()

    def _request(self, prompt: Prompt, *, stream: bool = False) -> dict[str, Any]:
        args: dict[str, Any] = {"model": self.model}
        if isinstance(prompt, str):
            args["prompt"] = prompt
        else:
            args["messages"] = prompt
        if self.temperature is not None:
            args["temperature"] = self.temperature
        if self.max_tokens is not None:
            args["max_tokens"] = self.max_tokens
        if stream:
            args["stream"] = True
            args["stream_options"] = {"include_usage": True}
        return args

    def _reply(self, response: Any) -> Reply:
        choice = response.choices[0] if response.choices else None
        if choice is None:
            raise ModelError(f"{self.model}: no choices in the reply", error_type="EmptyReply")
        if hasattr(choice, "message"):
            refusal = getattr(choice.message, "refusal", None)
            if refusal:
                raise ModelError(f"{self.model} refused: {refusal}", error_type="Refusal")
            text = choice.message.content
        else:
            text = choice.text
        if not text:
            raise ModelError(f"{self.model}: empty reply", error_type="EmptyReply")
        usage = response.usage
        return Reply(
            text,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )

    def generate(self, prompt: Prompt) -> Reply:
        """Send ``prompt`` and return the reply. Raises :class:`ModelError`."""
        try:
            endpoint = (
                self.client.completions if isinstance(prompt, str) else self.client.chat.completions
            )
            response = endpoint.create(**self._request(prompt))
        except _sdk().OpenAIError as exc:
            raise _fail(self.model, exc) from exc
        return self._reply(response)

    async def agenerate(self, prompt: Prompt) -> Reply:
        """:meth:`generate` on the async client."""
        try:
            client = self.aclient
            endpoint = client.completions if isinstance(prompt, str) else client.chat.completions
            response = await endpoint.create(**self._request(prompt))
        except _sdk().OpenAIError as exc:
            raise _fail(self.model, exc) from exc
        return self._reply(response)

    def _chunk(self, event: Any, parts: list[str], usage: list[Any]) -> str:
        if event.usage:
            usage.append(event.usage)
        if not event.choices:
            return ""
        choice = event.choices[0]
        delta = choice.delta.content if hasattr(choice, "delta") else choice.text
        if getattr(getattr(choice, "delta", None), "refusal", None):
            raise ModelError(f"{self.model} refused: {choice.delta.refusal}", error_type="Refusal")
        if delta:
            parts.append(delta)
        return delta or ""

    def _final(self, parts: list[str], usage: list[Any]) -> Reply:
        text = "".join(parts)
        if not text:
            raise ModelError(f"{self.model}: empty reply", error_type="EmptyReply")
        u = usage[-1] if usage else None
        return Reply(text, u.prompt_tokens if u else None, u.completion_tokens if u else None)

    def stream(self, prompt: Prompt) -> Iterator[str | Reply]:
        """Yield the reply's text chunks, then the whole :class:`Reply`."""
        parts: list[str] = []
        usage: list[Any] = []
        try:
            endpoint = (
                self.client.completions if isinstance(prompt, str) else self.client.chat.completions
            )
            with endpoint.create(**self._request(prompt, stream=True)) as events:
                for event in events:
                    chunk = self._chunk(event, parts, usage)
                    if chunk:
                        yield chunk
        except _sdk().OpenAIError as exc:
            raise _fail(self.model, exc) from exc
        except Exception as exc:  # a connection cut mid-stream surfaces as httpx's error
            if isinstance(exc, ModelError):
                raise
            raise _fail(self.model, exc) from exc
        yield self._final(parts, usage)

    async def astream(self, prompt: Prompt) -> AsyncIterator[str | Reply]:
        """:meth:`stream` on the async client."""
        parts: list[str] = []
        usage: list[Any] = []
        try:
            client = self.aclient
            endpoint = client.completions if isinstance(prompt, str) else client.chat.completions
            events = await endpoint.create(**self._request(prompt, stream=True))
            async with events:
                async for event in events:
                    chunk = self._chunk(event, parts, usage)
                    if chunk:
                        yield chunk
        except _sdk().OpenAIError as exc:
            raise _fail(self.model, exc) from exc
        except Exception as exc:
            if isinstance(exc, ModelError):
                raise
            raise _fail(self.model, exc) from exc
        yield self._final(parts, usage)


@dataclass
class ChatOpenAI(OpenAI):
    """An OpenAI (or OpenAI-compatible) chat model, as LangChain's
    ``ChatOpenAI``: the chat completions API, ``gpt-4o-mini`` by default."""

    model: str = "gpt-4o-mini"
    api: Literal["chat", "completions"] = "chat"
