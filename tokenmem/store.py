"""The store: sessions and messages in SQLite or PostgreSQL.

A :class:`Store` wraps one SQLAlchemy engine; create one per process and share
it between memories::

    store = Store("postgresql+psycopg://127.0.0.1/app")
    store.upgrade()                      # run tokenmem's migrations
    for msg in store.history("chat-1"):  # the full audit history, in pages
        print(msg.position, msg.type, msg.content)

Appends are serialised per session by the row lock an ``INSERT .. ON CONFLICT
DO UPDATE`` takes on the session row: positions stay gapless and each
exchange's messages adjacent, and other sessions are never blocked.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Row,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from . import migrate
from .errors import (
    ConfigurationError,
    InvalidInputError,
    SchemaError,
    SessionNotFound,
    StoreError,
)
from .messages import Message as MessageValue
from .messages import SessionInfo, StoredMessage
from .models import MESSAGES, ROLES, SESSIONS, Message, session_uuid, utcnow
from .tokens import TokenCounter
from .window import Rule, count_message, fit, window_select

__all__ = ["DEFAULT_OWNER", "Store", "default_url", "make_engine"]

DEFAULT_OWNER = ""
_RECOUNT_BATCH = 1000
_MAX_KEY = 255


def default_url() -> str:
    """``TOKENMEM_DATABASE_URL``, else the embedded SQLite file
    ``$XDG_DATA_HOME/tokenmem/tokenmem.sqlite3`` (``~/.local/share/...``)."""
    url = os.environ.get("TOKENMEM_DATABASE_URL")
    if url:
        return url
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{data / 'tokenmem' / 'tokenmem.sqlite3'}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` as tokenmem wants it: psycopg 3 for a bare
    ``postgresql://`` URL; WAL, a busy timeout and foreign keys for SQLite."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigurationError(f"not a database URL: {url!r}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the driver for {parsed.drivername} is not installed ({exc.name}); "
            "for PostgreSQL: pip install 'tokenmem[postgres]'"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


# --- validation ---------------------------------------------------------------


def check_text(value: object, what: str) -> str:
    """Return ``value`` if it can be stored and read back exactly, else raise."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInputError(
            f"{what} contains a NUL character (U+0000), which SQL text cannot hold"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid Unicode: {exc.reason} at {exc.start}"
        ) from None
    return value


def _check_key(value: object, what: str) -> str:
    text = check_text(value, what)
    if not text or len(text) > _MAX_KEY:
        raise InvalidInputError(f"{what} must have 1 to {_MAX_KEY} characters")
    return text


