"""The quick start's demo runs on the embedded SQLite default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def demo(tmp_path: Path, *args: str) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TOKENMEM_DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL")
    }
    env["XDG_DATA_HOME"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "tokenmem.cli", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def test_demo_on_embedded_sqlite(tmp_path: Path) -> None:
    out = demo(tmp_path)
    assert (tmp_path / "tokenmem" / "tokenmem.sqlite3").exists()
    assert "{'history': 'Human: not much you\\nAI: not much'}" in out
    # The full history is printed, including messages outside the window.
    assert "'hi'" in out and "'whats up'" in out
    # The chain part: verbose prompts, the offline responder labelled, the turn log.
    assert "OFFLINE RESPONDER" in out
    assert out.count("> Entering new ConversationChain chain...") == 4
    assert "Human: Haha nope, although a lot of people confuse it for that\nAI:" in out
    assert "turn audit log" in out and "    3 ok " in out


def test_demo_in_chinese(tmp_path: Path) -> None:
    out = demo(tmp_path, "--language", "zh")
    assert out.count("> 进入新的 ConversationChain 链...") == 4
    assert "当前对话：" in out and "人类: 哈哈，不是，虽然很多人把它弄混了\nAI:" in out
