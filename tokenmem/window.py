"""How a window is counted, the one SQL statement that loads it, and a
plain-Python reference of the same rule.

Two modes, as in LangChain:

* ``"text"`` (completion prompts): the window fits when its rendered string,
  the lines ``"{prefix}: {content}"`` joined by newlines, has at most
  ``limit`` tokens. tiktoken splits text into pieces before merging, and the
  piece that holds the colon always ends at it, so a line costs
  ``tokens(prefix + ":") + tokens(" " + content)``: the second term is stored
  per message (``text_tokens``), the first depends only on the prefixes. The
  newline after a line either stands alone or joins the line's last piece
  (``".\n"`` is one token), never the next line when the next prefix starts
  with a letter or digit: what it adds, ``tokens(" " + content + "\n") -
  text_tokens``, is stored too (``newline_tokens``). So message *k* costs
  ``tokens(prefix + ":") + text_tokens + newline_tokens`` and the rendered
  window has exactly ``sum(costs) - newline_tokens(newest)`` tokens, for
  cl100k_base and o200k_base (tests/test_tokens.py checks the claim). The
  window needs no tokenizer when it is loaded. Other prefixes or encodings,
  and rows written before ``newline_tokens`` existed (NULL, counted as 1),
  make the memory count the rendered string once more (:meth:`Rule.exact_lines`).
* ``"messages"`` (chat models): OpenAI's formula, 3 tokens per message plus its
  role, content and name (``chat_tokens``), plus 3 once for the reply priming:
  ``sum(costs) + 3 <= limit``.

Each message also has a *floor*, ``min(text_tokens + newline_tokens + 1,
chat_tokens + 3)``,
no more than its cost in either mode. Running totals of the floor are kept at
write time (``cum_floor``), so the query reads the index on
``(session_id, cum_floor)`` newest first, down to the oldest message that
could possibly fit and never more than :func:`row_cap` rows: its cost follows
the window, not the history. The exact window is then cut with
``SUM(cost) OVER (ORDER BY cum_floor DESC)`` (the session's order: every
floor is at least 1). :func:`fit` is the plain-Python reference of that cut
(tests and benchmarks check the statement against it).

    >>> fit([3, 4, 5], budget=9)   # the newest run of costs summing to <= 9
    1
"""
# (the floor of a row written before newline_tokens, counted as 1, is the
# floor it was written with: min(text_tokens + 2, chat_tokens + 3))

from __future__ import annotations

import functools
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import regex
from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    FunctionElement,
    Integer,
    Over,
    Select,
    bindparam,
    case,
    func,
    literal_column,
    select,
    union_all,
)

from .chat import content_tokens
from .errors import ConfigurationError
from .messages import Message, StoredMessage
from .models import MESSAGES, SESSIONS
from .tokens import TokenCounter, split_pattern

__all__ = [
    "CHAT_ROLES",
    "Counts",
    "Rule",
    "chat_prompt_tokens",
    "count_message",
    "fit",
    "fit_units",
    "get_buffer_string",
    "row_cap",
    "window_select",
]

Mode = Literal["text", "messages"]
StartOn = Literal["human"] | None
CHAT_ROLES = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "developer": "developer",
    "tool": "tool",
}
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


@dataclass(frozen=True)
class Counts:
    """A message's stored token counts (see the module docstring)."""

    text_tokens: int
    chat_tokens: int
    newline_tokens: int = 1

    @classmethod
    def stored(cls, m: StoredMessage) -> Counts:
        """A stored message's counts; a row from before newline_tokens
        (migration 0003) counts its newline as 1, as the window query does."""
        newline = 1 if m.newline_tokens is None else m.newline_tokens
        return cls(m.text_tokens, m.chat_tokens, newline)

    @property
    def floor(self) -> int:
        """No more than the message's cost in either mode (a prefix costs >= 1)."""
        return min(
            self.text_tokens + self.newline_tokens + 1, self.chat_tokens + TOKENS_PER_MESSAGE
        )


