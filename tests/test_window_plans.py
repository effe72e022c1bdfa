"""The window statement's plan cannot go wrong (docs/window-plans.md).

A session of 200,000 messages is written straight into the tables with SQL
(consistent counts and running floors; tiktoken is not the point here), next
to a few hundred small sessions, and the window statement is explained on
tables that were analysed and on tables that never were. On PostgreSQL it
runs as a prepared statement, as psycopg runs it after five executions, with
``plan_cache_mode`` forcing the custom plan (a fresh connection's first
loads) and then the generic one, under ``EXPLAIN (ANALYZE, FORMAT JSON)``:
every scan of ``tokenmem_messages`` must read an index range (in order, or
through a bitmap on never-analysed tables) of no more rows than the
statement's row cap, and the plan's estimated cost must stay
under ``jit_above_cost`` (no JIT compilation on a load). The statement the
first version sent read the whole session here on analysed tables.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, text

from tokenmem import Rule, Store, TokenCounter
from tokenmem.models import session_uuid
from tokenmem.window import row_cap, window_select

BIG = 200_000
SMALL_SESSIONS, SMALL = 300, 200
ENCODING = "o200k_base"
CUM_FLOOR_INDEX = "ix_tokenmem_messages_session_id_cum_floor"
COUNTER = TokenCounter(ENCODING)
OTHER = TokenCounter("cl100k_base")


def _fill(conn: Connection, name: str, n: int) -> None:
    """A session of ``n`` messages of 3 text tokens, floor 5 each."""
    uid = session_uuid("", name)
    sid = uid.hex if conn.dialect.name == "sqlite" else uid
    conn.execute(
        text(
            "INSERT INTO tokenmem_sessions (id, owner_id, name, encoding, next_position,"
            " next_turn, floor_total, start_position, start_floor, next_call, created_at,"
            " updated_at) VALUES (:id, '', :name, :enc, :n, :t, :total, 0, 0, 0,"
            " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
        ),
        {"id": sid, "name": name, "enc": ENCODING, "n": n, "t": n // 2, "total": 5 * n},
    )
    series = (
        "SELECT g FROM generate_series(0, :last) g"
        if conn.dialect.name == "postgresql"
        else "WITH RECURSIVE s(g) AS (SELECT 0 UNION ALL SELECT g + 1 FROM s WHERE g < :last)"
        " SELECT g FROM s"
    )
    conn.execute(
        text(
            "INSERT INTO tokenmem_messages (session_id, position, turn, role, content, name,"
            " metadata, created_at, encoding, text_tokens, newline_tokens, chat_tokens,"
            " cum_floor) SELECT :id, g, g / 2, CASE WHEN g % 2 = 0 THEN 'human' ELSE 'ai' END,"
            f" 'message ' || g, NULL, NULL, CURRENT_TIMESTAMP, :enc, 3, 1, 4, 5 * g FROM ({series})"
            " AS series"
        ),
        {"id": sid, "enc": ENCODING, "last": n - 1},
    )


@pytest.fixture(params=["analysed", "never analysed"])
def loaded(request: pytest.FixtureRequest, store: Store) -> Iterator[Store]:
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            for table in ("tokenmem_messages", "tokenmem_sessions"):
                conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        _fill(conn, "big", BIG)
        # A pinned system prompt at its start, and tool-call units (issue 13):
        # every fourth message answers the one before it.
        big = session_uuid("", "big")
        bid = big.hex if conn.dialect.name == "sqlite" else big
        conn.execute(
            text(
                "UPDATE tokenmem_messages SET unit = position - 1 WHERE session_id = :id"
                " AND position % 4 = 3"
            ),
            {"id": bid},
        )
        conn.execute(
            text(
                "UPDATE tokenmem_messages SET role = 'system' WHERE session_id = :id"
                " AND position = 0"
            ),
            {"id": bid},
        )
        conn.execute(
            text("UPDATE tokenmem_sessions SET pinned_first = 0, pinned_last = 0 WHERE id = :id"),
            {"id": bid},
        )
        for i in range(SMALL_SESSIONS):
            _fill(conn, f"small-{i}", SMALL)
    if request.param == "analysed":
        with store.engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
    yield store


RULES = [
    Rule(limit=2000),
    Rule(limit=2000, mode="messages", start_on="human"),
    Rule(limit=100),
    Rule(limit=2000, mode="messages", include_open=True),
]


@pytest.mark.slow
def test_the_window_reads_only_its_candidates(loaded: Store) -> None:
    for rule in RULES:
        _check_plans(loaded, rule)


def _check_plans(store: Store, rule: Rule) -> None:
    cap = row_cap(rule)
    window = store.window("big", rule, COUNTER)
    assert 0 < len(window) < cap
    assert window[-1].position == BIG - 1
    assert window[0].pinned and window[0].position == 0  # the pinned prompt, read by key
    if store.dialect == "sqlite":
        for counter in (COUNTER, OTHER):
            plan = store.explain_window("big", rule, counter)
            assert f"SEARCH tokenmem_messages USING INDEX {CUM_FLOOR_INDEX}" in plan, plan
            assert not re.search(r"SCAN tokenmem_messages\b", plan), plan
        return
    # Asked with another encoding than the session's (a new model, before the
    # session is recounted), the statement finds nothing: by the same plan.
    for mode, encoding in itertools.product(
        ("force_custom_plan", "force_generic_plan"), (ENCODING, OTHER.encoding_name)
    ):
        plan = _postgres_plan(store, rule, mode, encoding)
        shown = f"{rule} {mode} {encoding}:\n" + "\n".join(_tree(plan["Plan"]))
        scans = list(_scans(plan["Plan"], "tokenmem_messages"))
        assert scans, shown
        for node in scans:
            # an index range, read in order or through a bitmap: never the table
            assert node["Node Type"] in ("Index Scan", "Bitmap Heap Scan"), shown
            assert node["Actual Rows"] <= cap, shown
        assert f"{CUM_FLOOR_INDEX} " in shown, shown
        assert "JIT" not in plan, shown
        # a tenth: an estimate that grows with the session (as the pinned
        # prompt's join once made it, ~50,000 here) crosses jit_above_cost
        # at a million messages, where every fresh connection's first loads
        # were JIT-compiled (about a second each)
        assert plan["Plan"]["Total Cost"] < _jit_above_cost(store) / 10, shown


def _postgres_plan(store: Store, rule: Rule, plan_cache_mode: str, encoding: str) -> dict[str, Any]:
    """``EXPLAIN (ANALYZE, FORMAT JSON)`` of the window statement, prepared."""
    statement = window_select(rule.mode, row_cap(rule), rule.start_on, rule.include_open)
    sql = str(statement.compile(dialect=store.engine.dialect))
    names: list[str] = []

    def number(found: re.Match[str]) -> str:
        if found[1] not in names:
            names.append(found[1])
        return f"${names.index(found[1]) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", number, sql)
    params = rule.params(session_uuid("", "big"), encoding, rule.prefix_tokens(COUNTER))
    values = [params[name] for name in names]
    literals = ", ".join(str(v) if isinstance(v, int) else f"'{v}'" for v in values)
    with store.engine.connect() as conn:
        conn.exec_driver_sql(f"SET plan_cache_mode = {plan_cache_mode}")
        conn.exec_driver_sql(f"PREPARE tm_window AS {prepared}")
        explained = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE tm_window({literals})"
        ).scalar_one()
        conn.exec_driver_sql("DEALLOCATE tm_window")
        conn.rollback()
    found = explained if isinstance(explained, list) else json.loads(explained)
    return dict(found[0])


def _scans(node: dict[str, Any], table: str) -> Iterator[dict[str, Any]]:
    if node.get("Relation Name") == table:
        yield node
    for child in node.get("Plans", ()):
        yield from _scans(child, table)


def _tree(node: dict[str, Any], depth: int = 0) -> Iterator[str]:
    """The plan as lines: node, relation and index, estimated cost and rows, actual rows."""
    scan = " ".join(filter(None, (node.get("Relation Name"), node.get("Index Name"))))
    yield (
        f"{'  ' * depth}{node['Node Type']} {scan} (cost={node['Total Cost']}"
        f" rows={node['Plan Rows']}) (actual rows={node['Actual Rows']})"
    )
    for child in node.get("Plans", ()):
        yield from _tree(child, depth + 1)


def _jit_above_cost(store: Store) -> float:
    with store.engine.connect() as conn:
        return float(conn.exec_driver_sql("SHOW jit_above_cost").scalar_one())
