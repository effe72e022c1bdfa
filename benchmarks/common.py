"""What the benchmarks share: throwaway databases, the text they write, the
bare driver's statements, and medians.

The bare driver is the baseline each benchmark compares tokenmem with. For a
turn it runs *tokenmem's own statements*: :class:`TurnSQL` compiles them from
the tables in ``tokenmem.models`` (and the window from
``tokenmem.window.window_select``) as tokenmem builds them, once, into text
for sqlite3/aiosqlite or psycopg, and :func:`same_sql` compares them with what
a store actually sends, so the two cannot drift apart unnoticed::

    with database("sqlite", "demo") as url:
        store = Store(url, upgrade=True)
        sql = TurnSQL("sqlite", Rule(limit=2_000), TokenCounter("o200k_base"))
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import sqlite3
import statistics
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiosqlite
import psycopg
from sqlalchemy import (
    Dialect,
    create_engine,
    event,
    insert,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Engine, make_url

import tokenmem
from tokenmem import Rule, TokenCounter
from tokenmem.digest import message_digest
from tokenmem.models import MESSAGES
from tokenmem.window import Counts, row_cap, window_select
from tokenmem.writes import SET_HEAD, bump_statement, insert_params, insert_statement, sets_head

PG_URL = os.environ.get(
    "TOKENMEM_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgresql")
ENCODING = "o200k_base"
OWNER = ""  # the default owner: a session's id is session_uuid(OWNER, name)
SQLITE_PRAGMAS = ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON")  # as tokenmem's
TIMES = "\N{MULTIPLICATION SIGN}"


# --- text and digests ------------------------------------------------------------

_WORDS = tuple(
    """
