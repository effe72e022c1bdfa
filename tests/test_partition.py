"""Hash partitioning by session_id (tokenmem/partition.py) and the property
that makes it, and Citus, work: every hot statement is a single-session query.

PostgreSQL-only tests use ``fresh_engine("postgresql", ...)`` as the other
PostgreSQL-only tests do: without the server they fail, they never skip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text

from tokenmem import (
    ChatOpenAI,
    ConfigurationError,
    ConversationSummaryBufferMemory,
    ConversationTokenBufferMemory,
    Message,
    Rule,
    Store,
    StoreError,
    TokenCounter,
    migrate,
)
from tokenmem.aio import AsyncStore
from tokenmem.audit import TurnRecord
from tokenmem.cli import main
from tokenmem.models import SUMMARIES, Base, session_uuid, utcnow
from tokenmem.partition import include_name, is_partition, layout
from tokenmem.transfer import export_jsonl, import_jsonl
from tokenmem.window import window_select

from .conftest import async_twin, fresh_engine
from .openai_server import FakeOpenAI

PLAIN = {"tokenmem_messages": 0, "tokenmem_turns": 0, "tokenmem_summaries": 0}


def parts(n: int) -> dict[str, int]:
    return {"tokenmem_messages": n, "tokenmem_turns": n, "tokenmem_summaries": n}


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Engine]:
    """A fresh, empty PostgreSQL schema (the test fails without the server)."""
    with fresh_engine("postgresql", tmp_path) as engine:
        yield engine


def record(input: str, first: int | None = None, last: int | None = None) -> TurnRecord:
    return TurnRecord(
        model="m",
        api="chat",
        system="be brief",
        template="{history}{input}",
        human_prefix="Human",
        ai_prefix="AI",
        input=input,
        window_first=first,
        window_last=last,
        token_budget=60,
        prompt_tokens=5,
        latency_ms=1.0,
        outcome="ok",
    )


def _timeless(m: Any) -> tuple[Any, ...]:
    return (m.position, m.turn, m.type, m.content, m.name, m.metadata, m.encoding, m.text_tokens)


def everything(store: Store, o200k: TokenCounter, server: FakeOpenAI) -> dict[str, Any]:
    """What a store does — the memory's appends and windows (both modes), an
    encoding change, clear, the turn log, a summary memory, history pages,
    export and import, prune, erase, erase_owner, counts — as plain values,
    to compare a partitioned store with a plain one."""
    out: dict[str, Any] = {}
    server.reply(*[f"Summary of {n} lines." for n in range(12)])
    llm = ChatOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    summarizing = ConversationSummaryBufferMemory(
        llm=llm, store=store, session_id="sum", max_token_limit=40
    )
    for i in range(5):
        summarizing.save_context({"input": f"question {i}"}, {"output": f"answer {i}"})
    out["summarized"] = summarizing.load_memory_variables({})
    out["summaries"] = [
        (s.seq, s.first_position, s.last_position, s.content) for s in summarizing.summaries()
    ]
    memory = ConversationTokenBufferMemory(store=store, session_id="p", max_token_limit=40)
    for i in range(8):
        memory.save_context({"input": f"question {i} 你好?"}, {"output": f"answer {i}.\nok"})
    out["text"] = memory.load_memory_variables({})["history"]
    out["messages"] = ConversationTokenBufferMemory(
        store=store, session_id="p", max_token_limit=60, return_messages=True
    ).load_memory_variables({})["history"]
    store.append("p", [Message("system", "be brief", name="sys", metadata={"k": [1, "二"]})], o200k)
    store.append_turns("q", [[Message("human", f"m{i}")] for i in range(30)], o200k)
    store.append("q", [Message("ai", "recounted")], TokenCounter("cl100k_base"))
    store.clear("q")
    store.append("q", [Message("human", "after clear")], o200k)
    out["window_q"] = store.window("q", Rule(limit=30), TokenCounter("cl100k_base"))
    turn = store.record_turn("p", record("again?", 14, 15), [Message("human", "again?")], o200k)
    store.record_turn("p", record("failed"))
    out["turns"] = [(t.seq, t.input, t.turn) for t in store.turns("p")]
    out["rebuilt"] = store.rebuild_prompt("p", turn.seq or 0)
    out["page"] = [_timeless(m) for m in store.history_page("q", after=5, limit=7)]
    out["history"] = {s: [_timeless(m) for m in store.history(s, page_size=4)] for s in "pq"}
    exported = io.StringIO()
    export_jsonl(store, exported, sessions=["p", "q"])
    lines = [json.loads(line) for line in exported.getvalue().splitlines()]
    elsewhere = [json.dumps({k: v for k, v in r.items() if k != "owner"}) for r in lines]
    out["imported"] = import_jsonl(store, elsewhere, owner="copy")
    out["copy"] = [_timeless(m) for m in store.history("q", owner="copy")]
    again = io.StringIO()
    export_jsonl(store, again, owner="copy")
    out["same_export"] = [json.loads(line)["content"] for line in again.getvalue().splitlines()[:5]]
    for name in ("a", "b"):
        store.append(name, [Message("human", "old")], o200k, owner="gone")
    store.record_turn("a", record("x"), owner="gone")
    out["pruned"] = store.prune(timedelta(seconds=-60), owner="gone")
    out["erased_owner"] = store.erase_owner("copy")
    out["erased"] = store.erase("q")
    out["stats"] = [
        (s.owner_id, s.session_id, s.messages) for s in store.session_stats(all_owners=True)
    ]
    out["count"] = store.count(all_owners=True)
    return out


def test_a_partitioned_store_does_what_a_plain_one_does(
    pg: Engine, tmp_path: Path, o200k: TokenCounter, openai_server: FakeOpenAI
) -> None:
    plain = Store(pg, upgrade=True)
    expected = everything(plain, o200k, openai_server)
    with fresh_engine("postgresql", tmp_path / "parted") as engine:
        store = Store(engine, upgrade=True)
        assert store.partition(4) == parts(4)  # freshly upgraded, empty
        with FakeOpenAI() as server:  # the same replies, in the same order
            assert everything(store, o200k, server) == expected
        with engine.connect() as conn:
            assert layout(conn) == parts(4)
            # Rows are spread by session: p's messages all in one partition.
            where = conn.execute(
                text("SELECT DISTINCT tableoid::regclass::text FROM tokenmem_messages")
            ).scalars()
            assert set(where) <= {f"tokenmem_messages_p{r}" for r in range(4)}
    assert expected["text"] and expected["window_q"] and expected["turns"]
    assert expected["summaries"] and expected["summarized"]["history"].startswith("System: ")


def test_partition_and_unpartition_keep_every_row(pg: Engine, o200k: TokenCounter) -> None:
    store = Store(pg, upgrade=True)
    for i in range(12):
        store.append_turns(f"s{i}", [[Message("human", f"{i}-{j}")] for j in range(5)], o200k)
        store.record_turn(f"s{i}", record(f"call {i}"))
    summary = {"first_position": 0, "last_position": 1, "model": "m", "encoding": "o200k_base"}
    counts = {"text_tokens": 3, "newline_tokens": 1, "chat_tokens": 4, "created_at": utcnow()}
    with pg.begin() as conn:
        conn.execute(
            insert(SUMMARIES),
            [
                {"session_id": session_uuid("", f"s{i}"), "seq": 0, "content": f"about {i}"}
                | summary
                | counts
                for i in range(12)
            ],
        )

    def contents() -> tuple[Any, ...]:
        with pg.connect() as conn:
            summaries = conn.execute(
                select(SUMMARIES.c.session_id, SUMMARIES.c.seq, SUMMARIES.c.content).order_by(
                    SUMMARIES.c.content
                )
            ).all()
        return (
            [_timeless(m) for i in range(12) for m in store.history(f"s{i}")],
            [(t.seq, t.input) for i in range(12) for t in store.turns(f"s{i}")],
            [store.window(f"s{i}", Rule(limit=20), o200k) for i in range(12)],
            summaries,
        )

    before = contents()
    assert len(before[3]) == 12
    assert store.partition(8) == parts(8)
    assert contents() == before
    assert store.partition(8) == parts(8)  # nothing to do
    assert store.partition(3) == parts(3)  # repartitioned
    assert contents() == before
    with pg.connect() as conn:
        names = conn.execute(
            text("SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace")
        ).scalars()
        names = set(names)
    assert not {n for n in names if n.startswith("tokenmem_old_")}  # nothing left over
    assert {"tokenmem_messages_p2", "tokenmem_turns_p2", "tokenmem_summaries_p2"} <= names
    assert "tokenmem_messages_p3" not in names
    assert store.unpartition() == PLAIN
    assert store.unpartition() == PLAIN
    assert contents() == before
    store.append("s0", [Message("ai", "still appends")], o200k)


def test_migrations_run_on_partitioned_tables(pg: Engine, o200k: TokenCounter) -> None:
    """Down below 0004 (which alters tokenmem_turns' column types) and 0003
    (which adds a column to tokenmem_messages) and up again: the tables stay
    partitioned, rows kept, but for tokenmem_summaries, which 0005 drops and
    makes again (plain); and autogenerate finds no drift."""
    store = Store(pg, upgrade=True)
    store.partition(4)
    memory = ConversationTokenBufferMemory(store=store, session_id="m", max_token_limit=50)
    memory.save_context({"input": "hi"}, {"output": "there"})
    store.record_turn("m", dataclasses.replace(record("x"), model="m" * 300))
    for revision in ("0003", "0002"):
        store.downgrade(revision)
        assert store.current_revision() == revision
        store.upgrade()
        with pg.connect() as conn:
            assert layout(conn) == {**parts(4), "tokenmem_summaries": 0}
    assert memory.load_memory_variables({})["history"] == "Human: hi\nAI: there"
    assert [t.model for t in store.turns("m")] == ["m" * 255]  # 0004's downgrade cut it
    memory.save_context({"input": "and"}, {"output": "now"})
    with pg.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_name": include_name}
        )
        diff = [d for d in compare_metadata(ctx, Base.metadata) if "alembic_version" not in str(d)]
        assert diff == []
        # Without the hook the partitions, which the models do not list, are all it reports.
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        extra = [d for d in compare_metadata(ctx, Base.metadata) if d[0] == "remove_table"]
        assert sorted(d[1].name for d in extra if "alembic" not in d[1].name) == sorted(
            f"{t}_p{r}" for t in ("tokenmem_messages", "tokenmem_turns") for r in range(4)
        )
    # Below the revision that made a table, it is made again plain.
    store.downgrade("0001")
    store.upgrade()
    with pg.connect() as conn:
        assert layout(conn) == {**PLAIN, "tokenmem_messages": 4}


def _relations(plan: Any) -> list[str]:
    """Every relation a JSON plan scans."""
    found = []
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.append(plan["Relation Name"])
        for value in plan.values():
            found += _relations(value)
    elif isinstance(plan, list):
        for value in plan:
            found += _relations(value)
    return found


def _partition_of(conn: Connection, table: str, sid: uuid.UUID) -> str:
    (where,) = conn.execute(
        text(f"SELECT DISTINCT tableoid::regclass::text FROM {table} WHERE session_id = :s"),
        {"s": sid},
    ).scalars()
    return str(where)


def _literal(value: object) -> str:
    """A test's own parameter value as SQL (uuids, numbers, encoding names)."""
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _numbered(sql: str) -> tuple[str, list[str]]:
    """psycopg's ``%(name)s`` placeholders as PREPARE's ``$1``, ``$2``...,
    and the names in that order."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", number, sql).replace("%%", "%"), names


def test_the_window_of_one_session_reads_one_partition(pg: Engine, o200k: TokenCounter) -> None:
    """EXPLAIN of whatever ``window_select`` returns, with bound parameters
    (a custom plan: pruned when planned) and as a prepared statement under
    ``plan_cache_mode = force_generic_plan`` (pruned when the executor
    starts): one partition of tokenmem_messages, the session's."""
    store = Store(pg, upgrade=True)
    for i in range(16):
        store.append_turns(f"s{i}", [[Message("human", f"{i} {j}")] for j in range(20)], o200k)
    store.partition(8)
    sid = session_uuid("", "s5")
    for rule in (Rule(limit=50), Rule(limit=50, mode="messages")):
        params = rule.params(sid, o200k.encoding_name, rule.prefix_tokens(o200k))
        sql = str(window_select(rule.mode).compile(dialect=pg.dialect))
        with pg.connect() as conn:
            home = _partition_of(conn, "tokenmem_messages", sid)
            rows = conn.exec_driver_sql(sql, params).all()
            assert [r[3] for r in rows] == [
                m.message.content for m in store.window("s5", rule, o200k)
            ]
            assert rows
            plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params).scalar_one()
            scanned = {r for r in _relations(plan) if r.startswith("tokenmem_messages")}
            assert scanned == {home}, plan
            # A generic plan, as a long-lived prepared statement gets.
            numbered, names = _numbered(sql)
            conn.exec_driver_sql("PREPARE tm_window AS " + numbered)
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            args = ", ".join(_literal(params[n]) for n in names)
            plan = conn.exec_driver_sql(
                f"EXPLAIN (FORMAT JSON) EXECUTE tm_window({args})"
            ).scalar_one()
            scanned = {r for r in _relations(plan) if r.startswith("tokenmem_messages")}
            assert scanned == {home}, plan
            assert "Subplans Removed" in json.dumps(plan)  # pruned at executor start
            conn.exec_driver_sql("DEALLOCATE tm_window")
            conn.exec_driver_sql("RESET plan_cache_mode")