def count_message(
    counter: TokenCounter,
    role: str,
    content: str,
    name: str | None,
    openai: Mapping[str, Any] | None = None,
) -> Counts:
    """A message's counts; ``openai``, the Chat Completions dict it was
    saved from, counts its content parts and tool calls by
    :func:`tokenmem.chat.content_tokens`'s rule (``content`` is then its
    rendered text)."""
    text = counter.count(" " + content)
    if openai is None:
        body = unspaced_tokens(counter, content, text)
    else:
        body = content_tokens(counter, openai)
    chat = counter.count_label(CHAT_ROLES[role]) + body
    if name:
        chat += counter.count_label(name) + TOKENS_PER_NAME
    return Counts(
        text_tokens=text, chat_tokens=chat, newline_tokens=newline_tokens(counter, content)
    )


def unspaced_tokens(counter: TokenCounter, content: str, spaced: int) -> int:
    """``tokens(content)``, given ``spaced = tokens(" " + content)``. tiktoken
    splits text with a regex (no look-behind) and encodes each piece on its
    own, so when the space only joins content's first piece (``" Hello"``
    for ``"Hello"``) the two differ by that piece alone, counted once per
    process. Otherwise, or when a character the split depends on is outside
    the long-encoded scripts (Python's and tiktoken's Unicode tables may
    differ on it), content is counted whole."""
    match = _first_piece(counter.encoding_name)
    if match is not None:
        head, joined = match(content), match(" " + content)
        if head and joined == " " + head and all(map(_settled, content[: len(head) + 1])):
            return spaced - _piece_tokens(counter, joined) + _piece_tokens(counter, head)
    return counter.count(content)


@functools.cache
def _first_piece(encoding: str) -> Callable[[str], str] | None:
    """A function giving the first piece tiktoken splits a text into, for
    the encodings whose patterns are known to have no look-behind."""
    split = split_pattern(encoding) if encoding in _EXACT_ENCODINGS else None
    if split is None:
        return None
    # Rust's "$" is the end of the text, Python's also before a final newline.
    pattern = regex.compile(split.replace("$", r"\Z"))

    def first(text: str) -> str:
        found = pattern.match(text)
        return found.group() if found else ""

    return first


# The encodings whose pre-tokenizer patterns keep a newline that is followed
# by a letter or digit out of the next piece (see the module docstring), and
# end every piece that holds a letter or digit at one.
_EXACT_ENCODINGS = frozenset({"cl100k_base", "o200k_base"})


def newline_tokens(counter: TokenCounter, content: str) -> int:
    """``tokens(" " + content + "\n") - tokens(" " + content)``, counted on the
    line's tail: the characters after its last letter or digit. A piece that
    holds a letter or digit ends at one (cl100k_base, o200k_base), so the
    tail's pieces are the line's last ones, and the common tails ("", ".",
    "?") are counted once per process. A mark in the tail (o200k_base's
    words take marks), a character Python's Unicode tables do not know, or a
    last letter outside the long-encoded scripts (Python's and tiktoken's
    tables may differ on it) counts the whole line instead: never wrong."""
    line = " " + content
    start = len(line)
    while start and unicodedata.category(line[start - 1])[0] not in "LN":
        start -= 1
    tail = line[start:]
    if (
        counter.encoding_name not in _EXACT_ENCODINGS
        or (start and not _settled(line[start - 1]))
        or any(unicodedata.category(c) in _UNSURE for c in tail)
    ):
        tail = line
    return _piece_tokens(counter, tail + "\n") - _piece_tokens(counter, tail)


def _piece_tokens(counter: TokenCounter, text: str) -> int:
    """Tokens of a line's first or last pieces: the short ones recur (words,
    ".", "?") and are counted once per process, long ones each time."""
    return counter.count_label(text) if len(text) <= 16 else counter.count(text)


_UNSURE = frozenset({"Mn", "Mc", "Me", "Cn"})


def _settled(c: str) -> bool:
    """Whether ``c`` is a letter or digit to every Unicode table in use: of
    the scripts encoded long ago (Latin, Greek, Cyrillic, kana, CJK, Hangul),
    not one a newer Python might call a letter where tiktoken does not."""
    return (
        c < "\u0590"
        or "\u3040" <= c <= "\u30ff"
        or "\u4e00" <= c <= "\u9fef"
        or "\uac00" <= c <= "\ud7a3"
    )


