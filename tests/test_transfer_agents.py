"""Export and import of an OpenAI Agents SDK session (Responses API items):
an import checks each item as ``add_items`` does and places a session's
items in units by the items' rules, so the copy — on SQLite and PostgreSQL,
either way — exports the same bytes, gives the same windows and tails,
verifies with the same head digest and holds the same ``unit`` values; a
tampered item fails it with its line, nothing written, unless the items'
rules take it (an orphan)."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from tokenmem import ConfigurationError, ConversationTokenBufferMemory, Store
from tokenmem import transfer as transfer_module
from tokenmem.agents import TokenmemSession
from tokenmem.models import MESSAGES, session_uuid
from tokenmem.transfer import import_jsonl

from .test_agents import SETTINGS, WEATHER, conversations, said
from .test_agents import run as wait
from .test_cli import run, url_of
from .test_transfer import other_db  # noqa: F401  (fixture)
from .test_transfer_chat import _undigested, copy, export, stored  # noqa: F401  (copy: fixture)


def call(call_id: str, city: str) -> dict[str, Any]:
    return {
        "arguments": json.dumps({"city": city}),
        "call_id": call_id,
        "name": "get_weather",
        "type": "function_call",
    }


def output(call_id: str, text: str) -> dict[str, Any]:
    return {"call_id": call_id, "output": text, "type": "function_call_output"}


def user(text: str) -> dict[str, Any]:
    return {"content": text, "role": "user"}  # as the SDK writes a user's input


def fill(store: Store, session: str) -> None:
    """The session through ``TokenmemSession``: parallel calls with a
    reasoning item, a call orphaned by a new user message, a popped output,
    a call left open by ``clear_session`` (its late output an orphan of its
    own), and a call open at the end."""

    async def go() -> None:
        s = TokenmemSession(session, store=store)
        await s.add_items(WEATHER)
        await s.add_items([user("And Oslo?"), call("c_o", "Oslo")])
        await s.add_items([user("Never mind.")])  # c_o: orphaned
        await s.add_items([call("c_b", "Bern"), output("c_b", "12C")])
        assert await s.pop_item() == output("c_b", "12C")  # c_b waits again
        await s.add_items([output("c_b", "13C"), said("Bern 13C.")])
        await s.add_items([user("Lima?"), call("c_l", "Lima")])
        await s.clear_session()  # forgets c_l
        await s.add_items([output("c_l", "20C"), user("Hello again"), said("Hi!")])
        await s.add_items([user("Quito?"), call("c_q", "Quito")])  # left open

    wait(go())


def units(store: Store, session: str) -> list[tuple[int, int | None]]:
    m = MESSAGES.c
    with store.engine.connect() as conn:
        return [
            (row.position, row.unit)
            for row in conn.execute(
                select(m.position, m.unit)
                .where(m.session_id == session_uuid("", session))
                .order_by(m.position)
            )
        ]


def windows(store: Store, session: str) -> list[str]:
    """The session's token windows and tails, as JSON text."""

    async def go() -> list[str]:
        seen = []
        for limit in (30, 120, 10_000):
            s = TokenmemSession(session, store=store, max_token_limit=limit)
            try:
                seen.append(json.dumps(await s.get_items()))
            except ConfigurationError as exc:  # the pinned prompt alone is over it
                seen.append(str(exc))
        s = TokenmemSession(session, store=store)
        for n in (1, 2, 3, 5, 100):
            seen.append(json.dumps(await s.get_items(limit=n)))
        return seen

    return wait(go())


@pytest.mark.parametrize("batch", [2, 2000])
def test_an_agents_session_round_trips_exactly(
    store: Store,
    copy: Store,  # noqa: F811  (the fixture)
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
) -> None:
    """Into a fresh database on the other backend (SQLite to PostgreSQL and
    back), in batches that cut units too."""
    monkeypatch.setattr(transfer_module, "_BATCH", batch)
    monkeypatch.setattr(transfer_module, "_HELD", 2 * batch)
    fill(store, "agent")
    dump = export(store, "agent")
    assert import_jsonl(copy, io.StringIO(dump)).imported == len(dump.splitlines()) - 1
    assert export(copy, "agent") == dump
    assert windows(copy, "agent") == windows(store, "agent")
    last = [user("Hello again"), said("Hi!"), user("Quito?")]  # c_q: open, left out
    assert json.loads(windows(store, "agent")[2])[-3:] == last
    source = units(store, "agent")
    assert units(copy, "agent") == source
    assert sum(1 for _, u in source if u is not None and u < 0) == 2  # c_o, and c_l's late output
    assert stored(copy, "agent") == stored(store, "agent")  # the open unit, c_q, too
    verified = store.verify("agent")
    assert verified.ok and verified.head_digest is not None
    again = copy.verify("agent", expect_head=verified.head_digest)
    assert again.ok and again.head_digest == verified.head_digest

    # the copy goes on as the source does: c_q's output closes its unit
    for s in (store, copy):
        wait(TokenmemSession("agent", store=s).add_items([output("c_q", "9C")]))
    assert units(copy, "agent") == units(store, "agent")
    assert windows(copy, "agent") == windows(store, "agent")
    assert import_jsonl(copy, io.StringIO(dump)).skipped == len(dump.splitlines()) - 1


