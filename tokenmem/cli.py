"""The ``tokenmem`` command: a thin shell over the library.

Every command is a library call; this module parses arguments, prints tables
(or JSON with ``--json``) and turns errors into one line and an exit code:

    0  success                       3  no such session (or turn)
    1  failure (database, model,     4  the database is not at the migration
       bad input file)                  head: run `tokenmem db upgrade`
    2  usage error, bad option/URL   5  verify: a history's chain is broken
                                     130 interrupted
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass, replace
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from .errors import (
    ConfigurationError,
    ModelError,
    SchemaError,
    SessionNotFound,
    StoreError,
    TokenmemError,
)

if TYPE_CHECKING:
    from .audit import TurnRecord
    from .messages import StoredMessage
    from .store import Store
    from .tokens import TokenCounter

__all__ = ["main"]

EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_SCHEMA, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
EXIT_BROKEN = 5

EXAMPLES = {
    "db": "tokenmem db upgrade --db postgresql+psycopg://127.0.0.1/app",
    "sessions": "tokenmem sessions --owner alice",
    "history": "tokenmem history chat-1 --format jsonl --since 2026-11-01T00:00:00Z",
    "window": "tokenmem window chat-1 --limit 2000 --model gpt-4o-mini",
    "turns": "tokenmem turns chat-1        tokenmem turns chat-1 3",
    "chat": "OPENAI_API_KEY=... tokenmem chat chat-1 --model gpt-4o-mini --limit 500",
    "import": "tokenmem import backup.jsonl    tokenmem import --from-langchain sqlite:///lc.db",
    "export": "tokenmem export chat-1 -o chat-1.jsonl",
    "recount": "tokenmem recount --model gpt-4o --session chat-1",
    "erase": "tokenmem erase chat-1 --yes      tokenmem erase --owner alice",
    "demo": "tokenmem demo --language zh",
    "verify": "tokenmem verify chat-1 --expect-head 3f2a...    tokenmem verify --all --json",
    "serve": "tokenmem serve --db postgresql+psycopg://viewer@db/app --owner alice",
}


class _Out:
    """Where results go: aligned tables on a terminal (bold headers), or JSON.

    Text goes out with its control characters made visible (:func:`_visible`):
    stored text must not drive the operator's terminal. JSON and CSV stay
    lossless."""

    def __init__(self, as_json: bool, stream: IO[str]) -> None:
        self.as_json = as_json
        self.stream = stream
        self.tty = stream.isatty() and not os.environ.get("NO_COLOR")

    def line(self, text: str = "") -> None:
        """Text of one or more lines."""
        self.stream.write(_visible(text, newlines=True) + "\n")

    def header(self, text: str) -> None:
        """A table's header line: bold on a terminal."""
        text = _visible(text)
        self.stream.write((f"\033[1m{text}\033[0m" if self.tty else text) + "\n")

    def json(self, value: object) -> None:
        from .transfer import to_json

        self.stream.write(to_json(_plain(value), indent=2) + "\n")

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        cells = [[_cell(v) for v in row] for row in rows]
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
        self.header("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for r in cells:
            self.line("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# C0 controls, DEL and C1 controls: a terminal acts on them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\t": "\\t", "\r": "\\r"}


def _visible(text: str, *, newlines: bool = False) -> str:
    """``text`` with its control characters written as escapes (``\\x1b``,
    ``\\r``, ``\\t``...), so printing it cannot clear a screen, set a
    terminal's title or overwrite a line; a newline kept when ``newlines``,
    else shown as ``⏎``."""

    def escape(m: re.Match[str]) -> str:
        c = m[0]
        if c == "\n":
            return "\n" if newlines else "⏎ "
        return _NAMED.get(c) or f"\\x{ord(c):02x}"

    return _CONTROL.sub(escape, text)


def _plain(value: object) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return _visible(str(value))


def _short(text: str, width: int = 60) -> str:
    flat = _visible(text)
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"PORT must be a number from 1 to 65535, not {text!r}")
    return int(text)


def _seq(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"SEQ must be a call's number, not {text!r}")
    return int(text)


def _progress(total: int | None, label: str) -> Callable[[int], None]:
    """A progress bar on stderr when it is a terminal; silent otherwise."""
    done = 0
    tty = sys.stderr.isatty()

    def step(n: int) -> None:
        nonlocal done
        done += n
        if not tty:
            return
        if total:
            filled = int(30 * min(done, total) / total)
            sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        else:
            sys.stderr.write(f"\r{label} {done}")
        sys.stderr.flush()

    return step


