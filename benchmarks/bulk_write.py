"""Write throughput: bulk appends, imports and ``save_context``, beside a bare driver.

Four measurements a run, on the same database, each beside the least a
program could do with the driver alone (sqlite3 or psycopg, tokenmem's own
statements, the same token counts made with the same tiktoken counting):

* **bare executemany**: count ``--messages`` messages (``count_message``, as
  tokenmem counts them), then one transaction: bump the session with
  ``writes.bump_statement`` and ``executemany`` the rows, 2,000 a call. The
  baseline of the three bulk modes. On PostgreSQL, **bare COPY** does the same
  with ``COPY ... FROM STDIN`` (psycopg's ``Cursor.copy``), for reference.
* **store.append_many**: the same messages (``Message`` objects made
  beforehand) through ``Store.append_many`` on a store made from the URL.
* **import**: ``tokenmem.transfer.import_jsonl`` — what ``tokenmem import``
  calls — of a JSONL file of the same messages written by ``export_jsonl``
  (the session erased before each run, untimed). It reads the file twice:
  once to check every line, once to write.
* **save_context**: ``--exchanges`` exchanges, one ``save_context`` each on one
  memory, beside the **bare per-exchange insert**: count the two messages,
  BEGIN, the bump, ``executemany`` of the two rows, COMMIT. The two alternate
  in blocks of 50 exchanges (each commit waits for the disk, which other
  programs share: a slow spell then hits both alike).

Each run times every mode once, in an order rotated run by run so that drift
on a shared machine hits them alike; the table shows the medians of the runs'
msg/s and of each run's ratio to its own bare baseline. Every session written
is checked to hold its messages. Run from the repository root::

    .venv/bin/python benchmarks/bulk_write.py                 # both, 5 runs: a few minutes
    .venv/bin/python benchmarks/bulk_write.py --db sqlite --runs 3 --messages 20000

PostgreSQL comes from ``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), in a fresh schema.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import psycopg
from common import ENCODING, TIMES

from tokenmem import ConversationTokenBufferMemory, Message, Rule, Store, TokenCounter
from tokenmem.models import MESSAGES, session_uuid
from tokenmem.transfer import export_jsonl, import_jsonl
from tokenmem.window import count_message

MESSAGES_N, EXCHANGES, RUNS, BATCH, SEED = 100_000, 1_000, 5, 2_000, 20_261_201
CTX_BLOCK = 50
BARE, BARE_COPY, MANY, IMPORT = "bare executemany", "bare COPY", "store.append_many", "import"
BARE_CTX, CTX = "bare per-exchange insert", "save_context"
BASELINE = {
    BARE: BARE,
    BARE_COPY: BARE,
    MANY: BARE,
    IMPORT: BARE,
    BARE_CTX: BARE_CTX,
    CTX: BARE_CTX,
}
ROLES = ("human", "ai")


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [common.sentence_text(rng, rng.randint(8, 48)) for _ in range(n)]


class Bare:
    """The bare driver: tokenmem's statements (``common.TurnSQL``) on sqlite3 or psycopg."""

    def __init__(self, backend: str, url: str, counter: TokenCounter) -> None:
        self.backend, self.counter = backend, counter
        self.sql = common.TurnSQL(backend, Rule(limit=2_000), counter)
        self.conn = common.connect(url)

    def _bump(self, cur: Any, name: str, counts: Sequence[Any]) -> tuple[dict[str, Any], Any]:
        params = self.sql.upsert_params(session_uuid(common.OWNER, name), name, counts)
        cur.execute(self.sql.upsert, params)
        return params, cur.fetchone()

    def bulk(self, name: str, batch: Sequence[str], copy: bool = False) -> None:
        counts = [count_message(self.counter, ROLES[i % 2], t, None) for i, t in enumerate(batch)]
        cur = self.conn.cursor()
        up, (next_position, next_turn, floor_total) = self._bump(cur, name, counts)
        up["turns"] = len(batch)  # (the bump counted 1 turn: the turns column is not timed)
        position, cum = next_position - len(batch), floor_total - up["floor"]
        rows = []
        for i, (text, c) in enumerate(zip(batch, counts, strict=True)):
            rows.append(
                {
                    "session_id": up["id"],
                    "position": position + i,
                    "turn": next_turn - 1 + i // 2,
                    "role": ROLES[i % 2],
                    "content": text,
                    "name": None,
                    "metadata": None,
                    "created_at": up["now"],
                    "encoding": ENCODING,
                    "text_tokens": c.text_tokens,
                    "newline_tokens": c.newline_tokens,
                    "chat_tokens": c.chat_tokens,
                    "cum_floor": cum,
                }
            )
            cum += c.floor
            if len(rows) == BATCH or i == len(batch) - 1:
                if copy:
                    names = [c.name for c in MESSAGES.columns]
                    with cur.copy(f"COPY tokenmem_messages ({', '.join(names)}) FROM STDIN") as w:
                        for row in rows:
                            w.write_row([row[k] for k in names])
                else:
                    cur.executemany(self.sql.insert, rows)
                rows = []
        self.conn.commit()
        cur.close()

    def exchange(self, name: str, pair: Sequence[str]) -> None:
        counts = [count_message(self.counter, r, t, None) for r, t in zip(ROLES, pair, strict=True)]
        cur = self.conn.cursor()
        if self.backend == "sqlite":
            cur.execute("BEGIN")
        up, row = self._bump(cur, name, counts)
        cur.executemany(self.sql.insert, self.sql.insert_params(up, row, pair, counts))
        self.conn.commit()
        cur.close()


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    counter = TokenCounter(ENCODING)
    bulk = texts(args.messages, SEED)
    pairs = list(zip(*[iter(texts(2 * args.exchanges, SEED + 1))] * 2, strict=True))
    messages = [Message(ROLES[i % 2], t) for i, t in enumerate(bulk)]
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with common.database(backend, "bulk") as url, tempfile.TemporaryDirectory() as tmp:
        store = Store(url)
        store.upgrade()
        bare = Bare(backend, url, counter)
        dump = Path(tmp) / "export.jsonl"
        store.append_many("import", messages, counter)
        with dump.open("w", encoding="utf-8") as out:
            export_jsonl(store, out, sessions=["import"])

        def do_import() -> None:
            with dump.open(encoding="utf-8") as src:
                import_jsonl(store, src)

        def exchanges(run: int) -> dict[str, float]:
            """save_context and the bare insert, alternating in blocks of
            ``CTX_BLOCK`` exchanges (a commit waits for the disk, which others
            share: alternating lets a slow spell hit both); msg/s of each."""
            memory = ConversationTokenBufferMemory(
                store=store, session_id=f"ctx-{run}", max_token_limit=2_000, encoding=ENCODING
            )
            seconds = {BARE_CTX: 0.0, CTX: 0.0}
            for lo in range(0, len(pairs), CTX_BLOCK):
                block = pairs[lo : lo + CTX_BLOCK]
                started = time.perf_counter()
                for h, a in block:
                    memory.save_context({"input": h}, {"output": a})
                middle = time.perf_counter()
                for pair in block:
                    bare.exchange(f"bctx-{run}", pair)
                seconds[CTX] += middle - started
                seconds[BARE_CTX] += time.perf_counter() - middle
            return {mode: 2 * len(pairs) / t for mode, t in seconds.items()}

        for run in range(args.runs):
            store.erase("import")
            this: dict[str, float] = {}
            modes: list[tuple[str, Callable[[], object], str, int]] = [
                (BARE, lambda r=run: bare.bulk(f"bare-{r}", bulk), f"bare-{run}", len(bulk)),
                (
                    MANY,
                    lambda r=run: store.append_many(f"many-{r}", messages, counter),
                    f"many-{run}",
                    len(bulk),
                ),
                (IMPORT, do_import, "import", len(bulk)),
                (CTX, lambda r=run, t=this: t.update(exchanges(r)), f"ctx-{run}", 2 * len(pairs)),
            ]
            if backend == "postgresql":
                modes.insert(
                    1,
                    (
                        BARE_COPY,
                        lambda r=run: bare.bulk(f"copy-{r}", bulk, copy=True),
                        f"copy-{run}",
                        len(bulk),
                    ),
                )
            k = run % len(modes)
            for mode, work, session, n in modes[k:] + modes[:k]:
                seconds = timed(work)
                for name in (session, f"bctx-{run}") if mode == CTX else (session,):
                    held = store.session(name).next_position
                    if held != n:
                        raise RuntimeError(f"{mode}: session {name} holds {held}, not {n}")
                this.setdefault(mode, n / seconds)
            for mode, rate in this.items():
                rates.setdefault(mode, []).append(rate)
                ratios.setdefault(mode, []).append(rate / this[BASELINE[mode]])
            print(
                f"run {run + 1}: "
                + ", ".join(
                    f"{m} {r:,.0f} msg/s ({r / this[BASELINE[m]]:.2f}{TIMES})"
                    for m, r in this.items()
                ),
                flush=True,
            )
        bare.conn.close()
        store.close()
    order = [m for m in (BARE, BARE_COPY, MANY, IMPORT, BARE_CTX, CTX) if m in rates]
    return {
        "backend": backend,
        "modes": {
            m: {
                "msg_per_s": statistics.median(rates[m]),
                "ratio": statistics.median(ratios[m]),
                "runs_msg_per_s": rates[m],
            }
            for m in order
        },
    }


