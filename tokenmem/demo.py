"""The main job, shown: the reference notebook replayed on the embedded SQLite
store. First the memory on its own (the window printed as it slides), then
the conversation through a ConversationChain with verbose prompts and a
60-token window, then the full stored history beside the final window and
the turn audit log. Nothing is pruned from the database.

With ``OPENAI_API_KEY`` set the chain calls the real API (``OPENAI_BASE_URL``
honoured); without it a clearly labelled offline responder answers, so the
demo always runs. Run it with ``tokenmem demo [--language zh]``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from .chain import ConversationChain
from .llm import OpenAI, Prompt, Reply
from .memory import ConversationTokenBufferMemory
from .store import Store
from .window import Counts

__all__ = ["OfflineResponder", "run"]

EXCHANGES = [("hi", "whats up"), ("not much you", "not much")]
CONVERSATION = {
    "en": [
        ("Hi, what's up?", " Not much! Just enjoying the day. How about you?"),
        (
            "Just working on writing some documentation!",
            " Sounds productive! What are you documenting?",
        ),
        (
            "For LangChain! Have you heard of it?",
            " Yes, I have heard of LangChain! It is a language-learning platform that connects"
            " native speakers with learners in real time. Is that what you are documenting?",
        ),
        (
            "Haha nope, although a lot of people confuse it for that",
            " Oh, I see. Are you thinking of a different language-learning platform, then?",
        ),
    ],
    "zh": [
        ("你好，近来怎么样？", " 你好！我过得很好，正在享受这一天。你呢？"),
        ("我正在写一些文档！", " 听起来是一个充实的一天！你在写哪方面的文档呢？"),
        (
            "是关于LangChain的！你听说过吗？",
            " 是的，我听说过LangChain！它是一个分布式的语言学习平台，"
            "可以实时连接母语人士和学习者。你写的就是这个文档吗？",
        ),
        ("哈哈，不是，虽然很多人把它弄混了", " 哦，我明白了。你是在指其他的语言学习平台吗？"),
    ],
}


@dataclass
class OfflineResponder:
    """A stand-in model for running without an API key: it answers each input
    with the reference notebook's scripted reply. Never a real model."""

    replies: list[str]
    model: str = "offline-responder (no OPENAI_API_KEY: scripted replies)"
    api: Literal["chat", "completions"] = "completions"
    encoding: str = "o200k_base"
    context_window: int | None = None
    _next: Iterator[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = iter(self.replies)

    def generate(self, prompt: Prompt) -> Reply:
        return Reply(next(self._next, " (the offline responder has no more scripted replies)"))

    async def agenerate(self, prompt: Prompt) -> Reply:
        return self.generate(prompt)

    def stream(self, prompt: Prompt) -> Iterator[str | Reply]:
        reply = self.generate(prompt)
        yield reply.text
        yield reply

    async def astream(self, prompt: Prompt) -> AsyncIterator[str | Reply]:
        for chunk in self.stream(prompt):
            yield chunk


def _table(memory: ConversationTokenBufferMemory, out: Callable[[str], None]) -> None:
    rule, in_window = memory.rule, {w.position for w in memory.window()}
    prefix_tokens = rule.prefix_tokens(memory.counter)
    history = list(memory.history())  # a demo's few messages
    out(f"  {'pos':>3} {'turn':>4} {'role':<6} {'cost':>4}  window  content")
    for m in history:
        counts = Counts.stored(m)
        cost = rule.cost(m.type, counts, prefix_tokens)
        if m is history[-1]:  # the newest line: no newline after it (as `tokenmem window`)
            cost -= counts.newline_tokens
        mark = "yes" if m.position in in_window else "-"
        out(f"  {m.position:>3} {m.turn:>4} {m.type:<6} {cost:>4}  {mark:^6}  {m.content!r}")


def run(
    store: Store | None = None,
    out: Callable[[str], None] = print,
    language: Literal["en", "zh"] = "en",
) -> None:
    """Replay the notebook on ``store`` (default: the embedded SQLite file)."""
    store = store or Store()
    out(f"tokenmem demo: store {store!r}")

    out("\n1. The memory: ConversationTokenBufferMemory(llm=llm, max_token_limit=10)")
    memory = ConversationTokenBufferMemory(llm=OpenAI(), max_token_limit=10, store=store)
    for human, ai in EXCHANGES:
        memory.save_context({"input": human}, {"output": ai})
        out(f"   save_context({{'input': {human!r}}}, {{'output': {ai!r}}})")
        out(f"   load_memory_variables({{}}) -> {memory.load_memory_variables({})}")
    out("   The full stored history; cost = the line's tokens plus the newline joining it")
    out("   to the next line (the newest has none); the window = the newest run costing")
    out("   <= limit:")
    _table(memory, out)

    conversation = CONVERSATION[language]
    llm: OpenAI | OfflineResponder
    if os.environ.get("OPENAI_API_KEY"):
        llm = OpenAI()
        out(f"\n2. The chain, calling {llm.model} (OPENAI_API_KEY is set), 60-token window")
    else:
        llm = OfflineResponder([reply for _, reply in conversation])
        out("\n2. The chain, 60-token window. OFFLINE RESPONDER: no OPENAI_API_KEY is set,")
        out("   so scripted replies stand in for the model (set the key to call the API).")
    human_prefix = "人类" if language == "zh" else "Human"
    memory = ConversationTokenBufferMemory(
        llm=llm, max_token_limit=60, human_prefix=human_prefix, store=store
    )
    chain = ConversationChain(llm=llm, memory=memory, language=language, verbose=True, log=out)
    for human, _ in conversation:
        reply = chain.predict(input=human)
        out(f"\n   predict(input={human!r}) -> {reply!r}")

    out(f"\n3. Session {memory.session_id}: everything stored, and the window now:")
    _table(memory, out)
    out("\n   The turn audit log (each prompt can be rebuilt with store.rebuild_prompt):")
    out(f"  {'seq':>3} {'outcome':<7} {'window':>9} {'budget':>6} {'prompt':>6} {'ms':>5}")
    for t in store.turns(memory.session_id):
        window = "-" if t.window_first is None else f"{t.window_first}..{t.window_last}"
        out(
            f"  {t.seq:>3} {t.outcome:<7} {window:>9} {t.token_budget:>6} "
            f"{t.prompt_tokens:>6} {t.latency_ms:>5.0f}"
        )


if __name__ == "__main__":
    run()
