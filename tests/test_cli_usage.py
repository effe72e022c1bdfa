"""The command line as people type it (issue 10, items 5 and 12-16): options
after the command, the session's own encoding, confirmations, errors that
name what to do, and no file made from a typo'd URL."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmem import (
    ConversationChain,
    ConversationTokenBufferMemory,
    Message,
    OpenAI,
    Store,
    TokenCounter,
)
from tokenmem.cli import _parser, main

from .openai_server import FakeOpenAI
from .test_cli import run, url_of


def test_global_options_after_the_command(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    url = url_of(store.engine)
    store.append("s1", [Message("human", "hi")], TokenCounter("o200k_base"))
    code, out, _ = run(capsys, "sessions", "--json", "--db", url)
    assert code == 0 and [s["session_id"] for s in json.loads(out)] == ["s1"]
    # Before and after at once: the later one does not undo the first.
    code, out, _ = run(capsys, "--json", "sessions", "--db", url)
    assert code == 0 and json.loads(out)[0]["session_id"] == "s1"
    code, out, _ = run(capsys, "--db", url, "history", "s1", "--json")
    assert code == 0 and json.loads(out.splitlines()[0])["content"] == "hi"


def test_window_counts_with_the_sessions_encoding(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    url = url_of(store.engine)
    cl100k = TokenCounter("cl100k_base")
    memory = ConversationTokenBufferMemory(
        store=store, session_id="gpt4", encoding="cl100k_base", max_token_limit=50
    )
    for i in range(6):
        memory.save_context({"input": f"question {i}: ok?"}, {"output": f"Answer {i}.\nDone"})
    window = json.loads(run(capsys, "--db", url, "--json", "window", "gpt4", "--limit", "50")[1])
    assert window["encoding"] == "cl100k_base"
    rendered = memory.buffer_as_str
    assert [m["content"] for m in window["messages"]][-1] == "Answer 5.\nDone"
    # The running sum ends at the bar's total: the rendered string's tokens.
    assert window["messages"][-1]["running"] == window["used"] == cl100k.count(rendered)
    assert sum(m["cost"] for m in window["messages"]) == window["used"]
    # An explicit --model still wins.
    other = json.loads(
        run(capsys, "--db", url, "--json", "window", "gpt4", "--limit", "50", "--model", "gpt-4o")[
            1
        ]
    )
    assert other["encoding"] == "o200k_base"
    chat = json.loads(
        run(capsys, "--db", url, "--json", "window", "gpt4", "--limit", "50", "--messages")[1]
    )
    assert (
        chat["used"]
        == chat["messages"][-1]["running"] + 3
        == chat["reply_priming"] + sum(m["cost"] for m in chat["messages"])
    )
    code, out, _ = run(capsys, "--db", url, "window", "gpt4", "--limit", "50")
    assert code == 0 and f"{window['used']}/50 tokens (text, cl100k_base)" in out


def _cli(
    *argv: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.run(
        [sys.executable, "-m", "tokenmem.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **(env or {})},
    )


def test_chat_without_a_key_fails_first_and_leaves_nothing(store: Store) -> None:
    url = url_of(store.engine)
    done = _cli("--db", url, "chat", "c1", stdin="hello\n")
    assert done.returncode == 2, done.stderr
    assert "OPENAI_API_KEY" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert store.session_stats(all_owners=True) == []


def test_unnamed_chat_tells_its_session_over_a_pipe(
    store: Store, openai_server: FakeOpenAI
) -> None:
    url = url_of(store.engine)
    openai_server.reply("hello back")
    done = _cli(
        "--db",
        url,
        "chat",
        "--base-url",
        openai_server.base_url,
        stdin="hello\n",
        env={"OPENAI_API_KEY": "sk-test"},
    )
    assert done.returncode == 0, done.stderr
    assert "hello back" in done.stdout
    (line,) = [x for x in done.stderr.splitlines() if "new session" in x]
    session = line.rsplit(" ", 1)[1]
    assert [m.content for m in store.history(session)] == ["hello", "hello back"]


def test_turns_session_and_seq(
    store: Store, openai_server: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    url = url_of(store.engine)
    llm = OpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
    for name in ("show", "talk"):  # a session named "show" is listable
        memory = ConversationTokenBufferMemory(llm=llm, store=store, session_id=name)
        ConversationChain(llm=llm, memory=memory).predict(input=f"hi {name}")
    code, out, _ = run(capsys, "--db", url, "turns", "show")
    assert code == 0 and " ok " in out
    code, out, _ = run(capsys, "--db", url, "turns", "show", "0")
    assert code == 0 and "[user] hi show" in out
    code, _, err = run(capsys, "--db", url, "turns", "talk", "9")
    assert code == 3 and err.strip() == "tokenmem: no turn 9 in session 'talk'"
    code, _, err = run(capsys, "--db", url, "turns", "nope", "0")
    assert code == 3 and "session 'nope' not found" in err
    with pytest.raises(SystemExit) as exit:
        main(["--db", url, "turns", "talk", "x"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "SEQ must be a call's number, not 'x'" in err
    assert "rest" not in err and "argument seq" not in err
    turns = json.loads(run(capsys, "--db", url, "--json", "turns", "talk")[1])
    assert turns[0]["latency_ms"] == round(turns[0]["latency_ms"], 1)
    shown = json.loads(run(capsys, "--db", url, "--json", "turns", "talk", "0")[1])
    assert shown["turn"]["latency_ms"] == round(shown["turn"]["latency_ms"], 1)


def test_owner_and_all_owners_together_is_an_error(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--db", url_of(store.engine), "sessions", "--owner", "a", "--all-owners"])
    assert exit.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_answering_no_erases_and_downgrades_nothing(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = url_of(store.engine)
    store.append("keep", [Message("human", "hi")], TokenCounter("o200k_base"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    asked: list[str] = []

    def answer(prompt: str) -> str:
        asked.append(prompt)
        return "n"

    monkeypatch.setattr("builtins.input", answer)
    code, out, _ = run(capsys, "--db", url, "erase", "keep")
    assert code == 0 and out.strip() == "nothing erased"
    code, out, _ = run(capsys, "--db", url, "db", "downgrade", "base")
    assert code == 0 and out.strip() == "nothing downgraded"
    assert asked == [
        "Erase session 'keep' for good? Type 'yes': ",
        "Drop every tokenmem table and all history? Type 'yes': ",
    ]
    assert [m.content for m in store.history("keep")] == ["hi"]


def test_read_only_commands_never_create_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    typo = tmp_path / "typo" / "tokenmem.sqlite3"
    for argv in (
        ["sessions"],
        ["history", "s"],
        ["window", "s", "--limit", "10"],
        ["turns", "s"],
        ["export"],
        ["db", "current"],
        ["db", "check"],
        ["erase", "s", "--yes"],
    ):
        code, _, err = run(capsys, "--db", f"sqlite:///{typo}", *argv)
        assert code == 2 and f"no SQLite database at {typo}" in err, (argv, err)
    monkeypatch.setenv("TOKENMEM_DATABASE_URL", f"sqlite:///{typo}")
    assert run(capsys, "sessions")[0] == 2
    assert not (tmp_path / "typo").exists()


def test_version_and_help_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("tokenmem 0.")
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in [("tokenmem", parser), *commands.choices.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_db_upgrade_says_what_it_did(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenmem import migrate

    url = url_of(store.engine)
    store.downgrade("0003")
    code, out, _ = run(capsys, "--db", url, "db", "upgrade")
    assert code == 0 and out.startswith(f"upgraded from 0003 to {migrate.head()}")
    code, out, _ = run(capsys, "--db", url, "db", "upgrade")
    assert code == 0 and out.startswith(f"nothing to do: at {migrate.head()}")
