"""What the tamper-evident history costs ``save_context``: this checkout
beside a baseline without digests (by default the commit before migration
0006; once other work on the append has been merged after it, name a
commit with that work and without the digests: ``--baseline 19eb6c2``,
main before they arrived), single-threaded, on the same machine at the
same time.

Each side is a worker process importing its own tokenmem (the baseline's
``tokenmem/`` and ``migrations/`` from ``git archive``) with a database of
its own: ``--sessions`` sessions prefilled with 64 messages each. The parent
asks the two workers in turn for ``--chunk`` turns at a time (which goes
first alternating), so drift on a shared machine hits both alike; a turn is
a new ``ConversationTokenBufferMemory`` for a random session and one
``save_context`` (o200k_base). Reported: each side's CPU time per
``save_context`` (``time.process_time`` of the worker, SQLite's own work
included; PostgreSQL's server work is not) and median wall time, and the
ratios (goal: at most 1.1x). Run from the repository root::

    .venv/bin/python benchmarks/digests.py                   # both backends
    .venv/bin/python benchmarks/digests.py --backend sqlite --turns 4000 --json /tmp/d.json

PostgreSQL comes from ``TOKENMEM_BENCH_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), in a fresh schema.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SESSIONS, PREFILL, TURNS, CHUNK, WARMUP, SEED = 200, 64, 3_000, 100, 200, 20_261_129
GOAL = 1.1
MIGRATION = "migrations/versions/0006_digests.py"


def baseline_rev() -> str:
    """The commit before the one that added migration 0006."""
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", MIGRATION],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


def extract(rev: str, into: Path) -> None:
    """``tokenmem/`` of ``rev`` into ``into``, with its migrations inside it."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", rev, "tokenmem", "migrations"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "migrations").rename(into / "tokenmem" / "migrations")


# --- the worker: one side, driven over stdin/stdout --------------------------------


def worker(code: str, url: str, sessions: int) -> None:
    sys.path.insert(0, code)
    import tokenmem
    from tokenmem import ConversationTokenBufferMemory, Message, Store, TokenCounter

    store, counter = Store(url, upgrade=True), TokenCounter("o200k_base")
    rng = random.Random(SEED)
    for s in range(sessions):
        turns = [
            [Message("human", f"question {s}.{i} " * 3), Message("ai", f"answer {s}.{i} " * 8)]
            for i in range(PREFILL // 2)
        ]
        store.append_turns(f"d-{s}", turns, counter)
    print(json.dumps({"tokenmem": tokenmem.__file__}), flush=True)
    for line in sys.stdin:
        n, cpu, walls = int(line), 0.0, []
        for _ in range(n):
            name = f"d-{rng.randrange(sessions)}"
            memory = ConversationTokenBufferMemory(store=store, session_id=name)
            c0, t0 = time.process_time(), time.perf_counter_ns()
            memory.save_context({"input": "what next? " * 3}, {"output": "this, then that. " * 6})
            walls.append(time.perf_counter_ns() - t0)
            cpu += time.process_time() - c0
        print(json.dumps({"cpu": cpu, "walls": walls}), flush=True)
    store.close()


# --- the parent ------------------------------------------------------------------


def measure(
    backend: str, base: Path, turns: int, chunk: int, sessions: int, code: Path = ROOT
) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    with common.database(backend, "digest") as url_a, common.database(backend, "nodigest") as url_b:
        sides = {"digests": (str(code), url_a), "baseline": (str(base), url_b)}
        procs = {
            side: subprocess.Popen(
                [sys.executable, __file__, "--worker", code, url, str(sessions)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for side, (code, url) in sides.items()
        }
        try:
            for side, proc in procs.items():
                assert proc.stdout is not None
                loaded = json.loads(proc.stdout.readline())["tokenmem"]
                assert loaded.startswith(sides[side][0]), (side, loaded)
            cpu = dict.fromkeys(procs, 0.0)
            walls: dict[str, list[int]] = {side: [] for side in procs}
            for i in range((WARMUP + turns) // chunk):
                order = list(procs) if i % 2 else list(reversed(procs))
                for side in order:
                    proc = procs[side]
                    assert proc.stdin is not None and proc.stdout is not None
                    proc.stdin.write(f"{chunk}\n")
                    proc.stdin.flush()
                    got = json.loads(proc.stdout.readline())
                    if i * chunk >= WARMUP:
                        cpu[side] += got["cpu"]
                        walls[side] += got["walls"]
        finally:
            for proc in procs.values():
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=120)
    n = len(walls["digests"])
    out: dict[str, Any] = {"backend": backend, "turns": n}
    for side in procs:
        out[f"{side}_cpu_ms"] = 1e3 * cpu[side] / n
        out[f"{side}_p50_ms"] = statistics.median(walls[side]) / 1e6
    out["cpu_ratio"] = out["digests_cpu_ms"] / out["baseline_cpu_ms"]
    out["p50_ratio"] = out["digests_p50_ms"] / out["baseline_p50_ms"]
    return out


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], action="append")
    parser.add_argument("--baseline", help="git revision without digests (default: before 0006)")
    parser.add_argument(
        "--candidate",
        metavar="REV",
        help="measure this revision instead of the working tree (--candidate REV --baseline REV: "
        "the same code on both sides, the harness's noise)",
    )
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--chunk", type=int, default=CHUNK)
    parser.add_argument("--sessions", type=int, default=SESSIONS)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rev = args.baseline or baseline_rev()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base, code = Path(tmp) / "baseline", Path(tmp) / "candidate"
        extract(rev, base)
        if args.candidate:
            extract(args.candidate, code)
        for backend in args.backend or ["sqlite", "postgresql"]:
            r = measure(
                backend,
                base,
                args.turns,
                args.chunk,
                args.sessions,
                code if args.candidate else ROOT,
            )
            results.append({**r, "baseline_rev": rev, "candidate_rev": args.candidate})
            print(
                f"{backend:10} save_context CPU {r['digests_cpu_ms']:.3f} ms with digests, "
                f"{r['baseline_cpu_ms']:.3f} ms without: {r['cpu_ratio']:.3f}x "
                f"(goal <= {GOAL}x); p50 {r['digests_p50_ms']:.3f} / "
                f"{r['baseline_p50_ms']:.3f} ms: {r['p50_ratio']:.3f}x  [{r['turns']} turns]"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["cpu_ratio"] <= GOAL for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