# --- every hot statement is a single-session query ----------------------------------
#
# How it is checked: the test passes its own engine (so tokenmem runs every
# statement through Connection.execute) and records each statement and its
# parameters with a ``before_cursor_execute`` listener. A statement naming
# tokenmem_messages or tokenmem_turns must, for every reference to them (the
# table, or its alias: ``FROM tokenmem_messages AS newest_message``), have
# the equality ``<ref>.session_id = <placeholder>`` in its compiled text —
# SQLAlchemy always qualifies columns, so a careful regex on the compiled SQL
# is enough, no SQL parser needed; an INSERT must list session_id with a
# placeholder as its value. A statement naming tokenmem_sessions must have
# ``<ref>.id = <placeholder>`` (an INSERT: ``id`` bound, ``ON CONFLICT
# (id)``). Each placeholder's bound value (by name for psycopg's
# ``%(name)s``, by position for SQLite's ``?``) must be the session's
# uuid: what a Citus router needs to send the statement to one shard.

_PLACEHOLDER = r"(\?|%\((\w+)\)s)"
_REF = re.compile(r"\b(?:FROM|JOIN|UPDATE|INTO)\s+(tokenmem_\w+)(?:\s+AS\s+(\w+))?")
_INSERT = re.compile(r"^INSERT INTO (tokenmem_\w+) \(([^)]*)\) VALUES (.*)$", re.S)
_WITH_INSERT = re.compile(r"^WITH \w+ AS\s*\((INSERT INTO .*)\)\s*(UPDATE .*)$", re.S)
_KEY = {
    "tokenmem_messages": "session_id",
    "tokenmem_turns": "session_id",
    "tokenmem_summaries": "session_id",
    "tokenmem_sessions": "id",
}


