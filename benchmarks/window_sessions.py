"""The sessions ``window_load.py`` measures: written once by tokenmem, copied
on the server with SQL, and checked (the module docstring of
``window_load.py`` has the details)."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

from common import ENCODING, OWNER, driver_id, sentence_text
from sqlalchemy import Connection, Engine, text

from tokenmem import Message, Store, TokenCounter
from tokenmem.models import session_uuid

BLOCK = 2_000  # the session written with append_turns, copied into the others
FILLER = 1_000  # messages per filler session
SEED = 20_241_129
COLUMNS = (
    "session_id, position, turn, role, content, name, metadata, created_at, encoding,"
    " text_tokens, newline_tokens, chat_tokens, cum_floor"
)


def session_name(size: int) -> str:
    return f"bench-{size}"


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
    sid: object  # the block session's id as the driver takes it
    floor_total: int
    cum_floor: dict[int, int]  # position -> cum_floor, for cutting shorter sessions


def read_block(conn: Connection, dialect: str) -> Block:
    sid = driver_id(dialect, session_uuid(OWNER, session_name(BLOCK)))
    total, positions, turns = conn.execute(
        text("SELECT floor_total, next_position, next_turn FROM tokenmem_sessions WHERE id = :id"),
        {"id": sid},
    ).one()
    if (positions, turns) != (BLOCK, BLOCK // 2):
        raise RuntimeError(f"the block has {positions} messages in {turns} turns")
    cum = dict(
        conn.execute(
            text("SELECT position, cum_floor FROM tokenmem_messages WHERE session_id = :id"),
            {"id": sid},
        ).all()
    )
    return Block(sid, int(total), {int(p): int(c) for p, c in cum.items()})


def _new_session(conn: Connection, dialect: str, name: str, size: int, total: int) -> object:
    sid = driver_id(dialect, session_uuid(OWNER, name))
    conn.execute(
        text(
            "INSERT INTO tokenmem_sessions (id, owner_id, name, encoding, next_position,"
            " next_turn, floor_total, start_position, start_floor, next_call, created_at,"
            " updated_at) VALUES (:id, :owner, :name, :enc, :n, :turns, :total, 0, 0, 0,"
            " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
        ),
        {
            "id": sid,
            "owner": OWNER,
            "name": name,
            "enc": ENCODING,
            "n": size,
            "turns": size // 2,
            "total": total,
        },
    )
    return sid


def copy_session(conn: Connection, dialect: str, block: Block, size: int) -> None:
    """The session ``bench-<size>``: the block's messages, copied whole
    ``size // BLOCK`` times and then its first ``size % BLOCK`` messages."""
    whole, rest = divmod(size, BLOCK)
    total = whole * block.floor_total + (block.cum_floor[rest] if rest else 0)
    sid = _new_session(conn, dialect, session_name(size), size, total)
    select_copy = (
        f"INSERT INTO tokenmem_messages ({COLUMNS})"
        " SELECT :sid, b.position + g * :block, b.turn + g * :turns, b.role, b.content,"
        " b.name, b.metadata, b.created_at, b.encoding, b.text_tokens, b.newline_tokens,"
        " b.chat_tokens, b.cum_floor + g * :floor"
        " FROM ({series}) AS series CROSS JOIN tokenmem_messages AS b"
        " WHERE b.session_id = :src AND g >= :first AND b.position < :upto"
        " ORDER BY g, b.position"
    )
    common = {"sid": sid, "src": block.sid, "block": BLOCK, "turns": BLOCK // 2}
    common["floor"] = block.floor_total
    if whole:
        sql = select_copy.format(series=_series(dialect, "last"))
        conn.execute(text(sql), {**common, "first": 0, "last": whole - 1, "upto": BLOCK})
    if rest:
        sql = select_copy.format(series=_series(dialect, "last"))
        conn.execute(text(sql), {**common, "first": whole, "last": whole, "upto": rest})


def copy_filler(conn: Connection, dialect: str, block: Block, first: int, count: int) -> None:
    """Filler sessions ``first`` .. ``first + count - 1``, the block's first
    ``FILLER`` messages each."""
    names = [f"filler-{i:05d}" for i in range(first, first + count)]
    for name in names:
        _new_session(conn, dialect, name, FILLER, block.cum_floor[FILLER])
    conn.execute(
        text(
            f"INSERT INTO tokenmem_messages ({COLUMNS})"
            " SELECT s.id, b.position, b.turn, b.role, b.content, b.name, b.metadata,"
            " b.created_at, b.encoding, b.text_tokens, b.newline_tokens, b.chat_tokens,"
            " b.cum_floor FROM tokenmem_sessions AS s CROSS JOIN tokenmem_messages AS b"
            " WHERE s.name >= :lo AND s.name <= :hi AND s.owner_id = :owner"
            " AND b.session_id = :src AND b.position < :upto ORDER BY s.name, b.position"
        ),
        {"lo": names[0], "hi": names[-1], "owner": OWNER, "src": block.sid, "upto": FILLER},
    )


def fill(
    store: Store, sizes: tuple[int, ...], filler_sessions: int, counter: TokenCounter
) -> dict[str, float]:
    """Fill the database (see the module docstring); return seconds per step."""
    seconds: dict[str, float] = {}
    dialect = store.dialect
    t0 = time.perf_counter()
    written = store.append_turns(session_name(BLOCK), make_turns(BLOCK, SEED), counter)
    if written != BLOCK:
        raise RuntimeError(f"wrote {written} messages, expected {BLOCK}")
    seconds["block (append_turns)"] = time.perf_counter() - t0
    log(f"block of {BLOCK:,} written in {seconds['block (append_turns)']:.1f} s")
    engine = store.engine
    with engine.begin() as conn:
        block = read_block(conn, dialect)
    for size in sizes:
        if size == BLOCK:
            continue
        t0 = time.perf_counter()
        with engine.begin() as conn:
            copy_session(conn, dialect, block, size)
        seconds[f"{size:,}"] = time.perf_counter() - t0
        log(f"session of {size:,} copied in {seconds[f'{size:,}']:.1f} s")
    t0 = time.perf_counter()
    step = 500
    for first in range(0, filler_sessions, step):
        with engine.begin() as conn:
            copy_filler(conn, dialect, block, first, min(step, filler_sessions - first))
        log(f"filler sessions {first + step:,} of {filler_sessions:,}")
    seconds[f"filler ({filler_sessions:,} x {FILLER:,})"] = time.perf_counter() - t0
    return seconds


def table_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM tokenmem_messages")).scalar_one())


# --- checking the fill ---------------------------------------------------------


def check_session(conn: Connection, dialect: str, size: int) -> None:
    """Positions gapless, ``cum_floor`` the running sum of the earlier floors,
    the session row's counters in step (one pass in SQL)."""
    sid = driver_id(dialect, session_uuid(OWNER, session_name(size)))
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
        text("SELECT next_position, next_turn, floor_total FROM tokenmem_sessions WHERE id = :id"),
        {"id": sid},
    ).one()
    count, lo, hi, last_turn, wrong, total = found
    expected = (size, 0, size - 1, size // 2 - 1, 0, row.floor_total)
    if (count, lo, hi, last_turn, wrong, total) != expected or tuple(row[:2]) != (
        size,
        size // 2,
    ):
        raise RuntimeError(f"session {size:,} is inconsistent: {found} / {tuple(row)}")
