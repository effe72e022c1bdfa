"""Database URLs: no error, log line or repr shows a password; bad URLs and
drivers get one line of advice that is right."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError

from tokenmem import ConfigurationError, Store, TokenmemError
from tokenmem.cli import main

from .conftest import PG_URL

SECRET = "S3cr3t"  # in every form of every password below
PW = SECRET + "PW"
ODD = SECRET + "/&:?#@ PW"  # needs percent-encoding in a URL
REFUSED = "127.0.0.1:1"  # nothing listens there: connecting fails at once

FORMS = [
    f"postgresql+psycopg://u:{PW}@127.0.0.1:54x32/app",  # a bad port: not a URL
    f"postgresql+psycopg://u:{PW}@[::1/app",  # an unclosed IPv6 host: not a URL
    "[::1/app",
    f"postgresql+psycopg://u:{PW}@{REFUSED}/app",
    f"postgresql+psycopg://u:{quote(ODD, safe='')}@{REFUSED}/app",
    f"postgresql+psycopg://u@{REFUSED}/app?password={PW}",
    f"postgresql+psycopg://u@{REFUSED}/app?sslpassword={PW}&application_name=a%40b",
    f"postgresql+psycopg://u@{REFUSED}/app?password={quote(ODD, safe='')}",
    f"postgres://u:{PW}@{REFUSED}/app",
    f"postgresql://u:{PW}@{REFUSED}/app",
    f"postgresql+asyncpg://u:{PW}@{REFUSED}/app",
    f"postgresql+psycopg2://u:{PW}@{REFUSED}/app",
    f"mysql+pymysql://u:{PW}@{REFUSED}/app",
    f"nosuchdb://u:{PW}@{REFUSED}/app",
    f"host=127.0.0.1 port=1 password={PW}",  # a libpq DSN, not a URL
    f"u:{PW}@127.0.0.1/app",  # no scheme
    f"postgresql+psycopg://u:{ODD}@{REFUSED}/app",  # not percent-encoded
    # QA A3: an unescaped "@" ends the password for SQLAlchemy; the rest is the host's.
    f"postgresql+psycopg://u:pw@{SECRET}@{REFUSED}/app",
    f"postgresql+psycopg://u:pw@{SECRET}/x@{REFUSED}/app",  # and the database's
    f"postgresql+psycopg://u:pw@{SECRET}@{REFUSED}/app?password={PW}",
    # QA B3: keys and libpq settings in the query.
    f"postgresql+psycopg://u@{REFUSED}/app?api_key={PW}",
    f"postgresql+psycopg://u@{REFUSED}/app?options=-c%20password%3D{PW}",
]


def failure(call: Callable[[], object]) -> str:
    """The TokenmemError ``call`` raises, with its whole chain of causes."""
    with pytest.raises(TokenmemError) as info:
        call()
    return "".join(traceback.format_exception(info.value))


def no_secret(text: str) -> None:
    assert SECRET not in text, text


@pytest.mark.parametrize("url", FORMS)
def test_a_password_is_never_shown(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The library: errors (with their causes), reprs, on both stores.
    no_secret(failure(lambda: Store(url).sessions()))
    with contextlib.suppress(TokenmemError):
        no_secret(repr(Store(url)))

    async def through_async_store() -> None:
        from tokenmem import AsyncStore

        store = AsyncStore(url)
        no_secret(repr(store))
        try:
            await store.sessions()
        finally:
            await store.close()

    no_secret(failure(lambda: asyncio.run(through_async_store())))
    # A memory given the URL.
    from tokenmem import ConversationTokenBufferMemory

    no_secret(failure(lambda: ConversationTokenBufferMemory(store=url, session_id="s").buffer))

    # The command line: --db, TOKENMEM_DATABASE_URL, import --from-langchain.
    target = f"sqlite:///{tmp_path}/target.sqlite3"
    Store(target, upgrade=True).close()
    for argv, env in (
        (["--db", url, "sessions"], None),
        (["sessions"], url),
        (["--db", target, "import", "--from-langchain", url], None),
    ):
        if env is None:
            monkeypatch.delenv("TOKENMEM_DATABASE_URL", raising=False)
        else:
            monkeypatch.setenv("TOKENMEM_DATABASE_URL", env)
        code = main(argv)  # returns: no traceback
        out, err = capsys.readouterr()
        assert code != 0 and err.startswith("tokenmem: ") and len(err.splitlines()) == 1, err
        no_secret(out + err)


def test_a_password_in_a_sqlite_url_query(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a.sqlite3?password={PW}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = Store(url, upgrade=True)
    no_secret(repr(store) + "".join(str(w.message) for w in caught))
    assert repr(store) == f"Store('sqlite:///{tmp_path}/a.sqlite3?password=***')"
    assert repr(store.owner("alice")).endswith(", owner='alice')")
    store.close()


def test_a_driver_message_and_a_retry_log_are_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    from tokenmem.engine import retrying
    from tokenmem.urls import scrub

    url = make_url(f"postgresql+psycopg://u:{quote(ODD, safe='')}@db/app?sslpassword={PW}")
    message = f"failed: {ODD} {quote(ODD, safe='')} {PW} postgresql://x:{PW}@h/d password={PW}"
    no_secret(scrub(message, url))
    assert scrub("nothing secret here", url) == "nothing secret here"
    exc = OperationalError("SELECT 1", {}, Exception(message))
    with caplog.at_level(logging.INFO, logger="tokenmem.store"):
        retrying(exc, 0, url)
    assert caplog.records
    no_secret(caplog.text)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://app:pw@db/app?sslpassword=x", "postgresql+psycopg://app:***@db/app?sslpassword=***"),
        ("postgresql+psycopg://app:pw@db:54x32/app", "postgresql+psycopg://app:***@db:54x32/app"),
        ("postgresql+psycopg://app@db/app?application_name=a%40b", "postgresql+psycopg://app@db/app?application_name=a%40b"),
        ("postgresql://app:p@w@db/app", "postgresql://app:***@db/app"),
        ("sqlite:////var/lib/a.sqlite3", "sqlite:////var/lib/a.sqlite3"),
        ("host=db password='p w' user=app", "host=db password=*** user=app"),
        ("[::1/app", "[::1/app"),
        # QA A3: everything between the user's ":" and the last "@" is the password.
        ("postgresql+psycopg://u:PW@SECRET@127.0.0.1:1/app", "postgresql+psycopg://u:***@127.0.0.1:1/app"),
        ("postgresql+psycopg://u:pw@se/cret@h/app", "postgresql+psycopg://u:***@h/app"),
        ("postgresql+psycopg://u:pw@se/cret@h/app?sslpassword=x", "postgresql+psycopg://u:***@h/app?sslpassword=***"),
        # QA B3: api_key, apikey, key=-like names; libpq's options=-c password=...
        ("postgresql+psycopg://db/app?api_key=k&apikey=k&sslkey=/k.pem", "postgresql+psycopg://db/app?api_key=***&apikey=***&sslkey=***"),
        ("postgresql+psycopg://db/app?options=-c%20password%3Dx%20-c%20search_path%3Da", "postgresql+psycopg://db/app?options=-c+password=***+-c+search_path=a"),
        ("sqlite:///a.db?uri=true&mode=ro", "sqlite:///a.db?uri=true&mode=ro"),
    ],
)  # fmt: skip
def test_shown(url: str, expected: str) -> None:
    from tokenmem.urls import shown

    assert shown(url) == expected


@pytest.mark.parametrize(
    ("url", "drivername"),
    [
        ("postgres://u@h/d", "postgresql+psycopg"),
        ("postgresql://u@h/d", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg"),
        ("sqlite://", "sqlite"),
    ],
)
def test_postgres_urls_mean_psycopg(url: str, drivername: str) -> None:
    from tokenmem.urls import parse_source_url, parse_url

    assert parse_url(url).drivername == drivername
    assert parse_source_url(url).drivername == drivername


def test_postgres_scheme_reaches_postgresql() -> None:
    url = make_url(PG_URL).set(drivername="postgres").render_as_string(hide_password=False)
    store = Store(url)
    try:
        assert store.dialect == "postgresql"
        store.current_revision()  # connects
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "asynchronous", "advice"),
    [
        ("postgresql+psycopg2://u@h/d", False, "use postgresql+psycopg://u@h/d"),
        ("postgresql+asyncpg://u@h/d", True, "use postgresql+psycopg://u@h/d"),
        ("postgresql+pg8000://u@h/d", False, "use postgresql+psycopg://u@h/d"),
        ("sqlite+aiosqlite:///x.db", False, "use sqlite:///x.db"),
        ("sqlite+pysqlite:///x.db", True, "use sqlite+aiosqlite:///x.db"),
        ("mysql://u@h/d", False, "SQLite or PostgreSQL, not mysql"),
    ],
)
def test_tokenmems_own_database_is_told_what_to_use(
    url: str, asynchronous: bool, advice: str
) -> None:
    from tokenmem.urls import parse_url

    with pytest.raises(ConfigurationError) as info:
        parse_url(url, asynchronous=asynchronous)
    assert advice in str(info.value)


@pytest.mark.parametrize(
    ("url", "advice"),
    [
        ("postgresql+asyncpg://u@h/d", "async driver and this reads with a sync one: use postgresql+psycopg://u@h/d"),
        ("sqlite+aiosqlite:///lc.db", "use sqlite:///lc.db"),
        ("postgresql+psycopg2://u@h/d", "use postgresql+psycopg://"),
        ("mysql+mysqldb://u@h/d", "(no module named 'MySQLdb'): install it"),
        ("nosuchdb://u@h/d", "no SQLAlchemy dialect is installed for nosuchdb"),
    ],
)  # fmt: skip
def test_import_from_langchain_advice(
    url: str, advice: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The source of an import may be any SQLAlchemy database, read with a
    sync driver: a URL that cannot be is one line of advice, no traceback."""
    target = f"sqlite:///{tmp_path}/target.sqlite3"
    Store(target, upgrade=True).close()
    code = main(["--db", target, "import", "--from-langchain", url])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and advice in err, err
    assert "tokenmem[async]" not in err


