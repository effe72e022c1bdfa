"""Prompts: a template with ``{history}`` and ``{input}``, rendered for a
completion model as one string, or for a chat model as a message list.

    p = PromptTemplate.default("zh", human_prefix="人类")
    p.render_text("人类: 你好\\nAI: 你好！", "近来怎么样？")
    # instructions, "当前对话：", the window's lines, then "人类: 近来怎么样？\\nAI:"

A chat model gets ``[system] + window as user/assistant messages + [input]``;
the system message is the template's text before ``{history}`` (or
``system=`` when given).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Literal

from .chat import as_openai, display_text
from .errors import ConfigurationError
from .messages import Message

__all__ = ["PromptTemplate", "render_chat_text"]

Language = Literal["en", "zh"]

# (instructions, the line that introduces the history): LangChain's
# ConversationChain prompt (langchain_classic/chains/conversation/prompt.py,
# DEFAULT_TEMPLATE), and the Chinese translation of it on LangChain's
# Chinese documentation page this API mirrors.
_DEFAULTS: dict[str, tuple[str, str]] = {
    "en": (
        "The following is a friendly conversation between a human and an AI. The AI is "
        "talkative and provides lots of specific details from its context. If the AI does "
        "not know the answer to a question, it truthfully says it does not know.",
        "Current conversation:",
    ),
    "zh": (
        "下面是一个友好对话的片段，其中涉及人工智能和人类的对话。人工智能非常健谈，"
        "从其上下文中提供了大量具体的细节。如果人工智能无法回答问题，它会如实回答自己不知道。",
        "当前对话：",
    ),
}


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class PromptTemplate:
    """A completion-style template holding exactly ``{history}`` and ``{input}``.

    Literal braces are written ``{{`` and ``}}`` (``str.format`` rules).
    Raises :class:`ConfigurationError` for any other placeholder."""

    template: str
    system: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise ConfigurationError("template must be a str")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ConfigurationError(f"bad template: {exc}") from None
        if sorted(fields) != ["history", "input"]:
            raise ConfigurationError(
                "a template needs {history} and {input} once each and no other "
                f"placeholder (found {fields}); write literal braces as {{{{ and }}}}"
            )

    @classmethod
    def default(
        cls, language: Language = "en", *, human_prefix: str = "Human", ai_prefix: str = "AI"
    ) -> PromptTemplate:
        """tokenmem's default prompt, in English or Chinese (``"zh"``), ending
        with the input line in the memory's prefixes."""
        if language not in _DEFAULTS:
            raise ConfigurationError(f"language must be one of {sorted(_DEFAULTS)}")
        instructions, header = _DEFAULTS[language]
        return cls(
            f"{_escape(instructions)}\n\n{_escape(header)}\n{{history}}\n"
            f"{_escape(human_prefix)}: {{input}}\n{_escape(ai_prefix)}:"
        )

    @property
    def system_text(self) -> str:
        """The instructions: ``system``, or the template's text before ``{history}``."""
        if self.system is not None:
            return self.system
        head = self.template.split("{history}", 1)[0]
        # Drop the header line that introduces the history ("Current conversation:").
        lines = head.rstrip().splitlines()
        if len(lines) > 1 and lines[-1].rstrip().endswith((":", "：")):
            lines = lines[:-1]
        return "\n".join(lines).strip().replace("{{", "{").replace("}}", "}")

    @property
    def input_variables(self) -> list[str]:
        """The template's variables, as LangChain's ``PromptTemplate`` lists them."""
        return ["history", "input"]

    def format(self, **kwargs: str) -> str:
        """The template filled in, as LangChain's ``PromptTemplate.format``
        (``KeyError`` for a variable not given)."""
        return self.template.format(**kwargs)

    def render_text(self, history: str, input: str) -> str:
        """The prompt for a completion model, given the rendered history."""
        return self.template.format(history=history, input=input)

    def render_chat(
        self, window: list[Message], input: str, *, pinned: int = 0
    ) -> list[dict[str, Any]]:
        """The prompt for a chat model: system, the window (each message as
        it was saved: :func:`tokenmem.chat.as_openai`), the input. A window
        that starts with the session's pinned prompt (``pinned`` messages)
        sends it instead of the template's instructions."""
        messages = [] if pinned else [self.system_message]
        messages += [as_openai(m) for m in window]
        messages.append({"role": "user", "content": input})
        return messages

    @property
    def system_message(self) -> dict[str, Any]:
        """The template's instructions as the chat prompt's system message."""
        return {"role": "system", "content": self.system_text}


def render_chat_text(messages: list[dict[str, Any]], human_prefix: str, ai_prefix: str) -> str:
    """A chat prompt as readable text, for verbose output (tool traffic as a
    string window renders it: :func:`tokenmem.chat.display_text`)."""
    names = {
        "system": "System",
        "developer": "Developer",
        "user": human_prefix,
        "assistant": ai_prefix,
        "tool": "Tool",
    }
    return "\n".join(f"{names.get(m['role'], m['role'])}: {display_text(m)}" for m in messages)
