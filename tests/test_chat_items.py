"""Responses API items in the core (tokenmem.chat): roles, rendering and
counting checked against the documented rules written out again in plain
Python, and the unit rules on hand-made sequences. The stored windows are
tested on both databases in tests/test_agents.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmem import InvalidInputError, TokenCounter
from tokenmem.chat import (
    OpenUnit,
    as_openai,
    display_text,
    from_items,
    from_openai,
    place_items,
    reopen,
)
from tokenmem.window import CHAT_ROLES, count_message

ROLE = {"user": "human", "assistant": "ai", "system": "system", "developer": "developer"}
TEXT = ("text", "input_text", "output_text")
IMAGE = ("image_url", "input_image")


def reference_role(d: dict[str, Any]) -> str:
    """The docstring's mapping: a message's role; an output, tool; else ai."""
    if "role" in d:
        return ROLE[d["role"]]
    return "tool" if d["type"].endswith("_output") else "ai"


def parts_cost(counter: TokenCounter, parts: list[dict[str, Any]]) -> int:
    total = 0
    for p in parts:
        if p["type"] in TEXT:
            total += counter.count(p["text"])
        elif p["type"] in IMAGE:
            total += 85
        else:
            total += counter.count(json.dumps(p, ensure_ascii=False))
    return total


def item_cost(counter: TokenCounter, d: dict[str, Any]) -> int:
    """The documented rule: 3, the role, and the item's own part."""
    total = 3 + counter.count(CHAT_ROLES[reference_role(d)])
    kind = d.get("type", "message")
    if kind == "message":
        content = d["content"]
        return total + (
            counter.count(content) if isinstance(content, str) else parts_cost(counter, content)
        )
    if kind == "function_call":
        return total + 3 + counter.count(d["name"]) + counter.count(d["arguments"])
    if kind == "custom_tool_call":
        return total + 3 + counter.count(d["name"]) + counter.count(d["input"])
    if kind.endswith("_output") and isinstance(d.get("output"), str | list):
        output = d["output"]
        return total + (
            counter.count(output) if isinstance(output, str) else parts_cost(counter, output)
        )
    if kind == "reasoning":
        texts = [p["text"] for p in d.get("summary", []) + d.get("content", [])]
        texts += [d["encrypted_content"]] if "encrypted_content" in d else []
        return total + sum(counter.count(t) for t in texts)
    return total + counter.count(json.dumps(d, ensure_ascii=False))


def reference_text(d: dict[str, Any]) -> str:
    kind = d.get("type", "message")

    def parts(ps: list[dict[str, Any]]) -> str:
        return "\n".join(p["text"] if p["type"] in TEXT else f"[{p['type']}]" for p in ps)

    if kind == "message":
        return d["content"] if isinstance(d["content"], str) else parts(d["content"])
    if kind == "function_call":
        return f"{d['name']}({d['arguments']})"
    if kind == "custom_tool_call":
        return f"{d['name']}({d['input']})"
    if kind.endswith("_output") and isinstance(d.get("output"), str | list):
        return d["output"] if isinstance(d["output"], str) else parts(d["output"])
    if kind == "reasoning" and d.get("summary"):
        return "\n".join(p["text"] for p in d["summary"])
    return f"[{kind}]"


