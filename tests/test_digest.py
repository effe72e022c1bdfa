"""The tamper-evident history: every message and turn-log row chains to the
previous one of its session; verify walks the chains and names the first
row changed, inserted, deleted or moved through plain SQL."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, inspect, select, text, update

import tokenmem.audit
from tokenmem import (
    ConversationTokenBufferMemory,
    InvalidInputError,
    Message,
    Store,
    StoredMessage,
    TokenCounter,
    Verified,
    writes,
)
from tokenmem.aio import AsyncStore
from tokenmem.cli import main
from tokenmem.digest import MESSAGE_FIELDS, backfill, chain, message_digest
from tokenmem.models import MESSAGES, SESSIONS, TURNS, session_uuid, utcnow
from tokenmem.transfer import export_jsonl, import_jsonl
from tokenmem.validate import SessionKey

from .conftest import async_twin
from .test_owners import record
from .test_transfer import other_db  # noqa: F401

SID = session_uuid("", "s")


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def filled(store: Store, counter: TokenCounter) -> None:
    """Eight messages (plain, with metadata, OpenAI tool calls) and three turns."""
    store.append("s", [Message("system", "be brief"), Message("human", "hi")], counter)
    store.append(
        "s",
        [Message("ai", "héllo 👋", metadata={"score": 2.0, "tags": ["a"], "n": 1e20})],
        counter,
    )
    store.record_turn(
        "s", record("one", (0, 2)), [Message("human", "q"), Message("ai", "a")], counter
    )
    store.append(
        "s",
        [
            Message("ai", "", openai={"role": "assistant", "content": None, "tool_calls": [CALL]}),
            Message(
                "tool", "42", openai={"role": "tool", "tool_call_id": "call_1", "content": "42"}
            ),
        ],
        counter,
    )
    store.record_turn("s", record("two", (3, 6)), None, counter)
    store.append_many("s", [Message("human", "bulk 1"), Message("ai", "bulk 2")], counter)
    store.record_turn("s", record("three"), None, counter)


def digests(db: Engine) -> list[tuple[int, str]]:
    with db.connect() as conn:
        m = MESSAGES.c
        rows = conn.execute(
            select(m.position, m.digest).where(m.session_id == SID).order_by(m.position)
        )
        return [(int(p), d) for p, d in rows]


def test_an_untouched_history_verifies(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    for page in (1, 3, 1000):  # pages end inside, at and after the chain
        report = store.verify("s", page=page)
        assert report.ok, report
        assert (report.messages, report.turns) == (9, 3)
    chain = digests(store.engine)
    assert [p for p, _ in chain] == list(range(9))
    assert report.head_digest == chain[-1][1]
    assert len({d for _, d in chain}) == 9
    turns = store.turns("s")
    assert len(turns) == 3
    with store.engine.connect() as conn:
        sent = (
            conn.execute(
                select(TURNS.c.window_digest).where(TURNS.c.session_id == SID).order_by(TURNS.c.seq)
            )
            .scalars()
            .all()
        )
    assert sent == [chain[2][1], chain[6][1], None]  # the newest message each sent


def test_the_documented_encoding(store: Store, o200k: TokenCounter) -> None:
    """The README's recipe, by hand, gives the stored digests."""
    created = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    store.append(
        "s", [StoredMessage("human", "hi", metadata={"b": 1, "a": 1.0}, created_at=created)], o200k
    )
    fields = {
        "position": 0,
        "turn": 0,
        "role": "human",
        "content": "hi",
        "name": None,
        "metadata": {"a": 1, "b": 1},
        "message": None,
        "tool_calls": None,
        "tool_call_id": None,
        "created_at": "2026-01-02T01:04:05.000006+00:00",
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(canonical.encode() + b"\n").hexdigest()
    assert digests(store.engine) == [(0, expected)]
    assert store.verify("s").head_digest == expected


def broken(store: Store, sql: str, **params: object) -> tuple[str | None, int | None]:
    with store.engine.begin() as conn:
        conn.execute(text(sql), params)
    report = store.verify("s")
    assert not report.ok
    assert report.problem
    return report.table, report.position


MSG = "UPDATE tokenmem_messages SET {} WHERE position = :p"


def test_changed_content(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    assert broken(store, MSG.format("content = 'HI'"), p=1) == ("messages", 1)


def test_changed_metadata_created_at_and_tool_call(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    with store.engine.begin() as conn:
        later = utcnow()
        conn.execute(update(MESSAGES).where(MESSAGES.c.position == 4).values(created_at=later))
    report = store.verify("s")
    assert (report.ok, report.position) == (False, 4)
    with store.engine.begin() as conn:  # a forger recomputes that one digest: the next breaks
        from tokenmem.digest import message_digest

        m = MESSAGES.c
        row = (
            conn.execute(select(MESSAGES).where(m.session_id == SID, m.position == 4))
            .mappings()
            .one()
        )
        before = conn.execute(
            select(m.digest).where(m.session_id == SID, m.position == 3)
        ).scalar_one()
        conn.execute(
            update(MESSAGES)
            .where(m.session_id == SID, m.position == 4)
            .values(digest=message_digest(row, before))
        )
    assert store.verify("s").position == 5


def test_changed_tool_call_id(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    assert broken(store, MSG.format("tool_call_id = 'call_2'"), p=6) == ("messages", 6)


def test_deleted_row(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    sql = "DELETE FROM tokenmem_messages WHERE position = :p"
    assert broken(store, sql, p=3) == ("messages", 4)


def test_deleted_first_and_last_rows(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    sql = "DELETE FROM tokenmem_messages WHERE position = :p"
    assert broken(store, sql, p=8) == ("messages", 8)  # the chain ends before the head
    assert broken(store, sql, p=0) == ("messages", 1)


def test_swapped_positions(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    with store.engine.begin() as conn:
        for a, b in ((2, -1), (5, 2), (-1, 5)):
            conn.execute(text(MSG.format("position = :b")), {"p": a, "b": b})
    report = store.verify("s")
    assert (report.ok, report.table, report.position) == (False, "messages", 2)


def test_inserted_rows(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    with store.engine.begin() as conn:
        m = MESSAGES.c
        row = dict(
            conn.execute(select(MESSAGES).where(m.session_id == SID, m.position == 8))
            .mappings()
            .one()
        )
        conn.execute(insert(MESSAGES).values({**row, "position": 9, "content": "forged"}))
    assert store.verify("s").position == 9  # after the newest
    with store.engine.begin() as conn:
        conn.execute(delete(MESSAGES).where(MESSAGES.c.position == 9))
        conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.position >= 5)
            .values(position=MESSAGES.c.position + 10)
        )
        conn.execute(insert(MESSAGES).values({**row, "position": 5}))
    assert store.verify("s").position == 5


def test_altered_turn(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    sql = "UPDATE tokenmem_turns SET prompt_tokens = 1 WHERE seq = 1"
    assert broken(store, sql) == ("turns", 1)


def test_deleted_turn(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    sql = "DELETE FROM tokenmem_turns WHERE seq = 0"
    assert broken(store, sql) == ("turns", 1)


def test_recount_clear_and_prune_keep_the_chain(
    store: Store, o200k: TokenCounter, cl100k: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = utcnow() - timedelta(days=40)
    store.append("s", [StoredMessage("human", f"old {i}", created_at=old) for i in range(3)], o200k)
    with monkeypatch.context() as patch:  # a call recorded 40 days ago
        patch.setattr(tokenmem.audit, "utcnow", lambda: old)
        store.record_turn("s", record("old"), None, o200k)
    filled(store, o200k)
    head = store.verify("s").head_digest
    store.clear("s")
    assert store.verify("s").ok
    assert store.recount("s", cl100k, batch_size=2)  # counts only
    report = store.verify("s")
    assert report.ok and report.head_digest == head
    pruned = store.prune(timedelta(days=30), owner="")
    assert (pruned.messages, pruned.turns) == (3, 1)
    report = store.verify("s")
    assert report.ok, report
    assert (report.messages, report.turns, report.head_digest) == (9, 3, head)
    with store.engine.connect() as conn:
        s = SESSIONS.c
        anchor = conn.execute(
            select(s.anchor_position, s.turns_anchor_seq).where(s.id == SID)
        ).one()
    assert tuple(anchor) == (2, 0)
    # deleting the first row after the anchor is still found
    sql = "DELETE FROM tokenmem_messages WHERE position = 3"
    assert broken(store, sql) == ("messages", 4)


def test_a_pruned_out_session_verifies(store: Store, o200k: TokenCounter) -> None:
    old = utcnow() - timedelta(days=40)
    store.append("s", [StoredMessage("human", "old", created_at=old)], o200k)
    store.prune(timedelta(days=30), owner="")
    assert store.history("s") == [] or list(store.history("s")) == []
    assert store.verify("s").ok
    store.append("s", [Message("human", "new")], o200k)
    assert store.verify("s").ok


def test_erase_removes_the_chain(store: Store, o200k: TokenCounter) -> None:
    filled(store, o200k)
    store.erase("s")
    with pytest.raises(Exception, match="s"):
        store.verify("s")


def test_migration_0006_round_trip_backfills_the_chains(store: Store, o200k: TokenCounter) -> None:
    """Down to 0005 and up again: the backfill gives every message the digest
    it was written with, chains each session's turns again (older turns name
    no window digest), and verify passes; in batches of any size."""
    filled(store, o200k)
    for i in range(3):
        store.append(f"other {i}", [Message("human", f"x{j}") for j in range(i + 2)], o200k)
    written = digests(store.engine)
    store.downgrade("0005")
    with store.engine.connect() as conn:
        assert "digest" not in {c["name"] for c in inspect(conn).get_columns("tokenmem_messages")}
    store.upgrade()
    assert digests(store.engine) == written
    for session in ("s", "other 0", "other 1", "other 2"):
        assert store.verify(session).ok
    assert store.verify("s").turns == 3
    with store.engine.begin() as conn:
        conn.execute(update(MESSAGES).values(digest=None))
        conn.execute(update(TURNS).values(digest=None))
        backfill(conn, batch=2)
    assert digests(store.engine) == written
    assert all(store.verify(s).ok for s in ("s", "other 0", "other 1", "other 2"))
    store.append("s", [Message("human", "after the backfill")], o200k)
    assert store.verify("s").ok


def test_cli_verify(store: Store, o200k: TokenCounter, capsys: pytest.CaptureFixture[str]) -> None:
    filled(store, o200k)
    store.append("t", [Message("human", "hi")], o200k, owner="alice")
    url = url_of(store.engine)
    code, said, _ = run(capsys, "--db", url, "verify", "s")
    head = store.verify("s").head_digest
    assert (code, said) == (0, f"s: intact, 9 message(s), 3 turn(s); head {head}\n")
    code, said, _ = run(capsys, "--db", url, "verify", "s", "--expect-head", head or "")
    assert code == 0
    store.append("s", [Message("human", "later")], o200k)
    code, said, _ = run(capsys, "--db", url, "--json", "verify", "s", "--expect-head", head or "")
    assert code == 0 and json.loads(said)[0]["expected_at"] == 8  # the history up to it holds
    code, said, _ = run(capsys, "--db", url, "--json", "verify", "--all")
    assert code == 0
    assert sorted((r["owner_id"], r["session"], r["ok"]) for r in json.loads(said)) == [
        ("", "s", True),
        ("alice", "t", True),
    ]
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE tokenmem_messages SET content = 'HI' WHERE position = 1"))
    code, said, _ = run(capsys, "--db", url, "verify", "--all")
    assert code == 5
    assert "s: BROKEN at message position 1: its digest does not match" in said
    assert "t (owner 'alice'): intact" in said
    code, said, _ = run(capsys, "--db", url, "verify", "s", "--expect-head", "0" * 64)
    assert code == 5
    code, _, err = run(capsys, "--db", url, "verify")
    assert code == 2 and "SESSION ... or --all" in err
    code, _, err = run(capsys, "--db", url, "verify", "nope")
    assert code == 3


def test_async_verify(store: Store, o200k: TokenCounter) -> None:
    """AsyncStore.verify says what Store.verify says, and its appends chain as the sync ones."""
    filled(store, o200k)

    async def run() -> tuple[Verified, Verified]:
        twin = AsyncStore(async_twin(store.engine))
        try:
            await twin.append("s", [Message("human", "async")], o200k)
            intact = await twin.verify("s", page=2)
            with store.engine.begin() as conn:
                conn.execute(text("DELETE FROM tokenmem_messages WHERE position = 4"))
            return intact, await twin.verify("s")
        finally:
            await twin.close()

    intact, broken_ = asyncio.run(run())
    assert intact.ok and intact.messages == 10
    assert intact.head_digest == digests(store.engine)[-1][1]
    assert (broken_.ok, broken_.position) == (False, 5)
    assert store.verify("s") == broken_


_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_json = _scalar | st.lists(_scalar, max_size=3) | st.dictionaries(st.text(max_size=5), _scalar)


@given(
    content=st.text(),
    name=st.none() | st.text(max_size=10),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), _json, max_size=3),
    message=st.none() | st.dictionaries(st.text(max_size=5), _json, max_size=3),
    calls=st.none() | st.lists(_json, max_size=2),
    call_id=st.none() | st.text(max_size=10),
    created_at=st.datetimes(timezones=st.timezones()),
    position=st.integers(0, 2**62),
)
def test_the_append_path_digests_as_the_reference(
    content: str,
    name: str | None,
    metadata: dict[str, object] | None,
    message: dict[str, object] | None,
    calls: list[object] | None,
    call_id: str | None,
    created_at: datetime,
    position: int,
) -> None:
    """message_digest (written by hand for speed) is chain() over MESSAGE_FIELDS."""
    row = {
        "position": position,
        "turn": position // 2,
        "role": "tool",
        "content": content,
        "name": name,
        "metadata": metadata,
        "message": message,
        "tool_calls": calls,
        "tool_call_id": call_id,
        "created_at": created_at,
    }
    assert message_digest(row, "ab" * 32) == chain(row, MESSAGE_FIELDS, "ab" * 32)


def test_concurrent_writers_chain_in_commit_order(store: Store, o200k: TokenCounter) -> None:
    """Appends and turns from many threads to one session: each chains to the
    head the previous commit left (the bump's row lock orders them)."""

    def write(worker: int) -> None:
        for i in range(8):
            if i % 3:
                store.append("s", [Message("human", f"{worker}.{i}"), Message("ai", "ok")], o200k)
            else:
                store.record_turn("s", record(f"{worker}.{i}"), [Message("human", "q")], o200k)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(write, range(6)))
    report = store.verify("s")
    assert report.ok, report
    assert (report.messages, report.turns) == (6 * (5 * 2 + 3), 6 * 3)


def test_pop_leaves_the_chain_as_before(store: Store, o200k: TokenCounter) -> None:
    """The Agents SDK's pop_item (writes.pop) takes the newest message back:
    the head is the one before it, and the next append chains to that."""
    filled(store, o200k)
    before = store.verify("s").head_digest
    store.append("s", [Message("human", "retried")], o200k)
    popped = store.run(functools.partial(writes.pop, key=SessionKey.of("s")))
    assert popped is not None and popped.content == "retried"
    report = store.verify("s")
    assert report.ok and report.head_digest == before
    store.append("s", [Message("human", "again")], o200k)
    assert store.verify("s").ok
    for _ in range(10):  # down to nothing: the head is the chain's start
        store.run(functools.partial(writes.pop, key=SessionKey.of("s")))
    assert store.verify("s").ok


# --- export carries the chains, import checks them ---------------------------------


@pytest.fixture
def elsewhere(other_db: Engine) -> Store:  # noqa: F811
    """A fresh database on the other backend."""
    return Store(other_db, upgrade=True)


def with_pruned(store: Store, o200k: TokenCounter) -> None:
    """ "s" (nine messages: a pinned prompt, metadata, a tool call and its
    answer, a turn's, a bulk append's), "p" (four, its first two pruned: its
    chain starts at an anchor) and "gone" (its one message pruned)."""
    store.append("s", [Message("system", "be brief"), Message("human", "hi")], o200k)
    store.append(
        "s", [Message("ai", "héllo 👋", metadata={"score": 2.0, "tags": ["a"], "n": 1e20})], o200k
    )
    ConversationTokenBufferMemory(store=store, session_id="s").save_messages(
        [
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]
    )
    store.record_turn(
        "s", record("one", (0, 4)), [Message("human", "q"), Message("ai", "a")], o200k
    )
    store.append_many("s", [Message("human", "bulk 1"), Message("ai", "bulk 2", name="b")], o200k)
    old = utcnow() - timedelta(days=40)
    store.append("p", [StoredMessage("human", f"old {i}", created_at=old) for i in range(2)], o200k)
    store.append("p", [Message("human", "new"), Message("ai", "reply")], o200k)
    store.append("gone", [StoredMessage("human", "old", created_at=old)], o200k)
    store.prune(timedelta(days=30), all_owners=True)


def exported(store: Store) -> list[str]:
    out = io.StringIO()
    export_jsonl(store, out)
    return out.getvalue().splitlines(keepends=True)


def anchors(db: Engine) -> list[tuple[str, str | None, int | None, str | None]]:
    s = SESSIONS.c
    with db.connect() as conn:
        rows = conn.execute(
            select(s.name, s.anchor_digest, s.anchor_position, s.head_digest).order_by(s.name)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_an_exported_session_verifies_elsewhere_with_its_head(
    store: Store, elsewhere: Store, o200k: TokenCounter
) -> None:
    """SQLite to PostgreSQL and back: every message's digest, a pruned
    session's anchor, and the heads arrive as they were."""
    with_pruned(store, o200k)
    lines = exported(store)
    records = [json.loads(line) for line in lines]
    assert all(len(r.get("digest", "")) == 64 for r in records if r.get("kind") != "session")
    p = next(r for r in records if r.get("kind") == "session" and r["session_id"] == "p")
    assert p["anchor_position"] == 1 and p["head_digest"] == store.verify("p").head_digest
    assert import_jsonl(elsewhere, lines).imported == 11
    for name in ("s", "p", "gone"):
        was, now = store.verify(name), elsewhere.verify(name)
        assert now.ok, now
        assert (now.head_digest, now.messages) == (was.head_digest, was.messages)
    assert anchors(elsewhere.engine) == anchors(store.engine)
    chains = [
        {k: v for k, v in json.loads(line).items() if k.endswith(("digest", "position"))}
        for line in exported(elsewhere)
    ]  # (not the same bytes: PostgreSQL's jsonb writes 1e20 as 100000000000000000000)
    assert chains == [
        {k: v for k, v in r.items() if k.endswith(("digest", "position"))} for r in records
    ]
    assert import_jsonl(elsewhere, lines).skipped == 11  # again: nothing to do
    elsewhere.append("p", [Message("human", "goes on")], o200k)
    assert elsewhere.verify("p").ok


def test_a_file_without_digests_is_digested_afresh(
    store: Store, elsewhere: Store, o200k: TokenCounter
) -> None:
    """Written before the digests (or by hand): imported as before, its rows
    chained in the new database; a pruned session's chain then starts there."""
    with_pruned(store, o200k)
    lines = [
        json.dumps({k: v for k, v in json.loads(line).items() if not k.endswith("digest")})
        for line in exported(store)
    ]
    assert "digest" not in "".join(lines)
    import_jsonl(elsewhere, lines)
    for name in ("s", "p", "gone"):
        assert elsewhere.verify(name).ok
    # the same rows from the same start: the same chain; p's starts at "" now
    assert elsewhere.verify("s").head_digest == store.verify("s").head_digest
    assert elsewhere.verify("p").head_digest != store.verify("p").head_digest


def _line(lines: list[str], session: str, position: int | None = None) -> int:
    """The (1-based) line of a session's record at ``position``, or of its session line."""
    for i, line in enumerate(lines):
        r = json.loads(line)
        same = r["session_id"] == session and r.get("position") == position
        if same and (position is None) == (r.get("kind") == "session"):
            return i + 1
    raise LookupError(session, position)


MISMATCH = "its digest does not match the record"


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("content", (("s", 2), MISMATCH)),
        ("metadata", (("s", 2), MISMATCH)),
        ("tool answer", (("s", 4), MISMATCH)),
        ("created_at", (("s", 5), MISMATCH)),
        ("turn", (("s", 5), MISMATCH)),
        ("first", (("s", 0), MISMATCH + r".*\(the first of its session")),
        ("dropped", (("s", 3), MISMATCH)),  # where 3 was, 4 now is
        ("dropped first", (("s", 0), MISMATCH + r".*\(the first of its session")),
        ("dropped last", (("s", None), "head_digest is not the digest of the last record")),
        ("dropped session line", (("s", 8), "carry digests, but no session line follows")),
        ("swapped", (("s", 3), MISMATCH)),
        ("digest", (("s", 5), MISMATCH)),
        ("no digest", (("s", 5), "no digest, though the record before it")),
        ("bad digest", (("s", 5), "digest must be a SHA-256 in lowercase hex")),
        ("head", (("s", None), "head_digest is not the digest of the last record")),
        ("added", (("s", None), "head_digest is not the digest of the last record")),
        ("anchor", (("p", 2), MISMATCH + r".*\(the first of its session")),
        ("no anchor", (("p", 2), MISMATCH + r".*\(the first of its session")),
        ("gone head", (("gone", None), "head_digest is not the anchor_digest")),
    ],
)
def test_a_tampered_export_is_refused_with_its_line(
    store: Store, elsewhere: Store, o200k: TokenCounter, how: str, expected: tuple[Any, str]
) -> None:
    with_pruned(store, o200k)
    lines = exported(store)
    (session, position), error = expected
    at = _line(lines, session, position)
    records = [json.loads(line) for line in lines]

    def of(session: str, position: int | None = None) -> dict[str, Any]:
        return records[_line(lines, session, position) - 1]

    if how == "content":
        of("s", 2)["content"] += "!"
    elif how == "metadata":
        of("s", 2)["metadata"]["score"] = 3
    elif how == "tool answer":
        of("s", 4)["content"] = of("s", 4)["openai"]["content"] = "43"
    elif how == "created_at":
        of("s", 5)["created_at"] = "2020-01-01T00:00:00+00:00"
    elif how == "turn":
        of("s", 5)["turn"] += 1
    elif how == "first":
        of("s", 0)["content"] = "be verbose"
    elif how == "dropped":
        records.remove(of("s", 3))
    elif how == "dropped first":
        records.remove(of("s", 0))
    elif how == "dropped last":
        records.remove(of("s", 8))
        at -= 1
    elif how == "dropped session line":
        records.remove(of("s"))
    elif how == "swapped":
        i = _line(lines, "s", 3) - 1
        records[i], records[i + 1] = records[i + 1], records[i]
    elif how == "digest":
        of("s", 5)["digest"] = of("s", 4)["digest"]
    elif how == "no digest":
        del of("s", 5)["digest"]
    elif how == "bad digest":
        of("s", 5)["digest"] = of("s", 5)["digest"].upper()
    elif how == "head":
        of("s")["head_digest"] = of("s", 7)["digest"]
    elif how == "added":  # chained to the last, as a forger can: the head still says where it ended
        extra = {**of("s", 8), "position": 9, "content": "added"}
        fields = {**extra, "message": None, "tool_calls": None, "tool_call_id": None}
        fields["created_at"] = datetime.fromisoformat(extra["created_at"])
        extra["digest"] = message_digest(fields, of("s", 8)["digest"])
        records.insert(_line(lines, "s", 8), extra)
        at += 1
    elif how == "anchor":
        of("p")["anchor_digest"] = of("s", 0)["digest"]
    elif how == "no anchor":
        del of("p")["anchor_digest"]
    elif how == "gone head":
        of("gone")["head_digest"] = of("s", 0)["digest"]
    tampered = [json.dumps(r) + "\n" for r in records]
    with pytest.raises(InvalidInputError, match=rf"^line {at}: .*{error}"):
        import_jsonl(elsewhere, tampered)
    assert elsewhere.count(all_owners=True) == 0 and elsewhere.session_stats() == []


def test_cli_export_import_verify(
    store: Store,
    elsewhere: Store,
    o200k: TokenCounter,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    with_pruned(store, o200k)
    dump = tmp_path / "dump.jsonl"
    assert run(capsys, "--db", url_of(store.engine), "export", "-o", str(dump))[0] == 0
    target = url_of(elsewhere.engine)
    code, out, err = run(capsys, "--db", target, "import", str(dump))
    assert code == 0, err
    code, out, _ = run(capsys, "--db", target, "verify", "p")
    assert code == 0 and out.strip().endswith(f"head {store.verify('p').head_digest}"), out
    records = dump.read_text(encoding="utf-8").splitlines(keepends=True)
    assert '"content": "new"' in records[1]  # p's first: the line after gone's session line
    records[1] = records[1].replace('"content": "new"', '"content": "New"')
    dump.write_text("".join(records), encoding="utf-8")
    code, out, err = run(capsys, "--db", target, "import", str(dump))
    assert code == 1 and err.startswith(f"tokenmem: line 2: {MISMATCH}"), err