@dataclass(frozen=True)
class Rule:
    """How one memory counts its window: mode, limit and line prefixes."""

    limit: int
    mode: Mode = "text"
    human_prefix: str = "Human"
    ai_prefix: str = "AI"
    system_prefix: str = "System"
    # The window starts at a user message ("human"), or wherever it fits.
    start_on: StartOn = None
    # The session's tool-call unit still waiting for answers ends the window
    # (as it is so far), instead of being left out until it is answered.
    include_open: bool = False

    def prefix(self, role: str) -> str:
        return {
            "human": self.human_prefix,
            "ai": self.ai_prefix,
            "developer": "Developer",
            "tool": "Tool",
        }.get(role, self.system_prefix)

    def budget(self, newest: Counts | None) -> int:
        """The most the per-message costs of a fitting window may add up to,
        ``newest`` being the counts of the session's newest message."""
        if self.mode == "text":  # the newest line is joined to nothing
            return self.limit + (newest.newline_tokens if newest else 0)
        return self.limit - REPLY_PRIMING

    def exact_lines(self, counter: TokenCounter) -> bool:
        """Whether the stored counts give this rule's rendered window exactly
        (see the module docstring); if not, the memory recounts it."""
        return counter.encoding_name in _EXACT_ENCODINGS and self._pieces_apart

    @functools.cached_property
    def _pieces_apart(self) -> bool:
        return all(_starts_a_piece(self.prefix(role)) for role in CHAT_ROLES)

    def prefix_tokens(self, counter: TokenCounter) -> Mapping[str, int]:
        """Each role's ``tokens(prefix + ":")`` (remembered: do not change it)."""
        return _prefix_tokens(self, counter.encoding_name)

    def render(self, messages: Sequence[Message]) -> str:
        """The messages as this rule's lines ``"{prefix}: {content}"``, joined
        by newlines (LangChain's ``get_buffer_string``)."""
        prefixes = self.line_prefixes
        return "\n".join([prefixes[m.type] + m.content for m in messages])

    @functools.cached_property
    def line_prefixes(self) -> Mapping[str, str]:
        """Each role's ``prefix + ": "``, as lines are rendered."""
        return {role: self.prefix(role) + ": " for role in CHAT_ROLES}

    def cost(self, role: str, counts: Counts, prefix_tokens: Mapping[str, int]) -> int:
        """A message's cost under this rule, in Python (the reference)."""
        if self.mode == "text":
            return prefix_tokens[role] + counts.text_tokens + counts.newline_tokens
        return TOKENS_PER_MESSAGE + counts.chat_tokens

    def params(
        self, session_id: uuid.UUID, encoding: str, prefix_tokens: Mapping[str, int]
    ) -> dict[str, object]:
        """The parameters of :func:`window_select` for this rule."""
        return {
            "w_session": session_id,
            "w_encoding": encoding,
            "w_budget": self.budget(None),
            "w_prefix_human": prefix_tokens["human"],
            "w_prefix_ai": prefix_tokens["ai"],
            "w_prefix_system": prefix_tokens["system"],
            "w_prefix_developer": prefix_tokens["developer"],
            "w_prefix_tool": prefix_tokens["tool"],
        }


def _cost_sql(mode: Mode) -> ColumnElement[int]:
    """:meth:`Rule.cost` as a SQL expression over tokenmem_messages."""
    m = MESSAGES.c
    if mode == "text":
        per_role = case(
            (m.role == _const("'human'"), bindparam("w_prefix_human", type_=Integer)),
            (m.role == _const("'ai'"), bindparam("w_prefix_ai", type_=Integer)),
            (m.role == _const("'tool'"), bindparam("w_prefix_tool", type_=Integer)),
            (m.role == _const("'developer'"), bindparam("w_prefix_developer", type_=Integer)),
            else_=bindparam("w_prefix_system", type_=Integer),
        )
        return per_role + m.text_tokens + _newline(m.newline_tokens)
    return m.chat_tokens + _const(str(TOKENS_PER_MESSAGE))


def _newline(column: ColumnElement[int | None]) -> ColumnElement[int]:
    """``newline_tokens``, a row written before it existed counting as 1."""
    return func.coalesce(column, _const("1"))


def _const(sql: str) -> ColumnElement[Any]:
    """A constant written into the statement rather than bound: the driver
    then adapts only the parameters that vary."""
    return literal_column(sql)


