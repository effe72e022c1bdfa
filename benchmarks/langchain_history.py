"""A RunnableWithMessageHistory's load: LangChain's SQLChatMessageHistory
followed by trim_messages, against tokenmem's SQLTokenWindowHistory.

LangChain's recipe for a token-bounded history is a ``SQLChatMessageHistory``
(langchain-community) whose ``messages`` reads every message of the session,
then ``trim_messages`` keeping the newest that fit. tokenmem's drop-in
selects the window in SQL from counts stored at write time. Both are given
one session of ``--sizes`` messages (user/assistant turns of English-like
text) and load the window of ``--limit`` tokens that starts at a user
message, ``--reps`` times; the medians are compared in the same run, and
each size checks that the two windows are the same messages.

``trim_messages`` is timed with two counters:

* **exact**: the chat formula tokenmem uses (3 per message + role + content,
  o200k_base), so the windows must match exactly;
* **approximate**: langchain-core's ``count_tokens_approximately`` (about
  four characters a token): LangChain's fastest counter, which gives a
  different window (not compared).

langchain-community is not a tokenmem dependency; run from the repository
root::

    .venv/bin/pip install -e '.[test]' langchain-community==0.4.2
    .venv/bin/python benchmarks/langchain_history.py --backend sqlite
    .venv/bin/python benchmarks/langchain_history.py --backend postgresql
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from common import database, sentence_text, source_digest
from langchain_community.chat_message_histories import SQLChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.messages.utils import (
    convert_to_openai_messages,
    count_tokens_approximately,
    trim_messages,
)
from sqlalchemy import create_engine

from tokenmem import Store, TokenCounter
from tokenmem.langchain import SQLTokenWindowHistory

O200K = TokenCounter("o200k_base")
PRIMING = 3  # the reply priming, counted once per request (not by trim_messages)


def exact(messages: Sequence[BaseMessage]) -> int:
    """OpenAI's chat formula per message, as tokenmem counts a chat window."""
    return sum(
        3 + O200K.count(d["role"]) + O200K.count(d["content"])
        for d in convert_to_openai_messages(list(messages))
    )


def conversation(n: int, seed: int = 7) -> list[BaseMessage]:
    rng = random.Random(seed)
    return [
        (HumanMessage if i % 2 == 0 else AIMessage)(sentence_text(rng, rng.randint(8, 60)))
        for i in range(n)
    ]


def timed(load: Callable[[], list[BaseMessage]], reps: int) -> tuple[float, list[BaseMessage]]:
    """The median milliseconds of ``reps`` loads, and the last load's window."""
    times = []
    window: list[BaseMessage] = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        window = load()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6, window


def measure(backend: str, size: int, limit: int, reps: int) -> dict[str, Any]:
    messages = conversation(size)
    with database(backend, "lc") as url:
        engine = create_engine(url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # langchain-community's deprecations
            theirs = SQLChatMessageHistory("bench", connection=engine)
        store = Store(url, upgrade=True)
        ours = SQLTokenWindowHistory("bench", store=store)
        for lo in range(0, size, 1_000):
            theirs.add_messages(messages[lo : lo + 1_000])
            ours.add_messages(messages[lo : lo + 1_000])
        window = SQLTokenWindowHistory(
            "bench", store=store, max_token_limit=limit, start_on="human"
        )

        def trimmed(counter: Callable[..., int], budget: int) -> Callable[[], list[BaseMessage]]:
            return lambda: trim_messages(
                theirs.messages,
                strategy="last",
                token_counter=counter,
                max_tokens=budget,
                start_on="human",
                allow_partial=False,
            )

        exact_ms, expected = timed(trimmed(exact, limit - PRIMING), reps)
        approx_ms, _ = timed(trimmed(count_tokens_approximately, limit), reps)
        read_ms, _ = timed(lambda: theirs.messages, reps)
        tokenmem_ms, got = timed(lambda: window.messages, max(reps, 20))
        assert [(m.type, m.content) for m in got] == [(m.type, m.content) for m in expected], (
            f"the windows differ at {size} messages"
        )
        store.close()
        engine.dispose()
    return {
        "size": size,
        "window": len(got),
        "read": read_ms,
        "exact": exact_ms,
        "approx": approx_ms,
        "tokenmem": tokenmem_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--limit", type=int, default=2_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    print(
        f"# {args.backend}, window of {args.limit} tokens starting at a user message, "
        f"medians of {args.reps} loads (tokenmem: of max(reps, 20)); "
        f"tokenmem sources {source_digest()}"
    )
    print(
        "| messages | window | SQLChatMessageHistory.messages | + trim_messages (exact) "
        "| + trim_messages (approximate) | tokenmem | exact ÷ tokenmem |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(args.backend, size, args.limit, args.reps)
        print(
            f"| {r['size']:,} | {r['window']} | {r['read']:.1f} ms | {r['exact']:.1f} ms "
            f"| {r['approx']:.1f} ms | {r['tokenmem']:.2f} ms "
            f"| {r['exact'] / r['tokenmem']:,.0f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
