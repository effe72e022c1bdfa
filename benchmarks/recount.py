"""How long a write transaction holds its locks when a long session's model
changes to one with another encoding.

Two sessions of ``--messages`` messages (default 100,000) are filled with
``Store.append_turns`` counted with cl100k_base. Then a memory counting with
o200k_base takes each over:

* **whole session in one transaction** (what an append did before tokenmem
  0.2: recount every message inside the user's write transaction):
  ``Store.recount(batch_size=<all>)`` on the first session;
* **tokenmem**: on the second session, the new model's first
  ``save_context`` (its own transaction, then the one recount batch it
  runs), its window loads while the session is being recounted (counted in
  Python from the newest messages), and ``Store.recount`` finishing the rest,
  a batch of 1,000 messages per transaction.

Every transaction is timed from BEGIN to COMMIT with SQLAlchemy's engine
events; the longest is what another writer to the session (on SQLite: to the
database) may wait. Run from the repository root::

    .venv/bin/python benchmarks/recount.py
    .venv/bin/python benchmarks/recount.py --backend sqlite --messages 20000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from common import BACKENDS, TIMES, database, sentence_text, source_digest
from sqlalchemy import Engine, event

from tokenmem import ConversationTokenBufferMemory, Message, Store, TokenCounter

OLD, NEW = "cl100k_base", "o200k_base"
LIMIT = 2_000


@contextmanager
def transactions(engine: Engine) -> Iterator[list[float]]:
    """The duration (ms) of every transaction on ``engine`` while open."""
    started: dict[int, float] = {}
    durations: list[float] = []

    def begin(conn: Any) -> None:
        started[id(conn)] = time.perf_counter()

    def end(conn: Any) -> None:
        durations.append((time.perf_counter() - started.pop(id(conn))) * 1000)

    event.listen(engine, "begin", begin)
    event.listen(engine, "commit", end)
    event.listen(engine, "rollback", end)
    try:
        yield durations
    finally:
        event.remove(engine, "begin", begin)
        event.remove(engine, "commit", end)
        event.remove(engine, "rollback", end)


def fill(store: Store, name: str, messages: int, counter: TokenCounter) -> None:
    rng = random.Random(20_261_129)
    turns = [
        [
            Message("human", sentence_text(rng, rng.randint(4, 40))),
            Message("ai", sentence_text(rng, rng.randint(4, 40))),
        ]
        for _ in range(messages // 2)
    ]
    store.append_turns(name, turns, counter, batch_size=1_000)


def run_backend(backend: str, messages: int) -> list[str]:
    old, new = TokenCounter(OLD), TokenCounter(NEW)
    with database(backend, "recount") as url:
        store = Store(url, upgrade=True)
        t = time.perf_counter()
        for name in ("whole", "batched"):
            fill(store, name, messages, old)
        print(f"{backend}: filled 2 x {messages:,} messages in {time.perf_counter() - t:.0f} s")
        with transactions(store.engine) as whole:
            store.recount("whole", new, batch_size=messages + 10)
        memory = ConversationTokenBufferMemory(
            store=store, session_id="batched", encoding=NEW, max_token_limit=LIMIT
        )
        with transactions(store.engine) as save:
            memory.save_context({"input": "a new model"}, {"output": "takes over"})
        loads = []
        for _ in range(20):
            t = time.perf_counter()
            memory.load_memory_variables({})
            loads.append((time.perf_counter() - t) * 1000)
        with transactions(store.engine) as rest:
            assert store.recount("batched", new)
        assert {m.encoding for m in store.history("batched")} == {NEW}
        store.close()
    batches = [save[-1], *rest[1:]]  # the batch the save ran, then the rest (after a start)
    rows = [
        f"| whole session in one transaction | {whole[-1]:,.0f} | 1 |",
        f"| tokenmem: the new model's save (its own transaction) | {save[0]:.1f} | 1 |",
        f"| tokenmem: one recount batch (1,000 messages), median | "
        f"{statistics.median(batches):.1f} | {len(batches)} |",
        f"| tokenmem: longest recount batch | {max(batches):.1f} | |",
        f"| tokenmem: the new model's load during the recount, median | "
        f"{statistics.median(loads):.2f} | {len(loads)} |",
    ]
    longest = max([save[0], *batches])
    return [
        f"### {backend}: a {messages:,}-message session switched from {OLD} to {NEW}",
        "",
        "| transaction | ms | count |",
        "|---|---:|---:|",
        *rows,
        "",
        f"Longest write transaction: {longest:.1f} ms with tokenmem, {whole[-1]:,.0f} ms "
        f"recounting the whole session in one ({whole[-1] / longest:,.0f}{TIMES} longer).",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args(argv)
    print(f"tokenmem source digest {source_digest()}")
    for backend in BACKENDS if args.backend == "both" else (args.backend,):
        print("\n".join(run_backend(backend, args.messages)), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