words = st.text(alphabet="ab xyz 你好。!\n{}", max_size=20)
call_ids = st.sampled_from(["call_1", "call_2", "c-3"])
text_parts = st.lists(
    st.one_of(
        words.map(lambda t: {"type": "input_text", "text": t}),
        words.map(lambda t: {"type": "output_text", "text": t, "annotations": []}),
        st.just({"type": "input_image", "image_url": "https://x.test/a.png", "detail": "low"}),
        st.just({"type": "input_file", "file_id": "file-1"}),
        words.map(lambda t: {"type": "refusal", "refusal": t}),
    ),
    min_size=1,
    max_size=3,
)
items = st.one_of(
    st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(list(ROLE)),
        st.one_of(words, text_parts),
    ),
    st.builds(
        lambda content, id_: {
            "id": id_,
            "type": "message",
            "role": "assistant",
            "content": content,
        },
        text_parts,
        st.just("msg_1"),
    ),
    st.builds(
        lambda c, name, args: {
            "type": "function_call",
            "call_id": c,
            "name": name,
            "arguments": args,
        },
        call_ids,
        st.sampled_from(["get_weather", "天气"]),
        words,
    ),
    st.builds(
        lambda c, name, text: {
            "type": "custom_tool_call",
            "call_id": c,
            "name": name,
            "input": text,
        },
        call_ids,
        st.just("patch"),
        words,
    ),
    st.builds(
        lambda c, out: {"type": "function_call_output", "call_id": c, "output": out},
        call_ids,
        st.one_of(words, text_parts),
    ),
    st.builds(
        lambda c: {
            "type": "computer_call_output",
            "call_id": c,
            "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,AAAA"},
        },
        call_ids,
    ),
    st.builds(
        lambda summary, secret: {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": t} for t in summary],
            **({"encrypted_content": secret} if secret else {}),
        },
        st.lists(words, max_size=2),
        st.one_of(st.none(), st.just("gAAAAB3x+/="), words),
    ),
    st.just({"type": "web_search_call", "id": "ws_1", "status": "completed"}),
    st.just({"type": "mcp_approval_request", "id": "mcpr_1", "name": "x", "arguments": "{}"}),
)


@settings(max_examples=200, deadline=None)
@given(d=items, encoding=st.sampled_from(["o200k_base", "cl100k_base"]))
def test_items_are_kept_rendered_and_counted_by_the_documented_rules(
    d: dict[str, Any], encoding: str
) -> None:
    counter = TokenCounter(encoding)
    (m,) = from_items([d])
    assert m.type == reference_role(d)
    assert m.content == reference_text(d) == display_text(d)
    assert json.dumps(as_openai(m)) == json.dumps(d)  # kept exactly (or rebuilt exactly)
    counts = count_message(counter, m.type, m.content, m.name, m.openai or as_openai(m))
    assert counts.chat_tokens + 3 == item_cost(counter, d)


def test_roles_and_text_of_an_agent_turn() -> None:
    turn = [
        {"content": "Weather in Paris?", "role": "user"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Ask"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"c":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "18C."}],
        },
    ]
    made = from_items(turn)
    assert [m.type for m in made] == ["human", "ai", "ai", "tool", "ai"]
    assert [m.content for m in made] == [
        "Weather in Paris?",
        "Ask",
        'get_weather({"c":1})',
        "18C",
        "18C.",
    ]
    assert all(m.openai == d for m, d in zip(made, turn, strict=True))  # all kept as given
    assert from_items([{"role": "user", "content": "hi"}])[0].openai is None  # rebuilt exactly


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ({"role": "tool", "content": "x"}, "a message's role must be one of"),
        ({"role": "user", "content": None}, "content must be a str or a list"),
        ({"role": "user", "content": [{"text": "no type"}]}, "content must be a str or a list"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "needs a call_id"),
        ({"type": "function_call", "call_id": "c", "arguments": "{}"}, "needs a name and"),
        ({"type": "function_call_output", "output": "x"}, "needs a call_id"),
        ({"type": "function_call_output", "call_id": "c", "output": ["x"]}, "content parts"),
        ({"role": "assistant", "content": "x", "tool_calls": []}, "no tool_calls"),
        ({"type": 3}, "type must be a str"),
        ({"type": "message", "role": "user", "content": float("inf")}, "not JSON"),
        ("not a dict", "must be a dict"),
    ],
)
def test_bad_items_are_refused(item: Any, error: str) -> None:
    with pytest.raises(InvalidInputError, match=error):
        from_items([{"role": "user", "content": "fine"}, item])


