"""Export and import of OpenAI chat messages (issue 13): each record carries
the dict ``save_messages`` kept (``openai``), and an import gives back the
same windows, units and pinned prompt, byte for byte, on SQLite and
PostgreSQL, into the same database and into a fresh one; a tampered
``openai`` fails the import with its line number, nothing written."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from tokenmem import ConfigurationError, ConversationTokenBufferMemory, InvalidInputError, Store
from tokenmem import transfer as transfer_module
from tokenmem.models import MESSAGES, SESSIONS, session_uuid
from tokenmem.transfer import ImportResult, export_jsonl, import_jsonl

from .test_chat import WEATHER, conversations
from .test_cli import run, url_of
from .test_transfer import other_db  # noqa: F401  (fixture)


def windows(store: Store, session: str, encoding: str, limits: list[int]) -> list[str]:
    """Every window a memory loads, as JSON text (or the error it raises):
    messages and the string, with and without start_on."""
    seen = []
    for limit in limits:
        for start_on in (None, "human"):
            memory = ConversationTokenBufferMemory(
                store=store,
                session_id=session,
                encoding=encoding,
                max_token_limit=limit,
                start_on=start_on,  # type: ignore[arg-type]
            )
            try:
                seen.append(json.dumps(memory.load_messages()))
                seen.append(memory.buffer_as_str)
            except ConfigurationError as exc:  # the pinned prompt alone is over it
                seen.append(str(exc))
    return seen


def stored(store: Store, session: str) -> tuple[list[tuple[Any, ...]], tuple[Any, ...]]:
    """The session's rows as the window statement reads them: every column
    but the time of writing (the dict kept as JSON text, its keys' order
    too), and its session row's counters, pinned prompt and open tool-call
    unit (the encoding is every row's)."""
    sid, m, s = session_uuid("", session), MESSAGES.c, SESSIONS.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(
                m.position,
                m.turn,
                m.role,
                m.content,
                m.name,
                m.message,
                m.tool_calls,
                m.tool_call_id,
                m.unit,
                m.encoding,
                m.text_tokens,
                m.newline_tokens,
                m.chat_tokens,
                m.cum_floor,
            )
            .where(m.session_id == sid)
            .order_by(m.position)
        ).all()
        session_row = conn.execute(
            select(
                s.next_position,
                s.next_turn,
                s.floor_total,
                s.start_position,
                s.start_floor,
                s.open_position,
                s.open_floor,
                s.open_calls,
                s.pinned_first,
                s.pinned_last,
            ).where(s.id == sid)
        ).one()
    # A pinned prompt before the window's start is no longer sent (nor goes
    # on): where it stood is not carried (an export does not say where each
    # clear() was, only the last), so it is compared as absent.
    pinned = session_row.pinned_first, session_row.pinned_last
    if pinned[0] is not None and pinned[0] < session_row.start_position:
        pinned = (None, None)
    return [(*r[:5], json.dumps(r[5]), *r[6:]) for r in rows], (*session_row[:8], *pinned)


def export(store: Store, session: str) -> str:
    out = io.StringIO()
    export_jsonl(store, out, sessions=[session])
    return out.getvalue()


