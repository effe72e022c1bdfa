"""Alembic: up, down and up again; no drift from the models; own version table;
the alembic CLI from the repository root; migrations inside the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from tokenmem import ConversationTokenBufferMemory, Message, Store, TokenCounter, migrate
from tokenmem.models import Base
from tokenmem.transfer import recount

from .conftest import PG_URL
from .test_window import reference_text

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"tokenmem_sessions", "tokenmem_messages"}


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_upgrade_downgrade_upgrade(db: Engine, o200k: TokenCounter) -> None:
    store = Store(db)
    store.upgrade()
    assert tables(db) >= TABLES
    assert store.current_revision() == migrate.head()
    store.append("s", [Message("human", "hi")], o200k)
    store.downgrade("base")
    assert tables(db) & TABLES == set()
    assert store.current_revision() is None
    store.upgrade()
    store.append("s", [Message("human", "hi again")], o200k)
    assert [m.content for m in store.history("s")] == ["hi again"]


def test_models_and_migrations_agree(db: Engine) -> None:
    Store(db).upgrade()
    with db.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    diff = [d for d in diff if "tokenmem_alembic_version" not in str(d)]
    assert diff == []


def test_own_version_table_leaves_the_host_alone(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('host_rev_1')"))
    Store(db).upgrade()
    with db.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
            "host_rev_1"
        ]
        assert conn.execute(
            text("SELECT version_num FROM tokenmem_alembic_version")
        ).scalars().all() == [migrate.head()]


def alembic(*args: str, url: str) -> str:
    env = {**os.environ, "TOKENMEM_DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_alembic_cli_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    said = alembic("upgrade", "head", url=url)
    assert f"Running upgrade 0005 -> {migrate.head()}" in said  # it says what it did
    engine = create_engine(url)
    assert tables(engine) >= TABLES
    assert migrate.head() in alembic("current", url=url)
    alembic("downgrade", "base", url=url)
    assert tables(engine) & TABLES == set()
    engine.dispose()


@pytest.mark.slow
def test_alembic_cli_postgresql() -> None:
    schema = f"cli_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    try:
        alembic("upgrade", "head", url=url)
        with admin.connect() as conn:
            found = (
                conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
                )
                .scalars()
                .all()
            )
        assert TABLES | {"tokenmem_alembic_version"} <= set(found)
        alembic("downgrade", "base", url=url)
        alembic("upgrade", "head", url=url)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.mark.slow
def test_wheel_ships_the_migrations(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("tokenmem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "tokenmem/migrations/env.py",
        "tokenmem/migrations/script.py.mako",
        "tokenmem/migrations/versions/0001_initial.py",
        "tokenmem/py.typed",
        "tokenmem/langchain/__init__.py",
        "tokenmem/langchain/history.py",
        "tokenmem/langchain/memory.py",
        "tokenmem/web.py",
        "tokenmem/templates/base.html",
        "tokenmem/templates/session.html",
    } <= names


def _first_use(url: str) -> str:
    from tokenmem import Store as S

    store = S(url, upgrade=True)
    try:
        return str(store.current_revision())
    finally:
        store.close()


@pytest.mark.slow
def test_concurrent_first_upgrades(db: Engine) -> None:
    """Several processes migrating a fresh database at once: all succeed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    url = db.url.render_as_string(hide_password=False)
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        revisions = list(pool.map(_first_use, [url] * 4))
    assert revisions == [migrate.head()] * 4


def test_only_the_embedded_default_migrates_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, o200k: TokenCounter
) -> None:
    from tokenmem import SchemaError

    monkeypatch.setenv("TOKENMEM_DATABASE_URL", f"sqlite:///{tmp_path}/env.sqlite3")
    store = Store()
    with pytest.raises(SchemaError, match="not migrated"):
        store.append("s", [Message("human", "x")], o200k)
    store.close()


