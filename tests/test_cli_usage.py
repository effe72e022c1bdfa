"""The command line as people type it (issue 10, items 5 and 12-16): options
after the command, the session's own encoding, confirmations, errors that
name what to do, and no file made from a typo'd URL."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmem import (
    ChatOpenAI,
    ConversationChain,
    ConversationTokenBufferMemory,
    Message,
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


@pytest.mark.slow  # subprocesses
def test_chat_without_a_key_fails_first_and_leaves_nothing(store: Store) -> None:
    url = url_of(store.engine)
    done = _cli("--db", url, "chat", "c1", stdin="hello\n")
    assert done.returncode == 2, done.stderr
    assert "OPENAI_API_KEY" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert store.session_stats(all_owners=True) == []


@pytest.mark.slow  # subprocesses
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
    llm = ChatOpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
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
    turns = json.loads(run(capsys, "--db", url, "--json", "turns", "talk")[1])["turns"]
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


# --- QA A2: stored text cannot drive the operator's terminal -------------------------

# Sets the window title, clears the screen, returns to the line's start, a C1 CSI, DEL.
EVIL = "\x1b]0;owned\x07\x1b[2J\rX\x9b31m\x7f"
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # a newline is fine


def terminal_safe(text: str) -> None:
    assert not UNSAFE.search(text), repr(text)
    assert "\\x1b" in text, text  # shown, not dropped


def test_stored_text_is_shown_with_visible_controls(
    store: Store,
    openai_server: FakeOpenAI,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    url, owner, session = url_of(store.engine), f"o{EVIL}", f"s{EVIL}"
    llm = ChatOpenAI(
        base_url=openai_server.base_url,
        api_key="k",
        max_retries=0,
        model=f"m{EVIL}",
        encoding="o200k_base",
    )
    memory = ConversationTokenBufferMemory(
        llm=llm, store=store, session_id=session, owner=owner, encoding="o200k_base"
    )
    openai_server.reply(f"reply{EVIL}\nsecond line")
    ConversationChain(llm=llm, memory=memory).predict(input=f"hi{EVIL}")
    where = ["--owner", owner]
    for argv in (
        ["sessions", "--all-owners"],
        ["history", session, *where],
        ["window", session, "--limit", "500", *where],
        ["turns", session, *where],
        ["turns", session, "0", *where],
    ):
        code, out, err = run(capsys, "--db", url, *argv)
        assert code == 0, (argv, err)
        terminal_safe(out)
    # Errors, on stderr: a driver's, a path's, argparse's.
    for argv in (
        ["import", f"{tmp_path}/missing{EVIL}.jsonl"],
        ["history", session],  # the default owner has none
        ["export", "-o", f"{tmp_path}/no/such/dir{EVIL}"],
    ):
        code, _, err = run(capsys, "--db", url, *argv)
        assert code in (2, 3), (argv, err)
        terminal_safe(err)
    with pytest.raises(SystemExit):
        main(["--db", url, "sessions", EVIL])
    terminal_safe(capsys.readouterr().err)
    # JSON, JSONL and CSV stay lossless (JSON escapes DEL and C1 too).
    code, out, _ = run(capsys, "--db", url, "--json", "sessions", "--all-owners")
    assert not UNSAFE.search(out) and json.loads(out)[0]["session_id"] == session
    lines = run(capsys, "--db", url, "history", session, *where, "--format", "jsonl")[1]
    assert not UNSAFE.search(lines)
    assert json.loads(lines.splitlines()[0])["content"] == f"hi{EVIL}"
    table = run(capsys, "--db", url, "history", session, *where, "--format", "csv")[1]
    assert list(csv.reader(io.StringIO(table, newline="")))[1][3] == f"hi{EVIL}"
    dump = run(capsys, "--db", url, "export")[1]  # history's lines, with their digests
    assert not UNSAFE.search(dump)
    assert re.sub(r', "digest": "[0-9a-f]{64}"', "", dump).startswith(lines)


@pytest.mark.slow  # subprocesses
def test_chat_replies_are_shown_with_visible_controls(
    store: Store, openai_server: FakeOpenAI
) -> None:
    openai_server.reply(f"hello{EVIL}\nbye")
    done = _cli(
        "--db",
        url_of(store.engine),
        "chat",
        "c",
        "--base-url",
        openai_server.base_url,
        stdin="hi\n",
        env={"OPENAI_API_KEY": "k"},
    )
    assert done.returncode == 0, done.stderr
    terminal_safe(done.stdout)
    assert done.stdout.splitlines()[1] == "bye"
    assert [m.content for m in store.history("c")][1] == f"hello{EVIL}\nbye"


# --- QA B1: import reads stdin ------------------------------------------------------


@pytest.mark.slow  # subprocesses
def test_export_piped_into_import(
    store: Store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.append("s", [Message("human", "hi"), Message("ai", "yo")], TokenCounter("o200k_base"))
    source, target = url_of(store.engine), f"sqlite:///{tmp_path}/target.sqlite3"
    Store(target, upgrade=True).close()
    cli = f"{shlex.quote(sys.executable)} -m tokenmem.cli"
    done = subprocess.run(
        f"{cli} --db {shlex.quote(source)} export | {cli} --db {shlex.quote(target)} import -",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2 message(s) imported into 1 session(s); 0 already there"
    # In process, with a byte order mark.
    data = "\ufeff" + run(capsys, "--db", source, "export")[1]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode("utf-8"))))
    code, out, err = run(capsys, "--db", target, "import", "-")
    assert code == 0 and out.strip().endswith("; 2 already there"), err


def test_import_takes_one_source(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, path = url_of(store.engine), tmp_path / "in.jsonl"
    path.write_text('{"session_id": "s", "role": "human", "content": "hi"}\n')
    source = f"sqlite:///{tmp_path}/lc.sqlite3"
    for argv, message in [
        ([], "import needs a FILE (- for stdin) or --from-langchain URL"),
        ([str(path), "--from-langchain", source], "import reads a FILE or --from-langchain"),
        ([str(path), "--table", "t"], "--table names LangChain's table"),
    ]:
        code, _, err = run(capsys, "--db", url, "import", *argv)
        assert code == 2 and message in err, err
    assert store.count(all_owners=True) == 0
    assert not (tmp_path / "lc.sqlite3").exists()


# --- QA B5, B6: export through a symlink; SQLite URI filenames ---------------------------


def test_export_writes_through_a_symlink(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.append("s", [Message("human", "hi")], TokenCounter("o200k_base"))
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.write_text("old\n")
    link.symlink_to(real)
    code, _, err = run(capsys, "--db", url_of(store.engine), "export", "-o", str(link))
    assert code == 0 and err.strip() == f"1 message(s) written to {link}"
    assert link.is_symlink() and '"content": "hi"' in real.read_text()
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "new.jsonl")
    assert run(capsys, "--db", url_of(store.engine), "export", "-o", str(dangling))[0] == 0
    assert dangling.is_symlink() and '"hi"' in (tmp_path / "new.jsonl").read_text()


def test_sqlite_uri_filenames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rt1.db"
    store = Store(f"sqlite:///{path}", upgrade=True)
    store.append("s", [Message("human", "hi")], TokenCounter("o200k_base"))
    store.close()
    code, out, err = run(capsys, "--db", f"sqlite:///file:{path}?mode=ro&uri=true", "sessions")
    assert code == 0 and " s " in out, err
    missing = tmp_path / "nope" / "rt2.db"
    code, _, err = run(capsys, "--db", f"sqlite:///file:{missing}?mode=ro&uri=true", "sessions")
    assert code == 2 and f"no SQLite database at {missing}:" in err
    assert not (tmp_path / "nope").exists()


# --- QA B8, B9 ---------------------------------------------------------------------


def test_recount_session_is_the_default_owners_unless_owner_says(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    url = url_of(store.engine)
    store.append("shared", [Message("human", "hi")], TokenCounter("cl100k_base"), owner="alice")
    code, _, err = run(capsys, "--db", url, "recount", "--model", "gpt-4o", "--session", "shared")
    assert code == 3 and "session 'shared' not found" in err
    code, out, _ = run(
        capsys,
        "--db",
        url,
        "recount",
        "--model",
        "gpt-4o",
        "--session",
        "shared",
        "--owner",
        "alice",
    )
    assert code == 0 and out.startswith("1 session(s) recounted")
    with pytest.raises(SystemExit):
        main(["recount", "--help"])
    assert "the default owner's unless --owner" in " ".join(capsys.readouterr().out.split())


def test_json_is_refused_where_there_is_none(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["--json", "chat", "c"], ["demo", "--json"]):
        code, out, err = run(capsys, "--db", url_of(store.engine), *argv)
        assert code == 2 and out == "" and "has no JSON output: drop --json" in err, err


# --- QA C --------------------------------------------------------------------------


def test_db_messages_and_arguments(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    url = url_of(store.engine)
    for action in ("current", "check"):
        code, _, err = run(capsys, "--db", url, "db", action, "extra")
        assert code == 2 and f"db {action} takes no revision, not 'extra'" in err
    assert run(capsys, "--db", url, "db", "downgrade", "base", "--yes")[0] == 0
    code, out, _ = run(capsys, "--db", url, "db", "downgrade", "base", "--yes")
    assert code == 0 and out.startswith("nothing to do: at (not migrated)\n"), out


@pytest.mark.slow  # subprocesses
def test_chat_without_a_key_says_so_once(store: Store) -> None:
    done = _cli("--db", url_of(store.engine), "chat", "c1", stdin="hello\n")
    assert done.stderr.startswith("tokenmem: chat needs an API key: set OPENAI_API_KEY")


def test_history_header_is_bold_on_a_terminal(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append("s", [Message("human", "hi")], TokenCounter("o200k_base"))
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    for argv in (["history", "s"], ["sessions"]):
        out = run(capsys, "--db", url_of(store.engine), *argv)[1]
        assert out.startswith("\x1b[1m") and out.splitlines()[0].endswith("\x1b[0m"), out


@pytest.mark.parametrize(
    ("answer", "erased"),
    [("yes", True), ("YES", True), (" yes\n", True), ("y", False), ("yes please", False)],
)
def test_only_yes_confirms(
    answer: str,
    erased: bool,
    store: Store,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.append("s", [Message("human", "hi")], TokenCounter("o200k_base"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: answer)
    code, out, _ = run(capsys, "--db", url_of(store.engine), "erase", "s")
    assert code == 0 and (out.startswith("erased") if erased else out == "nothing erased\n")


def test_end_of_input_at_a_prompt_is_no(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def eof(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", eof)
    code, out, _ = run(capsys, "--db", url_of(store.engine), "db", "downgrade", "base")
    assert code == 0 and out == "nothing downgraded\n"


@pytest.mark.parametrize("tty", [True, False])
def test_import_shows_progress_only_on_a_terminal(
    tty: bool,
    store: Store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = [
        json.dumps({"session_id": "p", "role": "human" if i % 2 == 0 else "ai", "content": f"m{i}"})
        for i in range(4500)
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    code, out, err = run(capsys, "--db", url_of(store.engine), "import", str(path))
    assert code == 0 and out.startswith("4500 message(s) imported into 1 session(s)"), out
    if tty:  # a count after each batch written, on one line, then a newline
        assert err == "\rimported 2000\rimported 4000\rimported 4500\n", repr(err)
    else:
        assert err == ""
    assert store.session("p").next_position == 4500
