"""The main job, shown: the reference notebook's conversation replayed on the
embedded SQLite store, the window printed as it slides, then the full stored
history beside it (nothing was pruned from the database).

Run it with ``tokenmem demo`` (or ``python -m tokenmem.demo``).
"""

from __future__ import annotations

from collections.abc import Callable

from .llm import OpenAI
from .memory import ConversationTokenBufferMemory
from .store import Store
from .window import Counts

__all__ = ["run"]

EXCHANGES = [("hi", "whats up"), ("not much you", "not much")]
EXCHANGES_ZH = [("你好", "最近怎么样"), ("没什么，你呢", "一般般")]


def _table(memory: ConversationTokenBufferMemory, out: Callable[[str], None]) -> None:
    rule, in_window = memory.rule, {w.position for w in memory.window()}
    prefix_tokens = rule.prefix_tokens(memory.counter)
    out(f"  {'pos':>3} {'turn':>4} {'role':<6} {'cost':>4}  window  content")
    for m in memory.history():
        cost = rule.cost(m.type, Counts(m.text_tokens, m.chat_tokens), prefix_tokens)
        mark = "yes" if m.position in in_window else "-"
        out(f"  {m.position:>3} {m.turn:>4} {m.type:<6} {cost:>4}  {mark:^6}  {m.content!r}")


def run(store: Store | None = None, out: Callable[[str], None] = print) -> None:
    """Replay the notebook on ``store`` (default: the embedded SQLite file)."""
    llm = OpenAI()
    store = store or Store()
    out(f"tokenmem demo: store {store!r}")

    out("\n1. memory = ConversationTokenBufferMemory(llm=llm, max_token_limit=10)")
    memory = ConversationTokenBufferMemory(llm=llm, max_token_limit=10, store=store)
    for human, ai in EXCHANGES:
        memory.save_context({"input": human}, {"output": ai})
        out(f"   save_context({{'input': {human!r}}}, {{'output': {ai!r}}})")
        out(f"   load_memory_variables({{}}) -> {memory.load_memory_variables({})}")
    out(f"   session {memory.session_id}: the full stored history; cost = the line's tokens")
    out("   plus its joining newline; the window is the newest run costing <= limit + 1")
    _table(memory, out)

    out("\n2. The same in Chinese, human_prefix='人类', max_token_limit=20")
    memory = ConversationTokenBufferMemory(
        llm=llm, max_token_limit=20, human_prefix="人类", store=store
    )
    for human, ai in EXCHANGES_ZH:
        memory.save_context({"input": human}, {"output": ai})
        out(f"   load_memory_variables({{}}) -> {memory.load_memory_variables({})}")
    _table(memory, out)

    out("\n3. return_messages=True (chat formula: 3 per message + role + content, 3 priming)")
    memory = ConversationTokenBufferMemory(
        llm=llm, max_token_limit=20, return_messages=True, store=store, session_id=memory.session_id
    )
    for m in memory.load_memory_variables({})["history"]:
        out(f"   {m.type}: {m.content}")

    again = ConversationTokenBufferMemory(llm=llm, store=store, session_id=memory.session_id)
    out(
        f"\nA new memory on session {again.session_id!r} (default limit 2000, prefix 'Human')"
        f" sees:\n   {again.buffer!r}"
    )


if __name__ == "__main__":
    run()