@SETTINGS
@given(
    conversation=conversations(),
    clears=st.sets(st.integers(min_value=0, max_value=6)),
    pops=st.dictionaries(st.integers(min_value=0, max_value=6), st.integers(1, 3)),
    batch=st.integers(min_value=1, max_value=5),
)
def test_any_agents_session_round_trips_exactly(
    store: Store,
    copy: Store,  # noqa: F811  (the fixture)
    monkeypatch: pytest.MonkeyPatch,
    conversation: tuple[list[list[dict[str, Any]]], Any, Any, Any],
    clears: set[int],
    pops: dict[int, int],
    batch: int,
) -> None:
    """Any conversation the SDK saves, popped and cleared between its
    chunks (units left open, orphaned, reopened by a pop, forgotten by a
    clear), in batches of any size. But an export says where the last
    clear() was, not the others: a unit an earlier one forgot is orphaned in
    the copy by the item after it — before the window's start, where
    nothing sends or reads it — so units are compared from there on."""
    monkeypatch.setattr(transfer_module, "_BATCH", batch)
    monkeypatch.setattr(transfer_module, "_HELD", 2 * batch)
    name = uuid.uuid4().hex

    async def go() -> None:
        session = TokenmemSession(name, store=store)
        for i, chunk in enumerate(conversation[0]):
            await session.add_items(chunk)
            for _ in range(pops.get(i, 0)):
                await session.pop_item()
            if i in clears:
                await session.clear_session()

    wait(go())
    dump = export(store, name)
    import_jsonl(copy, io.StringIO(dump))
    assert export(copy, name) == dump
    start = store.session(name).window_start
    if len(clears & set(range(len(conversation[0])))) <= 1:
        start = 0  # the one clear() is the last: every unit is as it was
    assert units(copy, name)[start:] == units(store, name)[start:]
    assert _after(stored(copy, name), start) == _after(stored(store, name), start)
    assert windows(copy, name) == windows(store, name)
    head = store.verify(name).head_digest
    assert copy.verify(name, expect_head=head).ok


def _after(state: tuple[list[tuple[Any, ...]], tuple[Any, ...]], start: int) -> Any:
    """:func:`stored`'s rows, their ``unit`` left out before ``start``."""
    rows, session_row = state
    return [(*r[:8], r[8] if r[0] >= start else "?", *r[9:]) for r in rows], session_row


def test_a_session_the_store_filled_with_both_kinds_round_trips(
    store: Store,
    copy: Store,  # noqa: F811  (the fixture)
) -> None:
    """The store holds chat messages and items in one session (a chat tool
    message may answer a function_call item, an item output a chat tool
    call): the import takes what the store took, and places it the same."""
    memory = ConversationTokenBufferMemory(store=store, session_id="mixed")
    session = TokenmemSession("mixed", store=store)
    wait(session.add_items([user("Paris?"), call("c_p", "Paris")]))
    memory.save_messages([{"role": "tool", "tool_call_id": "c_p", "content": "18C"}])
    chat_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c_r", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    memory.save_messages([{"role": "user", "content": "Rome?"}, chat_call])
    wait(session.add_items([output("c_r", "25C"), said("Rome 25C.")]))
    dump = export(store, "mixed")
    assert import_jsonl(copy, io.StringIO(dump)).imported == 7
    assert export(copy, "mixed") == dump
    assert units(copy, "mixed") == units(store, "mixed")
    assert stored(copy, "mixed") == stored(store, "mixed")
    assert windows(copy, "mixed") == windows(store, "mixed")


def _records(store: Store) -> list[dict[str, Any]]:
    fill(store, "agent")
    return [json.loads(line) for line in export(store, "agent").splitlines()]