@pytest.fixture
def copy(other_db: Engine) -> Store:  # noqa: F811
    """A fresh database on the other backend."""
    return Store(other_db, upgrade=True)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chunks=conversations(),
    clears=st.sets(st.integers(min_value=0, max_value=9)),
    pins=st.sets(st.integers(min_value=0, max_value=9)),
    encoding=st.sampled_from(["o200k_base", "cl100k_base"]),
    batch=st.integers(min_value=1, max_value=6),
    limits=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=3),
)
def test_an_exported_session_imports_with_the_same_windows(
    store: Store,
    copy: Store,
    monkeypatch: pytest.MonkeyPatch,
    chunks: list[list[dict[str, Any]]],
    clears: set[int],
    pins: set[int],
    encoding: str,
    batch: int,
    limits: list[int],
) -> None:
    # Small batches: units and pinned runs cross the import's transactions.
    monkeypatch.setattr(transfer_module, "_BATCH", batch)
    monkeypatch.setattr(transfer_module, "_HELD", 2 * batch)
    session = uuid.uuid4().hex
    saver = ConversationTokenBufferMemory(store=store, session_id=session, encoding=encoding)
    pinning = ConversationTokenBufferMemory(
        store=store, session_id=session, encoding=encoding, system_message="Be brief."
    )
    cleared = False
    for i, chunk in enumerate(chunks):
        if cleared:  # clear() forgot the calls these tool messages answer
            while chunk and chunk[0]["role"] == "tool":
                chunk = chunk[1:]
        if chunk:
            saver.save_messages(chunk)
            cleared = False  # (a chunk of answers alone, dropped, leaves it cleared)
        if i in clears:  # perhaps with calls left open: then more messages follow them
            saver.clear()
            cleared = True
        if i in pins:  # the pinned system_message, saved again when it is not pinned
            pinned(pinning)
    was = windows(store, session, encoding, limits)
    rows = stored(store, session)
    dump = export(store, session)
    head = store.verify(session).head_digest

    # Into a fresh database on the other backend ...
    assert import_jsonl(copy, io.StringIO(dump)).imported == len(rows[0])
    assert windows(copy, session, encoding, limits) == was
    assert stored(copy, session) == rows
    assert export(copy, session) == dump  # the digests too
    assert copy.verify(session) == dataclasses.replace(store.verify(session), turns=0)
    # ... and into this one, the session erased first.
    store.erase(session)
    assert import_jsonl(store, io.StringIO(dump)).imported == len(rows[0])
    assert windows(store, session, encoding, limits) == was
    assert stored(store, session) == rows
    report = store.verify(session)
    assert report.ok and report.head_digest == head
    # Idempotent: all there, the same messages.
    assert import_jsonl(copy, io.StringIO(dump)) == ImportResult(1, 0, len(rows[0]))
    # The pinned system_message is found where it was: loaded on either, it
    # is saved again (or not) alike.
    loads = [
        pinned(
            ConversationTokenBufferMemory(
                store=s, session_id=session, encoding=encoding, system_message="Be brief."
            )
        )
        for s in (store, copy)
    ]
    assert loads[0] == loads[1]
    assert stored(copy, session) == stored(store, session)


def pinned(memory: ConversationTokenBufferMemory) -> str:
    """The memory's window, its system_message saved first if not pinned —
    or why not: refused while tool calls are open."""
    try:
        return json.dumps(memory.load_messages())
    except InvalidInputError as exc:
        return str(exc)


def test_a_pinned_prompt_saved_again_after_clear_stays_pinned(store: Store, copy: Store) -> None:
    """clear() ends a run of system messages: the prompt saved right after it
    is pinned alone. An import writes the run as one; the session line's
    window start splits it again."""
    memory = ConversationTokenBufferMemory(
        store=store, session_id="s", max_token_limit=100, system_message="Be brief."
    )
    memory.load_messages()  # saved at 0
    memory.clear()
    memory.load_messages()  # saved again at 1: a new run
    memory.save_messages(WEATHER)
    assert import_jsonl(copy, io.StringIO(export(store, "s"))).imported == 7
    again = ConversationTokenBufferMemory(
        store=copy, session_id="s", max_token_limit=100, system_message="Be brief."
    )
    assert json.dumps(again.load_messages()) == json.dumps(memory.load_messages())
    assert copy.session("s").next_position == 7  # pinned: not saved a third time
    assert stored(copy, "s") == stored(store, "s")


def test_records_carry_the_openai_dict_only_when_kept(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store, session_id="s")
    memory.save_messages([{"role": "developer", "content": "metric"}, *WEATHER])
    records = [json.loads(line) for line in export(store, "s").splitlines()[:-1]]
    assert [r["role"] for r in records] == ["developer", "human", "ai", "tool", "tool", "ai"]
    assert ["openai" in r for r in records] == [False, False, True, True, True, False]
    assert records[2]["openai"] == WEATHER[1]
    assert list(records[2]["openai"]) == ["role", "content", "tool_calls"]  # in its order
    assert records[3]["openai"] == {"role": "tool", "tool_call_id": "call_r", "content": "25C"}
    assert records[2]["content"] == (
        'get_weather({"city": "Paris"})\nget_weather({"city": "Rome"})'
    )