def _bound(statement: str, params: Any, start: int, name: str | None) -> object:
    """The value bound to the placeholder at ``start`` of ``statement``."""
    if name is not None:
        return params[name]
    return params[statement.count("?", 0, start)]


def _as_uuid(value: object) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _values(tuples: str) -> Iterator[list[tuple[int, str]]]:
    """Each ``(...)`` of a VALUES clause as its items, with their offsets."""
    depth, item, items, begin = 0, "", [], 0
    for i, ch in enumerate(tuples):
        if ch == "(":
            depth += 1
            if depth == 1:
                item, items, begin = "", [], i + 1
                continue
        elif ch == ")":
            depth -= 1
            if depth == 0:
                items.append((begin, item.strip()))
                yield items
                continue
        if depth == 1 and ch == ",":
            items.append((begin, item.strip()))
            item, begin = "", i + 1
            continue
        if depth >= 1:
            if not item.strip():
                begin = i
            item += ch


def session_keys(statement: str, params: Any) -> list[tuple[str, uuid.UUID]]:
    """For each reference to a tokenmem table in ``statement``: the table and
    the session id its key is bound to. AssertionError when a reference has
    no equality of its key to a bound parameter."""
    found: list[tuple[str, uuid.UUID]] = []
    rows = params if isinstance(params, list) else [params]
    cte = _WITH_INSERT.match(statement)
    if cte:  # PostgreSQL's append: its rows' INSERT inside the session's UPDATE
        assert "?" not in statement  # named parameters: no offsets to keep
        return session_keys(cte.group(1), params) + session_keys(cte.group(2), params)
    insert = _INSERT.match(statement)
    if insert:
        table, columns = insert.group(1), [c.strip() for c in insert.group(2).split(",")]
        key = columns.index(_KEY[table])
        values_at = insert.start(3)
        tail = re.split(r"\s+ON CONFLICT\b", insert.group(3))[0]
        if table == "tokenmem_sessions":
            assert "ON CONFLICT (id)" in statement, statement
        for items in _values(tail):
            offset, item = items[key]
            bound = re.match(_PLACEHOLDER, item)
            assert bound, f"{table}.{_KEY[table]} is not bound: {statement}"
            for row in rows:
                value = _bound(statement, row, values_at + offset, bound.group(2))
                found.append((table, _as_uuid(value)))
        return found
    for ref in _REF.finditer(statement):
        table, alias = ref.group(1), ref.group(2) or ref.group(1)
        if table not in _KEY:
            continue
        equal = re.search(rf"\b{alias}\.{_KEY[table]} = {_PLACEHOLDER}", statement)
        assert equal, f"no {alias}.{_KEY[table]} = <parameter> in: {statement}"
        for row in rows:
            found.append((table, _as_uuid(_bound(statement, row, equal.start(1), equal.group(2)))))
    return found


