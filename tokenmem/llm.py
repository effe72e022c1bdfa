"""The OpenAI model client: a thin wrapper over the official ``openai`` SDK.

Constructing it needs neither network nor API key; the SDK client is made at
the first call, which is where a missing ``OPENAI_API_KEY`` is reported::

    llm = OpenAI(model="gpt-4o-mini")              # OPENAI_BASE_URL honoured
    llm.chat([{"role": "user", "content": "hi"}])  # -> the reply text
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import openai

from .errors import ModelError

__all__ = ["OpenAI"]


@dataclass
class OpenAI:
    """An OpenAI (or OpenAI-compatible) chat model.

    ``encoding`` names the tiktoken encoding for models tiktoken's table does
    not know (local servers); otherwise it is looked up from ``model``.
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    max_retries: int = 2
    temperature: float | None = None
    encoding: str | None = None
    _client: openai.OpenAI | None = field(default=None, init=False, repr=False)

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            key = self.api_key or os.environ.get("OPENAI_API_KEY")
            if not key:
                raise ModelError("no API key: set OPENAI_API_KEY or pass OpenAI(api_key=...)")
            try:
                self._client = openai.OpenAI(
                    api_key=key,
                    base_url=self.base_url or os.environ.get("OPENAI_BASE_URL") or None,
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                )
            except openai.OpenAIError as exc:
                raise ModelError(f"cannot create the OpenAI client: {exc}") from exc
        return self._client

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """Send ``messages`` to chat completions and return the reply text."""
        extra: dict[str, Any] = {}
        if self.temperature is not None:
            extra["temperature"] = self.temperature
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                **extra,
            )
        except openai.OpenAIError as exc:
            raise ModelError(f"{self.model}: {type(exc).__name__}: {exc}") from exc
        content = response.choices[0].message.content if response.choices else None
        if not content:
            raise ModelError(f"{self.model}: empty reply")
        return content