# --- commands -------------------------------------------------------------------


def _counter(args: argparse.Namespace) -> TokenCounter:
    from .tokens import TokenCounter

    if getattr(args, "encoding", None):
        return TokenCounter(args.encoding)
    return TokenCounter.for_model(getattr(args, "model", None) or "gpt-4o-mini")


def _confirm(what: str, args: argparse.Namespace) -> bool:
    """Whether a destructive command may go on: ``--yes``, or "yes" typed at
    a terminal; refused (an error) when nobody can be asked."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigurationError(f"refusing to {what} without --yes (stdin is not a terminal)")
    try:
        answer = input(_visible(f"{what[0].upper()}{what[1:]}? Type 'yes': "))
    except EOFError:  # Ctrl-D: no
        return False
    return answer.strip().lower() == "yes"  # "yes" in any case; anything else is no


def cmd_db(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from . import migrate

    before, head = store.current_revision(), migrate.head()
    did = None
    if args.action == "upgrade":
        store.upgrade(args.revision or "head")
        did = "upgraded"
    elif args.action == "downgrade":
        if not args.revision:
            raise ConfigurationError("db downgrade needs a revision (e.g. base)")
        what = (
            "drop every tokenmem table and all history"
            if args.revision == "base"
            else f"downgrade tokenmem's tables to {args.revision} (dropping what later "
            "revisions added)"
        )
        if not _confirm(what, args):
            out.line("nothing downgraded")
            return 0
        store.downgrade(args.revision)
        did = "downgraded"
    elif args.action in ("partition", "unpartition"):
        return _partition(args, store, out)
    current = store.current_revision() if did else before
    if out.as_json:
        out.json({"current": current, "head": head, "at_head": current == head, "before": before})
    else:
        if did:
            change = f"from {before or '(not migrated)'} to {current or '(not migrated)'}"
            nothing = f"nothing to do: at {current or '(not migrated)'}"
            out.line(f"{did} {change}" if before != current else nothing)
        out.line(f"current: {current or '(not migrated)'}  head: {head}")
    if args.action == "check":
        store.check()
    return 0


def _partition(args: argparse.Namespace, store: Store, out: _Out) -> int:
    """``db partition --partitions N`` and ``db unpartition``: rebuild the
    per-session tables (PostgreSQL), asking first like ``downgrade``."""
    from .partition import checked

    n = checked(args.partitions) if args.action == "partition" else 0
    if store.dialect != "postgresql":
        raise ConfigurationError(
            f"db {args.action} needs PostgreSQL; this database is {store.dialect} "
            "(SQLite has no table partitioning)"
        )
    tables = "tokenmem_messages, tokenmem_turns and tokenmem_summaries"
    what = (
        f"rebuild {tables} as {n} hash partitions each"
        if n
        else f"rebuild {tables} as plain tables"
    )
    if not _confirm(what + " (they are locked while their rows are copied)", args):
        out.line("nothing changed")
        return 0
    layout = store.partition(n) if n else store.unpartition()
    if out.as_json:
        out.json({"partitions": layout})
    else:
        for table, count in layout.items():
            out.line(f"{table}: {f'{count} hash partitions by session_id' if count else 'plain'}")
    return 0


def cmd_sessions(args: argparse.Namespace, store: Store, out: _Out) -> int:
    stats = store.session_stats(owner=args.owner, all_owners=args.all_owners)
    if out.as_json:
        out.json(stats)
        return 0
    out.table(
        ["owner", "session", "messages", "text_tokens", "encoding", "created", "last activity"],
        [
            (
                s.owner_id or "-",
                s.session_id,
                s.messages,
                s.text_tokens,
                s.encoding,
                s.created_at,
                s.updated_at,
            )
            for s in stats
        ],
    )
    return 0


_HISTORY_FIELDS = [
    "position",
    "turn",
    "role",
    "content",
    "name",
    "created_at",
    "encoding",
    "text_tokens",
    "openai",
]
_HISTORY_HEAD = (
    f"{'pos':>6} {'turn':>5} {'role':<9} {'name':<10} {'text_tokens':>11}  {'created':<19}  "
)


def _content_lines(m: StoredMessage) -> list[str]:
    """A message's content in the history table: its text; a tool message's
    after the id of the call it answers (``← id``); an assistant's tool
    calls a line each (``→ id name(arguments)``) after its text."""
    from .chat import traffic

    text, calls, answers = traffic(m.type, m.content, m.openai)
    if answers is not None:
        return [f"← {answers} {text}"]
    return [text] * bool(text or not calls) + [f"→ {call_id} {shown}" for call_id, shown in calls]


def cmd_history(args: argparse.Namespace, store: Store, out: _Out) -> int:
    stream = store.history(args.session, owner=args.owner, since=args.since, until=args.until)
    first = next(stream, None)  # a missing session fails here, before any output
    messages = itertools.chain([first] if first else [], stream)
    fmt = "jsonl" if out.as_json else args.format
    from .transfer import to_json, to_record

    if fmt == "jsonl":  # the export format: `tokenmem import` reads it back
        key = store.session(args.session, owner=args.owner)
        for m in messages:
            out.stream.write(to_json(to_record(key.owner_id, key.session_id, m)) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out.stream)
        writer.writerow(_HISTORY_FIELDS)
        for m in messages:
            writer.writerow(
                [
                    m.position,
                    m.turn,
                    m.type,
                    m.content,
                    m.name or "",
                    _plain(m.created_at),
                    m.encoding,
                    m.text_tokens,
                    "" if m.openai is None else to_json(m.openai),
                ]
            )
    else:
        out.header(_HISTORY_HEAD + "content")
        for m in messages:
            text, *calls = _content_lines(m)
            out.line(
                f"{m.position:>6} {m.turn:>5} {m.type:<9} {_short(m.name or '-', 10):<10} "
                f"{m.text_tokens:>11}  {_cell(m.created_at)}  {_short(text)}"
            )
            for call in calls:
                out.line(" " * len(_HISTORY_HEAD) + _short(call))
    return 0


def cmd_window(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from .memory import ConversationTokenBufferMemory
    from .tokens import TokenCounter

    session = store.session(args.session, owner=args.owner)
    if args.model or args.encoding:
        counter = _counter(args)
    else:  # as the session was counted (a session with no message yet: the default)
        counter = TokenCounter(session.encoding or _counter(args).encoding_name)
    memory = ConversationTokenBufferMemory(
        store=store,
        session_id=args.session,
        owner=args.owner,
        max_token_limit=args.limit,
        return_messages=args.messages,
        encoding=counter.encoding_name,
    )
    rule, window = memory.rule, memory.window()
    # Each message's cost: what it adds to what is sent. As a string, its line
    # and the newline joining it to the next (the newest line has none): the
    # count of the history from it on, less the count from the next line on,
    # so the costs add up to the string's count whatever merges at the joins.
    # As messages, the chat formula's cost (the reply priming adds 3).
    costs = [w.tokens for w in window]
    if rule.mode == "text":
        after = 0
        for i in reversed(range(len(window))):
            total = counter.count(rule.render([w.message for w in window[i:]]))
            costs[i], after = total - after, total
    rows, running = [], 0
    for w, cost in zip(window, costs, strict=True):
        running += cost
        rows.append(
            {
                "position": w.position,
                "turn": w.turn,
                "role": w.message.type,
                "pinned": w.pinned,
                "cost": cost,
                "running": running,
                "content": w.message.content,
            }
        )
    priming = 3 if rule.mode == "messages" and rows else 0
    used = running + priming
    # the oldest message of the window proper (the pinned prompt is sent first)
    first = next((w.position for w in window if not w.pinned), session.next_position)
    pinned_before = sum(w.pinned and w.position < first for w in window)
    if out.as_json:
        out.json(
            {
                "limit": args.limit,
                "mode": rule.mode,
                "encoding": counter.encoding_name,
                "used": used,
                "reply_priming": priming,
                "messages": rows,
                "fell_out": first - pinned_before,
            }
        )
        return 0
    out.table(
        ["pos", "turn", "role", "cost", "running", "content"],
        [
            (
                r["position"],
                r["turn"],
                f"{r['role']} (pinned)" if r["pinned"] else r["role"],
                r["cost"],
                r["running"],
                _short(str(r["content"])),
            )
            for r in rows
        ],
    )
    width = 40
    filled = round(width * min(used, args.limit) / args.limit)
    how = f"{running} + 3 for the reply priming, " if priming else ""
    out.line(
        f"\n[{'#' * filled}{'.' * (width - filled)}] {used}/{args.limit} tokens "
        f"({how}{rule.mode}, {counter.encoding_name})"
    )
    older = f" (positions 0..{first - 1}"
    older += ", but the pinned prompt)" if pinned_before else ")"
    out.line(
        f"{first - pinned_before} older message(s) are outside the window"
        f"{older if first else ''}: over the budget, cleared or pruned; {len(rows)} are in it"
    )
    return 0


def _turn(record: TurnRecord) -> dict[str, Any]:
    """A call as shown: its fields, latency to 0.1 ms, and the API's prompt
    tokens over the local count."""
    from .audit import prompt_ratio

    ratio = prompt_ratio(record)
    return {
        **asdict(replace(record, latency_ms=round(record.latency_ms, 1))),
        "prompt_ratio": None if ratio is None else round(ratio, 4),
    }


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_turns(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from .audit import prompt_ratio, usage_by_model

    if args.seq is not None:
        prompt = store.rebuild_prompt(args.session, args.seq, owner=args.owner)
        (turn,) = (t for t in store.turns(args.session, owner=args.owner) if t.seq == args.seq)
        if out.as_json:
            out.json({"turn": _turn(turn), "prompt": prompt})
            return 0
        for key, value in _turn(turn).items():
            if key not in ("system", "template"):
                out.line(f"{key:>22}: {_cell(value)}")
        out.line("\nThe prompt it sent, rebuilt from the stored history:\n")
        if isinstance(prompt, str):
            out.line(prompt)
        else:
            for message in prompt:
                out.line(f"[{message['role']}] {message['content']}")
        return 0
    turns = store.turns(args.session, owner=args.owner)
    models = usage_by_model(turns)
    if out.as_json:
        out.json({"turns": [_turn(t) for t in turns], "models": models})
        return 0
    out.table(
        [
            "seq",
            "time",
            "model",
            "outcome",
            "window",
            "budget",
            "prompt",
            "api prompt",
            "api/prompt",
            "ms",
            "error",
        ],
        [
            (
                t.seq,
                t.created_at,
                _short(t.model, 24),
                t.outcome,
                "-" if t.window_first is None else f"{t.window_first}..{t.window_last}",
                t.token_budget,
                t.prompt_tokens,
                t.api_prompt_tokens,
                _ratio(prompt_ratio(t)),
                f"{t.latency_ms:.0f}",
                t.error_type,
            )
            for t in turns
        ],
    )
    if models:
        out.line()
        out.table(
            ["model", "calls", "with usage", "median api/prompt", "min", "max"],
            [
                (
                    _short(u.model, 24),
                    u.calls,
                    u.reported,
                    _ratio(u.median_ratio),
                    _ratio(u.min_ratio),
                    _ratio(u.max_ratio),
                )
                for u in models
            ],
        )
    return 0


def cmd_chat(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from .chain import ConversationChain
    from .llm import ChatOpenAI
    from .memory import ConversationTokenBufferMemory

    llm = ChatOpenAI(model=args.model, encoding=args.encoding, base_url=args.base_url)
    try:
        llm.client  # noqa: B018  (made now: a missing key is told before any input is read)
    except ModelError as exc:
        raise ConfigurationError(
            "chat needs an API key: set OPENAI_API_KEY (for a local "
            "OpenAI-compatible server, any value, with --base-url or OPENAI_BASE_URL)"
        ) from exc
    memory = ConversationTokenBufferMemory(
        llm=llm,
        store=store,
        session_id=args.session,
        owner=args.owner,
        max_token_limit=args.limit,
        human_prefix="人类" if args.language == "zh" else "Human",
    )
    chain = ConversationChain(llm=llm, memory=memory, language=args.language, verbose=args.verbose)
    interactive = sys.stdin.isatty()
    if args.session is None:  # told even over a pipe: it is the only way back to this chat
        print(f"tokenmem: new session {memory.session_id}", file=sys.stderr)
    if interactive:
        out.line(
            f"session {memory.session_id} · {llm.model} · {args.limit}-token window · "
            "Ctrl-D to leave"
        )
    while True:
        if interactive:
            out.stream.write("> ")
            out.stream.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        for chunk in chain.stream(input=text):
            out.stream.write(_visible(chunk, newlines=True))
            out.stream.flush()
        out.line()


def cmd_import(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from .transfer import import_jsonl, import_langchain

    # Without --model/--encoding each session keeps the encoding its records name.
    counter = _counter(args) if args.model or args.encoding else None
    step = _progress(None, "imported")
    if args.from_langchain:
        result = import_langchain(
            store,
            args.from_langchain,
            counter,
            table=args.table or "message_store",
            owner=args.owner,
            progress=step,
        )
    else:
        with _input(args.file) as lines:
            result = import_jsonl(store, lines, counter, owner=args.owner, progress=step)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if out.as_json:
        out.json(result)
    else:
        out.line(
            f"{result.imported} message(s) imported into {result.sessions} session(s); "
            f"{result.skipped} already there"
        )
    return 0


@contextmanager
def _input(path: str) -> Iterator[IO[str]]:
    """The lines of ``path``, or of stdin for ``-``. Bytes that are not UTF-8
    reach the checks as lone surrogates, which fail the line they are on, by
    its number."""
    if path == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # a text stream without bytes beneath (a test's)
            yield sys.stdin
            return
        stdin = io.TextIOWrapper(buffer, encoding="utf-8", errors="surrogateescape")
        try:
            yield stdin
        finally:
            stdin.detach()  # stdin's buffer stays open
        return
    try:
        lines = open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    with lines:
        yield lines


def cmd_export(args: argparse.Namespace, store: Store, out: _Out) -> int:
    import stat
    import tempfile

    from .transfer import export_jsonl

    path = args.output
    if path:  # through a symlink to its target: the link stays a link
        path = os.path.realpath(path)
    if not path or (os.path.exists(path) and not os.path.isfile(path)):  # stdout, a pipe
        try:
            target = open(path, "w", encoding="utf-8") if path else out.stream  # noqa: SIM115
        except OSError as exc:
            raise ConfigurationError(f"cannot write {args.output}: {exc.strerror}") from None
        try:
            written = export_jsonl(store, target, owner=args.owner, sessions=args.sessions)
        finally:
            if path:
                target.close()
    else:
        # Written beside FILE and renamed over it once complete: a failed export
        # leaves no file, and never a partial one in place of an earlier export.
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:  # a new file: as open() would make it
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        try:
            fd, part = tempfile.mkstemp(
                dir=os.path.dirname(path),
                prefix=f".{os.path.basename(path)}.",
                suffix=".part",
            )
        except OSError as exc:
            raise ConfigurationError(f"cannot write {args.output}: {exc.strerror}") from None
        try:
            with open(fd, "w", encoding="utf-8") as target:
                written = export_jsonl(store, target, owner=args.owner, sessions=args.sessions)
            os.chmod(part, mode)
            os.replace(part, path)
        except BaseException as exc:
            os.unlink(part)
            if isinstance(exc, OSError):
                raise ConfigurationError(f"cannot write {args.output}: {exc.strerror}") from None
            raise
    if path:
        print(_visible(f"{written} message(s) written to {args.output}"), file=sys.stderr)
    return 0


def cmd_recount(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from .transfer import recount

    # Without --model/--encoding: only fill in rows from before migration 0003.
    counter = _counter(args) if args.model or args.encoding else None
    encoding = counter.encoding_name if counter else "each session's own encoding"
    # As recount() reads them: --session is the default owner's unless --owner says.
    if args.session is not None:
        stats = [s for s in store.session_stats(owner=args.owner) if s.session_id == args.session]
    else:
        stats = store.session_stats(owner=args.owner, all_owners=args.owner is None)
    total = sum(s.messages for s in stats)
    done = recount(
        store,
        counter,
        owner=args.owner,
        session=args.session,
        progress=_progress(total, f"recount to {encoding}"),
    )
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if out.as_json:
        out.json(
            {"encoding": counter.encoding_name if counter else None, "sessions_recounted": done}
        )
    else:
        out.line(f"{done} session(s) recounted with {encoding}")
    return 0


def cmd_erase(args: argparse.Namespace, store: Store, out: _Out) -> int:
    if not args.session and args.owner is None:
        raise ConfigurationError("erase needs a SESSION or --owner")
    what = (
        f"session {args.session!r}" + (f" of owner {args.owner!r}" if args.owner else "")
        if args.session
        else f"everything owner {args.owner!r} has"
    )
    if not _confirm(f"erase {what} for good", args):
        out.line("nothing erased")
        return 0
    if args.session:
        deleted = store.erase(args.session, owner=args.owner)
        result = {"sessions": 1, "messages": deleted}
    else:
        result = asdict(store.erase_owner(args.owner))
    if out.as_json:
        out.json(result)
    else:
        out.line(f"erased {what}: {result['messages']} message(s)")
    return 0


def cmd_verify(args: argparse.Namespace, store: Store, out: _Out) -> int:
    if args.all == bool(args.sessions):
        raise ConfigurationError("verify takes SESSION ... or --all (one of the two)")
    if args.expect_head and len(args.sessions) != 1:
        raise ConfigurationError("--expect-head goes with one SESSION")
    if args.all:
        stats = store.session_stats(owner=args.owner, all_owners=args.owner is None)
        keys = [(s.session_id, s.owner_id) for s in stats]
    else:
        keys = [(name, args.owner) for name in args.sessions]
    step = _progress(len(keys), "verify") if len(keys) > 1 else lambda n: None
    reports, broken = [], False
    for name, owner in keys:
        report = store.verify(name, owner=owner, expect_head=args.expect_head)
        step(1)
        broken = broken or not report.ok
        if out.as_json:
            reports.append({"owner_id": owner or "", **asdict(report)})
            continue
        who = f"{name} (owner {owner!r})" if owner else name
        if report.ok:
            out.line(
                f"{who}: intact, {report.messages} message(s), {report.turns} turn(s); "
                f"head {report.head_digest or '-'}"
            )
        else:
            where = "message position" if report.table == "messages" else "turn seq"
            out.line(
                f"{who}: BROKEN at {where} {report.position}: {report.problem}; "
                f"head {report.head_digest or '-'}"
            )
    if len(keys) > 1 and sys.stderr.isatty():
        sys.stderr.write("\n")
    if out.as_json:
        out.json(reports)
    return EXIT_BROKEN if broken else 0


def cmd_serve(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from .web import create_app, is_loopback

    token = args.token or os.environ.get("TOKENMEM_SERVE_TOKEN") or None
    if token is None and not is_loopback(args.host):
        raise ConfigurationError(
            f"refusing to serve on {args.host} without a token: anyone who can reach it could "
            "read every history; pass --token or set TOKENMEM_SERVE_TOKEN (or listen on "
            "127.0.0.1)"
        )
    store.check()  # exit 4 before listening, on a database not at the head
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigurationError("tokenmem serve needs: pip install 'tokenmem[web]'") from exc
    # The viewer reads through an engine of its own, made read-only.
    app = create_app(
        store.engine.url.render_as_string(hide_password=False), owner=args.owner, token=token
    )
    # Bound here, so a port in use is our error, before "serving" is said.
    sock = _listening(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"tokenmem: serving http://{host}:{args.port}/ "
        f"(read-only{', token required' if token else ''})",
        file=sys.stderr,
    )
    # No access log: a first request's ?token= would be written to it.
    config = uvicorn.Config(
        app, host=args.host, port=args.port, access_log=False, server_header=False
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        app.state.store.close()
    return 0


def _listening(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (ConfigurationError if it cannot be)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host} port {port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise ConfigurationError(f"cannot listen on {host} port {port}: {why}") from None
    return sock


def cmd_demo(args: argparse.Namespace, store: Store, out: _Out) -> int:
    from .demo import run

    run(store, out=out.line, language=args.language)
    return 0


# --- parser ---------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokenmem")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse, with errors that name options by their metavar, not argparse's dest."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"tokenmem: {_visible(message)}\n")


def _global_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    """--db and --json, accepted before the command and after it (the
    subcommands' copies default to SUPPRESS so they never undo the first)."""
    parser.add_argument(
        "--db",
        metavar="URL",
        default=default,
        help="database URL (default: $TOKENMEM_DATABASE_URL or the embedded SQLite file)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if default is None else default,
        help="machine-readable JSON output",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokenmem",
        description="Persistent token-window conversation memory: operate and audit it.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 not found, 4 not migrated, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"tokenmem {_version()}")
    _global_options(parser, default=None)
    common = _Parser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        sub.set_defaults(handler=handler)
        return sub

    def owner(sub: argparse.ArgumentParser | Any) -> None:
        sub.add_argument("--owner", help="the owner (user or tenant) of the session")

    def encoding(sub: argparse.ArgumentParser, default: str) -> None:
        group = sub.add_mutually_exclusive_group()
        group.add_argument("--model", help=f"count tokens as this model does (default: {default})")
        group.add_argument("--encoding", help="tiktoken encoding, e.g. o200k_base")

    db = command(
        "db",
        "migrations: upgrade, downgrade REV, current, check; partition --partitions N, "
        "unpartition (PostgreSQL)",
        cmd_db,
    )
    db.add_argument(
        "action",
        metavar="ACTION",
        choices=["upgrade", "downgrade", "current", "check", "partition", "unpartition"],
        help="upgrade, downgrade, current, check, partition or unpartition",
    )
    db.add_argument(
        "revision",
        nargs="?",
        help="target revision (upgrade: head; downgrade: e.g. base; current and check take none)",
    )
    db.add_argument(
        "--yes",
        action="store_true",
        help="downgrade or (un)partition without asking (else type yes)",
    )
    db.add_argument(
        "--partitions",
        metavar="N",
        type=int,
        help="partition: how many hash partitions by session_id (1 to 1024)",
    )

    sessions = command("sessions", "sessions with message count, tokens and activity", cmd_sessions)
    scope = sessions.add_mutually_exclusive_group()
    owner(scope)
    scope.add_argument("--all-owners", action="store_true", help="every owner's sessions")

    history = command("history", "a session's full history, streamed", cmd_history)
    history.add_argument("session", metavar="SESSION", help="the session id")
    owner(history)
    history.add_argument(
        "--format", choices=["table", "jsonl", "csv"], default="table", help="output format"
    )
    history.add_argument("--since", type=_when, help="ISO 8601 time (UTC if no zone)")
    history.add_argument("--until", type=_when, help="ISO 8601 time, exclusive")

    window = command("window", "what the model would see now, token by token", cmd_window)
    window.add_argument("session", metavar="SESSION", help="the session id")
    owner(window)
    window.add_argument("--limit", type=int, required=True, help="max_token_limit")
    window.add_argument(
        "--messages", action="store_true", help="count as chat messages (return_messages=True)"
    )
    encoding(window, "the encoding the session was counted with")

    turns = command(
        "turns", "the turn audit log; with SEQ, one call and the prompt it sent", cmd_turns
    )
    turns.add_argument("session", metavar="SESSION", help="the session id")
    turns.add_argument(
        "seq", metavar="SEQ", nargs="?", type=_seq, help="a call's number: show its prompt"
    )
    owner(turns)

    chat = command("chat", "talk through the chain, continuing or starting a session", cmd_chat)
    chat.add_argument(
        "session", metavar="SESSION", nargs="?", help="the session id (default: a new one)"
    )
    owner(chat)
    chat.add_argument("--model", default="gpt-4o-mini", help="the OpenAI model")
    chat.add_argument("--encoding", help="tiktoken encoding, for models tiktoken does not know")
    chat.add_argument(
        "--base-url",
        metavar="URL",
        help="an OpenAI-compatible server (default: $OPENAI_BASE_URL or OpenAI's)",
    )
    chat.add_argument("--limit", type=int, default=2000, help="max_token_limit (default 2000)")
    chat.add_argument("--language", choices=["en", "zh"], default="en", help="prompt and prefixes")
    chat.add_argument("--verbose", action="store_true", help="print each prompt")

    imp = command(
        "import", "import JSONL, or LangChain's message_store table (idempotent)", cmd_import
    )
    imp.add_argument(
        "file", metavar="FILE", nargs="?", help="a JSONL file written by export; - reads stdin"
    )
    imp.add_argument(
        "--from-langchain", metavar="URL", help="SQLAlchemy URL of LangChain's database"
    )
    imp.add_argument(
        "--table", help="LangChain's table, with --from-langchain (default: message_store)"
    )
    owner(imp)
    encoding(imp, "each record's own encoding")

    export = command("export", "write sessions as JSONL that import reads back", cmd_export)
    export.add_argument("sessions", metavar="SESSION", nargs="*", help="sessions (default: all)")
    owner(export)
    export.add_argument("-o", "--output", metavar="FILE", help="file (default: stdout)")

    rec = command(
        "recount",
        "count tokens for another encoding (none given: fill in rows from before "
        "migration 0003), resumable",
        cmd_recount,
    )
    encoding(rec, "each session's own encoding")
    rec.add_argument(
        "--session", help="only this session: the default owner's unless --owner names another"
    )
    rec.add_argument(
        "--owner",
        help="only this owner's sessions (default: every owner's; with --session, the default "
        "owner's)",
    )

    erase = command("erase", "hard-delete a session, or everything an owner has", cmd_erase)
    erase.add_argument("session", metavar="SESSION", nargs="?", help="the session id")
    owner(erase)
    erase.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (else type yes)"
    )

    verify = command(
        "verify",
        "check that sessions' histories are unchanged (their digest chains); print each head",
        cmd_verify,
    )
    verify.add_argument("sessions", metavar="SESSION", nargs="*", help="the session ids")
    verify.add_argument(
        "--all", action="store_true", help="every session (of --owner, else of every owner)"
    )
    owner(verify)
    verify.add_argument(
        "--expect-head",
        metavar="DIGEST",
        help="a head printed earlier: fail unless the history up to it is unchanged",
    )

    serve = command(
        "serve",
        "the read-only audit viewer in the browser (pip install 'tokenmem[web]')",
        cmd_serve,
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface (default 127.0.0.1; others need --token)"
    )
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    serve.add_argument("--owner", help="show only this owner's sessions")
    serve.add_argument(
        "--token",
        help="required on every request (default: $TOKENMEM_SERVE_TOKEN): "
        "Authorization: Bearer TOKEN, or open ?token=TOKEN once",
    )

    demo = command("demo", "replay the reference notebook: window, chain, history", cmd_demo)
    demo.add_argument("--language", choices=["en", "zh"], default="en", help="en or zh")
    return parser


# Commands that work on a database that exists: a typo'd SQLite path must not
# create an empty file for them to find nothing in.
_EXISTING = {
    "sessions",
    "history",
    "window",
    "turns",
    "export",
    "recount",
    "erase",
    "verify",
    "serve",
}


def _check_exists(args: argparse.Namespace) -> None:
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    from .urls import sqlite_path

    url = args.db or os.environ.get("TOKENMEM_DATABASE_URL")
    existing = ("current", "check", "partition", "unpartition")
    if not url or not (args.command in _EXISTING or args.action in existing):
        return  # the embedded default is made on first use
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return  # the store reports a bad URL
    path = sqlite_path(parsed)
    if path is not None and not os.path.exists(path):
        raise ConfigurationError(
            f"no SQLite database at {path}: check the URL (`tokenmem db upgrade` creates one)"
        )


def _check_args(args: argparse.Namespace) -> None:
    """Usage errors argparse cannot see: options that would be ignored."""
    if args.json and args.command in ("chat", "demo", "serve"):
        raise ConfigurationError(f"{args.command} has no JSON output: drop --json")
    if args.command == "db" and args.action in ("current", "check") and args.revision:
        raise ConfigurationError(f"db {args.action} takes no revision, not {args.revision!r}")
    if args.command == "db" and args.action in ("partition", "unpartition"):
        if args.revision:
            raise ConfigurationError(f"db {args.action} takes no revision, not {args.revision!r}")
        if args.action == "partition" and args.partitions is None:
            raise ConfigurationError("db partition needs --partitions N (e.g. 16)")
    if args.command == "db" and args.action != "partition" and args.partitions is not None:
        raise ConfigurationError("--partitions goes with db partition")
    if args.command == "import":
        if args.file and args.from_langchain:
            raise ConfigurationError("import reads a FILE or --from-langchain URL, not both")
        if not args.file and not args.from_langchain:
            raise ConfigurationError("import needs a FILE (- for stdin) or --from-langchain URL")
        if args.table and not args.from_langchain:
            raise ConfigurationError(
                "--table names LangChain's table: use it with --from-langchain"
            )


def _one_line(exc: TokenmemError) -> str:
    """The error as one line: a database error's first line (SQLAlchemy adds
    the statement and a link below it); any other message whole."""
    text = str(exc)
    if isinstance(exc, StoreError):
        return text.splitlines()[0] if text else type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not hasattr(args, "action"):
        args.action = None
    out = _Out(args.json, sys.stdout)
    store = None
    try:
        from .store import Store

        _check_args(args)
        _check_exists(args)
        # `db` commands report the schema as it is: they never migrate by
        # themselves. The others make the embedded default on first use (a
        # database named by a URL is never migrated but by `db upgrade`).
        upgrade = False if args.command == "db" else None
        store = Store(args.db or None, upgrade=upgrade)
        return int(args.handler(args, store, out))
    except KeyboardInterrupt:
        print("\ntokenmem: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except TokenmemError as exc:
        print(f"tokenmem: {_visible(_one_line(exc))}", file=sys.stderr)
        if isinstance(exc, SessionNotFound):
            return EXIT_NOT_FOUND
        if isinstance(exc, SchemaError):
            return EXIT_SCHEMA
        if isinstance(exc, ConfigurationError):
            return EXIT_USAGE
        return EXIT_FAILURE
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