def test_the_checker_finds_what_it_is_for() -> None:
    sid = uuid.uuid4()
    assert session_keys(
        "SELECT m.x FROM tokenmem_messages AS m WHERE m.session_id = %(s)s::UUID", {"s": sid}
    ) == [("tokenmem_messages", sid)]
    assert (
        session_keys(
            "INSERT INTO tokenmem_turns (seq, session_id) VALUES (?, ?)",
            [(1, sid.hex), (2, sid.hex)],
        )
        == [("tokenmem_turns", sid)] * 2
    )
    appended = (
        "WITH a AS (INSERT INTO tokenmem_messages (position, session_id) VALUES (%(p)s, %(s)s))"
        " UPDATE tokenmem_sessions SET head_digest = %(d)s WHERE tokenmem_sessions.id = %(s)s"
    )
    assert session_keys(appended, [{"p": 0, "s": sid, "d": "x"}]) == [
        ("tokenmem_messages", sid),
        ("tokenmem_sessions", sid),
    ]
    for fans_out in (
        "SELECT count(*) FROM tokenmem_messages",
        "DELETE FROM tokenmem_messages WHERE tokenmem_messages.session_id IN (SELECT 1)",
        "SELECT x FROM tokenmem_sessions WHERE tokenmem_sessions.owner_id = ?",
        "INSERT INTO tokenmem_messages (session_id) VALUES (lower(?))",
    ):
        with pytest.raises(AssertionError):
            session_keys(fans_out, ("x",))
    with pytest.raises(AssertionError):  # every session's head
        session_keys(appended.split(" WHERE ")[0], [{"p": 0, "s": sid, "d": "x"}])


