"""The `tokenmem` command, on SQLite and PostgreSQL, in process and as a subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, Text, create_engine, insert

from tokenmem import (
    ChatOpenAI,
    ConversationChain,
    ConversationTokenBufferMemory,
    Message,
    ModelError,
    Store,
    TokenCounter,
)
from tokenmem.cli import main

from .openai_server import FakeOpenAI


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def filled(store: Store, openai_server: FakeOpenAI) -> Store:
    """A session 'talk' with 6 exchanges made through the chain (so turns exist)."""
    llm = ChatOpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
    memory = ConversationTokenBufferMemory(
        llm=llm, store=store, session_id="talk", max_token_limit=40
    )
    chain = ConversationChain(llm=llm, memory=memory)
    for i in range(6):
        chain.predict(input=f"question {i} about something")
    return store


def test_db_commands(db: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    url = url_of(db)
    db.connect().close()  # an empty database (SQLite: the file exists)
    code, out, _ = run(capsys, "--db", url, "db", "current")
    assert code == 0 and "(not migrated)" in out
    code, _, err = run(capsys, "--db", url, "db", "check")
    assert code == 4 and "not migrated" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "--db", url, "sessions")
    assert code == 4 and "tokenmem db upgrade" in err
    assert run(capsys, "--db", url, "db", "upgrade")[0] == 0
    code, out, _ = run(capsys, "--db", url, "--json", "db", "check")
    assert code == 0 and json.loads(out)["at_head"] is True
    assert run(capsys, "--db", url, "db", "downgrade")[0] == 2
    code, _, err = run(capsys, "--db", url, "db", "downgrade", "base")
    assert code == 2 and "without --yes" in err  # destructive: asks, like erase
    assert run(capsys, "--db", url, "db", "downgrade", "base", "--yes")[0] == 0
    assert json.loads(run(capsys, "--db", url, "--json", "db", "current")[1])["current"] is None


def test_sessions_history_window_turns(filled: Store, capsys: pytest.CaptureFixture[str]) -> None:
    url = url_of(filled.engine)
    code, out, _ = run(capsys, "--db", url, "sessions")
    assert code == 0 and "talk" in out and "12" in out
    stats = json.loads(run(capsys, "--db", url, "--json", "sessions")[1])
    assert stats[0]["messages"] == 12 and stats[0]["text_tokens"] > 0

    code, out, _ = run(capsys, "--db", url, "history", "talk")
    assert code == 0 and out.count("question") == 12  # inputs and their echoes
    lines = run(capsys, "--db", url, "history", "talk", "--format", "jsonl")[1].splitlines()
    assert [json.loads(line)["position"] for line in lines] == list(range(12))
    csv_out = run(capsys, "--db", url, "history", "talk", "--format", "csv")[1]
    assert csv_out.splitlines()[0].startswith("position,turn,role,content")
    future = run(
        capsys, "--db", url, "history", "talk", "--since", "2999-01-01", "--format", "jsonl"
    )
    assert future[1] == ""

    code, out, _ = run(capsys, "--db", url, "window", "talk", "--limit", "40")
    assert code == 0 and "outside the window (positions 0.." in out and "/40 tokens" in out
    window = json.loads(run(capsys, "--db", url, "--json", "window", "talk", "--limit", "40")[1])
    assert 0 < window["used"] <= 40 and window["fell_out"] == 12 - len(window["messages"])
    rendered = "\n".join(
        {"human": "Human", "ai": "AI"}[m["role"]] + ": " + m["content"] for m in window["messages"]
    )
    assert window["used"] == TokenCounter("o200k_base").count(rendered)
    assert [m["running"] for m in window["messages"]] == sorted(
        m["running"] for m in window["messages"]
    )
    chat = json.loads(
        run(capsys, "--db", url, "--json", "window", "talk", "--limit", "40", "--messages")[1]
    )
    assert chat["mode"] == "messages" and chat["used"] <= 40

    code, out, _ = run(capsys, "--db", url, "turns", "talk")
    assert code == 0 and out.count(" ok ") == 6
    code, out, _ = run(capsys, "--db", url, "turns", "talk", "5")
    assert code == 0 and "[system]" in out and "[user] question 5 about something" in out
    shown = json.loads(run(capsys, "--db", url, "--json", "turns", "talk", "5")[1])
    assert shown["prompt"] == filled.rebuild_prompt("talk", 5)


def test_errors_are_one_line_with_exit_codes(
    filled: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = url_of(filled.engine)
    for argv, code in [
        (["history", "nope"], 3),
        (["window", "nope", "--limit", "5"], 3),
        (["turns", "talk", "99"], 3),
        (["import", str(tmp_path / "missing.jsonl")], 2),
        (["erase", "talk"], 2),  # stdin is not a terminal and no --yes
    ]:
        got, _, err = run(capsys, "--db", url, *argv)
        assert got == code, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session_id": "x", "role": "human", "content": "ok"}\nnot json\n')
    code, _, err = run(capsys, "--db", url, "import", str(bad))
    assert code == 1 and "line 2: not JSON" in err
    assert run(capsys, "--db", "nonsense://x", "sessions")[0] == 2
    code, _, err = run(capsys, "--db", "postgresql+psycopg://postgres@127.0.0.1:1/x", "sessions")
    assert code == 1 and "Connection refused" in err and len(err.strip().splitlines()) == 1


def test_export_import_roundtrip_and_idempotence(
    filled: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = url_of(filled.engine)
    dump = tmp_path / "dump.jsonl"
    assert run(capsys, "--db", url, "export", "-o", str(dump))[0] == 0
    target = f"sqlite:///{tmp_path}/copy.sqlite3"
    assert run(capsys, "--db", target, "db", "upgrade")[0] == 0
    code, out, _ = run(capsys, "--db", target, "import", str(dump))
    assert code == 0 and "12 message(s) imported" in out
    code, out, _ = run(capsys, "--db", target, "import", str(dump))
    assert code == 0 and "0 message(s) imported" in out and "12 already there" in out
    again = tmp_path / "again.jsonl"
    run(capsys, "--db", target, "export", "-o", str(again))
    assert again.read_text() == dump.read_text()


def langchain_db(path: Path) -> str:
    """LangChain's SQLChatMessageHistory table, with its schema and JSON format
    (message_to_dict: {"type": ..., "data": {...}}), as langchain-community writes it."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    table = Table(
        "message_store",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("session_id", Text),
        Column("message", Text),
    )
    table.create(engine)

    def message(kind: str, content: str) -> str:
        data = {
            "content": content,
            "additional_kwargs": {},
            "response_metadata": {},
            "type": kind,
            "name": None,
            "id": None,
        }
        return json.dumps({"type": kind, "data": data})

    rows = [
        ("lc-1", message("human", "hi from langchain")),
        ("lc-2", message("human", "另一个会话")),
        ("lc-1", message("ai", "hello back")),
        ("lc-1", message("human", "second question")),
        ("lc-1", message("ai", "second answer")),
        ("lc-2", message("ai", "好的")),
    ]
    with engine.begin() as conn:
        conn.execute(insert(table), [{"session_id": s, "message": m} for s, m in rows])
    engine.dispose()
    return url