def test_a_chat_message_with_a_type_is_refused() -> None:
    """Chat Completions messages have no "type": one that has is a Responses
    item given to save_messages, whose rules it would not get."""
    with pytest.raises(InvalidInputError, match="has a 'type'"):
        from_openai([{"type": "function_call_output", "role": "tool", "tool_call_id": "c"}])


def fc(c: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": c, "name": "f", "arguments": "{}"}


def out(c: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": c, "output": "ok"}


USER = {"role": "user", "content": "hi"}
SAID = {"role": "assistant", "content": "said"}
THINK = {"type": "reasoning", "summary": []}
SEARCH = {"type": "web_search_call", "id": "ws", "status": "completed"}


@pytest.mark.parametrize(
    ("sequence", "units", "open_"),
    [
        # parallel calls, answered in any order: one unit
        ([USER, fc("a"), fc("b"), out("b"), out("a"), SAID], [None, None, 1, 1, 1, None], None),
        # reasoning starts the unit of what follows it
        ([THINK, fc("a"), out("a")], [None, 0, 0], None),
        ([THINK, THINK, SAID, USER], [None, 0, 0, None], None),
        ([THINK, SEARCH], [None, 0], None),
        # left open: calls unanswered, reasoning with nothing after it
        ([USER, fc("a"), fc("b"), out("a")], [None, None, 1, 1], (1, ["b"])),
        ([SAID, THINK], [None, None], (1, [])),
        # another item orphans an open unit; a stray output is an orphan of its own
        ([fc("a"), USER, out("a")], [-1, None, -3], None),
        ([THINK, USER], [-1, None], None),
        ([THINK, out("x")], [-1, -2], None),
        ([fc("a"), THINK, fc("b"), out("b")], [-1, None, 1, 1], None),
    ],
)
def test_units_of_items(
    sequence: list[dict[str, Any]], units: list[int | None], open_: tuple[int, list[str]] | None
) -> None:
    placed = place_items(from_items(sequence), None, 0)
    assert placed.units == units
    assert placed.orphaned is None
    assert (placed.after and (placed.after.position, placed.after.calls)) == open_


def test_units_go_on_across_saves() -> None:
    """An append goes on from the unit its session left open: answering it,
    joining it (more calls, the item after a reasoning item), or orphaning
    it — the stored rows of that unit then become orphans too."""
    session = OpenUnit(position=4, floor=40, calls=["a", "b"])
    placed = place_items(from_items([out("b"), fc("c"), out("a"), out("c")]), session, 7)
    assert placed.units == [4, 4, 4, 4] and placed.after is None and placed.orphaned is None
    placed = place_items(from_items([out("a")]), session, 7)
    assert placed.after == OpenUnit(4, 40, ["b"])
    placed = place_items(from_items([out("a"), USER]), session, 7)
    assert placed.units == [-5, None] and placed.orphaned == 4 and placed.after is None
    waiting = OpenUnit(position=2, floor=9, calls=[])  # a reasoning item
    assert place_items(from_items([SAID]), waiting, 3).units == [2]
    placed = place_items(from_items([USER, THINK]), waiting, 3)
    assert placed.units == [None, None] and placed.orphaned == 2
    assert placed.after == OpenUnit(4, -1, [])  # opened here: the writer fills in its floor


def test_reopen() -> None:
    """What a unit waits for once its newest item is popped."""
    assert reopen([fc("a"), fc("b"), out("b")]) == ["a"]
    assert reopen([fc("a"), out("a")]) is None
    assert reopen([THINK]) == []
    assert reopen([THINK, SAID]) is None
    assert reopen([out("x")]) is None  # a stray output: never a unit
    chat = from_openai(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}},
                    {"id": "t2", "type": "function", "function": {"name": "f", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "t2", "content": "x"},
        ]
    )
    assert reopen([as_openai(m) for m in chat]) == ["t1"]  # Chat Completions units too