def test_every_hot_statement_names_one_session(
    store: Store, o200k: TokenCounter, openai_server: FakeOpenAI
) -> None:
    """An append (store.append and memory.save_context), the window
    (load_memory_variables), a history page, recording and reading the turn
    log, a summary memory's saves, summaries and loads: each statement on
    tokenmem_messages, tokenmem_turns or tokenmem_summaries is keyed by the
    session's id, and so is each on tokenmem_sessions."""
    store.check()  # the schema check reads alembic's table once: not a hot statement
    sid = session_uuid("alice", "hot")
    seen: list[tuple[str, Any]] = []
    event.listen(
        store.engine, "before_cursor_execute", lambda *args: seen.append((args[2], args[3]))
    )
    alice = store.owner("alice")
    memory = ConversationTokenBufferMemory(store=alice, session_id="hot", max_token_limit=30)
    for i in range(6):
        memory.save_context({"input": f"question {i}"}, {"output": f"answer {i}"})
        memory.load_memory_variables({})
    ConversationTokenBufferMemory(
        store=alice, session_id="hot", max_token_limit=30, return_messages=True
    ).load_memory_variables({})
    alice.append("hot", [Message("human", "one"), Message("ai", "two")], o200k)
    alice.history_page("hot", after=3, limit=4)
    turn = alice.record_turn("hot", record("q", 12, 13), [Message("human", "q")], o200k)
    alice.record_turn("hot", record("failed"))
    alice.turns("hot")
    alice.rebuild_prompt("hot", turn.seq or 0)
    openai_server.reply(*["A summary."] * 10)
    llm = ChatOpenAI(base_url=openai_server.base_url, api_key="k", max_retries=0)
    summarizing = ConversationSummaryBufferMemory(
        llm=llm, store=alice, session_id="hot", max_token_limit=40
    )
    for i in range(3):
        summarizing.save_context({"input": f"question {i}"}, {"output": f"answer {i}"})
        summarizing.load_memory_variables({})
    assert summarizing.summaries() and summarizing.moving_summary_buffer
    touched: Mapping[str, set[uuid.UUID]] = {t: set() for t in _KEY}
    for statement, params in seen:
        for table, key in session_keys(statement, params):
            touched[table].add(key)
    assert touched == {t: {sid} for t in _KEY}, touched
    assert len(seen) > 30