def test_import_from_langchain(
    filled: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, source = url_of(filled.engine), langchain_db(tmp_path / "lc.sqlite3")
    code, out, _ = run(capsys, "--db", url, "import", "--from-langchain", source, "--owner", "lc")
    assert code == 0 and "6 message(s) imported into 2 session(s)" in out
    history = list(filled.history("lc-1", owner="lc"))
    assert [(m.type, m.content, m.turn) for m in history] == [
        ("human", "hi from langchain", 0),
        ("ai", "hello back", 0),
        ("human", "second question", 1),
        ("ai", "second answer", 1),
    ]
    assert [m.content for m in filled.history("lc-2", owner="lc")] == ["另一个会话", "好的"]
    code, out, _ = run(capsys, "--db", url, "import", "--from-langchain", source, "--owner", "lc")
    assert "0 message(s) imported" in out
    assert filled.count(all_owners=True) == 12 + 6


def test_recount_is_resumable(
    store: Store, capsys: pytest.CaptureFixture[str], cl100k: object
) -> None:
    url = url_of(store.engine)
    for name in ("a", "b"):
        store.append(name, [Message("human", "你好 world"), Message("ai", "hello")], cl100k)  # type: ignore[arg-type]
    code, out, _ = run(capsys, "--db", url, "recount", "--model", "gpt-4o", "--session", "a")
    assert code == 0 and "1 session(s) recounted with o200k_base" in out
    assert {m.encoding for m in store.history("a")} == {"o200k_base"}
    assert {m.encoding for m in store.history("b")} == {"cl100k_base"}
    assert "1 session(s)" in run(capsys, "--db", url, "recount", "--encoding", "o200k_base")[1]
    assert "0 session(s)" in run(capsys, "--db", url, "recount", "--encoding", "o200k_base")[1]


def test_erase(store: Store, capsys: pytest.CaptureFixture[str], o200k: object) -> None:
    url = url_of(store.engine)
    for owner, name in (("alice", "x"), ("alice", "y"), ("bob", "x")):
        store.append(name, [Message("human", "hi")], o200k, owner=owner)  # type: ignore[arg-type]
    code, out, _ = run(capsys, "--db", url, "erase", "x", "--owner", "bob", "--yes")
    assert code == 0 and "1 message(s)" in out
    code, out, _ = run(capsys, "--db", url, "--json", "erase", "--owner", "alice", "--yes")
    assert json.loads(out)["sessions"] == 2
    assert store.count(all_owners=True) == 0


@pytest.mark.parametrize(
    "command",
    [
        "db",
        "sessions",
        "history",
        "window",
        "turns",
        "chat",
        "import",
        "export",
        "recount",
        "erase",
        "demo",
    ],
)
def test_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "example:" in capsys.readouterr().out


@pytest.mark.slow
def test_chat_subprocess(openai_server: FakeOpenAI, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/chat.sqlite3"
    env = {**os.environ, "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": openai_server.base_url}
    openai_server.reply("first reply", "second reply")

    def cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokenmem.cli", "--db", url, *argv],
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    chat = ("chat", "cli-chat", "--limit", "100")
    done = cli(*chat, stdin="hello\n\nhow are you\n")
    assert done.returncode == 4, done.stderr  # not migrated yet: says so
    assert cli("db", "upgrade").returncode == 0
    done = cli(*chat, stdin="hello\n\nhow are you\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["first reply", "second reply"]
    assert [m.content for m in Store(url).history("cli-chat")] == [
        "hello",
        "first reply",
        "how are you",
        "second reply",
    ]
    assert openai_server.requests[-1].body["messages"][-2] == {  # type: ignore[index]
        "role": "assistant",
        "content": "first reply",
    }


def test_incremental_import_after_the_source_pruned(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path, o200k: object
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from tokenmem.models import MESSAGES, utcnow

    url, target = url_of(store.engine), f"sqlite:///{tmp_path}/backup.sqlite3"
    run(capsys, "--db", target, "db", "upgrade")
    for i in range(2):
        store.append("s", [Message("human", f"q{i}"), Message("ai", f"a{i}")], o200k)  # type: ignore[arg-type]
    run(capsys, "--db", url, "export", "-o", str(tmp_path / "1.jsonl"))
    run(capsys, "--db", target, "import", str(tmp_path / "1.jsonl"))
    with store.engine.begin() as conn:  # retention removes the first exchange at the source
        conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.position < 2)
            .values(created_at=utcnow() - timedelta(days=9))
        )
    store.prune(timedelta(days=1), owner="")
    store.append("s", [Message("human", "q2"), Message("ai", "a2")], o200k)  # type: ignore[arg-type]
    run(capsys, "--db", url, "export", "-o", str(tmp_path / "2.jsonl"))
    code, out, _ = run(capsys, "--db", target, "import", str(tmp_path / "2.jsonl"))
    assert code == 0 and "2 message(s) imported" in out and "2 already there" in out
    backup = Store(target)
    assert [(m.position, m.content) for m in backup.history("s")] == [
        (0, "q0"),
        (1, "a0"),
        (2, "q1"),
        (3, "a1"),
        (4, "q2"),
        (5, "a2"),
    ]
    backup.close()
    # Into an empty database the pruned export keeps its positions (a gap, as at the source).
    fresh = f"sqlite:///{tmp_path}/fresh.sqlite3"
    run(capsys, "--db", fresh, "db", "upgrade")
    run(capsys, "--db", fresh, "import", str(tmp_path / "2.jsonl"))
    copy = Store(fresh)
    assert [m.position for m in copy.history("s")] == [2, 3, 4, 5]
    copy.close()


def test_bad_migration_revision_is_a_usage_error(
    db: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--db", url_of(db), "db", "upgrade", "nonsense")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_window_shows_the_pinned_prompt_and_tool_traffic(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    memory = ConversationTokenBufferMemory(
        store=store, session_id="tools", max_token_limit=60, system_message="Be brief."
    )
    for city in ("Paris", "Rome", "Oslo"):
        call = {"id": f"call_{city}", "type": "function"}
        call["function"] = {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}
        memory.save_messages(
            [
                {"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call_{city}", "content": "20C"},
                {"role": "assistant", "content": f"20C in {city}."},
            ]
        )
    memory.load_messages()  # saves the prompt, pinned at position 12
    url = url_of(store.engine)
    code, out, _ = run(capsys, "--db", url, "window", "tools", "--limit", "60", "--messages")
    assert code == 0 and "system (pinned)" in out and 'get_weather({"city": "Oslo"})' in out
    shown = json.loads(
        run(capsys, "--db", url, "--json", "window", "tools", "--limit", "60", "--messages")[1]
    )
    rows = shown["messages"]
    assert rows[0]["pinned"] and rows[0]["position"] == 12
    assert shown["fell_out"] == rows[1]["position"]  # all before it: the prompt is after them
    assert f"{shown['fell_out']} older message(s) are outside the window" in out


# --- issue 13: OpenAI chat messages and the API's prompt tokens ------------------------

TOOL_TALK: list[dict[str, Any]] = [
    {"role": "developer", "content": "Use metric units."},
    {"role": "user", "content": "Weather in Paris?", "name": "alice"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_p",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_x",
                "type": "function",
                "function": {"name": "log", "arguments": '{"text": "\x1b[2Jgone"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_x", "content": "ok"},
    {"role": "tool", "tool_call_id": "call_p", "content": "18C\nsunny"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "And this?"},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
        ],
    },
]


def test_history_shows_tool_calls_their_answers_roles_and_parts(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    url = url_of(store.engine)
    ConversationTokenBufferMemory(store=store, session_id="tools").save_messages(TOOL_TALK)
    code, out, _ = run(capsys, "--db", url, "history", "tools")
    assert code == 0
    lines = out.splitlines()
    content = lines[0].index("content")  # where the content column starts
    assert lines[0].split() == ["pos", "turn", "role", "name", "text_tokens", "created", "content"]
    rows = [(line[:content].split(), line[content:]) for line in lines[1:]]
    assert [(r[:4], text) for r, text in rows] == [
        (["0", "0", "developer", "-"], "Use metric units."),
        (["1", "0", "human", "alice"], "Weather in Paris?"),
        (["2", "0", "ai", "-"], "Let me look."),
        ([], '→ call_p get_weather({"city": "Paris"})'),  # a call a line, under its message
        ([], '→ call_x log({"text": "\\x1b[2Jgone"})'),  # escapes shown, never sent
        (["3", "0", "tool", "-"], "← call_x ok"),
        (["4", "0", "tool", "-"], "← call_p 18C⏎ sunny"),
        (["5", "0", "human", "-"], "And this?⏎ [image_url]"),
    ]
    assert "\x1b" not in out

    # --json (as --format jsonl): the export's lines, each message's dict in full
    code, out, _ = run(capsys, "--db", url, "--json", "history", "tools")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["role"] for r in records] == ["developer", "human", "ai", "tool", "tool", "human"]
    assert [r.get("openai") for r in records] == [None, None, *TOOL_TALK[2:]]
    assert json.dumps([r["openai"] for r in records[2:]]) == json.dumps(TOOL_TALK[2:])
    assert (records[1]["name"], records[3]["openai"]["tool_call_id"]) == ("alice", "call_x")

    # --format csv: the dict as JSON in its own column
    code, out, _ = run(capsys, "--db", url, "history", "tools", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [row["role"] for row in table] == [r["role"] for r in records]
    assert [json.loads(row["openai"]) if row["openai"] else None for row in table] == [
        None,
        None,
        *TOOL_TALK[2:],
    ]


def test_turns_show_local_and_api_prompt_tokens_and_their_ratio(
    store: Store, openai_server: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    url = url_of(store.engine)
    for model, n in (("gpt-4o-mini", 3), ("gpt-4o", 2)):
        llm = ChatOpenAI(model=model, base_url=openai_server.base_url, api_key="k", max_retries=0)
        memory = ConversationTokenBufferMemory(llm=llm, store=store, session_id="talk")
        for i in range(n):
            ConversationChain(llm=llm, memory=memory).predict(input=f"question {i} on {model}")
    openai_server.fail(500)  # a failed call: no usage reported
    with pytest.raises(ModelError):
        ConversationChain(llm=llm, memory=memory).predict(input="lost")
    turns = store.turns("talk")
    ratios = [t.api_prompt_tokens / t.prompt_tokens for t in turns[:5]]  # type: ignore[operator]
    assert len(set(ratios)) > 1  # the fake server counts words: not tiktoken's count

    code, out, _ = run(capsys, "--db", url, "turns", "talk")
    assert code == 0
    calls, summary = out.split("\n\n")
    header, *rows = calls.splitlines()
    assert "prompt  api prompt  api/prompt  ms" in header
    for t, row in zip(turns, rows, strict=True):
        shown = row.split()
        ratio = (
            "-" if t.api_prompt_tokens is None else f"{t.api_prompt_tokens / t.prompt_tokens:.3f}"
        )
        at = shown.index(str(t.prompt_tokens), 4)  # after seq, date, time, model
        assert shown[at : at + 3] == [str(t.prompt_tokens), str(t.api_prompt_tokens or "-"), ratio]
    head, *lines = summary.splitlines()
    assert head.split() == "model calls with usage median api/prompt min max".split()
    by_model = {}
    for model in ("gpt-4o", "gpt-4o-mini"):  # by name
        by_model[model] = got = [r for t, r in zip(turns, ratios, strict=False) if t.model == model]
        stats = (f"{f(got):.3f}" for f in (median, min, max))
        assert lines.pop(0).split() == [model, "3", str(len(got)), *stats]

    shown = json.loads(run(capsys, "--db", url, "--json", "turns", "talk")[1])
    assert [t["prompt_ratio"] for t in shown["turns"]] == [*(round(r, 4) for r in ratios), None]
    assert [t["api_prompt_tokens"] for t in shown["turns"]] == [t.api_prompt_tokens for t in turns]
    assert shown["models"][1] == {
        "model": "gpt-4o-mini",
        "calls": 3,
        "reported": 3,
        "median_ratio": median(by_model["gpt-4o-mini"]),
        "min_ratio": min(by_model["gpt-4o-mini"]),
        "max_ratio": max(by_model["gpt-4o-mini"]),
    }
    one = json.loads(run(capsys, "--db", url, "--json", "turns", "talk", "1")[1])
    assert one["turn"]["prompt_ratio"] == round(ratios[1], 4)
    code, out, _ = run(capsys, "--db", url, "turns", "talk", "1")
    assert f"prompt_ratio: {round(ratios[1], 4)}" in out