def _check_metadata(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInputError(f"metadata must be a dict, not {type(value).__name__}")
    try:
        dumped = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata is not JSON: {exc}") from None
    if "\\u0000" in dumped:
        raise InvalidInputError("metadata contains a NUL character (U+0000)")
    check_text(dumped, "metadata")
    return value


def _checked(messages: Sequence[MessageValue]) -> list[MessageValue]:
    out = []
    for i, msg in enumerate(messages):
        if msg.type not in ROLES:
            raise InvalidInputError(f"message {i}: type must be one of {ROLES}, not {msg.type!r}")
        check_text(msg.content, f"message {i} content")
        if msg.name is not None:
            _check_key(msg.name, f"message {i} name")
        _check_metadata(msg.metadata)
        out.append(msg)
    return out


# --- statements (pure: the async store runs the same ones) ---------------------


def _insert(dialect: str) -> Any:
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise ConfigurationError(f"tokenmem supports SQLite and PostgreSQL, not {dialect}")


def bump_session(
    dialect: str,
    sid: uuid.UUID,
    owner: str,
    name: str,
    encoding: str,
    n: int,
    turns: int,
    floor: int,
) -> Insert:
    """Create the session or reserve ``n`` positions and ``turns`` turns in it.

    Returns (next_position, next_turn, floor_total) after the bump, or no row
    when the session is counted with another encoding."""
    s = SESSIONS.c
    now = utcnow()
    stmt = _insert(dialect)(SESSIONS).values(
        id=sid,
        owner_id=owner,
        name=name,
        encoding=encoding,
        next_position=n,
        next_turn=turns,
        floor_total=floor,
        start_position=0,
        start_floor=0,
        created_at=now,
        updated_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[s.id],
        set_={
            "next_position": s.next_position + n,
            "next_turn": s.next_turn + turns,
            "floor_total": s.floor_total + floor,
            "encoding": encoding,
            "updated_at": now,
        },
        where=or_(s.encoding == encoding, s.encoding.is_(None)),
    )
    returning: Insert = stmt.returning(s.next_position, s.next_turn, s.floor_total)
    return returning


def _stored(row: Row[Any]) -> StoredMessage:
    return StoredMessage(
        type=row.role,
        content=row.content,
        name=row.name,
        metadata=row.metadata,
        position=row.position,
        turn=row.turn,
        created_at=row.created_at,
        encoding=row.encoding,
        text_tokens=row.text_tokens,
        chat_tokens=row.chat_tokens,
    )


_HISTORY_COLUMNS = (
    Message.position,
    Message.turn,
    Message.role,
    Message.content,
    Message.name,
    Message.meta.label("metadata"),
    Message.created_at,
    Message.encoding,
    Message.text_tokens,
    Message.chat_tokens,
)


class WindowMessage(NamedTuple):
    """A message of the window, with its place in the session."""

    position: int
    turn: int
    message: MessageValue


# --- the sync store ------------------------------------------------------------


class Store:
    """tokenmem's tables in one database.

    ``url`` is a database URL or an existing :class:`~sqlalchemy.Engine`
    (``None``: :func:`default_url`). The embedded default is migrated on first
    use; any other database is migrated explicitly with :meth:`upgrade` (or
    ``upgrade=True``), and a store on a database behind the head raises
    :class:`SchemaError` instead of failing on a missing column.
    """

    def __init__(self, url: str | Engine | None = None, *, upgrade: bool | None = None) -> None:
        if isinstance(url, Engine):
            self.engine = url
        else:
            self.engine = make_engine(url or default_url())
        if upgrade is None:
            upgrade = url is None
        self._ready = False
        if upgrade:
            self.upgrade()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # migrations

    def upgrade(self, revision: str = "head") -> None:
        """Run tokenmem's migrations up to ``revision``."""
        with self._errors(), self.engine.begin() as conn:
            migrate.upgrade(conn, revision)
        self._ready = False

    def downgrade(self, revision: str) -> None:
        with self._errors(), self.engine.begin() as conn:
            migrate.downgrade(conn, revision)
        self._ready = False

    def current_revision(self) -> str | None:
        with self._errors(), self.engine.connect() as conn:
            return migrate.current(conn)

    def check(self) -> None:
        """Raise :class:`SchemaError` unless the database is at the migration head."""
        current, head = self.current_revision(), migrate.head()
        if current != head:
            state = "not migrated" if current is None else f"at revision {current}"
            raise SchemaError(
                f"tokenmem's tables are {state}, the code needs {head}: run "
                "Store.upgrade() or `alembic upgrade head`",
                current=current,
                head=head,
            )
        self._ready = True

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc}") from exc

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        if not self._ready:
            self.check()
        with self._errors(), self.engine.begin() as conn:
            yield conn

    # writes

    def append(
        self,
        session_id: str,
        messages: Sequence[MessageValue],
        counter: TokenCounter,
        *,
        owner: str = DEFAULT_OWNER,
    ) -> list[StoredMessage]:
        """Append ``messages`` as one turn, in one transaction: all or nothing.

        Returns them as stored, with positions and token counts."""
        return self._append(session_id, [messages], counter, owner)

    def append_turns(
        self,
        session_id: str,
        turns: Iterable[Sequence[MessageValue]],
        counter: TokenCounter,
        *,
        owner: str = DEFAULT_OWNER,
        batch_size: int = 500,
    ) -> int:
        """Append many turns (imports, benchmarks), ``batch_size`` turns per
        transaction; return how many messages were written."""
        written, batch = 0, []
        for turn in turns:
            batch.append(turn)
            if len(batch) == batch_size:
                written += len(self._append(session_id, batch, counter, owner))
                batch = []
        if batch:
            written += len(self._append(session_id, batch, counter, owner))
        return written

    def _append(
        self,
        session_id: str,
        turns: Sequence[Sequence[MessageValue]],
        counter: TokenCounter,
        owner: str,
    ) -> list[StoredMessage]:
        owner = _check_key(owner, "owner") if owner else ""
        name = _check_key(session_id, "session_id")
        if not turns or not all(turns):
            raise InvalidInputError("nothing to append: a turn needs at least one message")
        turn_of = [t for t, msgs in enumerate(turns) for _ in msgs]
        msgs = _checked([m for msgs in turns for m in msgs])
        counts = [count_message(counter, m.type, m.content, m.name) for m in msgs]
        floor = sum(c.floor for c in counts)
        sid = session_uuid(owner, name)
        enc = counter.encoding_name
        bump = bump_session(self.dialect, sid, owner, name, enc, len(msgs), len(turns), floor)
        with self._begin() as conn:
            row = conn.execute(bump).first()
            if row is None:  # counted with another encoding: recount, then bump
                self._recount(conn, sid, counter)
                row = conn.execute(bump).one()
            next_position, next_turn, floor_total = row
            position, turn, cum = (
                next_position - len(msgs),
                next_turn - len(turns),
                floor_total - floor,
            )
            now, stored = utcnow(), []
            for i, (msg, c) in enumerate(zip(msgs, counts, strict=True)):
                stored.append(
                    StoredMessage(
                        type=msg.type,
                        content=msg.content,
                        name=msg.name,
                        metadata=msg.metadata,
                        position=position + i,
                        turn=turn + turn_of[i],
                        created_at=now,
                        encoding=enc,
                        text_tokens=c.text_tokens,
                        chat_tokens=c.chat_tokens,
                    )
                )
            rows = []
            for m, c in zip(stored, counts, strict=True):
                rows.append(
                    {
                        "session_id": sid,
                        "position": m.position,
                        "turn": m.turn,
                        "role": m.type,
                        "content": m.content,
                        "name": m.name,
                        "metadata": m.metadata,
                        "created_at": now,
                        "encoding": enc,
                        "text_tokens": c.text_tokens,
                        "chat_tokens": c.chat_tokens,
                        "cum_floor": cum,
                    }
                )
                cum += c.floor
            conn.execute(insert(MESSAGES), rows)
        return stored

    def _recount(self, conn: Connection, sid: uuid.UUID, counter: TokenCounter) -> None:
        """Count every message of the session again with ``counter``'s encoding."""
        s, m = SESSIONS.c, MESSAGES.c
        start = conn.execute(
            select(s.start_position).where(s.id == sid).with_for_update()
        ).scalar_one()
        cum, after, start_floor = 0, -1, None
        while True:
            batch = conn.execute(
                select(m.position, m.role, m.content, m.name)
                .where(m.session_id == sid, m.position > after)
                .order_by(m.position)
                .limit(_RECOUNT_BATCH)
            ).all()
            if not batch:
                break
            params = []
            for row in batch:
                if row.position == start:
                    start_floor = cum
                c = count_message(counter, row.role, row.content, row.name)
                params.append(
                    {
                        "pos": row.position,
                        "text_tokens": c.text_tokens,
                        "chat_tokens": c.chat_tokens,
                        "cum_floor": cum,
                    }
                )
                cum += c.floor
            conn.execute(
                update(MESSAGES)
                .where(m.session_id == sid, m.position == bindparam("pos"))
                .values(encoding=counter.encoding_name),
                params,
            )
            after = batch[-1].position
        conn.execute(
            update(SESSIONS)
            .where(s.id == sid)
            .values(
                encoding=counter.encoding_name,
                floor_total=cum,
                start_floor=cum if start_floor is None else start_floor,
            )
        )

    def clear(self, session_id: str, *, owner: str = DEFAULT_OWNER) -> None:
        """Start an empty window; every message stays in the history."""
        s = SESSIONS.c
        with self._begin() as conn:
            conn.execute(
                update(SESSIONS)
                .where(s.id == session_uuid(owner, session_id))
                .values(
                    start_position=s.next_position, start_floor=s.floor_total, updated_at=utcnow()
                )
            )

    def erase(self, session_id: str, *, owner: str = DEFAULT_OWNER) -> int:
        """Delete the session and all its messages for good; return how many
        messages were deleted. Raises :class:`SessionNotFound`."""
        sid = session_uuid(owner, session_id)
        with self._begin() as conn:
            deleted = conn.execute(delete(MESSAGES).where(MESSAGES.c.session_id == sid)).rowcount
            if not conn.execute(delete(SESSIONS).where(SESSIONS.c.id == sid)).rowcount:
                raise SessionNotFound(session_id)
        return int(deleted)

    # reads

    def window(
        self,
        session_id: str,
        rule: Rule,
        counter: TokenCounter,
        *,
        owner: str = DEFAULT_OWNER,
    ) -> list[WindowMessage]:
        """The newest messages that fit ``rule``, oldest first (one query)."""
        sid = session_uuid(owner, session_id)
        prefix_tokens = rule.prefix_tokens(counter)
        params = rule.params(sid, counter.encoding_name, prefix_tokens)
        with self._begin() as conn:
            rows: Sequence[Any] = conn.execute(window_select(rule.mode), params).all()
            if not rows:
                rows = self._window_recounting(conn, sid, rule, counter, prefix_tokens)
        return [
            WindowMessage(position, turn, MessageValue(role, content, name))
            for position, turn, role, content, name in rows
        ]

    def explain_window(
        self, session_id: str, rule: Rule, counter: TokenCounter, *, owner: str = DEFAULT_OWNER
    ) -> str:
        """The database's query plan for this window's statement, as text."""
        params = rule.params(
            session_uuid(owner, session_id), counter.encoding_name, rule.prefix_tokens(counter)
        )
        stmt = window_select(rule.mode).params(params)
        sql = str(stmt.compile(self.engine, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN QUERY PLAN " if self.dialect == "sqlite" else "EXPLAIN "
        with self._begin() as conn:
            rows = conn.exec_driver_sql(explain + sql).all()
        return "\n".join(" | ".join(str(v) for v in row) for row in rows)

    def _window_recounting(
        self,
        conn: Connection,
        sid: uuid.UUID,
        rule: Rule,
        counter: TokenCounter,
        prefix_tokens: dict[str, int],
    ) -> Sequence[Any]:
        """The window of a session counted with another encoding: count the
        newest messages (at most ``rule.budget``, as each costs at least one
        token) in Python. Rare: the next append recounts the session."""
        s, m = SESSIONS.c, MESSAGES.c
        session = conn.execute(select(s.encoding, s.start_position).where(s.id == sid)).first()
        if session is None or session.encoding in (None, counter.encoding_name):
            return []
        tail = conn.execute(
            select(m.position, m.turn, m.role, m.content, m.name)
            .where(m.session_id == sid, m.position >= session.start_position)
            .order_by(m.position.desc())
            .limit(max(rule.budget, 0))
        ).all()[::-1]
        costs = [
            rule.cost(r.role, count_message(counter, r.role, r.content, r.name), prefix_tokens)
            for r in tail
        ]
        return tail[fit(costs, rule.budget) :]

    def history_page(
        self,
        session_id: str,
        *,
        owner: str = DEFAULT_OWNER,
        after: int = -1,
        limit: int = 500,
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with a position above ``after``, in order.

        Raises :class:`SessionNotFound` for a session that does not exist."""
        sid = session_uuid(owner, session_id)
        m = MESSAGES.c
        with self._begin() as conn:
            rows = conn.execute(
                select(*_HISTORY_COLUMNS)
                .where(m.session_id == sid, m.position > after)
                .order_by(m.position)
                .limit(limit)
            ).all()
            if (
                not rows
                and not conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == sid)).first()
            ):
                raise SessionNotFound(session_id)
        return [_stored(r) for r in rows]

    def history(
        self, session_id: str, *, owner: str = DEFAULT_OWNER, page_size: int = 500
    ) -> Iterator[StoredMessage]:
        """Iterate over the session's full history, oldest first, one page of
        ``page_size`` rows in memory at a time."""
        after = -1
        while True:
            page = self.history_page(session_id, owner=owner, after=after, limit=page_size)
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].position

    def sessions(self, *, owner: str = DEFAULT_OWNER) -> list[SessionInfo]:
        """The owner's sessions, by name."""
        s = SESSIONS.c
        with self._begin() as conn:
            rows = conn.execute(
                select(s.owner_id, s.name, s.next_position, s.created_at, s.updated_at)
                .where(s.owner_id == owner)
                .order_by(s.name)
            ).all()
        return [SessionInfo(*r) for r in rows]

    def count(self) -> int:
        """How many messages the store holds (all sessions)."""
        with self._begin() as conn:
            return int(conn.execute(select(func.count()).select_from(MESSAGES)).scalar_one())