# --- options, errors, the command, the async twin ------------------------------------


def test_partitioning_needs_postgresql(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.sqlite3", upgrade=True)
    with pytest.raises(ConfigurationError, match=r"needs PostgreSQL.*sqlite"):
        store.partition(4)
    with pytest.raises(ConfigurationError, match="needs PostgreSQL"):
        store.unpartition()
    store.close()


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.0, True, "4"])
def test_a_partition_count_is_checked(pg: Engine, bad: Any) -> None:
    store = Store(pg, upgrade=True)
    with pytest.raises(ConfigurationError, match="partitions must be"):
        store.partition(bad)
    with pg.connect() as conn:
        assert layout(conn) == PLAIN


def test_partitions_are_named_for_the_autogenerate_hook() -> None:
    assert is_partition("tokenmem_messages_p0") and is_partition("tokenmem_turns_p15")
    assert is_partition("tokenmem_summaries_p7")
    assert not is_partition("tokenmem_messages") and not is_partition("host_table_p1")
    assert include_name("tokenmem_turns", "table", {}) and not include_name(
        "tokenmem_turns_p3", "table", {}
    )


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_db_partition_command(
    pg: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str], o200k: TokenCounter
) -> None:
    url = pg.url.render_as_string(hide_password=False)
    store = Store(pg, upgrade=True)
    store.append("c", [Message("human", "kept")], o200k)
    code, out, err = _run(capsys, "--db", url, "db", "partition", "--partitions", "4")
    assert (code, out) == (2, "")
    assert "refusing to rebuild" in err and "without --yes" in err
    code, out, err = _run(capsys, "--db", url, "db", "partition")
    assert code == 2 and "needs --partitions N" in err
    code, out, err = _run(capsys, "--db", url, "db", "upgrade", "--partitions", "4")
    assert code == 2 and "--partitions goes with db partition" in err
    code, out, err = _run(capsys, "--db", url, "db", "partition", "--partitions", "0", "--yes")
    assert code == 2 and "partitions must be 1 to 1024" in err
    code, out, _ = _run(capsys, "--db", url, "db", "partition", "--partitions", "4", "--yes")
    assert code == 0
    assert out == (
        "tokenmem_messages: 4 hash partitions by session_id\n"
        "tokenmem_turns: 4 hash partitions by session_id\n"
        "tokenmem_summaries: 4 hash partitions by session_id\n"
    )
    code, out, _ = _run(capsys, "--db", url, "--json", "db", "unpartition", "--yes")
    assert (code, json.loads(out)) == (0, {"partitions": PLAIN})
    assert [m.content for m in store.history("c")] == ["kept"]
    sqlite = f"sqlite:///{tmp_path}/c.sqlite3"
    assert _run(capsys, "--db", sqlite, "db", "upgrade")[0] == 0
    code, out, err = _run(capsys, "--db", sqlite, "db", "partition", "--partitions", "4", "--yes")
    assert code == 2 and "db partition needs PostgreSQL; this database is sqlite" in err
    code, out, err = _run(capsys, "--db", f"{sqlite}.nope", "db", "unpartition", "--yes")
    assert code == 2 and "no SQLite database" in err