def show(r: dict[str, Any], args: argparse.Namespace) -> None:
    name = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[r["backend"]]
    print(f"\n## {name}\n")
    print("| mode | messages | msg/s (median) | ÷ bare (median) | runs (msg/s) |")
    print("|---|---:|---:|---:|---|")
    for mode, s in r["modes"].items():
        n = 2 * args.exchanges if mode in (BARE_CTX, CTX) else args.messages
        runs = " ".join(f"{x:,.0f}" for x in s["runs_msg_per_s"])
        print(f"| {mode} | {n:,} | {s['msg_per_s']:,.0f} | {s['ratio']:.2f}{TIMES} | {runs} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--runs", type=int, default=RUNS, help=f"default {RUNS}")
    parser.add_argument("--messages", type=int, default=MESSAGES_N, help=f"default {MESSAGES_N:,}")
    parser.add_argument(
        "--exchanges",
        type=int,
        default=EXCHANGES,
        help=f"save_context calls (default {EXCHANGES:,})",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.messages < 2 or args.exchanges < 1:
        parser.error("--runs and --exchanges must be at least 1, --messages at least 2")
    digest = common.source_digest()
    print(
        f"# Bulk writes: {args.messages:,} messages, {args.exchanges:,} exchanges, "
        f"medians of {args.runs} runs ({ENCODING})\n\n"
        f"tokenmem sources {digest}, Python {sys.version.split()[0]}, SQLite "
        f"{sqlite3.sqlite_version}, psycopg {psycopg.__version__}, {os.cpu_count()} CPUs.\n"
    )
    reports = []
    for backend in common.BACKENDS if args.db == "both" else (args.db,):
        print(f"{backend}:", flush=True)
        reports.append(run_backend(backend, args))
    for r in reports:
        show(r, args)
    if args.json:
        args.json.write_text(json.dumps({"source_digest": digest, "backends": reports}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
