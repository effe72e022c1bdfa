"""The quick start's demo runs on the embedded SQLite default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_on_embedded_sqlite(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOKENMEM_DATABASE_URL"}
    env["XDG_DATA_HOME"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "tokenmem.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert (tmp_path / "tokenmem" / "tokenmem.sqlite3").exists()
    assert "{'history': 'Human: not much you\\nAI: not much'}" in out
    assert "{'history': '人类: 你好\\nAI: 最近怎么样'}" in out
    # The full history is printed, including messages outside the window.
    assert "'hi'" in out and "'whats up'" in out