def _starts_a_piece(prefix: str) -> bool:
    return bool(prefix) and unicodedata.category(prefix[0])[0] in "LN"


@functools.lru_cache(maxsize=256)
def _prefix_tokens(rule: Rule, encoding: str) -> Mapping[str, int]:
    counter = TokenCounter(encoding)
    return {role: counter.count_label(rule.prefix(role) + ":") for role in CHAT_ROLES}


def get_buffer_string(
    messages: Sequence[Message], human_prefix: str = "Human", ai_prefix: str = "AI"
) -> str:
    """Render messages as LangChain's ``get_buffer_string`` does (same
    signature): one ``"{prefix}: {content}"`` line each, ``System`` for a
    system message. Raises :class:`ConfigurationError` for a prefix that is
    not a str (before 0.2 the second argument was a :class:`Rule`)."""
    if not isinstance(human_prefix, str) or not isinstance(ai_prefix, str):
        raise ConfigurationError(
            "get_buffer_string(messages, human_prefix='Human', ai_prefix='AI') takes "
            f"str prefixes, as LangChain's, not {type(human_prefix).__name__}"
        )
    return Rule(limit=1, human_prefix=human_prefix, ai_prefix=ai_prefix).render(messages)


def render_rows(rows: Sequence[Sequence[Any]], rule: Rule) -> str:
    """:func:`get_buffer_string` of window rows (position, turn, role, content, ...)."""
    prefixes = rule.line_prefixes
    return "\n".join([prefixes[row[2]] + row[3] for row in rows])


def chat_prompt_tokens(messages: Sequence[Mapping[str, Any]], counter: TokenCounter) -> int:
    """OpenAI's count of a chat request: per message 3 + role + content
    (+ name + 1; content parts and tool calls by :mod:`tokenmem.chat`'s
    rule), plus 3 for the reply priming."""
    total = REPLY_PRIMING
    for m in messages:
        total += TOKENS_PER_MESSAGE + counter.count(m["role"]) + content_tokens(counter, m)
        if m.get("name"):
            total += counter.count(m["name"]) + TOKENS_PER_NAME
    return total


def fit(costs: Sequence[int], budget: int) -> int:
    """Return the index where the newest run of ``costs`` summing to at most
    ``budget`` starts (``len(costs)`` when not even the newest fits)."""
    total, start = 0, len(costs)
    for i in range(len(costs) - 1, -1, -1):
        total += costs[i]
        if total > budget:
            break
        start = i
    return start


def fit_units(
    rows: Sequence[tuple[int, int, str, int]], budget: int, start_on: StartOn = None
) -> int:
    """The plain-Python reference of the window's cut: ``rows`` (position,
    unit, role, cost), oldest first, ``unit`` the position the row's unit
    starts at; return the index where the window starts: the oldest unit
    start of the newest run of costs summing to at most ``budget`` (a unit
    whose first row is not in ``rows`` never fits) and, with
    ``start_on="human"``, from there the first human row (``len(rows)``
    when there is none). A row whose unit is negative is an orphan
    (:mod:`tokenmem.chat`): it counts, but is never sent — the window is
    the rows from there without the orphans."""
    total, start = 0, len(rows)
    for i in range(len(rows) - 1, -1, -1):
        position, unit, _, cost = rows[i]
        total += cost
        if total > budget:
            break
        if unit == position:
            start = i
    if start_on == "human":
        while start < len(rows) and rows[start][2] != "human":
            start += 1
    return start


def row_cap(rule: Rule) -> int:
    """The most rows the window statement reads for ``rule``: a constant
    written into the statement, so a planner never estimates from the
    session's size (see :func:`window_select`). A message costs at least one
    token, so a window has at most ``budget`` rows; the cap is the first
    power of two above ``limit + 1`` (few distinct statements). A window of
    exactly this many rows may have been cut: :func:`tokenmem.reads.window_rows`
    then asks again without a cap."""
    return 1 << max(rule.limit + 1, 1).bit_length()


