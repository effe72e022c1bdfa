"""Database URLs: which drivers tokenmem uses, and showing a URL without its secrets.

A URL can carry a password in its user part (``postgresql+psycopg://app:pw@db/app``)
or in its query. The rule for what is secret, in every error, log line and
repr of tokenmem:

- everything written between the user name's ``:`` and the last ``@`` (a
  password with an unescaped ``@`` in it, which SQLAlchemy reads as part of
  the host, is hidden whole);
- the value of a query parameter whose name contains ``pass``, ``pwd``,
  ``secret``, ``token`` or ``key`` (``password``, ``sslpassword``,
  ``api_key``, ``apikey``, ``sslkey``...);
- the value of a ``name=value`` setting with such a name inside any text or
  query value (libpq's ``options=-c password=...``, a DSN ``password=...``).

A URL is shown through :func:`shown` — which also copes with a string that
is not a URL at all — and a driver's message through :func:`scrub`::

    >>> shown("postgresql+psycopg://app:pw@db/app?sslpassword=x")
    'postgresql+psycopg://app:***@db/app?sslpassword=***'
    >>> shown("postgresql+psycopg://app:pw@db:54x32/app")  # a bad port: no URL
    'postgresql+psycopg://app:***@db:54x32/app'
    >>> shown("postgresql+psycopg://app:p@ss@db/app")  # the password is p@ss
    'postgresql+psycopg://app:***@db/app'
    >>> shown("postgresql+psycopg://db/app?api_key=k&options=-c%20password%3Dx")
    'postgresql+psycopg://db/app?api_key=***&options=-c+password=***'

:func:`parse_url` picks tokenmem's drivers for its own database (psycopg 3;
sqlite3, or aiosqlite for the async store); :func:`parse_source_url` takes any
SQLAlchemy URL with a sync driver, for a database tokenmem only reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, quote, quote_plus, unquote, urlsplit

from sqlalchemy import make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

__all__ = ["missing_driver", "parse_source_url", "parse_url", "scrub", "shown", "sqlite_path"]

MASK = "***"
# Query keys (and libpq's key=value settings) whose values are secrets.
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key", re.I)
_SECRET_SETTING = re.compile(
    r"(?i)(?<![\w.-])([\w.-]*(?:pass|pwd|secret|token|key)[\w.-]*\s*=\s*)"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;]*)"
)
# A whole string's user part, up to its last "@" (a password may hold an "@").
_USERINFO = re.compile(r"^(?P<head>[^:/?#@\s]*://)?(?P<user>[^:@]*)(?P<password>:.*)?@", re.S)
# A URL's user part inside other text (a driver's message), up to its last "@".
_URL_USERINFO = re.compile(r"(\b[a-z][\w+.-]*://[^:/@\s]*):\S*@", re.I)
_EXAMPLES = "e.g. postgresql+psycopg://USER@HOST:5432/DB or sqlite:///PATH"
# The module a missing driver lacks -> the extra that installs it.
_EXTRAS = {"psycopg": "postgres", "aiosqlite": "async", "greenlet": "async"}


def _masked(text: str) -> str:
    text = _SECRET_SETTING.sub(lambda m: m[1] + MASK, text)
    return _USERINFO.sub(
        lambda m: (m["head"] or "") + m["user"] + (":" + MASK if m["password"] else "") + "@",
        text,
    )


def _values(values: str | tuple[str, ...]) -> tuple[str, ...]:
    return (values,) if isinstance(values, str) else tuple(values)


def shown(url: str | URL) -> str:
    """``url`` as text to show, its secrets (see the module's rule) replaced
    by ``***``. A string that does not parse as a URL is masked as well as its
    form allows: its user part up to the last ``@``, and ``key=value``
    secrets."""
    if isinstance(url, str):
        text = url
        try:
            url = make_url(text)
        except Exception:  # whatever make_url raises, the string is not shown as is
            return _masked(text)
    spill = _spill(url)
    if spill is not None:  # shown from after the last "@", as the user wrote it
        user = quote(url.username or "", safe="")
        return _masked(f"{url.drivername}://{user}:{MASK}@{_masked_settings(spill[1])}")
    # The query rendered here, so a setting inside a value is masked readably.
    query = [
        quote_plus(key)
        + "="
        + (MASK if _SECRET_KEY.search(key) else quote_plus(_masked_settings(value), safe="*="))
        for key, values in url.query.items()
        for value in _values(values)
    ]
    text = _masked(url.set(query={}).render_as_string(hide_password=True))
    return text + ("?" + "&".join(query) if query else "")


def _masked_settings(text: str) -> str:
    return _SECRET_SETTING.sub(lambda m: m[1] + MASK, text)


def _secrets(url: URL) -> tuple[list[str], list[str]]:
    """``url``'s secrets: whole values (found anywhere in a text), and the
    pieces of a password that SQLAlchemy took for host, port, database or
    query because of an unescaped ``@`` (found as whole words)."""
    found = [url.password] if url.password else []
    for key, values in url.query.items():
        for value in _values(values):
            if _SECRET_KEY.search(key):
                found.append(value)
            else:
                found += [m[2] for m in _SECRET_SETTING.finditer(value)]
    pieces: list[str] = []
    spill = _spill(url)
    if spill is not None:
        pieces = [spill[0], *re.split(r"[/:?&=]", spill[0])]
        pieces += [p.strip() for p in pieces]
    return [s for s in found if s.strip(" '\"")], [p for p in pieces if p]


def _spill(url: URL, *, query: bool = True) -> tuple[str, str] | None:
    """When ``url`` has a password and an ``@`` after it (SQLAlchemy ends the
    password at the first ``@``): what the user wrote between that ``@`` and
    the last one (the rest of the password), and what follows the last; the
    query included unless ``query`` is false."""
    if url.password is None:
        return None
    rest = (url.host or "") + (f":{url.port}" if url.port is not None else "")
    rest += "" if url.database is None else "/" + url.database
    values = "&".join(f"{k}={v}" for k, vs in url.query.items() for v in _values(vs))
    rest += "?" + values if values and query else ""
    if "@" not in rest:
        return None
    spilled, _, after = rest.rpartition("@")
    return spilled, after


def scrub(text: str, url: URL | None = None) -> str:
    """``text`` (say, a driver's error message) without ``url``'s secrets,
    as written or percent-encoded, nor the user part of any URL in it."""
    whole, pieces = _secrets(url) if url is not None else ([], [])
    for secret in whole:
        for form in sorted({secret, quote(secret, safe=""), quote_plus(secret)}, key=len)[::-1]:
            text = text.replace(form, MASK)
    for piece in sorted(set(pieces), key=len, reverse=True):
        text = re.sub(rf"(?<![^\W_]){re.escape(piece)}(?![^\W_])", MASK, text)
    return _URL_USERINFO.sub(lambda m: m[1] + ":" + MASK + "@", _masked_settings(text))


def sqlite_path(url: URL) -> str | None:
    """The file a SQLite URL keeps its database in; None if it is not SQLite,
    or in memory, or a temporary database. A URI filename
    (``sqlite:///file:chat.db?mode=ro&uri=true``) names its file after
    ``file:``, percent-decoded, without its own query."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    path = url.database
    uri = _values(url.query.get("uri", ""))
    if uri and uri[0].strip().lower() in _TRUE and path.startswith("file:"):
        parts = urlsplit(path)
        modes = [*_values(url.query.get("mode", ())), *parse_qs(parts.query).get("mode", [])]
        if "memory" in modes or parts.netloc not in ("", "localhost"):
            return None
        path = unquote(parts.path)
    return None if path in ("", ":memory:") else path


_TRUE = ("true", "yes", "on", "y", "t", "1")  # what SQLAlchemy's pysqlite takes for true


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except Exception:
        # from None: the parser's message may quote a piece of the password.
        raise ConfigurationError(f"not a database URL: {shown(url)} ({_EXAMPLES})") from None
    if _spill(parsed, query=False):
        # SQLAlchemy (like libpq) ends the password at its first "@": the rest
        # would go to the driver as the host or database, and into its errors.
        raise ConfigurationError(
            f"not a database URL: {shown(url)} (an '@' in a password or a database "
            "name must be written %40)"
        )
    name, plus, driver = parsed.drivername.partition("+")
    if name in ("postgres", "postgresql") and driver in ("", "psycopg"):
        # postgres:// is PostgreSQL too (Heroku's and libpq's spelling).
        return parsed.set(drivername="postgresql+psycopg")
    if name == "postgres":
        return parsed.set(drivername="postgresql" + plus + driver)
    return parsed


def parse_url(url: str, *, asynchronous: bool = False) -> URL:
    """Parse the URL of tokenmem's own database: PostgreSQL through psycopg 3
    (``postgres://``, ``postgresql://``, ``postgresql+psycopg://``), SQLite
    through sqlite3, or aiosqlite when ``asynchronous``. Creates a SQLite
    file's directory. Raises :class:`ConfigurationError`, saying what to use."""
    parsed = _parse(url)
    name, _, driver = parsed.drivername.partition("+")
    if name == "postgresql":
        if driver == "psycopg" or (asynchronous and driver == "psycopg_async"):
            return parsed
        use = shown(parsed.set(drivername="postgresql+psycopg"))
        raise ConfigurationError(
            f"tokenmem talks to PostgreSQL through psycopg 3 (sync and async), not {driver}: "
            f"use {use} (pip install 'tokenmem[postgres]')"
        )
    if name == "sqlite":
        if driver not in (("", "aiosqlite") if asynchronous else ("", "pysqlite")):
            want = "sqlite+aiosqlite" if asynchronous else "sqlite"
            store = "AsyncStore" if asynchronous else "Store"
            use = shown(parsed.set(drivername=want))
            raise ConfigurationError(
                f"{store} opens SQLite with {want}://, not {driver}: use {use}"
            )
        if asynchronous:
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        path = sqlite_path(parsed)
        if path is not None:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot create the directory of {shown(parsed)}: {exc.strerror}"
                ) from None
        return parsed
    raise ConfigurationError(
        f"tokenmem keeps its tables in SQLite or PostgreSQL, not {name} ({_EXAMPLES})"
    )


def parse_source_url(url: str) -> URL:
    """Parse the URL of a database tokenmem only reads (an import's source):
    any SQLAlchemy dialect with a sync driver; ``postgres://`` and
    ``postgresql://`` use psycopg 3. Raises :class:`ConfigurationError`."""
    parsed = _parse(url)
    try:
        dialect = parsed.get_dialect()
    except (ArgumentError, ImportError):
        raise ConfigurationError(
            f"no SQLAlchemy dialect is installed for {parsed.drivername}: {shown(parsed)}"
        ) from None
    if dialect.is_async:
        backend = parsed.get_backend_name()
        sync = {"postgresql": "postgresql+psycopg", "sqlite": "sqlite"}.get(backend, backend)
        raise ConfigurationError(
            f"{parsed.drivername} is an async driver and this reads with a sync one: "
            f"use {shown(parsed.set(drivername=sync))}"
        )
    return parsed


def missing_driver(url: URL, exc: ImportError) -> ConfigurationError:
    """The error for a driver of ``url`` that cannot be imported, naming the
    tokenmem extra that installs it (or, for another driver, what to do)."""
    module = (exc.name or "").partition(".")[0]
    reason = f"no module named {module!r}" if module else str(exc).strip().splitlines()[0]
    extra = _EXTRAS.get(module)
    if extra is None and url.drivername in ("postgresql+psycopg", "postgresql+psycopg_async"):
        extra = "postgres"  # psycopg is there, but not its libpq wrapper
    if extra is not None:
        advice = f"pip install 'tokenmem[{extra}]'"
    elif url.get_backend_name() == "postgresql":
        advice = "use postgresql+psycopg:// (psycopg 3, pip install 'tokenmem[postgres]')"
    else:
        advice = "install it, or name an installed driver in the URL"
    return ConfigurationError(
        f"the driver for {url.drivername} cannot be loaded ({reason}): {advice}"
    )
