"""Fixtures: every store test runs on a SQLite file and on a real PostgreSQL.

PostgreSQL comes from ``TOKENMEM_TEST_POSTGRES_URL`` (default: the local
server at 127.0.0.1:5432, database ``test``). It is required: without it the
PostgreSQL half of the suite errors, it is never skipped. Each test gets its
own schema (PostgreSQL) or file (SQLite), migrated to the head.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine, create_engine, text

from tokenmem import Store, TokenCounter
from tokenmem.engine import make_engine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

PG_URL = os.environ.get(
    "TOKENMEM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def _close_model_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close the HTTP connections of every OpenAI model a test made (the SDK
    keeps them pooled; left to the garbage collector they warn, at random
    points of later tests)."""
    import tokenmem.llm

    made: list[tokenmem.llm.OpenAI] = []
    original = tokenmem.llm.OpenAI.__init__

    def init(self: tokenmem.llm.OpenAI, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(tokenmem.llm.OpenAI, "__init__", init)
    yield
    for llm in made:
        llm.close()


@pytest.fixture(autouse=True)
def _dispose_engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Dispose of every engine tokenmem made during a test (stores built from
    a URL): their pooled connections are closed now, not by the garbage
    collector at a random later point (Python 3.13's sqlite3 warns then)."""
    import tokenmem.engine

    made: list[Engine] = []
    original = tokenmem.engine.create_engine

    def create(*args: Any, **kwargs: Any) -> Engine:
        engine = original(*args, **kwargs)
        made.append(engine)
        return engine

    monkeypatch.setattr(tokenmem.engine, "create_engine", create)
    yield
    for engine in made:
        engine.dispose()


@pytest.fixture(autouse=True)
def _no_default_database(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A test that forgets to pass a store must not write to the user's home.
    monkeypatch.delenv("TOKENMEM_DATABASE_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))
    import tokenmem.memory

    monkeypatch.setattr(tokenmem.memory, "_default_store", None)
    monkeypatch.setattr(tokenmem.memory, "_stores", {})


def _pg_admin() -> Engine:
    engine = create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL is required at {PG_URL} ({exc}); start it, do not skip", pytrace=False
        )
    return engine


@contextmanager
def fresh_engine(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """A fresh, empty (unmigrated) database on ``backend``."""
    if backend == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path}/tokenmem.sqlite3")
        try:
            yield eng
        finally:
            eng.dispose()
        return
    admin = _pg_admin()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    # The schema travels in the URL, so an async twin of the engine finds it too.
    eng = create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """A fresh, empty database on each backend."""
    with fresh_engine(backend, tmp_path) as eng:
        yield eng


@pytest.fixture
def store(db: Engine) -> Store:
    """A migrated store on each backend."""
    return Store(db, upgrade=True)


@pytest.fixture(scope="session")
def o200k() -> TokenCounter:
    return TokenCounter("o200k_base")


@pytest.fixture(scope="session")
def cl100k() -> TokenCounter:
    return TokenCounter("cl100k_base")


def async_twin(engine: Engine, **options: Any) -> AsyncEngine:
    """An async engine on the same database (and PostgreSQL schema) as
    ``engine``; ``options`` go to ``create_async_engine``."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from tokenmem.engine import tune

    url = engine.url
    if url.get_backend_name() == "sqlite":
        if "pool_size" in options:  # a pool, as SQLAlchemy makes by default since 2.0.38
            from sqlalchemy.pool import AsyncAdaptedQueuePool

            options = {"poolclass": AsyncAdaptedQueuePool, **options}
        twin = create_async_engine(url.set(drivername="sqlite+aiosqlite"), **options)
        tune(twin.sync_engine)
        return twin
    return create_async_engine(url, **options)


from .openai_server import openai_server  # noqa: E402, F401  (fixture)