MISSING = """
import sys
sys.modules[{module!r}] = None  # as if not installed
from tokenmem import AsyncStore, Store, TokenmemError
try:
    {call}
except TokenmemError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize(
    ("module", "call", "extra"),
    [
        ("greenlet", "AsyncStore('sqlite:///' + sys.argv[1])", "tokenmem[async]"),
        ("aiosqlite", "AsyncStore('sqlite:///' + sys.argv[1])", "tokenmem[async]"),
        ("psycopg", "AsyncStore('postgresql+psycopg://u@h/d')", "tokenmem[postgres]"),
        ("psycopg", "Store('postgresql://u@h/d')", "tokenmem[postgres]"),
    ],
)
def test_a_missing_driver_names_the_extra(
    module: str, call: str, extra: str, tmp_path: Path
) -> None:
    script = MISSING.format(module=module, call=call)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "a.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.startswith("ConfigurationError ") and extra in done.stdout, done
    assert f"pip install '{extra}'" in done.stdout
    assert not done.stderr


def test_a_spilled_password_is_scrubbed_from_a_drivers_message() -> None:
    """QA A3: psycopg names the host it could not resolve, which holds the
    part of the password after an unescaped "@"."""
    from tokenmem.urls import scrub

    url = make_url(f"postgresql+psycopg://u:pw@{SECRET}@127.0.0.1:1/app")
    assert url.host == f"{SECRET}@127.0.0.1"  # SQLAlchemy's reading of it
    message = f"failed to resolve host '{SECRET}@127.0.0.1': Name or service not known"
    assert (
        scrub(message, url) == "failed to resolve host '***@127.0.0.1': Name or service not known"
    )
    # Pieces are hidden where they are whole words, not inside others.
    url = make_url("postgresql+psycopg://u:pw@se/cret@h/app")
    assert scrub("host 'se' database 'cret@h/app': service", url) == (
        "host '***' database '***@h/app': service"
    )


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:////srv/a.db", "/srv/a.db"),
        ("sqlite:///file:rt1.db?mode=ro&uri=true", "rt1.db"),
        ("sqlite:///file:/srv/a%20b.db?uri=true", "/srv/a b.db"),
        ("sqlite:///file://localhost/srv/a.db?uri=true", "/srv/a.db"),
        ("sqlite:///file:a.db", "file:a.db"),  # without uri=true: a plain name
        ("sqlite:///file::memory:?uri=true", None),
        ("sqlite:///file:a?mode=memory&uri=true", None),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql+psycopg://h/d", None),
    ],
)
def test_sqlite_path(url: str, path: str | None) -> None:
    from tokenmem.urls import sqlite_path

    assert sqlite_path(make_url(url)) == path


def test_an_at_sign_after_the_password_is_refused_with_advice() -> None:
    """QA A3: SQLAlchemy would hand the rest of such a password to the driver
    as the host (or database), which quotes it in its errors."""
    from tokenmem.urls import parse_source_url, parse_url

    for url in (f"postgresql+psycopg://u:pw@{SECRET}@h/app", f"sqlite://u:pw@{SECRET}@/x"):
        for parse in (parse_url, parse_source_url):
            with pytest.raises(ConfigurationError) as info:
                parse(url)
            assert "must be written %40" in str(info.value)
            no_secret(str(info.value))
    # An "@" in a query value is no password's.
    parsed = parse_url("postgresql://u:pw@h/app?application_name=a@b")
    assert (parsed.password, parsed.host, parsed.query) == ("pw", "h", {"application_name": "a@b"})
    assert parse_url("postgresql://u:p%40w@h/app").password == "p@w"
