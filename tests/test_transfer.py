"""JSONL export and import, LangChain import and recount (tokenmem/transfer.py
and its reader, tokenmem/jsonl.py), in the library and through the `tokenmem`
command, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from tokenmem import (
    ConversationTokenBufferMemory,
    InvalidInputError,
    Message,
    Store,
    StoreError,
    TokenCounter,
    transfer,
)
from tokenmem.cli import main
from tokenmem.models import MESSAGES, SESSIONS, utcnow
from tokenmem.transfer import (
    ImportResult,
    export_jsonl,
    import_jsonl,
    import_langchain,
    recount,
)

from .conftest import fresh_engine
from .test_cli import langchain_db


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rec(session: str, content: str, role: str = "human", **fields: Any) -> dict[str, Any]:
    return {"session_id": session, "role": role, "content": content, **fields}


def jsonl(*records: dict[str, Any]) -> list[str]:
    return [json.dumps(r, ensure_ascii=False) + "\n" for r in records]


def contents(store: Store, session: str, owner: str | None = None) -> list[str]:
    return [m.content for m in store.history(session, owner=owner)]


# --- issue 10.1: nothing is skipped that the database does not hold ---------------


def test_a_sessions_lines_need_not_be_consecutive(store: Store, o200k: TokenCounter) -> None:
    lines = jsonl(
        rec("A", "a0"),
        rec("A", "a1", "ai"),
        rec("B", "b0"),
        rec("B", "b1", "ai"),
        rec("A", "a2"),
        rec("A", "a3", "ai"),
    )
    assert import_jsonl(store, lines, o200k) == ImportResult(sessions=2, imported=6, skipped=0)
    assert contents(store, "A") == ["a0", "a1", "a2", "a3"]
    assert [(m.position, m.turn) for m in store.history("A")] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert contents(store, "B") == ["b0", "b1"]
    assert import_jsonl(store, lines, o200k) == ImportResult(sessions=2, imported=0, skipped=6)


def test_sessions_counts_distinct_sessions(store: Store, o200k: TokenCounter) -> None:
    # Round robin over four sessions: twelve blocks of one line, four sessions.
    lines = jsonl(*(rec(f"s{i % 4}", f"m{i}") for i in range(12)))
    assert import_jsonl(store, lines, o200k) == ImportResult(sessions=4, imported=12, skipped=0)
    assert contents(store, "s1") == ["m1", "m5", "m9"]


def test_an_import_never_skips_what_the_database_does_not_hold(
    store: Store, o200k: TokenCounter
) -> None:
    # Another conversation under the same name: not "already there".
    store.append("A", [Message("human", "something else")], o200k)
    with pytest.raises(
        InvalidInputError, match=r"^line 1: .*'A'.* different message at position 0"
    ):
        import_jsonl(store, jsonl(rec("A", "a0"), rec("A", "a1", "ai")), o200k)
    assert contents(store, "A") == ["something else"]
    # Positions the session is past but does not hold (pruned or never here).
    store.align("P", 2, 1)
    records = [rec("P", f"p{i}", position=i, turn=i // 2) for i in range(3)]
    with pytest.raises(InvalidInputError, match=r"^line 1: .*'P'.* no message at position 0"):
        import_jsonl(store, jsonl(*records), o200k)
    assert list(store.history("P")) == []


def test_an_import_checks_the_whole_input_before_writing(store: Store, o200k: TokenCounter) -> None:
    lines = jsonl(rec("A", "fine"), rec("A", "fine too", "ai"), rec("B", "x", "robot"))
    with pytest.raises(InvalidInputError, match=r"^line 3: role must be one of"):
        import_jsonl(store, lines, o200k)
    assert store.count(all_owners=True) == 0
    unordered = jsonl(rec("A", "x", position=3), rec("B", "y"), rec("A", "z", position=3))
    with pytest.raises(InvalidInputError, match=r"^line 3: position 3 .*not after .*line 1"):
        import_jsonl(store, unordered, o200k)
    assert store.count(all_owners=True) == 0


def test_an_import_from_a_stream_is_checked_first_too(store: Store, o200k: TokenCounter) -> None:
    lines = iter(jsonl(rec("A", "fine"), rec("A", 7)))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"^line 2: content must be a str"):
        import_jsonl(store, lines, o200k)
    assert store.count(all_owners=True) == 0
    assert import_jsonl(store, iter(jsonl(rec("A", "a"))), o200k).imported == 1


# --- issue 10.2: export | import | export is identical -----------------------------


def _varied_source(store: Store, o200k: TokenCounter, cl100k: TokenCounter) -> None:
    """Sessions of two encodings and three owners; cleared windows (in the middle,
    at the end); a start pruned away; metadata; an empty session."""

    def exchange(n: int, counter: TokenCounter, session: str, owner: str = "") -> None:
        for i in range(n):
            store.append(
                session,
                [Message("human", f"{session} q{i} 你好\nsecond line"), Message("ai", f"a{i}")],
                counter,
                owner=owner,
            )

    exchange(3, cl100k, "chat")
    store.append(
        "chat",
        [
            Message("human", "with a name", name="ann", metadata={"z": 1, "a": [2, {"y": 3}]}),
            Message("ai", "and metadata", metadata={"source": "test"}),
        ],
        cl100k,
    )
    store.clear("chat")  # the window starts at position 8 ...
    exchange(2, cl100k, "chat")  # ... and goes on
    exchange(2, o200k, "chat", owner="alice")  # the same name, another owner
    exchange(2, o200k, "done", owner="alice")
    store.clear("done", owner="alice")  # nothing in the window
    exchange(3, cl100k, "pruned", owner="bob")
    with store.engine.begin() as conn:
        conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.position < 2)
            .values(created_at=utcnow() - timedelta(days=9))
        )
        conn.execute(update(SESSIONS).values(metadata={"tier": "gold", "b": 1}))
    store.prune(timedelta(days=1), all_owners=True)  # positions 0, 1 of every session
    store.align("empty", 0, 0, owner="bob")


@pytest.fixture
def other_db(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """A fresh database on the other backend."""
    other = "postgresql" if backend == "sqlite" else "sqlite"
    (tmp_path / "other").mkdir()
    with fresh_engine(other, tmp_path / "other") as engine:
        yield engine


def test_export_import_export_is_identical_across_databases(
    store: Store,
    other_db: Engine,
    o200k: TokenCounter,
    cl100k: TokenCounter,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    _varied_source(store, o200k, cl100k)
    source, target = url_of(store.engine), url_of(other_db)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert run(capsys, "--db", source, "export", "-o", str(first))[0] == 0
    assert run(capsys, "--db", target, "db", "upgrade")[0] == 0
    code, out, err = run(capsys, "--db", target, "import", str(first))
    assert code == 0, err
    assert out.strip() == "18 message(s) imported into 5 session(s); 0 already there"
    assert run(capsys, "--db", target, "export", "-o", str(second))[0] == 0
    assert second.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")

    copy = Store(other_db)
    assert {m.encoding for m in copy.history("chat")} == {"cl100k_base"}
    assert {m.encoding for m in copy.history("chat", owner="alice")} == {"o200k_base"}
    for session, owner, encoding in [
        ("chat", "", "cl100k_base"),
        ("chat", "alice", "o200k_base"),
        ("done", "alice", "o200k_base"),
        ("pruned", "bob", "cl100k_base"),
    ]:
        was, now = (
            ConversationTokenBufferMemory(
                store=s, session_id=session, owner=owner, encoding=encoding, max_token_limit=1000
            ).buffer
            for s in (store, copy)
        )
        assert now == was
        assert bool(now) == (session != "done")  # cleared at its end
    assert contents(copy, "chat")[6:] == [
        "chat q0 你好\nsecond line",
        "a0",
        "chat q1 你好\nsecond line",
        "a1",
    ]

    # Again: nothing added, nothing moved, the same file.
    code, out, _ = run(capsys, "--db", target, "import", str(first))
    assert out.strip() == "0 message(s) imported into 5 session(s); 18 already there"
    assert run(capsys, "--db", target, "export", "-o", str(second))[0] == 0
    assert second.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")


def test_concatenated_exports_import_as_the_last_one(
    store: Store, other_db: Engine, o200k: TokenCounter, cl100k: TokenCounter
) -> None:
    def export() -> str:
        out = io.StringIO()
        export_jsonl(store, out)
        return out.getvalue()

    store.append_turns(
        "s", [[Message("human", f"q{i}"), Message("ai", f"a{i}")] for i in range(2)], cl100k
    )
    monday = export()
    store.append("s", [Message("human", "q2"), Message("ai", "a2")], cl100k)
    store.recount("s", o200k)
    store.clear("s")
    tuesday = export()
    copy = Store(other_db, upgrade=True)
    assert import_jsonl(copy, io.StringIO(monday + tuesday)) == ImportResult(1, 6, 4)
    out = io.StringIO()
    export_jsonl(copy, out)
    assert out.getvalue() == tuesday
    # Without a session line between them, going back is out of order.
    messages = [line for line in (monday + tuesday).splitlines(True) if '"kind"' not in line]
    with pytest.raises(InvalidInputError, match=r"^line 5: position 0 .*not after position 3"):
        import_jsonl(copy, messages)


def test_export_to_stdout_and_history_jsonl_import_back(
    store: Store, other_db: Engine, cl100k: TokenCounter, capsys: pytest.CaptureFixture[str]
) -> None:
    store.append("s", [Message("human", "hi"), Message("ai", "there")], cl100k)
    code, dump, _ = run(capsys, "--db", url_of(store.engine), "export")
    assert code == 0
    copy = Store(other_db, upgrade=True)
    assert import_jsonl(copy, io.StringIO(dump)) == ImportResult(1, 2, 0)
    assert [(m.content, m.encoding) for m in copy.history("s")] == [
        ("hi", "cl100k_base"),
        ("there", "cl100k_base"),
    ]
    # `history --format jsonl` writes the message lines only: they import too.
    history = run(capsys, "--db", url_of(store.engine), "history", "s", "--format", "jsonl")[1]
    assert import_jsonl(copy, io.StringIO(history)) == ImportResult(1, 0, 2)


def test_an_explicit_encoding_recounts_and_records_name_one_each(
    store: Store, o200k: TokenCounter, cl100k: TokenCounter, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = jsonl(
        rec("a", "hello world", encoding="cl100k_base"),
        rec("b", "hello world", encoding="o200k_base"),
        rec("c", "no encoding named"),
    )
    import_jsonl(store, lines)
    assert [store.session(s).encoding for s in "abc"] == ["cl100k_base", "o200k_base", "o200k_base"]
    assert import_jsonl(store, jsonl(rec("d", "x", encoding="cl100k_base")), o200k).imported == 1
    assert store.session("d").encoding == "o200k_base"
    # A session exported part-way through a model switch (its oldest records
    # recounted for the new model): counted with its newest record's encoding.
    mixed = jsonl(rec("e", "x", encoding="o200k_base"), rec("e", "y", encoding="cl100k_base"))
    assert import_jsonl(store, mixed).imported == 2
    assert {m.encoding for m in store.history("e")} == {"cl100k_base"}
    assert import_jsonl(store, mixed, o200k).imported == 0  # all there; recounted
    assert {m.encoding for m in store.history("e")} == {"o200k_base"}
    # Into a session counted with another encoding: its records are counted
    # with the session's, then the session is recounted in batches.
    assert import_jsonl(store, jsonl(rec("a", "more", position=1)), o200k).imported == 1
    assert store.session("a").encoding == "o200k_base"
    history = list(store.history("a"))
    assert [m.encoding for m in history] == ["o200k_base"] * 2
    assert [m.text_tokens for m in history] == [o200k.count(" " + m.content) for m in history]


# --- issue 10.3: import --owner --------------------------------------------------


def test_import_owner_option(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, path = url_of(store.engine), tmp_path / "in.jsonl"
    path.write_text("".join(jsonl(rec("s", "hi"), rec("s", "yo", "ai", owner="alice"))))
    code, out, err = run(capsys, "--db", url, "import", str(path), "--owner", "alice")
    assert code == 0 and out.strip().startswith("2 message(s) imported into 1 session(s)"), err
    assert contents(store, "s", owner="alice") == ["hi", "yo"]
    assert store.count() == 0  # the default owner got nothing
    path.write_text("".join(jsonl(rec("t", "x"), rec("u", "y", owner="bob"))))
    code, _, err = run(capsys, "--db", url, "import", str(path), "--owner", "alice")
    assert code == 1 and "line 2: " in err and "'bob'" in err and "'alice'" in err
    assert len(err.strip().splitlines()) == 1
    assert store.count(owner="alice") == 2  # nothing of that file imported


# --- issue 10.6: a failed export leaves no file ----------------------------------------


def test_a_failed_export_leaves_no_file(
    store: Store,
    o200k: TokenCounter,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, folder = url_of(store.engine), tmp_path / "out"
    folder.mkdir()
    dump = folder / "dump.jsonl"
    store.append("A", [Message("human", "hi")], o200k)
    code, _, err = run(capsys, "--db", url, "export", "A", "missing", "-o", str(dump))
    assert code == 3 and "'missing'" in err
    assert list(folder.iterdir()) == []
    code, out, _ = run(capsys, "--db", url, "export", "A", "missing")
    assert code == 3 and out == ""
    dump.write_text("precious\n")
    code, _, _ = run(capsys, "--db", url, "export", "A", "missing", "-o", str(dump))
    assert code == 3 and dump.read_text() == "precious\n"
    assert list(folder.iterdir()) == [dump]

    def failing(*args: object, **kwargs: object) -> list[object]:
        raise StoreError("database error: the connection went away")

    monkeypatch.setattr(transfer, "_PAGE", 1)  # the second page fails, after the first's lines
    monkeypatch.setattr(Store, "history_page", failing)
    code, _, err = run(capsys, "--db", url, "export", "-o", str(dump))
    assert code == 1 and "went away" in err
    assert dump.read_text() == "precious\n" and list(folder.iterdir()) == [dump]
    monkeypatch.undo()
    assert run(capsys, "--db", url, "export", "A", "-o", str(dump))[0] == 0
    assert json.loads(dump.read_text().splitlines()[0])["content"] == "hi"


# --- issue 10.9: a scoped store does everything within its scope ------------------------


def test_a_scoped_store_exports_imports_and_recounts_its_own(
    store: Store, o200k: TokenCounter, cl100k: TokenCounter, tmp_path: Path
) -> None:
    bob = store.owner("bob")
    bob.append("bob-own", [Message("human", "mine"), Message("ai", "yours")], cl100k)
    store.append("bob-own", [Message("human", "the default owner's")], cl100k)
    dump = io.StringIO()
    assert export_jsonl(bob, dump, sessions=["bob-own"]) == 2
    records = [json.loads(line) for line in dump.getvalue().splitlines()]
    assert {r["owner"] for r in records} == {"bob"}
    assert "the default owner's" not in dump.getvalue()

    carol = store.owner("carol")
    mine = [{k: v for k, v in r.items() if k != "owner"} for r in records]
    assert import_jsonl(carol, jsonl(*mine)) == ImportResult(1, 2, 0)
    assert contents(store, "bob-own", owner="carol") == ["mine", "yours"]
    with pytest.raises(InvalidInputError, match=r"^line 1: .*'bob'.*'carol'"):
        import_jsonl(carol, io.StringIO(dump.getvalue()))
    assert import_jsonl(bob, io.StringIO(dump.getvalue())) == ImportResult(1, 0, 2)

    assert recount(bob, o200k) == 1
    assert {m.encoding for m in bob.history("bob-own")} == {"o200k_base"}
    assert {m.encoding for m in store.history("bob-own")} == {"cl100k_base"}

    lc = store.owner("lc")
    result = import_langchain(lc, langchain_db(tmp_path / "lc.sqlite3"))
    assert result == ImportResult(sessions=2, imported=6, skipped=0)
    assert contents(lc, "lc-2") == ["另一个会话", "好的"]


# --- issue 10.16: a bad line's error is whole ----------------------------------------


def test_a_bad_lines_error_is_whole_and_names_the_line(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, bad = url_of(store.engine), tmp_path / "bad.jsonl"
    good = json.dumps(rec("x", "ok")) + "\n"
    bad.write_text(good + '{"session_id": "x", "role": "human", "content": "no end"\n')
    code, _, err = run(capsys, "--db", url, "import", str(bad))
    assert code == 1
    assert err.strip() == "tokenmem: line 2: not JSON: Expecting ',' delimiter at column 57"
    bad.write_text(good + "\n" + json.dumps({"session_id": "x", "role": "human"}) + "\n")
    code, _, err = run(capsys, "--db", url, "import", str(bad))
    assert code == 1
    assert err.strip() == (
        "tokenmem: line 3: missing content (a message needs session_id, role and content)"
    )
    bad.write_text(good + "[1, 2]\n")
    assert run(capsys, "--db", url, "import", str(bad))[2].strip() == (
        "tokenmem: line 2: a JSON object expected, not a list"
    )
    assert store.count(all_owners=True) == 0


# --- QA A0: imports at once write each record once ------------------------------


def _import_twice_at_once(store: Store, lines: list[str]) -> list[ImportResult]:
    """Two imports of ``lines``, each with its own store (as two processes
    would), started together."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(2)

    def one(_: int) -> ImportResult:
        own = Store(store.engine.url)
        try:
            start.wait(timeout=60)
            return import_jsonl(own, lines)
        finally:
            own.close()

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, range(2)))


