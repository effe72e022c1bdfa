"""The audit viewer: a read-only web app over a store (``tokenmem serve``).

Server-rendered HTML (Starlette and Jinja2, no JavaScript) for operators and
auditors: the sessions, one session's full history with the window a limit
and a model would send highlighted, the turn log with each call's prompt
rebuilt exactly as sent, and the digest chains' verdict::

    import uvicorn
    from tokenmem.web import create_app

    app = create_app("postgresql+psycopg://viewer@db/app", owner="alice", token="s3cret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Safe by default:

- **read-only**: only GET routes, and no write path of the store is ever
  called; an engine the app is given or makes is used read-only on
  PostgreSQL (``postgresql_readonly``: the database refuses a write), and
  on SQLite one it makes from a URL (``PRAGMA query_only``);
- **a token** (when given) is checked on every request, with
  :func:`hmac.compare_digest`: ``Authorization: Bearer TOKEN``, or a
  ``?token=TOKEN`` link, which sets an HttpOnly, SameSite=Strict cookie and
  redirects to the same page without it; without a token only requests
  addressed to a loopback name (``127.0.0.1``, ``localhost``) are served
  (against DNS rebinding), and ``tokenmem serve`` refuses another interface;
- **one owner** with ``owner=``: the store's owner scope, so another
  owner's session answers 404 like a missing one;
- everything stored is HTML-escaped (Jinja2's autoescape) and a
  Content-Security-Policy forbids scripts: a message holding ``<script>``
  is shown, never run;
- the database URL is shown with its password masked
  (:func:`tokenmem.urls.shown`); errors show no driver text.

Everything is paged in SQL by position (or seq, or owner and name): keyset
paging, no OFFSET, so a million-message history costs a page per request.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Engine, event

from . import audit, reads
from .chat import traffic
from .engine import make_engine
from .errors import (
    ConfigurationError,
    InvalidInputError,
    SchemaError,
    SessionNotFound,
    StoreError,
    TokenmemError,
)
from .store import Store
from .tokens import TokenCounter
from .urls import shown
from .validate import SessionKey
from .window import REPLY_PRIMING, Mode, Rule

try:
    import jinja2
    from starlette.applications import Starlette
    from starlette.datastructures import MutableHeaders
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route
    from starlette.templating import Jinja2Templates
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as exc:  # the optional extra
    raise ConfigurationError(
        f"the audit viewer needs the web extra ({exc.name} is missing): pip install 'tokenmem[web]'"
    ) from exc

__all__ = ["COOKIE", "LOOPBACK_NAMES", "create_app", "is_loopback"]

COOKIE = "tokenmem_token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
HISTORY_PAGE = 100  # messages per page
# A session page verifies the chains itself up to this many positions; a
# longer history links to /verify, which reads the whole chain.
VERIFY_INLINE = 10_000
LIST_PAGE = 50  # sessions or turns per page

# Scripts, frames, forms elsewhere, plugins: none. Inline CSS only.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to listen on) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class _Guard:
    """Every HTTP request: the token first (when one is set), then the
    security headers on whatever is answered."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token
        # The cookie holds a value derived from the token, not the token.
        self.cookie = (
            None
            if token is None
            else hmac.new(token.encode(), b"tokenmem serve cookie", "sha256").hexdigest()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers[name] = value
            await send(message)

        refusal = self._refusal(Request(scope))
        if refusal is not None:
            await refusal(scope, receive, secured)
        else:
            await self.app(scope, receive, secured)

    def _refusal(self, request: Request) -> Response | None:
        """None when the request may go on; else what to answer."""
        if self.token is None or self.cookie is None:
            return None
        given = request.query_params.get("token")
        if given is not None:
            if not _same(given, self.token):
                return _unauthorized()
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + ("?" + urlencode(rest) if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict")
            return response
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(bearer.strip(), self.token):
            return None
        if _same(request.cookies.get(COOKIE, ""), self.cookie):
            return None
        return _unauthorized()


def _unauthorized() -> Response:
    return PlainTextResponse(
        "401 Unauthorized: this viewer needs its token — open it once with ?token=TOKEN "
        "(kept in a cookie) or send Authorization: Bearer TOKEN\n",
        status_code=401,
        headers={"www-authenticate": "Bearer"},
    )


class _BadRequest(ValueError):
    """A query parameter that cannot be used: answered 400."""


def _int(request: Request, name: str, default: int, least: int) -> int:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer, not {raw!r}") from None
    if not least <= value < 2**62:  # a BIGINT holds it
        raise _BadRequest(f"{name} must be at least {least} and below 2**62, not {value}")
    return value


def _day(request: Request, name: str, *, end: bool = False) -> datetime | None:
    """A ``YYYY-MM-DD`` parameter as the UTC midnight it starts (``end``:
    the midnight after it, for an inclusive last day)."""
    raw = request.query_params.get(name, "")
    if not raw:
        return None
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise _BadRequest(f"{name} must be a date, YYYY-MM-DD, not {raw!r}") from None
    return datetime.combine(day + timedelta(days=end), time(), timezone.utc)


def link(path: str, **params: object) -> str:
    """``path`` with ``params`` as its query (None and "" left out, but an
    owner of "", the default owner, kept)."""
    query = [
        (k, str(v))
        for k, v in params.items()
        if v is not None and (v != "" or k in ("owner", "after_owner"))
    ]
    return path + ("?" + urlencode(query) if query else "")


class _Viewer:
    """The pages: each a sync endpoint (Starlette runs it in a thread), one
    store call or a few per request."""

    def __init__(self, store: Store, templates: Jinja2Templates) -> None:
        self.store = store
        self.templates = templates
        self.confined = store.default_owner if store.scoped else None

    def page(self, request: Request, name: str, code: int = 200, **context: Any) -> Response:
        common = {
            "database": shown(self.store.engine.url),
            "confined": self.confined,
            "link": link,
        }
        return self.templates.TemplateResponse(
            request, name, {**common, **context}, status_code=code
        )

    def _owner(self, request: Request) -> str:
        """The owner a session page names (``""``: the default owner). On a
        viewer confined to one owner, another owner's session is missing."""
        owner = request.query_params.get("owner", self.confined or "")
        if self.confined is not None and owner != self.confined:
            raise SessionNotFound(request.query_params.get("id", ""))
        return owner

    def _session_id(self, request: Request) -> str:
        sid = request.query_params.get("id", "")
        if not sid:
            raise _BadRequest("which session? add ?id=SESSION")
        return sid

    def sessions(self, request: Request) -> Response:
        search = request.query_params.get("q", "")
        owner: str | None = request.query_params.get("owner")
        if self.confined is not None:
            owner = self.confined
        elif owner == "*":
            owner = None
        since, until = _day(request, "since"), _day(request, "until", end=True)
        after_owner = request.query_params.get("after_owner")
        after_id = request.query_params.get("after_id")
        after = None if after_owner is None or after_id is None else (after_owner, after_id)
        work = functools.partial(
            reads.session_page,
            owner=owner,
            after=after,
            limit=LIST_PAGE + 1,
            search=search,
            since=since,
            until=until,
        )
        found = self.store.run(work)
        more = found[LIST_PAGE] if len(found) > LIST_PAGE else None
        found = found[:LIST_PAGE]
        filters = {
            "q": search,
            "owner": request.query_params.get("owner") if self.confined is None else None,
            "since": request.query_params.get("since"),
            "until": request.query_params.get("until"),
        }
        next_link = None
        if more is not None:
            last = found[-1]
            next_link = link("/", **filters, after_owner=last.owner_id, after_id=last.session_id)
        return self.page(
            request,
            "sessions.html",
            sessions=found,
            filters=filters,
            next_link=next_link,
            first_link=link("/", **filters) if after else None,
        )

    def session(self, request: Request) -> Response:
        sid, owner = self._session_id(request), self._owner(request)
        info = self.store.session(sid, owner=owner)
        limit = _int(request, "limit", 2000, 1)
        mode: Mode = "text"
        if request.query_params.get("mode", "text") == "messages":
            mode = "messages"
        elif request.query_params.get("mode", "text") != "text":
            raise _BadRequest("mode must be text or messages")
        model = request.query_params.get("model", "")
        encoding = request.query_params.get("encoding", "")
        if encoding:
            counter = TokenCounter(encoding)
        elif model:
            counter = TokenCounter.for_model(model)
        else:  # as the session was counted
            counter = TokenCounter(info.encoding or "o200k_base")
        window = self.store.window(sid, Rule(limit=limit, mode=mode), counter, owner=owner)
        costs: dict[int, tuple[int, int, bool]] = {}
        running = 0
        for w in window:
            running += w.tokens
            costs[w.position] = (w.tokens, running, w.pinned)
        used = running + (REPLY_PRIMING if mode == "messages" and window else 0)
        verified = None
        if info.next_position <= VERIFY_INLINE:
            verified = self.store.verify(sid, owner=owner)
        after = _int(request, "after", -1, -1)
        got = self.store.history_page(sid, owner=owner, after=after, limit=HISTORY_PAGE + 1)
        rows = [
            (m, *traffic(m.type, m.content, m.openai), costs.get(m.position))
            for m in got[:HISTORY_PAGE]
        ]
        here = {"id": sid, "owner": owner}
        form = {"limit": limit, "mode": mode, "model": model, "encoding": encoding}
        unpinned = [w.position for w in window if not w.pinned]
        # Positions are gapless: the page before starts a page's length back.
        return self.page(
            request,
            "session.html",
            info=info,
            here=here,
            form=form,
            encoding=counter.encoding_name,
            window=window,
            used=used,
            verified=verified,
            rows=rows,
            window_link=link("/session", **here, **form, after=unpinned[0] - 1)
            if unpinned
            else None,
            next_link=link("/session", **here, **form, after=got[HISTORY_PAGE - 1].position)
            if len(got) > HISTORY_PAGE
            else None,
            prev_link=link("/session", **here, **form, after=max(-1, after - HISTORY_PAGE))
            if after > -1
            else None,
        )

    def turns(self, request: Request) -> Response:
        sid, owner = self._session_id(request), self._owner(request)
        info = self.store.session(sid, owner=owner)
        key = SessionKey.of(sid, info.owner_id)
        after = _int(request, "after", -1, -1)
        work = functools.partial(audit.turns, key=key, after=after, limit=LIST_PAGE + 1)
        got = self.store.run(work)
        here = {"id": sid, "owner": owner}
        return self.page(
            request,
            "turns.html",
            info=info,
            here=here,
            turns=[(t, audit.prompt_ratio(t)) for t in got[:LIST_PAGE]],
            next_link=link("/turns", **here, after=got[LIST_PAGE - 1].seq)
            if len(got) > LIST_PAGE
            else None,
            prev_link=link("/turns", **here, after=max(-1, after - LIST_PAGE))
            if after > -1
            else None,
        )

    def turn(self, request: Request) -> Response:
        sid, owner = self._session_id(request), self._owner(request)
        info = self.store.session(sid, owner=owner)
        seq = _int(request, "seq", -1, 0)
        if seq < 0:
            raise _BadRequest("which call? add &seq=N")
        key = SessionKey.of(sid, info.owner_id)
        (record,) = self.store.run(functools.partial(audit.turns, key=key, seq=seq))
        prompt: str | None
        problem: str | None
        try:
            sent = self.store.rebuild_prompt(sid, seq, owner=owner)
        except SessionNotFound as exc:  # its window was pruned or erased
            prompt, problem, as_json = None, str(exc), False
        else:
            as_json = not isinstance(sent, str)
            prompt = (
                sent if isinstance(sent, str) else json.dumps(sent, indent=2, ensure_ascii=False)
            )
            problem = None
        return self.page(
            request,
            "turn.html",
            info=info,
            here={"id": sid, "owner": owner},
            t=record,
            ratio=audit.prompt_ratio(record),
            prompt=prompt,
            as_json=as_json,
            problem=problem,
        )

    def verify(self, request: Request) -> Response:
        sid, owner = self._session_id(request), self._owner(request)
        report = self.store.verify(sid, owner=owner)
        here = {"id": sid, "owner": owner}
        return self.page(request, "verify.html", here=here, report=report)

    async def error(self, request: Request, exc: Exception) -> Response:
        """Our errors as a page: a missing (or another owner's) session is
        404; a bad parameter 400; a database error 503, without its text."""
        status, message = 500, "internal error"
        if isinstance(exc, SessionNotFound):
            status, message = 404, f"not found: {exc}"
        elif isinstance(exc, _BadRequest | ConfigurationError | InvalidInputError):
            status, message = 400, str(exc)
        elif isinstance(exc, SchemaError):
            status, message = 503, str(exc)
        elif isinstance(exc, StoreError):
            status, message = 503, "database error (see the server's log)"
        return self.page(request, "error.html", status, status=status, message=message)


def _query_only(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA query_only = ON")
    cursor.close()


def _store(source: Store | Engine | str) -> Store:
    """The store the viewer reads: a Store as it is; an engine or URL read
    only. On PostgreSQL every transaction is READ ONLY (the database refuses
    a write; a host's engine is left unchanged: the option is the copy's);
    on SQLite an engine made from a URL has ``PRAGMA query_only`` on every
    connection (an engine passed in is the host's: its pool is not touched)."""
    if isinstance(source, Store):
        return source
    engine = source if isinstance(source, Engine) else make_engine(source)
    if isinstance(source, str) and engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _query_only)  # after tune's pragmas
    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(postgresql_readonly=True)
    return Store(engine, upgrade=False)


def create_app(
    store: Store | Engine | str,
    *,
    owner: str | None = None,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The audit viewer as an ASGI app (serve it with uvicorn).

    ``store``: a :class:`Store` (used as it is), or an engine or URL (read
    through a read-only store of its own; it is never migrated).
    ``owner``: confine the viewer to that owner's sessions. ``token``:
    required on every request (see the module docstring). ``allowed_hosts``:
    the Host names served; default: loopback names only when there is no
    token, any with one. Raises :class:`ConfigurationError` for an empty
    token."""
    if token is not None and not token:
        raise ConfigurationError("an empty token protects nothing: give one or none")
    base = _store(store)
    viewer = _Viewer(base if owner is None else base.owner(owner), _templates())
    if allowed_hosts is None:
        allowed_hosts = ["*"] if token else [*LOOPBACK_NAMES, "[::1]"]
    handler: Callable[[Request, Exception], Any] = viewer.error
    app = Starlette(
        routes=[
            Route("/", viewer.sessions, methods=["GET"]),
            Route("/session", viewer.session, methods=["GET"]),
            Route("/turns", viewer.turns, methods=["GET"]),
            Route("/turn", viewer.turn, methods=["GET"]),
            Route("/verify", viewer.verify, methods=["GET"]),
        ],
        middleware=[
            Middleware(_Guard, token=token),
            Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)),
        ],
        exception_handlers={TokenmemError: handler, _BadRequest: handler},
    )
    app.state.store = viewer.store  # what it reads (a host closes it with its engine)
    return app


@functools.cache
def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tokenmem", "templates"),
        autoescape=True,  # every page is HTML: stored text is escaped, always
        undefined=jinja2.StrictUndefined,
    )
    return Jinja2Templates(env=env)
