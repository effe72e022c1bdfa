"""The README states facts: its sample output is what tokenmem prints now
(docs/samples.py), and its example prints what its comments say."""

from __future__ import annotations

import ast
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

# Imported before a test sets its warning filters: on import, LangChain puts
# its own in front of them (its deprecation warnings shown, never errors).
import langchain_classic  # noqa: F401
import langchain_core  # noqa: F401
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow  # runs the demo in a subprocess
def test_sample_output_is_current() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOKENMEM_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "samples.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def block(title: str) -> str:
    """The first Python block of the README's section (or subsection) ``title``."""
    found = re.search(rf"^###? {re.escape(title)}\n.*?^```python\n(.*?)^```", README, re.S | re.M)
    assert found is not None, title
    return found.group(1)


def run_block(code: str) -> int:
    """Run a README block statement by statement: an expression followed by
    ``#`` lines must have the repr they give (whitespace aside). Returns how
    many were checked."""
    lines = code.splitlines()
    scope: dict[str, object] = {}
    checked = 0
    for node in ast.parse(code).body:
        source = ast.get_source_segment(code, node)
        assert source is not None and node.end_lineno is not None
        shown = list(
            itertools.takewhile(lambda line: line.startswith("#"), lines[node.end_lineno :])
        )
        if shown and isinstance(node, ast.Expr):
            value = eval(source, scope)
            expected = "".join(line.lstrip("#") for line in shown)
            assert re.sub(r"\s", "", repr(value)) == re.sub(r"\s", "", expected), source
            checked += 1
        else:
            exec(source, scope)
    return checked


LANGCHAIN = "Inside LangChain: RunnableWithMessageHistory and LangChain's own chains"


@pytest.mark.parametrize(
    ("section", "checks"),
    [("Example", 3), ("Tool calls", 4), ("With the OpenAI Agents SDK", 3), (LANGCHAIN, 5)],
)
# LangChain deprecates the classes its example runs.
@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
@pytest.mark.filterwarnings("ignore:The class `ConversationChain` was deprecated")
def test_the_example_prints_what_its_comments_say(section: str, checks: int) -> None:
    """Run a README section's first block; each expression followed by ``#``
    lines must have that repr (whitespace aside)."""
    assert run_block(block(section)) == checks


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