def _tamper(records: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    """The first records of ``fill`` (WEATHER: a user message, reasoning,
    the calls c_p and c_r, their outputs, the reply) changed by ``how``."""
    r = [json.loads(json.dumps(x)) for x in records]
    reasoning, c_p, out_r = r[1], r[2], r[4]
    if how == "call_id":
        out_r["openai"]["call_id"] = "c_x"
    elif how == "call lost":
        del r[3]
    elif how == "no call_id":
        del out_r["openai"]["call_id"]
    elif how == "no arguments":
        del c_p["openai"]["arguments"]
    elif how == "content":
        c_p["content"] = 'get_weather({"city":"Pisa"})'
    elif how == "role":
        c_p["role"] = "human"
    elif how == "name":
        c_p["name"] = "bot"
    elif how == "type":
        reasoning["openai"]["type"] = ""
    elif how == "chat answer":  # a chat tool message the store would refuse here
        out_r["role"], out_r["openai"] = "tool", {"role": "tool", "tool_call_id": "c_x"}
        out_r["openai"]["content"] = out_r["content"]
    elif how == "chat after reasoning":  # and no session line: no clear() forgot it
        refusal = {"role": "assistant", "content": None, "refusal": "No."}
        r = [*r[:2], {**c_p, "role": "ai", "content": "No.", "openai": refusal}, *r[3:7]]
    return r


@pytest.mark.parametrize(
    ("how", "digests", "error"),
    [
        ("call_id", True, "line 5: its digest does not match the record"),
        ("call lost", True, "line 4: its digest does not match the record"),
        ("no call_id", False, "line 5: openai: a function_call_output needs a call_id (a str)"),
        ("no arguments", False, "line 3: openai: a function_call needs a name and arguments"),
        ("content", False, "line 3: content is not the text of openai's message"),
        ("role", False, "line 3: openai's function_call item does not make a 'human' message"),
        ("name", False, "line 3: name 'bot' is not openai's None"),
        ("type", False, "line 2: openai: type must be a str, not ''"),
        ("chat answer", False, "line 5: tool message answers 'c_x', which no open tool call"),
        (
            "chat after reasoning",
            False,
            "line 2: a reasoning item has no item the model made after it before line 3",
        ),
    ],
)
def test_a_tampered_item_fails_the_import_with_its_line(
    store: Store,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    how: str,
    digests: bool,
    error: str,
) -> None:
    """With its digests, a changed record breaks the chain. Without (a
    hand-written file), an item is checked as ``add_items`` checks it, and
    a chat message among items as ``save_messages`` would take it there."""
    records = [
        {**(r if digests else _undigested(json.dumps(r))), "session_id": "copy"}
        for r in _records(store)
    ]
    path = tmp_path / "tampered.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _tamper(records, how)))
    code, out, err = run(capsys, "--db", url_of(store.engine), "import", str(path))
    assert (code, out) == (1, "")
    assert err.startswith(f"tokenmem: {error}"), err
    assert len(err.strip().splitlines()) == 1
    assert [s.session_id for s in store.session_stats()] == ["agent"]  # nothing written


@pytest.mark.parametrize("how", ["call_id", "call lost"])
def test_an_item_the_rules_make_an_orphan_is_imported_as_one(store: Store, how: str) -> None:
    """The items' rules never refuse an order (the Runner goes on after a
    call it never answered): without digests, an output whose call is
    changed or lost is imported, as ``add_items`` takes it — an orphan,
    never sent, and c_p's unit orphaned by the reply."""
    records = [{**_undigested(json.dumps(r)), "session_id": "copy"} for r in _records(store)]
    # WEATHER's records (no session line: the window starts at 0)
    tampered = [r for r in _tamper(records, how) if r.get("position", 7) < 7]
    result = import_jsonl(store, [json.dumps(r) + "\n" for r in tampered])
    assert result.imported == len(tampered)
    window = json.loads(windows(store, "copy")[2])
    assert window[:2] == [WEATHER[0], WEATHER[-1]]  # no reasoning, call or output: orphans
    # the unit from the reasoning item (1) on: orphaned (-2) by the output
    # answering no open call, itself an orphan (-5), as is c_p's output then
    calls = [(1, -2), (2, -2), (3, -2)] if how == "call_id" else [(1, -2), (2, -2)]
    expected = [(0, None), *calls, (4, -5), (5, -6), (6, None)]
    assert units(store, "copy")[: len(expected)] == expected