the a an and but or so because if when while after before then now just also
very really quite still even only maybe perhaps probably certainly actually
I you we they he she it this that these those there here someone everyone
is are was were be been being have has had do does did can could will would
should might must need want like know think see say tell ask give take make
go come get find use try keep let help show feel seem leave call work read
write run move play live believe bring happen start stop turn change follow
time day week year way thing people man woman child world life hand part place
case point group number question problem fact idea story book page line word
system data model memory window token message history session answer reason
good new first last long great little own other old right big high small large
next early young important few public bad same able simple clear useful quick
about with from into over under between through during without around against
of in on at by for to up out off down back again once more most less many much
""".split()
)
_ENDS = (".", ".", ".", ".", "?", "!")


def sentence_text(rng: random.Random, words: int) -> str:
    """``words`` words of English-like text: sentences of 3 to 14 words,
    capitalised, with the odd comma, ending in ``.``, ``?`` or ``!``."""
    out: list[str] = []
    left = words
    while left > 0:
        n = min(left, rng.randint(3, 14))
        left -= n
        chosen = [rng.choice(_WORDS) for _ in range(n)]
        chosen[0] = chosen[0].capitalize()
        if n > 6 and rng.random() < 0.4:
            k = rng.randint(2, n - 3)
            chosen[k] += ","
        out.append(" ".join(chosen) + rng.choice(_ENDS))
    return " ".join(out)


def source_digest() -> str:
    """A short digest of tokenmem's sources, to tie the numbers to the code measured."""
    digest = hashlib.sha256()
    for path in sorted(Path(tokenmem.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def median_ms(ns: Sequence[int]) -> float:
    return statistics.median(ns) / 1e6 if ns else math.nan


def percentile_ms(ns: Sequence[int], p: float) -> float:
    """The nearest-rank ``p``-th percentile of nanoseconds, in milliseconds."""
    ordered = sorted(ns)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] / 1e6


# --- databases -------------------------------------------------------------------


@contextmanager
def pg_schema(url: str, prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL schema's name, the schema dropped afterwards."""
    admin = create_engine(url)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@contextmanager
def database(backend: str, name: str) -> Iterator[str]:
    """The URL of an empty database, removed afterwards: a SQLite file in a
    temporary directory, or a fresh PostgreSQL schema (the URL sets the
    search_path, so every engine and connection made from it finds it)."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix=f"tokenmem-{name}-") as tmp:
            yield f"sqlite:///{Path(tmp) / f'{name}.sqlite3'}"
        return
    with pg_schema(PG_URL, name) as schema:
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(url: str) -> Any:
    """A bare sqlite3 (with tokenmem's pragmas) or psycopg connection to ``url``."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(make_url(url).database or "", timeout=30, check_same_thread=False)
        for pragma in SQLITE_PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        return conn
    return psycopg.connect(_libpq(url))


async def aconnect(url: str) -> Any:
    """:func:`connect` for asyncio: aiosqlite, or psycopg's AsyncConnection."""
    if url.startswith("sqlite"):
        conn = await aiosqlite.connect(make_url(url).database or "", timeout=30)
        for pragma in SQLITE_PRAGMAS:
            await conn.execute(f"PRAGMA {pragma}")
        return conn
    return await psycopg.AsyncConnection.connect(_libpq(url))


# --- the bare driver's statements ------------------------------------------------


def range_sql(backend: str) -> str:
    """The least SQL that reads a window's rows once their positions are known
    (window_load.py's floor): parameters (session id, first, last)."""
    mark = "?" if backend == "sqlite" else "%s"
    return (
        "SELECT role, content FROM tokenmem_messages "
        f"WHERE session_id = {mark} AND position BETWEEN {mark} AND {mark} ORDER BY position"
    )


def driver_id(backend: str, sid: uuid.UUID) -> object:
    """A session id as the driver takes it (SQLAlchemy's Uuid keeps hex text in SQLite)."""
    return sid.hex if backend == "sqlite" else sid


def driver_dialect(backend: str) -> Dialect:
    """The dialect that writes a statement as the bare driver takes it:
    sqlite3's named parameters, psycopg's ``%(name)s`` (with the casts
    SQLAlchemy writes for tokenmem)."""
    return sqlite.dialect(paramstyle="named") if backend == "sqlite" else PGDialect_psycopg()


def _upsert(backend: str) -> Any:
    """Create the session or bump its counters, returning them: tokenmem's
    append, step 1 (tokenmem's own statement)."""
    return bump_statement(backend)


def _insert_exchange() -> Any:
    """One message row: the exchange's two are sent as one executemany, as tokenmem does."""
    return insert(MESSAGES)


class TurnSQL:
    """A turn as tokenmem runs it — the upsert, the exchange's INSERT (on
    PostgreSQL with the head's UPDATE), SQLite's UPDATE of the head, the
    window SELECT (text mode) — as text and parameters for a bare driver.
    Token counts come precomputed; the rest is done per turn, as tokenmem does."""

    def __init__(self, backend: str, rule: Rule, counter: TokenCounter) -> None:
        self.backend, self.sqlite = backend, backend == "sqlite"
        dialect = driver_dialect(backend)
        window = window_select("text", row_cap(rule), rule.start_on)
        statements = (_upsert(backend), _insert_exchange(), window, SET_HEAD)
        upsert, insert, window, head = (s.compile(dialect=dialect) for s in statements)
        self.upsert, self.insert, self.window = upsert.string, insert.string, window.string
        # An exchange's rows as tokenmem sends them: on PostgreSQL with the
        # session's new head in the same statement, on SQLite SET_HEAD after.
        self.append = insert_statement(backend).compile(dialect=dialect).string
        self.head: str | None = None if sets_head(backend) else head.string
        constants = rule.params(uuid.UUID(int=0), ENCODING, rule.prefix_tokens(counter))
        # what the dialect bound itself (SQLite's OFFSET 0), and the rule's constants
        self.window_params = {k: v for k, v in window.params.items() if v is not None}
        self.window_params |= {k: v for k, v in constants.items() if k != "w_session"}

    def upsert_params(self, sid: uuid.UUID, name: str, counts: Sequence[Counts]) -> dict[str, Any]:
        now: Any = datetime.now(timezone.utc)
        if self.sqlite:  # the text SQLAlchemy binds for a UTC datetime in SQLite
            now = now.replace(tzinfo=None).isoformat(" ", "microseconds")
        return {
            "id": driver_id(self.backend, sid),
            "owner": OWNER,
            "name": name,
            "encoding": ENCODING,
            "n": len(counts),
            "turns": 1,
            "floor": sum(c.floor for c in counts),
            "now": now,
            "pin_first": None,
            "pin_last": None,
        }

    def insert_params(
        self,
        upsert: Mapping[str, Any],
        row: Sequence[int],
        texts: Sequence[str],
        counts: Sequence[Counts],
    ) -> list[dict[str, Any]]:
        """The exchange's two rows, placed by the upsert's returned ``row``."""
        next_position, next_turn, floor_total, *_, head = row
        rows, cum, previous = [], floor_total - upsert["floor"], head or ""
        for i, role in enumerate(("human", "ai")):
            c = counts[i]
            rows.append(
                {
                    "session_id": upsert["id"],
                    "position": next_position - 2 + i,
                    "turn": next_turn - 1,
                    "role": role,
                    "content": texts[i],
                    "name": None,
                    "metadata": None,
                    "created_at": upsert["now"],
                    "encoding": ENCODING,
                    "text_tokens": c.text_tokens,
                    "newline_tokens": c.newline_tokens,
                    "chat_tokens": c.chat_tokens,
                    "cum_floor": cum,
                    "message": None,
                    "tool_calls": None,
                    "tool_call_id": None,
                    "unit": None,
                }
            )
            # the chain link, as tokenmem makes it (tokenmem.digest)
            made = dict(rows[-1])
            if isinstance(made["created_at"], str):  # SQLite's text: the digest takes the time
                made["created_at"] = datetime.fromisoformat(made["created_at"]).replace(
                    tzinfo=timezone.utc
                )
            rows[-1]["digest"] = previous = message_digest(made, previous)
            cum += c.floor
        return rows

    def append_params(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`insert_params`' rows as :attr:`append` takes them."""
        return insert_params(self.backend, rows)

    def head_params(
        self, upsert: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The session's new head digest: tokenmem's last statement of an append."""
        return {"sid": upsert["id"], "head": rows[-1]["digest"]}

    def load_params(self, sid: uuid.UUID) -> dict[str, Any]:
        return {**self.window_params, "w_session": driver_id(self.backend, sid)}


@contextmanager
def statements_sent(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The statements and driver-level parameters ``engine`` sends in the block.

    Listening marks the engine watched for good (SQLAlchemy never unmarks it),
    and tokenmem then sends every statement through a ``Connection``, where
    listeners see it, instead of its faster path: listen on a throwaway engine
    (a store of its own), never on the one being measured."""
    sent: list[tuple[str, Any]] = []

    def record(_c: Any, _cur: Any, statement: str, parameters: Any, _x: Any, _many: bool) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _markers(sql: str) -> str:
    """``sql`` with every parameter marker (``?``, ``:name``, ``%(name)s``) as ``?``."""
    return re.sub(r"%\(\w+\)s|(?<!:):\w+", "?", sql)


def same_sql(sent: Sequence[tuple[str, Any]], sql: TurnSQL, store: str) -> None:
    """Raise unless ``sent`` (what a tokenmem turn sent: save, then load) is
    exactly the bare driver's statements (four on SQLite, three on
    PostgreSQL), up to how parameters are named."""
    theirs = [_markers(s) for s, _ in sent]
    ours = [_markers(s) for s in (sql.upsert, sql.append, sql.head, sql.window) if s is not None]
    if theirs != ours:
        raise RuntimeError(
            f"a turn on {store} sends other SQL than the bare driver's (benchmarks/common.py):\n"
            + "\n".join(
                f"  tokenmem: {a}\n  bare:     {b}" for a, b in zip(theirs, ours, strict=False)
            )
            + f"\n  ({len(theirs)} statements from tokenmem, {len(ours)} from the bare driver)"
        )