def test_the_async_store_partitions_too(pg: Engine, o200k: TokenCounter) -> None:
    Store(pg, upgrade=True)

    async def go() -> tuple[dict[str, int], dict[str, int], list[str]]:
        astore = AsyncStore(async_twin(pg))
        await astore.append("a", [Message("human", "x")], o200k)
        parted = await astore.partition(2)
        history = [m.content for m in await astore.history_page("a")]
        plain = await astore.unpartition()
        await astore.close()
        return parted, plain, history

    assert asyncio.run(go()) == (parts(2), PLAIN, ["x"])


def test_partition_needs_the_migrated_schema(pg: Engine) -> None:
    from tokenmem import SchemaError

    store = Store(pg)
    store.upgrade("0002")
    with pytest.raises(SchemaError):
        store.partition(4)
    assert migrate.head() != "0002"


def test_audit_reads_run_on_a_read_only_replica(pg: Engine, o200k: TokenCounter) -> None:
    """What docs/scaling.md sends to a read replica — history, the turn log,
    rebuilt prompts, sessions, exports — never writes: a store whose every
    transaction is read-only (as on a hot standby) serves all of it."""
    store = Store(pg, upgrade=True)
    memory = ConversationTokenBufferMemory(store=store, session_id="r", max_token_limit=50)
    memory.save_context({"input": "hi"}, {"output": "there"})
    store.record_turn("r", record("q", 0, 1), [Message("human", "q")], o200k)
    url = pg.url.update_query_dict(
        {"options": pg.url.query["options"] + " -cdefault_transaction_read_only=on"}
    )
    replica = create_engine(url)
    try:
        audit = Store(replica)
        assert [m.content for m in audit.history("r")] == ["hi", "there", "q"]
        assert [t.input for t in audit.turns("r")] == ["q"]
        assert audit.rebuild_prompt("r", 0)
        assert [s.session_id for s in audit.session_stats(all_owners=True)] == ["r"]
        exported = io.StringIO()
        assert export_jsonl(audit, exported) == 3
        assert audit.window("r", Rule(limit=50), o200k)
        with pytest.raises(StoreError, match="read-only transaction"):
            audit.append("r", [Message("human", "no")], o200k)
    finally:
        replica.dispose()


def test_partitions_go_where_the_schema_translate_map_says(
    tmp_path: Path, o200k: TokenCounter
) -> None:
    """A host keeps tokenmem's tables in a schema of its own through a
    ``schema_translate_map``; the connection's search_path is another, empty
    schema: the rebuilt tables and their partitions land in the mapped one."""
    with (
        fresh_engine("postgresql", tmp_path / "t") as home,
        fresh_engine("postgresql", tmp_path / "d") as decoy,
    ):
        schema = str(home.url.query["options"]).split("=")[-1]  # -csearch_path=...
        mapped = decoy.execution_options(schema_translate_map={None: schema})
        store = Store(mapped, upgrade=True)
        memory = ConversationTokenBufferMemory(store=store, session_id="t", max_token_limit=50)
        memory.save_context({"input": "hi"}, {"output": "there"})
        assert store.partition(4) == parts(4)
        memory.save_context({"input": "and"}, {"output": "now"})
        assert memory.load_memory_variables({})["history"].endswith("Human: and\nAI: now")
        with home.connect() as conn:
            assert layout(conn) == parts(4)
            tables = set(
                conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                ).scalars()
            )
        assert {f"tokenmem_messages_p{r}" for r in range(4)} <= tables
        with decoy.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT count(*) FROM pg_class "
                    "WHERE relnamespace = current_schema()::regnamespace"
                )
            ).scalar_one()
        assert found == 0
        assert store.unpartition() == PLAIN
        assert [m.content for m in Store(home).history("t")] == ["hi", "there", "and", "now"]