def test_a_database_ahead_of_the_code(db: Engine, o200k: TokenCounter) -> None:
    from tokenmem import SchemaError

    store = Store(db, upgrade=True)
    with db.begin() as conn:
        conn.execute(text("UPDATE tokenmem_alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match=r"does not know.*upgrade tokenmem"):
        store.check()


def test_rows_written_before_0003(db: Engine, o200k: TokenCounter) -> None:
    """Rows from before newline_tokens (NULL) are counted by the old rule: the
    window still fits, is recounted while they are in it, and exact once
    `recount` has filled them in."""
    store = Store(db)
    store.upgrade()
    memory = ConversationTokenBufferMemory(store=store, session_id="old", max_token_limit=60)
    messages = []
    for i in range(12):
        human, ai = f"Question {i}?", f"Answer {i}." + " Fine." * (i % 3)
        memory.save_context({"input": human}, {"output": ai})
        messages += [Message("human", human), Message("ai", ai)]
    # What the code before 0003 left: floors min(text_tokens + 2, chat_tokens + 3).
    store.downgrade("0002")
    with db.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT position, text_tokens, chat_tokens FROM tokenmem_messages ORDER BY position"
            )
        ).all()
        cum = 0
        for position, text_tokens, chat_tokens in rows:
            conn.execute(
                text("UPDATE tokenmem_messages SET cum_floor = :c WHERE position = :p"),
                {"c": cum, "p": position},
            )
            cum += min(text_tokens + 2, chat_tokens + 3)
        conn.execute(text("UPDATE tokenmem_sessions SET floor_total = :c"), {"c": cum})
    store.upgrade()
    assert {m.newline_tokens for m in store.history("old")} == {None}

    def rendered_fits() -> list[Message]:
        window = memory.window()
        assert o200k.count(memory.buffer_as_str) <= 60
        assert [w.message for w in window] == messages[len(messages) - len(window) :]
        return [w.message for w in window]

    assert not all(w.exact for w in memory.window())
    assert rendered_fits()
    stats = store.session_stats()
    assert [s.uncounted for s in stats] == [24]
    # Filling in keeps each session's encoding (None: its own).
    other = Store(db).owner("x")
    other.append("cl", [Message("human", "kept in cl100k")], TokenCounter("cl100k_base"))
    assert recount(store, None) == 1
    assert {m.newline_tokens is None for m in store.history("old")} == {False}
    assert [m.encoding for m in other.history("cl")] == ["cl100k_base"]
    assert all(w.exact for w in memory.window())
    assert rendered_fits() == reference_text(messages, memory.rule, o200k)
    assert recount(store, None) == 0  # nothing left to do
    memory.save_context({"input": "and now?"}, {"output": "Counted."})
    assert store.session_stats()[0].uncounted == 0


PIP_INSTALL = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]


@pytest.mark.slow
def test_the_sdist_carries_tests_that_run(tmp_path: Path) -> None:
    """An sdist builds, installs, and its own tests pass against what it installed."""
    import shutil
    import tarfile

    built = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    sdist = tmp_path / built.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    (source,) = (tmp_path / "src").iterdir()
    assert {"LICENSE", "CHANGELOG.md", "alembic.ini"} <= {p.name for p in source.iterdir()}
    target, work = tmp_path / "site", tmp_path / "work"
    subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(sdist)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    shutil.copytree(source / "tests", work / "tests")  # away from the source's tokenmem/
    done = subprocess.run(
        [*PYTEST, "tests/test_window.py", "tests/test_store.py", "tests/test_parity.py"],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert (
        str(target)
        in subprocess.run(
            [sys.executable, "-c", "import tokenmem; print(tokenmem.__file__)"],
            env={**os.environ, "PYTHONPATH": str(target)},
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def test_0005_round_trip_with_chat_messages(db: Engine, o200k: TokenCounter) -> None:
    """0005 keeps older rows as they were (a unit of their own, no pinned
    prompt until the next save), and its downgrade refuses a database
    holding what the older schema cannot, leaving it intact."""
    store = Store(db)
    store.upgrade()
    store.append("old", [Message("system", "be brief"), Message("human", "hi")], o200k)
    with db.begin() as conn:  # as 0005's upgrade leaves a session
        conn.execute(text("UPDATE tokenmem_sessions SET pinned_first = NULL, pinned_last = NULL"))
    memory = ConversationTokenBufferMemory(store=store, session_id="old", max_token_limit=100)
    assert memory.load_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    memory.save_messages(
        [
            {"role": "developer", "content": "metric units"},
            {"role": "user", "content": "temp?", "x_client": 7},
        ]
    )
    pinned = memory.load_messages()
    assert pinned[0] == {"role": "developer", "content": "metric units"}
    with pytest.raises(Exception, match="cannot downgrade below 0005: 2 messages"):
        store.downgrade("0004")
    assert store.current_revision() == migrate.head()
    assert memory.load_messages() == pinned  # nothing was lost
    store.erase("old")
    store.append("plain", [Message("human", "hi"), Message("ai", "yo")], o200k)
    store.downgrade("0004")
    with db.connect() as conn:
        rows = conn.execute(text("SELECT content FROM tokenmem_messages ORDER BY position"))
        assert rows.scalars().all() == ["hi", "yo"]
    store.upgrade()
    assert ConversationTokenBufferMemory(store=store, session_id="plain").load_messages() == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
