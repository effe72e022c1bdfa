"""The sessions ``window_load.py`` measures: a block of each shape written by
tokenmem itself, copied on the server with SQL, and checked (the module
docstring of ``window_load.py`` has the details)::

    seconds = fill(store, (100, 2_000, 10_000), 10, TokenCounter("o200k_base"))

Two shapes. **text**: human/ai turns saved with ``Store.append_turns``.
**tools**: a pinned system prompt, then turns of OpenAI chat messages saved
with ``memory.save_messages`` — a user message, an assistant message calling
one to three tools at once, the tools' answers, the assistant's reply — so
that every copy holds units (``tokenmem_messages.unit``) and the session
row its pinned prompt (``pinned_first``, ``pinned_last``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common import ENCODING, OWNER, database, driver_id, sentence_text
from sqlalchemy import Connection, Engine, select, text

from tokenmem import ConversationTokenBufferMemory, Message, Store, TokenCounter
from tokenmem.chat import from_openai
from tokenmem.models import MESSAGES, session_uuid

BLOCK = 2_000  # messages of a block, copied into the longer sessions
FILLER = 1_000  # messages per filler session
SEED = 20_241_129
# Columns a copy takes from the block as they are; position, turn, cum_floor
# and unit are shifted by whole blocks.
COPIED = (
    "role, content, name, metadata, created_at, encoding, text_tokens, newline_tokens,"
    " chat_tokens, message, tool_calls, tool_call_id"
)
COLUMNS = f"session_id, position, turn, cum_floor, unit, {COPIED}"
TOOL_CUTS = (100, 1_000, BLOCK)  # the tool block's turns end at these counts
TOOL_NAMES = ("search_docs", "get_weather", "lookup_order", "run_query", "read_file")
SYSTEM_PROMPT = (
    "You are the support assistant of an online shop. Call tools to look things up; "
    + sentence_text(random.Random(SEED), 60)
)


@dataclass(frozen=True)
class Shape:
    """A kind of session: its sessions are named ``{prefix}-{size}`` and hold
    ``head`` messages (the pinned prompt) before their ``size`` others."""

    name: str
    prefix: str
    head: int

    def session(self, size: int) -> str:
        return f"{self.prefix}-{size}"


TEXT = Shape("text", "bench", 0)
TOOLS = Shape("tools", "bench-tools", 1)
SHAPES = (TEXT, TOOLS)


def session_name(size: int) -> str:
    return TEXT.session(size)


def make_turns(messages: int, seed: int) -> list[list[Message]]:
    """``messages // 2`` deterministic human/ai turns (4 to 48 words a message)."""
    rng = random.Random(seed)
    return [
        [
            Message("human", sentence_text(rng, rng.randint(4, 48))),
            Message("ai", sentence_text(rng, rng.randint(4, 48))),
        ]
        for _ in range(messages // 2)
    ]


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- filling -------------------------------------------------------------------


def _floor_sql(dialect: str) -> str:
    """A message's floor (tokenmem.window.Counts.floor) over tokenmem_messages."""
    least = "MIN" if dialect == "sqlite" else "LEAST"
    return f"{least}(text_tokens + COALESCE(newline_tokens, 1) + 1, chat_tokens + 3)"


def _series(dialect: str, last: str) -> str:
    """Rows ``g`` = 0..``last`` (a bound parameter's name)."""
    if dialect == "postgresql":
        return f"SELECT g FROM generate_series(0, :{last}) AS g"
    return (
        f"WITH RECURSIVE s(g) AS (SELECT 0 UNION ALL SELECT g + 1 FROM s WHERE g < :{last})"
        " SELECT g FROM s"
    )


@dataclass(frozen=True)
class Block:
    """A shape's block session as written by tokenmem: its pinned prompt
    (``shape.head`` messages), then ``BLOCK`` messages that the longer
    sessions repeat."""

    shape: Shape
    sid: object  # the block session's id as the driver takes it
    # per position, and at head + BLOCK the session row's floor_total / next_turn
    cum_floor: dict[int, int]
    turn: dict[int, int]

    @property
    def floor(self) -> int:
        """The floors of one repetition."""
        head = self.shape.head
        return self.cum_floor[head + BLOCK] - self.cum_floor[head]

    @property
    def turns(self) -> int:
        head = self.shape.head
        return self.turn[head + BLOCK] - self.turn[head]

    def session_row(self, size: int) -> tuple[int, int, int]:
        """(next_position, next_turn, floor_total) of a session of ``size``
        messages after its head: ``size // BLOCK`` repetitions, then the
        first ``size % BLOCK`` messages of one (which must end a turn)."""
        head = self.shape.head
        whole, rest = divmod(size, BLOCK)
        cut = head + rest
        if rest and self.turn[cut] == self.turn[cut - 1]:
            raise RuntimeError(f"{self.shape.name}: {size:,} messages end inside a turn")
        return (
            head + size,
            whole * self.turns + self.turn[cut],
            whole * self.floor + self.cum_floor[cut],
        )


def read_block(conn: Connection, dialect: str, shape: Shape) -> Block:
    sid = driver_id(dialect, session_uuid(OWNER, shape.session(BLOCK)))
    total, positions, turns = conn.execute(
        text("SELECT floor_total, next_position, next_turn FROM tokenmem_sessions WHERE id = :id"),
        {"id": sid},
    ).one()
    if positions != shape.head + BLOCK:
        raise RuntimeError(f"the {shape.name} block has {positions} messages")
    rows = conn.execute(
        text("SELECT position, cum_floor, turn FROM tokenmem_messages WHERE session_id = :id"),
        {"id": sid},
    ).all()
    cum = {int(p): int(c) for p, c, _ in rows} | {positions: int(total)}
    turn = {int(p): int(t) for p, _, t in rows} | {positions: int(turns)}
    return Block(shape, sid, cum, turn)


def _new_session(
    conn: Connection,
    dialect: str,
    name: str,
    row: tuple[int, int, int],
    pinned: tuple[int, int] | None = None,
) -> object:
    sid = driver_id(dialect, session_uuid(OWNER, name))
    conn.execute(
        text(
            "INSERT INTO tokenmem_sessions (id, owner_id, name, encoding, next_position,"
            " next_turn, floor_total, start_position, start_floor, next_call, created_at,"
            " updated_at, pinned_first, pinned_last) VALUES (:id, :owner, :name, :enc, :n,"
            " :turns, :total, 0, 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :pin0, :pin1)"
        ),
        {
            "id": sid,
            "owner": OWNER,
            "name": name,
            "enc": ENCODING,
            "n": row[0],
            "turns": row[1],
            "total": row[2],
            "pin0": pinned[0] if pinned else None,
            "pin1": pinned[1] if pinned else None,
        },
    )
    return sid


def copy_session(conn: Connection, dialect: str, block: Block, size: int) -> None:
    """The session of ``size`` messages after its head: the block's head,
    then its other messages copied whole ``size // BLOCK`` times and then
    the first ``size % BLOCK`` of them."""
    head = block.shape.head
    sid = _new_session(
        conn,
        dialect,
        block.shape.session(size),
        block.session_row(size),
        (0, head - 1) if head else None,
    )
    select_copy = (
        f"INSERT INTO tokenmem_messages ({COLUMNS})"
        " SELECT :sid, b.position + g * :block, b.turn + g * :turns, b.cum_floor + g * :floor,"
        f" b.unit + g * :block, {', '.join(f'b.{c.strip()}' for c in COPIED.split(','))}"
        f" FROM ({_series(dialect, 'last')}) AS series CROSS JOIN tokenmem_messages AS b"
        " WHERE b.session_id = :src AND g >= :first AND b.position >= :lo"
        " AND b.position < :upto ORDER BY g, b.position"
    )
    common = {"sid": sid, "src": block.sid, "block": BLOCK, "turns": block.turns}
    common["floor"] = block.floor
    whole, rest = divmod(size, BLOCK)
    for first, last, lo, upto in (
        (0, 0, 0, head),  # the head, once
        (0, whole - 1, head, head + BLOCK),
        (whole, whole, head, head + rest),
    ):
        if last >= first and upto > lo:
            conn.execute(
                text(select_copy), {**common, "first": first, "last": last, "lo": lo, "upto": upto}
            )


def copy_filler(conn: Connection, dialect: str, block: Block, first: int, count: int) -> None:
    """Filler sessions ``first`` .. ``first + count - 1``, the text block's
    first ``FILLER`` messages each."""
    names = [f"filler-{i:05d}" for i in range(first, first + count)]
    for name in names:
        _new_session(conn, dialect, name, block.session_row(FILLER))
    conn.execute(
        text(
            f"INSERT INTO tokenmem_messages ({COLUMNS})"
            " SELECT s.id, b.position, b.turn, b.cum_floor, b.unit,"
            f" {', '.join(f'b.{c.strip()}' for c in COPIED.split(','))}"
            " FROM tokenmem_sessions AS s CROSS JOIN tokenmem_messages AS b"
            " WHERE s.name >= :lo AND s.name <= :hi AND s.owner_id = :owner"
            " AND b.session_id = :src AND b.position < :upto ORDER BY s.name, b.position"
        ),
        {"lo": names[0], "hi": names[-1], "owner": OWNER, "src": block.sid, "upto": FILLER},
    )


def tool_turns(seed: int) -> list[list[dict[str, Any]]]:
    """Deterministic turns of OpenAI chat messages, ``BLOCK`` in all and
    ending a turn at each of ``TOOL_CUTS``: a user message, an assistant
    message calling one to three tools at once (content null), each tool's
    answer (JSON text), the assistant's reply."""
    rng = random.Random(seed)
    turns: list[list[dict[str, Any]]] = []
    count = 0
    for cut in TOOL_CUTS:
        while count < cut:
            # a turn has 4 to 6 messages: leave what turns can still fill
            calls = rng.choice([n for n in (1, 2, 3) if _fillable(cut - count - 3 - n)])
            turns.append(_tool_turn(rng, len(turns), calls))
            count += 3 + calls
    return turns


def _fillable(left: int) -> bool:
    """Whether ``left`` messages are whole turns of 4 to 6 messages."""
    return left == 0 or (left >= 4 and left != 7)


def _tool_turn(rng: random.Random, turn: int, calls: int) -> list[dict[str, Any]]:
    ids = [f"call_{turn:04d}_{k}" for k in range(calls)]
    ask = [
        {
            "id": call,
            "type": "function",
            "function": {
                "name": rng.choice(TOOL_NAMES),
                "arguments": json.dumps(
                    {"query": sentence_text(rng, rng.randint(2, 8)), "limit": rng.randint(1, 20)}
                ),
            },
        }
        for call in ids
    ]
    return [
        {"role": "user", "content": sentence_text(rng, rng.randint(4, 40))},
        {"role": "assistant", "content": None, "tool_calls": ask},
        *(
            {
                "role": "tool",
                "tool_call_id": call,
                "content": json.dumps(
                    {"status": "ok", "result": sentence_text(rng, rng.randint(10, 80))}
                ),
            }
            for call in ids
        ),
        {"role": "assistant", "content": sentence_text(rng, rng.randint(8, 60))},
    ]


def write_blocks(store: Store, counter: TokenCounter) -> None:
    """The two blocks, written by tokenmem: the text block with
    ``append_turns`` in one call, the tool block as an application writes
    it — the memory's ``system_message`` saved by its first load, then one
    ``save_messages`` call per turn."""
    written = store.append_turns(TEXT.session(BLOCK), make_turns(BLOCK, SEED), counter)
    if written != BLOCK:
        raise RuntimeError(f"wrote {written} messages, expected {BLOCK}")
    memory = ConversationTokenBufferMemory(
        store=store,
        session_id=TOOLS.session(BLOCK),
        encoding=ENCODING,
        system_message=SYSTEM_PROMPT,
    )
    memory.load_memory_variables({})
    for turn in tool_turns(SEED):
        memory.save_messages(turn)


def fill(
    store: Store, sizes: tuple[int, ...], filler_sessions: int, counter: TokenCounter
) -> dict[str, float]:
    """Fill the database (see the module docstring); return seconds per step."""
    seconds: dict[str, float] = {}
    dialect = store.dialect
    t0 = time.perf_counter()
    write_blocks(store, counter)
    seconds["blocks (tokenmem)"] = time.perf_counter() - t0
    log(f"blocks written in {seconds['blocks (tokenmem)']:.1f} s")
    engine = store.engine
    with engine.begin() as conn:
        blocks = [read_block(conn, dialect, shape) for shape in SHAPES]
    for block in blocks:
        for size in sizes:
            if size == BLOCK:
                continue
            t0 = time.perf_counter()
            with engine.begin() as conn:
                copy_session(conn, dialect, block, size)
            step = f"{block.shape.name} {size:,}"
            seconds[step] = time.perf_counter() - t0
            log(f"{step}: copied in {seconds[step]:.1f} s")
    t0 = time.perf_counter()
    step = 500
    for first in range(0, filler_sessions, step):
        with engine.begin() as conn:
            copy_filler(conn, dialect, blocks[0], first, min(step, filler_sessions - first))
        log(f"filler sessions {first + step:,} of {filler_sessions:,}")
    seconds[f"filler ({filler_sessions:,} x {FILLER:,})"] = time.perf_counter() - t0
    return seconds


def table_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM tokenmem_messages")).scalar_one())


# --- checking the fill ---------------------------------------------------------


def check_session(conn: Connection, dialect: str, shape: Shape, size: int) -> None:
    """Positions gapless, ``cum_floor`` the running sum of the earlier floors,
    the session row's counters in step (one pass in SQL); in a tool session
    also its pinned prompt, and every tool message (and no other) in the
    unit of an assistant message with tool calls."""
    sid = driver_id(dialect, session_uuid(OWNER, shape.session(size)))
    found = conn.execute(
        text(
            "SELECT COUNT(*), MIN(position), MAX(position), MAX(turn),"
            " SUM(CASE WHEN cum_floor = before THEN 0 ELSE 1 END), MAX(cum_floor + floor)"
            " FROM (SELECT position, turn, cum_floor, floor, COALESCE(SUM(floor) OVER"
            " (ORDER BY position ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before"
            f" FROM (SELECT position, turn, cum_floor, {_floor_sql(dialect)} AS floor"
            " FROM tokenmem_messages WHERE session_id = :id) AS m) AS checked"
        ),
        {"id": sid},
    ).one()
    row = conn.execute(
        text(
            "SELECT next_position, next_turn, floor_total, pinned_first, pinned_last"
            " FROM tokenmem_sessions WHERE id = :id"
        ),
        {"id": sid},
    ).one()
    n = shape.head + size
    expected = (n, 0, n - 1, row.next_turn - 1, 0, row.floor_total)
    pinned = (0, shape.head - 1) if shape.head else (None, None)
    if tuple(found) != expected or (row.next_position, *row[3:]) != (n, *pinned):
        raise RuntimeError(f"{shape.session(size)} is inconsistent: {found} / {tuple(row)}")
    if shape is not TOOLS:
        return
    wrong = conn.execute(
        text(
            "SELECT COUNT(*) FROM tokenmem_messages AS m WHERE m.session_id = :id AND ("
            " (m.role = 'tool') <> (m.unit IS NOT NULL) OR (m.position < :head) <>"
            " (m.role = 'system') OR (m.unit IS NOT NULL AND NOT EXISTS (SELECT 1"
            " FROM tokenmem_messages AS a WHERE a.session_id = m.session_id"
            " AND a.position = m.unit AND a.role = 'ai' AND a.tool_calls IS NOT NULL)))"
        ),
        {"id": sid, "head": shape.head},
    ).scalar_one()
    if wrong:
        raise RuntimeError(f"{shape.session(size)}: {wrong} messages out of their units")


def check_copies(store: Store, sizes: Sequence[int], counter: TokenCounter) -> int:
    """Raise unless the copies hold what tokenmem writes: the first two
    blocks of a copied tool session must equal, column for column (the
    session and the time aside), the session ``Store.append_turns`` writes
    from the same turns in a scratch database. Returns the messages compared
    (0 without a copy of two blocks)."""
    size = min((s for s in sizes if s >= 2 * BLOCK), default=None)
    if size is None:
        return 0
    turns = [[Message("system", SYSTEM_PROMPT)]] + [from_openai(t) for t in tool_turns(SEED)] * 2
    with database(store.dialect, "bench_check") as url:
        scratch = Store(url, upgrade=True)
        try:
            scratch.append_turns("check", turns, counter)
            expected = _rows(scratch.engine, "check", 1 + 2 * BLOCK)
        finally:
            scratch.close()
    if _rows(store.engine, TOOLS.session(size), len(expected)) != expected:
        raise RuntimeError(f"{TOOLS.session(size)} is not what tokenmem writes")
    return len(expected)


def _rows(engine: Engine, name: str, upto: int) -> list[Any]:
    m = MESSAGES.c
    columns = [c for c in MESSAGES.c if c.name not in ("session_id", "created_at")]
    with engine.connect() as conn:
        found = conn.execute(
            select(*columns)
            .where(m.session_id == session_uuid(OWNER, name), m.position < upto)
            .order_by(m.position)
        )
        return [tuple(row) for row in found]