def test_history_jsonl_imports_with_its_tool_calls(
    store: Store, copy: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    memory = ConversationTokenBufferMemory(store=store, session_id="s", max_token_limit=100)
    memory.save_messages(WEATHER)
    path = tmp_path / "history.jsonl"
    code, out, _ = run(capsys, "--db", url_of(store.engine), "history", "s", "--format", "jsonl")
    assert code == 0
    path.write_text(out, encoding="utf-8")
    code, out, err = run(capsys, "--db", url_of(copy.engine), "import", str(path))
    assert code == 0, err
    assert out.strip() == "5 message(s) imported into 1 session(s); 0 already there"
    loaded = ConversationTokenBufferMemory(store=copy, session_id="s", max_token_limit=100)
    assert json.dumps(loaded.load_messages()) == json.dumps(WEATHER)


def test_units_cross_the_imports_batches(
    store: Store, copy: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches end anywhere, between a call and its answers too (the session
    keeps the unit open till the next), with interleaved sessions too."""
    monkeypatch.setattr(transfer_module, "_BATCH", 2)
    monkeypatch.setattr(transfer_module, "_HELD", 3)
    for session in ("a", "b"):
        memory = ConversationTokenBufferMemory(store=store, session_id=session)
        for _ in range(3):
            memory.save_messages(WEATHER)
    dumps = [export(store, s).splitlines(True) for s in ("a", "b")]
    interleaved = [line for pair in zip(*dumps, strict=True) for line in pair]
    assert import_jsonl(copy, interleaved) == ImportResult(2, 30, 0)
    for session in ("a", "b"):
        assert stored(copy, session) == stored(store, session)
        assert windows(copy, session, "o200k_base", [60, 500]) == windows(
            store, session, "o200k_base", [60, 500]
        )


def test_a_held_message_with_another_openai_dict_is_an_error(store: Store) -> None:
    ConversationTokenBufferMemory(store=store, session_id="s").save_messages(WEATHER)
    records = [_undigested(line) for line in export(store, "s").splitlines()]
    records[3]["openai"]["extra"] = 1  # the same text: another message
    lines = [json.dumps(r) + "\n" for r in records]
    with pytest.raises(InvalidInputError, match=r"^line 4: .*at position 3 \(its openai differs"):
        import_jsonl(store, lines)


# --- a tampered file: refused with its line, nothing written -----------------------


def _undigested(line: str) -> dict[str, Any]:
    """An exported line without its digests, as written before issue 15 or
    by hand: the import checks its rules, not a chain (tests/test_digest.py)."""
    return {k: v for k, v in json.loads(line).items() if not k.endswith("digest")}


def _tamper(records: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    """``records`` (a user message, then WEATHER's tool calls, answers and
    reply saved apart) changed by ``how``."""
    r = [json.loads(json.dumps(x)) for x in records]
    call, answer = r[1], r[2]  # the assistant message with tool calls, a tool answer
    if how == "not an object":
        call["openai"] = "hello"
    elif how == "role":
        answer["role"] = "human"
    elif how == "content":
        call["content"] = "get_weather(Paris)"
    elif how == "name":
        call["openai"]["name"] = "bot"
    elif how == "no tool_call_id":
        del answer["openai"]["tool_call_id"]
    elif how == "bad tool_calls":
        call["openai"]["tool_calls"][0]["function"] = "get_weather"
    elif how == "tool without openai":
        del answer["openai"]
    elif how == "answers nothing":
        answer["openai"]["tool_call_id"] = "call_x"
    elif how == "answer lost":
        del r[3]
    elif how == "call lost":
        del r[1]
    elif how == "gap":
        for x in r[2:]:
            if "position" in x:
                x["position"] += 1
    elif how == "NUL":
        answer["openai"]["content"] = [{"type": "text", "text": "a\x00b"}]
    return r


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("not an object", "line 2: openai must be an object or null, not a string"),
        ("role", "line 3: openai's role 'tool' does not make a 'human' message"),
        ("content", "line 2: content is not the text of openai's message"),
        ("name", "line 2: name None is not openai's 'bot'"),
        ("no tool_call_id", "line 3: openai: a tool message needs a tool_call_id (a str)"),
        ("bad tool_calls", "line 2: openai.tool_calls[0] must be {"),
        ("tool without openai", "line 3: a tool message needs its openai object"),
        ("answers nothing", "line 3: tool message answers 'call_x', which no open tool call"),
        (
            "answer lost",
            "line 2: tool_calls ['call_p'] have no tool message answering them before line 4",
        ),
        ("call lost", "line 2: tool message answers 'call_r', which no open tool call"),
        ("gap", "line 3: position 3 is not right after position 1"),
        ("NUL", "line 3: openai contains a NUL character"),
    ],
)
def test_a_tampered_openai_value_fails_the_import_with_its_line(
    store: Store,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    how: str,
    error: str,
) -> None:
    memory = ConversationTokenBufferMemory(store=store, session_id="s")
    memory.save_messages([{"role": "user", "content": "first"}])
    memory.save_messages(WEATHER[1:])
    records = [
        {**_undigested(line), "session_id": "copy"} for line in export(store, "s").splitlines()
    ]
    path = tmp_path / "tampered.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _tamper(records, how)))
    code, out, err = run(capsys, "--db", url_of(store.engine), "import", str(path))
    assert (code, out) == (1, "")
    assert err.startswith(f"tokenmem: {error}"), err
    assert len(err.strip().splitlines()) == 1
    assert store.count(all_owners=True) == 5  # "s"'s: not the good first line either
    assert [s.session_id for s in store.session_stats()] == ["s"]


def test_calls_left_open_are_imported_open(store: Store, copy: Store) -> None:
    """A session whose last calls are not all answered: imported with them
    open (kept out of windows), and their answers can be saved on the copy."""
    memory = ConversationTokenBufferMemory(store=store, session_id="s", max_token_limit=500)
    memory.save_messages(WEATHER[:3])  # call_p not answered yet
    assert import_jsonl(copy, io.StringIO(export(store, "s"))).imported == 3
    assert stored(copy, "s") == stored(store, "s")
    assert copy.session("s").next_position == 3
    for s in (store, copy):
        again = ConversationTokenBufferMemory(store=s, session_id="s", max_token_limit=500)
        assert again.load_messages() == WEATHER[:1]  # the open unit is kept out
        again.save_messages(WEATHER[3:])
        assert json.dumps(again.load_messages()) == json.dumps(WEATHER)
    assert stored(copy, "s") == stored(store, "s")


def test_calls_forgotten_by_clear_must_be_before_the_window(
    store: Store, copy: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """clear() forgets calls left open; a message may follow them then. An
    import accepts that only where the session line's window starts after
    them: anywhere else, an answer was lost."""
    memory = ConversationTokenBufferMemory(store=store, session_id="s", max_token_limit=500)
    memory.save_messages(WEATHER[:2])  # the calls, no answers
    memory.clear()
    memory.save_messages([{"role": "user", "content": "never mind"}])
    dump = export(store, "s")
    assert import_jsonl(copy, io.StringIO(dump)).imported == 3
    assert stored(copy, "s") == stored(store, "s")
    assert windows(copy, "s", "o200k_base", [500]) == windows(store, "s", "o200k_base", [500])

    records = [{**json.loads(line), "session_id": "t"} for line in dump.splitlines()]
    records[-1]["window_start"] = 0  # as if never cleared
    tampered, history = tmp_path / "tampered.jsonl", tmp_path / "history.jsonl"
    tampered.write_text("".join(json.dumps(r) + "\n" for r in records))
    history.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))  # no session line
    for path, why in [
        (tampered, "yet the session's window starts at 0, not after them"),
        (history, "and no session line says the window starts after them"),
    ]:
        code, _, err = run(capsys, "--db", url_of(store.engine), "import", str(path))
        assert code == 1
        assert err.strip() == (
            "tokenmem: line 2: tool_calls ['call_p', 'call_r'] have no tool message answering "
            f"them before line 3, {why}: only clear() forgets unanswered calls (was a line lost?)"
        )
    assert [s.session_id for s in store.session_stats()] == ["s"]