@pytest.mark.parametrize("interleaved", [False, True], ids=["grouped", "interleaved"])
def test_imports_at_once_write_every_record_once(store: Store, interleaved: bool) -> None:
    sessions, per = 5, 1200  # over two batches each
    records = [(s, i) for s in range(sessions) for i in range(per)]
    if interleaved:
        records.sort(key=lambda r: (r[1], r[0]))
    lines = jsonl(*(rec(f"s{s}", f"msg {i}", "human" if i % 2 == 0 else "ai") for s, i in records))
    results = _import_twice_at_once(store, lines)
    assert sum(r.imported for r in results) == sessions * per
    assert sum(r.skipped for r in results) == sessions * per
    for s in range(sessions):
        history = list(store.history(f"s{s}"))
        assert [(m.position, m.content) for m in history] == [(i, f"msg {i}") for i in range(per)]
        assert [m.turn for m in history] == [i // 2 for i in range(per)]
        assert store.session(f"s{s}").next_position == per
    # And again, one after the other: nothing added.
    assert import_jsonl(store, lines) == ImportResult(sessions, 0, sessions * per)


@pytest.mark.slow
def test_imports_at_once_through_the_command(backend: str, store: Store, tmp_path: Path) -> None:
    """QA A0 as reported: two `tokenmem import` processes of one file."""
    import subprocess
    import sys

    path = tmp_path / "grouped.jsonl"
    path.write_text(
        "".join(jsonl(*(rec(f"s{s}", f"msg {i}") for s in range(3) for i in range(700)))),
        encoding="utf-8",
    )
    argv = [sys.executable, "-m", "tokenmem.cli", "--db", url_of(store.engine), "import"]
    both = [
        subprocess.Popen([*argv, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for process in both:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    for s in range(3):
        assert [(m.position, m.content) for m in store.history(f"s{s}")] == [
            (i, f"msg {i}") for i in range(700)
        ]


def test_an_import_racing_the_application_stops_at_its_message(
    store: Store, o200k: TokenCounter
) -> None:
    """The documented semantics: an import writes each record at its own
    position or not at all; a position the application took meanwhile stops
    it with an error naming the line, and nothing is written twice."""
    lines = jsonl(*(rec("s", f"m{i}", "human" if i % 2 == 0 else "ai") for i in range(2400)))
    written: list[int] = []

    def progress(n: int) -> None:
        written.append(n)
        if len(written) == 1:  # after the first batch, the application appends
            store.append("s", [Message("human", "from the app")], o200k)

    with pytest.raises(
        InvalidInputError,
        match=r"^line 2001: session 's' already holds a different message at position 2000",
    ):
        import_jsonl(store, lines, o200k, progress=progress)
    assert written == [2000]  # a batch: 2,000 records
    assert contents(store, "s") == [f"m{i}" for i in range(2000)] + ["from the app"]


# --- QA B4: turns as the records group them ---------------------------------------


def test_turns_follow_each_sessions_records_not_the_line_order(
    store: Store, o200k: TokenCounter
) -> None:
    def turns(session: str) -> list[tuple[int, int]]:
        return [(m.position, m.turn) for m in store.history(session)]

    # Without turn: a human message and the AI reply after it in its session.
    lines = jsonl(rec("A", "a?"), rec("B", "b?"), rec("A", "a!", "ai"), rec("B", "b!", "ai"))
    import_jsonl(store, lines, o200k)
    assert turns("A") == turns("B") == [(0, 0), (1, 0)]
    # With turn: grouped by its value, and the value kept.
    lines = jsonl(
        rec("T", "q", turn=5), rec("U", "x", turn=0), rec("T", "a", "ai", turn=5),
        rec("T", "q2", turn=9), rec("T", "more", turn=9), rec("U", "y", "ai", turn=0),
    )  # fmt: skip
    import_jsonl(store, lines, o200k)
    assert turns("T") == [(0, 5), (1, 5), (2, 9), (3, 9)]
    assert store.session("T").next_turn == 10
    assert turns("U") == [(0, 0), (1, 0)]
    # A session already past a record's turn goes on from its own, grouping kept.
    store.append_turns("W", [[Message("human", "q"), Message("ai", "a")]] * 2, o200k)
    import_jsonl(store, jsonl(*(rec("W", f"w{i}", position=4 + i, turn=0) for i in range(2))))
    assert turns("W")[4:] == [(4, 2), (5, 2)]


@pytest.mark.parametrize("with_turns", [False, True])
def test_a_resumed_import_continues_the_turn_it_stopped_in(
    store: Store, o200k: TokenCounter, with_turns: bool
) -> None:
    fields: dict[str, Any] = {"turn": 0} if with_turns else {}
    question, answer = rec("s", "q", **fields), rec("s", "a", "ai", **fields)
    import_jsonl(store, jsonl(question), o200k)  # stopped between them
    assert import_jsonl(store, jsonl(question, answer), o200k) == ImportResult(1, 1, 1)
    assert [(m.position, m.turn) for m in store.history("s")] == [(0, 0), (1, 0)]
    assert store.session("s").next_turn == 1


# --- QA B2: a LangChain source that is not there --------------------------------------


def test_a_missing_langchain_source_is_an_error_and_creates_nothing(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenmem import ConfigurationError

    typo = tmp_path / "typo.db"
    with pytest.raises(ConfigurationError, match=f"^no SQLite database at {typo}: check the URL"):
        import_langchain(store, f"sqlite:///{typo}")
    assert not typo.exists()
    source = langchain_db(tmp_path / "lc.sqlite3")
    with pytest.raises(ConfigurationError, match=r"^no table 'nope' in sqlite:///.*lc\.sqlite3"):
        import_langchain(store, source, table="nope")
    url = url_of(store.engine)
    code, _, err = run(capsys, "--db", url, "import", "--from-langchain", f"sqlite:///{typo}")
    assert code == 2 and "no SQLite database at" in err and not typo.exists()
    code, _, err = run(capsys, "--db", url, "import", "--from-langchain", source, "--table", "nope")
    assert code == 2 and err.startswith("tokenmem: no table 'nope' in sqlite:///"), err
    assert store.count(all_owners=True) == 0


# --- QA C: messages ----------------------------------------------------------------


def test_input_messages_read_well(store: Store, o200k: TokenCounter) -> None:
    with pytest.raises(
        InvalidInputError, match=r"^line 1: not JSON: Unterminated string starting at column 32$"
    ):
        import_jsonl(store, ['{"session_id": "x", "content": "no end\n'], o200k)
    with pytest.raises(InvalidInputError) as info:
        import_jsonl(store.owner("alice"), jsonl(rec("x", "hi", owner="")), o200k)
    assert str(info.value) == (
        "line 1: the record belongs to the default owner (''), but the import is into "
        "owner 'alice': drop its owner field to import it there"
    )
    # A byte order mark, as Windows tools write one, is not the first record's.
    bom = "\ufeff" + "".join(jsonl(rec("x", "hi"), rec("x", "yo", "ai")))
    assert import_jsonl(store, io.StringIO(bom), o200k) == ImportResult(1, 2, 0)
    assert contents(store, "x") == ["hi", "yo"]


def test_a_name_too_long_fails_the_check_before_anything_is_written(
    store: Store, o200k: TokenCounter
) -> None:
    lines = jsonl(rec("x", "fine"), rec("x", "named", name="n" * 256))
    with pytest.raises(InvalidInputError, match=r"^line 2: name must have 1 to 255 characters"):
        import_jsonl(store, lines, o200k)
    assert store.count(all_owners=True) == 0


def test_a_session_behind_where_it_was_seen_is_counted_whole(
    store: Store, o200k: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are counted outside the lock only from where the session was
    seen; erased since (behind it), the batch is counted whole and written."""
    import tokenmem.transfer
    from tokenmem.messages import SessionInfo

    now = utcnow()
    seen = SessionInfo("", "s", 2, now, now)  # as if it held positions 0 and 1
    monkeypatch.setattr(tokenmem.transfer, "_state", lambda store, key: seen)
    assert import_jsonl(store, jsonl(*(rec("s", f"m{i}") for i in range(3))), o200k).imported == 3
    assert contents(store, "s") == ["m0", "m1", "m2"]
