"""The sample output the README shows, made by running tokenmem.

Each sample stands in README.md under a marker line
``<!-- sample: NAME (docs/samples.py) -->``, followed by a fenced block. This
script runs the demo on a fresh embedded SQLite file (in a temporary
``XDG_DATA_HOME``), then the commands each sample shows, and either rewrites
the blocks (``--write``) or compares them (``--check``, the default; exit 1 and
a diff when the README is stale). Times, session ids and latencies differ from
run to run, so the comparison masks them (and sorts the lines: sessions of the
same second list in the order of their ids); everything else must match.

    .venv/bin/python docs/samples.py --write     # after a change to the output
    .venv/bin/python docs/samples.py             # what tests/test_readme.py runs
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(
    r"^<!-- sample: (\w+) \(docs/samples\.py\) -->\n```text\n(.*?)^```", re.M | re.S
)


def _cli(*argv: str) -> str:
    """What ``tokenmem ARGV`` prints (stdout, then stderr and the exit code
    when it fails), shown as typed."""
    from tokenmem.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    if code:
        return f"$ tokenmem {' '.join(argv)}; echo $?\n{out.getvalue()}{err.getvalue()}{code}\n"
    return f"$ tokenmem {' '.join(argv)}\n{out.getvalue()}"


def cli_sample() -> str:
    from tokenmem import Store

    _cli("demo")
    store = Store()
    try:
        chat = max(store.session_stats(), key=lambda s: s.messages).session_id
    finally:
        store.close()
    parts = [
        _cli("sessions"),
        _cli("window", chat, "--limit", "60"),
        _cli("turns", chat),
        _history_head(chat),
        _cli("history", "nope"),
    ]
    return "\n".join(part.rstrip("\n") + "\n" for part in parts)


def _history_head(session: str) -> str:
    text = _cli("history", session, "--format", "jsonl")
    command, first = text.splitlines()[:2]
    return f"{command} | head -1\n{first}\n"


def transcript_sample() -> str:
    """The verbose output of the demo chain's last call (offline responder)."""
    from tokenmem import ConversationChain, ConversationTokenBufferMemory, Store
    from tokenmem.demo import CONVERSATION, OfflineResponder

    lines: list[str] = []
    llm = OfflineResponder([reply for _, reply in CONVERSATION["en"]])
    store = Store()
    try:
        memory = ConversationTokenBufferMemory(llm=llm, max_token_limit=60, store=store)
        chain = ConversationChain(llm=llm, memory=memory, verbose=True, log=lines.append)
        for human, _ in CONVERSATION["en"]:
            lines.clear()
            chain.predict(input=human)
    finally:
        store.close()
    return "\n".join(lines).strip("\n") + "\n"


SAMPLES: dict[str, Callable[[], str]] = {"cli": cli_sample, "transcript": transcript_sample}

_MASKS = [
    (re.compile(r"\b[0-9a-f]{32}\b"), "<session>"),
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00)?"), "<time>"),
    # The turns table's latency column (the one before the error column).
    (re.compile(r"(offline-responder.*?)\d+(\s+-)$", re.M), r"\1<ms>\2"),
    (re.compile(r"[ \t]+"), " "),
]


def masked(text: str) -> list[str]:
    """The lines that must match, sorted (sessions made in the same second
    list in the order of their random ids)."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return sorted(text.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md's samples")
    args = parser.parse_args(argv)
    readme = README.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as data:
        os.environ["XDG_DATA_HOME"] = data  # the embedded default, fresh
        os.environ.pop("TOKENMEM_DATABASE_URL", None)
        os.environ.pop("OPENAI_API_KEY", None)  # the demo's offline responder
        made = {name: make() for name, make in SAMPLES.items()}
    found = {m.group(1): m.group(2) for m in MARKER.finditer(readme)}
    if set(found) != set(made):
        print(f"README.md has samples {sorted(found)}, this script makes {sorted(made)}")
        return 1
    if args.write:
        README.write_text(
            MARKER.sub(lambda m: m.group(0).replace(m.group(2), made[m.group(1)]), readme),
            encoding="utf-8",
        )
        return 0
    stale = 0
    for name, text in made.items():
        if masked(found[name]) != masked(text):
            stale += 1
            diff = difflib.unified_diff(
                found[name].splitlines(), text.splitlines(), "README.md", "now", lineterm=""
            )
            print(f"sample {name!r} is stale:\n" + "\n".join(diff))
    if stale:
        print("run: .venv/bin/python docs/samples.py --write")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
