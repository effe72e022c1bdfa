"""The README states facts: its sample output is what tokenmem prints now
(docs/samples.py), and its example prints what its comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    ("section", "checks"), [("Example", 3), ("Tool calls", 4), ("OpenAI Agents SDK", 3)]
)
def test_the_example_prints_what_its_comments_say(section: str, checks: int) -> None:
    """Run a README section's first block; each expression followed by ``#``
    lines must have that repr (whitespace aside)."""
    block = re.search(rf"^## {section}\n.*?```python\n(.*?)^```", README, re.S | re.M)
    assert block is not None
    scope: dict[str, object] = {}
    statement: list[str] = []
    checked = 0
    lines = [*block.group(1).splitlines(), ""]
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            expected = []
            while lines[i].startswith("#"):
                expected.append(lines[i].lstrip("#"))
                i += 1
            value = eval("\n".join(statement), scope)  # the expression just before
            assert re.sub(r"\s", "", repr(value)) == re.sub(r"\s", "", "".join(expected))
            statement, checked = [], checked + 1
            continue
        if statement and not line.startswith(" ") and not statement[-1].rstrip().endswith(","):
            exec("\n".join(statement), scope)
            statement = []
        if line.strip():
            statement.append(line.split("  #")[0])
        i += 1
    assert checked == checks


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
