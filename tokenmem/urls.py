"""Database URLs: which drivers tokenmem uses, and showing a URL without its secrets.

A URL can carry a password in its user part (``postgresql+psycopg://app:pw@db/app``)
or in its query (``?password=pw``, ``?sslpassword=...``). Every error, log line
and repr of tokenmem shows a URL through :func:`shown` — which also copes with
a string that is not a URL at all — and a driver's message through
:func:`scrub`::

    >>> shown("postgresql+psycopg://app:pw@db/app?sslpassword=x")
    'postgresql+psycopg://app:***@db/app?sslpassword=***'
    >>> shown("postgresql+psycopg://app:pw@db:54x32/app")  # a bad port: no URL
    'postgresql+psycopg://app:***@db:54x32/app'

:func:`parse_url` picks tokenmem's drivers for its own database (psycopg 3;
sqlite3, or aiosqlite for the async store); :func:`parse_source_url` takes any
SQLAlchemy URL with a sync driver, for a database tokenmem only reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, quote_plus

from sqlalchemy import make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

__all__ = ["missing_driver", "parse_source_url", "parse_url", "scrub", "shown"]

MASK = "***"
# Query keys (and libpq's key=value settings) whose values are secrets.
_SECRET_KEY = re.compile(r"pass|pwd|secret|token", re.I)
_SECRET_SETTING = re.compile(
    r"(?i)(?<![\w.-])([\w.-]*(?:pass|pwd|secret|token)[\w.-]*\s*=\s*)"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;]*)"
)
# A whole string's user part, up to its last "@" (a password may hold an "@").
_USERINFO = re.compile(r"^(?P<head>[^:/?#@\s]*://)?(?P<user>[^:@]*)(?P<password>:.*)?@", re.S)
# A URL's user part inside other text (a driver's message).
_URL_USERINFO = re.compile(r"(\b[a-z][\w+.-]*://[^:/@\s]*):[^@\s]*@", re.I)
_EXAMPLES = "e.g. postgresql+psycopg://USER@HOST:5432/DB or sqlite:///PATH"
# The module a missing driver lacks -> the extra that installs it.
_EXTRAS = {"psycopg": "postgres", "aiosqlite": "async", "greenlet": "async"}


def _masked(text: str) -> str:
    text = _SECRET_SETTING.sub(lambda m: m[1] + MASK, text)
    return _USERINFO.sub(
        lambda m: (m["head"] or "") + m["user"] + (":" + MASK if m["password"] else "") + "@",
        text,
    )


def shown(url: str | URL) -> str:
    """``url`` as text to show: its password and secret query values (keys
    with pass, pwd, secret or token in them) replaced by ``***``. A string
    that does not parse as a URL is masked as well as its form allows: its
    user part up to the last ``@``, and ``key=value`` secrets."""
    if isinstance(url, str):
        text = url
        try:
            url = make_url(text)
        except Exception:  # whatever make_url raises, the string is not shown as is
            return _masked(text)
    return _masked(url.render_as_string(hide_password=True))


def _secrets(url: URL) -> list[str]:
    found = [url.password] if url.password else []
    for key, values in url.query.items():
        if _SECRET_KEY.search(key):
            found += [v for v in ((values,) if isinstance(values, str) else values) if v]
    return found


def scrub(text: str, url: URL | None = None) -> str:
    """``text`` (say, a driver's error message) without ``url``'s secrets,
    as written or percent-encoded, nor the user part of any URL in it."""
    for secret in _secrets(url) if url is not None else ():
        for form in sorted({secret, quote(secret, safe=""), quote_plus(secret)}, key=len)[::-1]:
            text = text.replace(form, MASK)
    return _URL_USERINFO.sub(lambda m: m[1] + ":" + MASK + "@", _SECRET_SETTING.sub(r"\1***", text))


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except Exception:
        # from None: the parser's message may quote a piece of the password.
        raise ConfigurationError(f"not a database URL: {shown(url)} ({_EXAMPLES})") from None
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
        if parsed.database not in (None, "", ":memory:"):
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
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