@functools.lru_cache(maxsize=128)
def window_select(
    mode: Mode, cap: int | None = None, start_on: StartOn = None, include_open: bool = False
) -> Select[tuple[int, int, str, str, str | None, int, bool, bool, int, Any, int, Any]]:
    """The window as one statement, built once per mode, row cap,
    ``start_on`` and ``include_open``: the session's pinned prompt (its newest run of
    system/developer messages) first, then the newest messages that fit,
    oldest first, as rows (position, turn, role, content, name, cost,
    counted, pinned, unit, message, newline, metadata): ``cost`` the row's
    under the rule, ``counted`` whether its newline_tokens were counted at
    write time, ``unit`` the position its unit starts at, ``message`` the
    OpenAI dict kept for it (or NULL), ``newline`` its newline_tokens,
    ``metadata`` the message's metadata (what tokenmem.langchain rebuilds a
    LangChain message from). Its
    parameters come from :meth:`Rule.params`. It returns no unpinned rows
    when the session is missing, empty, being recounted (its oldest message
    counted with another encoding than the session) or counted with another
    encoding than the one asked for (the reader then counts in Python:
    :func:`tokenmem.reads.window_rows`).

    The window's rows fit in the budget less the pinned rows' cost, hold
    whole units (an assistant message with tool calls and its answers; never
    an orphan, whose negative unit no row starts) and, with
    ``start_on="human"``, start at a user message. A unit still waiting for
    tool answers is left out, and the window ends before it; with
    ``include_open`` it ends the window, as it is so far (for a caller whose
    next request sends the answers after the window). Its shape is chosen so
    that no plan can go wrong (docs/window-plans.md): the oldest message
    that could fit is a scalar subquery over the session row (an InitPlan
    in PostgreSQL: run once, its value a parameter of the scan), and the
    candidates are read newest first through the ``(session_id, cum_floor)``
    index with ``LIMIT cap``, a constant; the pinned rows by primary key.
    The planner needs no estimate of the runtime bound: whatever it guesses
    for the range, the capped, index-ordered scan is the cheapest plan, and
    its estimated cost stays far below ``jit_above_cost`` — on analysed and
    never-analysed tables, in custom and generic plans. Units, the pinned
    cost and ``start_on`` are window functions over those few rows."""
    m = MESSAGES.c
    s = SESSIONS.c
    sid: BindParameter[uuid.UUID] = bindparam("w_session")
    budget: ColumnElement[int] = bindparam("w_budget", type_=BigInteger)
    bound: ColumnElement[int] = budget
    # The session's oldest message: while a recount to another encoding runs
    # (writes.recount_batch), the oldest messages hold that one, and the
    # stored counts are no one's window: no rows, the window is counted in
    # Python (reads.window_rows). One probe of the primary key.
    o = MESSAGES.alias("oldest_message").c
    oldest = (
        select(o.encoding)
        .where(o.session_id == sid)
        .order_by(o.position)
        .limit(_const("1"))
        .subquery("oldest")
    )
    sources = SESSIONS.join(oldest, oldest.c.encoding == s.encoding)
    # The pinned rows (none after clear() started the window past them).
    pinned_first = case((s.pinned_first >= s.start_position, s.pinned_first), else_=_const("-1"))
    pinned_last = case((s.pinned_first >= s.start_position, s.pinned_last), else_=_const("-1"))
    # A unit still waiting for tool answers (and what came after it: nothing)
    # is not sent; the window ends before it, and its floors do not count.
    # With include_open it is the window's newest unit, as any other.
    before = s.next_position if include_open else func.coalesce(s.open_position, s.next_position)
    floor_end = s.floor_total if include_open else func.coalesce(s.open_floor, s.floor_total)
    if mode == "text":  # plus what the newest unpinned message's newline adds: one probe
        n = MESSAGES.alias("newest_message").c
        newest = (
            select(_newline(n.newline_tokens))
            .where(
                n.session_id == sid,
                ~n.position.between(pinned_first, pinned_last),
                n.position < before,
            )
            .order_by(n.position.desc())
            .limit(_const("1"))
            .scalar_subquery()
        )
        bound = budget + func.coalesce(newest, _const("1"))
    # The oldest message that could fit, or the start set by clear(); NULL
    # (no rows) when the session is missing, empty, being recounted, or
    # counted with another encoding. (Pinned rows only make the rest's
    # budget smaller: each costs at least its floor, so the bound holds.)
    reach = (
        select(s.start_floor.label("start_floor"), (floor_end - bound).label("reach"))
        .select_from(sources)
        .where(s.id == sid, s.encoding == bindparam("w_encoding"))
        .subquery("reach")
    )
    r0 = reach.c
    start = select(
        case((r0.start_floor > r0.reach, r0.start_floor), else_=r0.reach)
    ).scalar_subquery()
    # The pinned range, as values (InitPlans) rather than a join: a range
    # bounded by a joined row's columns is estimated at a tenth of the
    # session, which made the plan's cost cross jit_above_cost.
    first_pinned = select(pinned_first).where(s.id == sid).scalar_subquery()
    last_pinned = select(pinned_last).where(s.id == sid).scalar_subquery()

    def columns(pinned: bool) -> list[ColumnElement[Any]]:
        return [
            m.position,
            m.turn,
            m.role,
            m.content,
            m.name,
            m.cum_floor,
            _cost_sql(mode).label("cost"),
            _newline(m.newline_tokens).label("newline"),
            m.newline_tokens.is_not(None).label("counted"),
            _const("1" if pinned else "0").label("pinned"),
            func.coalesce(m.unit, m.position).label("unit"),
            m.message,
            m.metadata,
        ]

    # (no pinned rows when the session is counted with another encoding;
    # more than the cap cannot fit: each costs at least one token)
    pinned = (
        select(*columns(True))
        .where(
            m.session_id == sid,
            m.position.between(first_pinned, last_pinned),
            select(s.encoding).where(s.id == sid).scalar_subquery() == bindparam("w_encoding"),
        )
        .order_by(m.position)
    )
    candidates = select(*columns(False)).where(
        m.session_id == sid,
        m.cum_floor >= start,
        ~m.position.between(first_pinned, last_pinned),
        m.position < select(before).where(s.id == sid).scalar_subquery(),
    )
    # cum_floor grows with position (every floor is at least 1): the index
    # order is the session's order, newest first.
    candidates = candidates.order_by(m.cum_floor.desc())
    if cap is not None:
        pinned = pinned.limit(_const(str(cap)))
        candidates = candidates.limit(_const(str(cap)))
    both = union_all(
        select(pinned.subquery("pinned")), select(candidates.subquery("candidates"))
    ).subquery("rows")
    c = both.c

    def newest_first(f: FunctionElement[Any]) -> Over[Any]:
        return f.over(partition_by=c.pinned, order_by=c.cum_floor.desc(), rows=(None, 0))

    # the rest's budget: less the pinned rows' cost; in text mode plus the
    # newest row's newline (the newest line is joined to nothing)
    rest = budget - func.coalesce(
        func.sum(case((c.pinned == _const("1"), c.cost))).over(), _const("0")
    )
    if mode == "text":
        rest = rest + newest_first(func.first_value(c.newline))
    running = select(
        *[c[k] for k in _OUT],
        newest_first(func.sum(c.cost)).label("running"),
        rest.label("rest"),
    ).subquery("running")
    r = running.c
    unit = (r.pinned, r.unit)
    # a unit fits when its oldest row does, and that row was read
    fits = select(
        *[r[k] for k in _OUT],
        (
            (r.pinned == _const("1"))
            | (
                (func.max(r.running).over(partition_by=unit) <= r.rest)
                & (func.min(r.position).over(partition_by=unit) == r.unit)
            )
        ).label("fits"),
    ).subquery("fits")
    f = fits.c
    keep: ColumnElement[bool] = f.fits
    if start_on == "human":
        first_human = func.min(
            case(((f.pinned == _const("0")) & f.fits & (f.role == _const("'human'")), f.position))
        ).over()
        keep = keep & ((f.pinned == _const("1")) | (f.position >= first_human))
    kept = select(*[f[k] for k in _OUT], keep.label("keep")).subquery("kept")
    k = kept.c
    return select(*[k[name] for name in _OUT]).where(k.keep).order_by(k.pinned.desc(), k.position)


_OUT = (
    "position",
    "turn",
    "role",
    "content",
    "name",
    "cost",
    "counted",
    "pinned",
    "unit",
    "message",
    "newline",
    "metadata",
)
