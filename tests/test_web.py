"""The audit viewer (tokenmem.web, `tokenmem serve`): over HTTP with
Starlette's TestClient, and in a real headless Chromium against a uvicorn
server on 127.0.0.1 — what a person would see."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tokenmem import (
    ChatOpenAI,
    ConversationChain,
    ConversationTokenBufferMemory,
    Message,
    Store,
    StoreError,
    TokenCounter,
)
from tokenmem.cli import main
from tokenmem.models import MESSAGES, SESSIONS, TURNS
from tokenmem.web import COOKIE, create_app, is_loopback
from tokenmem.window import Rule

from .conftest import fresh_engine
from .openai_server import FakeOpenAI

SCRIPT = "<script>window.__pwned = 1; document.title = 'pwned'</script>"
TOKEN = "correct-horse-battery-staple"


def client(app: Starlette, **options: Any) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1", **options)


def chat_session(server: FakeOpenAI, store: Store, session_id: str = "chat-1") -> str:
    """A session written through the chain (so the turn log has rows), with a
    ``<script>`` in a message and a tool call answered."""
    model = ChatOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=5.0)
    memory = ConversationTokenBufferMemory(
        llm=model, max_token_limit=60, store=store, session_id=session_id
    )
    chain = ConversationChain(llm=model, memory=memory)
    server.reply("Hello! How can I help?", f"I will not run {SCRIPT}", "It is sunny.")
    chain.predict(input="Hi there, I am Ann.")
    chain.predict(input=f"Please show this: {SCRIPT}")
    weather = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    call = {"id": "call_1", "type": "function", "function": weather}
    memory.save_messages(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        ]
    )
    chain.predict(input="And tomorrow?")
    return session_id


def in_window(html: str) -> list[int]:
    return [int(p) for p in re.findall(r'data-position="(\d+)"[^>]*data-in-window="1"', html)]


def snapshot(store: Store) -> tuple[Any, ...]:
    """What a read-only viewer must leave as it found it."""

    def read(conn: Any) -> tuple[Any, ...]:
        return (
            conn.execute(select(func.count()).select_from(MESSAGES)).scalar(),
            conn.execute(select(func.count()).select_from(TURNS)).scalar(),
            conn.execute(
                select(SESSIONS.c.name, SESSIONS.c.head_digest, SESSIONS.c.updated_at).order_by(
                    SESSIONS.c.name
                )
            ).all(),
        )

    return store.run(read)


# --- over HTTP ------------------------------------------------------------------


def test_pages_escape_stored_text_and_forbid_scripts(
    openai_server: FakeOpenAI, store: Store
) -> None:
    sid = chat_session(openai_server, store)
    store.append(
        "<b>bold id</b>",
        [Message("human", '"><img src=x onerror=alert(1)>')],
        TokenCounter("o200k_base"),
    )
    with client(create_app(store)) as http:
        pages = {
            "/": http.get("/"),
            "session": http.get("/session", params={"id": sid, "limit": 500}),
            "bold": http.get("/session", params={"id": "<b>bold id</b>"}),
            "turns": http.get("/turns", params={"id": sid}),
            "turn": http.get("/turn", params={"id": sid, "seq": 1}),
            "verify": http.get("/verify", params={"id": sid}),
        }
    for name, page in pages.items():
        assert page.status_code == 200, name
        assert "<script" not in page.text.lower(), name
        assert "<img" not in page.text and "<b>bold" not in page.text, name
        assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none'
        assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "&lt;script&gt;window.__pwned" in pages["session"].text
    assert "&lt;b&gt;bold id&lt;/b&gt;" in pages["/"].text
    # tool calls and answers are shown
    assert "→ call_1 get_weather({&#34;city&#34;: &#34;Paris&#34;})" in pages["session"].text
    assert "← call_1" in pages["session"].text
    assert "intact" in pages["verify"].text


def test_window_highlight_and_rebuilt_prompt(openai_server: FakeOpenAI, store: Store) -> None:
    sid = chat_session(openai_server, store)
    counter = TokenCounter.for_model("gpt-4o-mini")
    with client(create_app(store)) as http:
        for limit, mode in ((60, "messages"), (25, "text"), (10_000, "messages")):
            page = http.get(
                "/session", params={"id": sid, "limit": limit, "mode": mode, "model": "gpt-4o-mini"}
            )
            expected = store.window(sid, Rule(limit=limit, mode=mode), counter)
            assert in_window(page.text) == [w.position for w in expected], (limit, mode)
        for turn in store.turns(sid):
            page = http.get("/turn", params={"id": sid, "seq": turn.seq})
            shown = re.search(r'<pre id="prompt" data-format="json">(.*?)</pre>', page.text, re.S)
            assert shown is not None
            assert json.loads(unescape(shown[1])) == store.rebuild_prompt(sid, turn.seq or 0)


def test_token_is_checked_on_every_request(store: Store) -> None:
    store.append("s", [Message("human", "hi")], TokenCounter("o200k_base"))
    app = create_app(store, token=TOKEN)
    with client(app) as http:
        assert http.get("/").status_code == 401
        assert http.get("/session", params={"id": "s"}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert http.get("/", headers=wrong).status_code == 401
        assert http.get("/", params={"token": "nope"}).status_code == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert http.get("/", headers=right).status_code == 200
        assert not http.cookies
        # ?token= sets a cookie and redirects to the page without it
        first = http.get("/session", params={"id": "s", "token": TOKEN}, follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/session?id=s"
        assert "HttpOnly" in first.headers["set-cookie"]
        assert TOKEN not in first.headers["set-cookie"]  # a value derived from it
        assert http.get("/session", params={"id": "s"}).status_code == 200
        http.cookies.clear()
        http.cookies.set(COOKIE, "forged")
        assert http.get("/").status_code == 401
    assert TOKEN not in client(app).get("/").text


def test_without_a_token_only_loopback_names_are_served(store: Store) -> None:
    app = create_app(store)
    assert TestClient(app, base_url="http://evil.example").get("/").status_code == 400
    assert TestClient(app, base_url="http://localhost:8000").get("/").status_code == 200
    assert (
        TestClient(create_app(store, token=TOKEN), base_url="http://viewer.lan")
        .get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        .status_code
        == 200
    )
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2")] == [True] * 4
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com"))


def test_owner_scope_hides_other_owners(store: Store) -> None:
    counter = TokenCounter("o200k_base")
    store.append("shared", [Message("human", "alice's words")], counter, owner="alice")
    store.append("shared", [Message("human", "bob's secret")], counter, owner="bob")
    store.append("bobs-only", [Message("human", "bob's other secret")], counter, owner="bob")
    with client(create_app(store, owner="alice")) as http:
        listing = http.get("/", params={"owner": "bob"}).text  # the filter cannot widen it
        assert "alice" in listing and "bobs-only" not in listing and "bob" not in listing
        page = http.get("/session", params={"id": "shared"})
        assert page.status_code == 200 and "alice&#39;s words" in page.text
        assert "secret" not in page.text
        for path in ("/session", "/turns", "/verify"):
            for params in ({"id": "shared", "owner": "bob"}, {"id": "bobs-only"}):
                answer = http.get(path, params=params)
                assert answer.status_code == 404 and "secret" not in answer.text, (path, params)
    with client(create_app(store)) as http:  # unconfined: every owner, or one
        assert "bobs-only" in http.get("/").text
        assert "bobs-only" not in http.get("/", params={"owner": "alice"}).text
        assert (
            "bob&#39;s secret" in http.get("/session", params={"id": "shared", "owner": "bob"}).text
        )


def test_no_database_password_reaches_a_page(tmp_path: Path) -> None:
    with fresh_engine("postgresql", tmp_path) as db:
        Store(db, upgrade=True).append("s", [Message("human", "hi")], TokenCounter("o200k_base"))
        # (trust authentication: the server ignores the password)
        url = db.url.set(password="hunter2-db-secret").render_as_string(hide_password=False)
        app = create_app(url)
        with client(app) as http:
            pages = [
                http.get("/"),
                http.get("/session", params={"id": "s"}),
                http.get("/session", params={"id": "missing"}),
                http.get("/session", params={"id": "s", "limit": "x"}),
                http.get("/turns", params={"id": "s"}),
                http.get("/verify", params={"id": "s"}),
            ]
        assert [p.status_code for p in pages] == [200, 200, 404, 400, 200, 200]
        for page in pages:
            assert "hunter2" not in page.text
        assert "postgres:***@127.0.0.1" in pages[0].text
        app.state.store.close()


def test_paging_is_keyset_in_sql(store: Store, db: Engine) -> None:
    counter = TokenCounter("o200k_base")
    store.append_many("long", [Message("human", f"message {i}") for i in range(250)], counter)
    for i in range(60):
        store.append(f"s{i:03}", [Message("human", "hi")], counter)
    offsets: list[object] = []  # every OFFSET a statement skips rows with

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        if statement.startswith("SELECT kept."):
            return  # the window statement (tests/test_window_plans.py checks its plans)
        if "OFFSET" in statement.upper():  # SQLite's LIMIT ? OFFSET ?: the last parameter
            offsets.append(parameters[-1] if statement.rstrip().endswith("?") else statement)

    event.listen(db, "before_cursor_execute", seen)
    with client(create_app(store)) as http:
        first = http.get("/session", params={"id": "long"}).text
        positions = [int(p) for p in re.findall(r'data-position="(\d+)"', first)]
        assert positions == list(range(100))
        after = re.search(r'id="next" href="([^"]+)"', first)
        assert after is not None and "after=99" in unescape(after[1])
        third = http.get("/session", params={"id": "long", "after": 199}).text
        positions = [int(p) for p in re.findall(r'data-position="(\d+)"', third)]
        assert positions == list(range(200, 250)) and 'id="next"' not in third
        assert "after=99" in unescape(third)  # « previous
        listing = http.get("/").text
        assert len(re.findall(r"<tr data-session=", listing)) == 50
        more = re.search(r'id="next" href="([^"]+)"', listing)
        assert more is not None
        rest = http.get(unescape(more[1])).text
        assert len(re.findall(r"<tr data-session=", rest)) == 11 and 'id="next"' not in rest
        assert 'data-session="s049"' in rest and 'data-session="s048"' not in rest
        found = http.get("/", params={"q": "s05"}).text
        assert len(re.findall(r"<tr data-session=", found)) == 10
        assert (
            http.get("/", params={"since": "2000-01-01", "until": "2000-12-31"}).text.count(
                "<tr data-session="
            )
            == 0
        )
        turns = http.get("/turns", params={"id": "long", "after": 5})
        assert turns.status_code == 200
    event.remove(db, "before_cursor_execute", seen)
    assert all(offset == 0 for offset in offsets), offsets


def test_browsing_changes_nothing(openai_server: FakeOpenAI, store: Store, db: Engine) -> None:
    sid = chat_session(openai_server, store)
    before = snapshot(store)
    app = create_app(db)  # an engine: read through a store of the viewer's own
    with client(app) as http:
        for path, params in [
            ("/", {}),
            ("/session", {"id": sid, "limit": 30}),
            ("/turns", {"id": sid}),
            ("/turn", {"id": sid, "seq": 0}),
            ("/verify", {"id": sid}),
        ]:
            assert http.get(path, params=params).status_code == 200
            assert http.post(path, params=params).status_code == 405
    assert snapshot(store) == before and store.verify(sid).ok
    viewer: Store = app.state.store
    if db.dialect.name == "postgresql":  # the database itself refuses a write
        with pytest.raises(StoreError, match="read-only transaction"):
            viewer.append(sid, [Message("human", "x")], TokenCounter("o200k_base"))
    else:  # and the store's own engine still writes
        store.append(sid, [Message("human", "x")], TokenCounter("o200k_base"))
        url = db.url.render_as_string(hide_password=False)
        from_url: Store = create_app(url).state.store  # its own engine: query_only
        assert from_url.verify(sid).ok
        with pytest.raises(StoreError, match="readonly database"):
            from_url.append(sid, [Message("human", "x")], TokenCounter("o200k_base"))
        from_url.close()


def test_a_broken_chain_shows_where(store: Store) -> None:
    counter = TokenCounter("o200k_base")
    for i in range(3):
        store.append("s", [Message("human", f"hi {i}")], counter)
    with client(create_app(store)) as http:
        assert "badge ok" in http.get("/session", params={"id": "s"}).text
        store.run(
            lambda conn: conn.execute(
                MESSAGES.update().where(MESSAGES.c.position == 1).values(content="HI")
            )
        )
        page = http.get("/session", params={"id": "s"}).text
        assert "BROKEN</span></a> at message position 1" in page
        verdict = http.get("/verify", params={"id": "s"}).text
        assert "BROKEN</span> at message position 1: its digest does not match" in verdict


def test_bad_parameters_are_400_pages(store: Store) -> None:
    store.append("s", [Message("human", "hi")], TokenCounter("o200k_base"))
    with client(create_app(store)) as http:
        for params in (
            {"id": "s", "limit": "0"},
            {"id": "s", "mode": "poetry"},
            {"id": "s", "encoding": "no_such_encoding"},
            {"id": "s", "after": "x"},
            {"id": "s", "after": str(2**64)},  # not a BIGINT
            {"id": "s", "model": "no-such-model"},
            {},
        ):
            answer = http.get("/session", params=params)
            assert answer.status_code == 400, params
        assert http.get("/", params={"since": "yesterday"}).status_code == 400
        assert http.get("/turn", params={"id": "s", "seq": 7}).status_code == 404


def test_serve_refuses_another_interface_without_a_token(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    url = store.engine.url.render_as_string(hide_password=False)
    runs: list[tuple[Any, tuple[str, int]]] = []

    def run(server: uvicorn.Server, sockets: list[socket.socket]) -> None:
        (sock,) = sockets  # bound by tokenmem: a port in use is its error, not uvicorn's
        runs.append((server.config, sock.getsockname()[:2]))

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.delenv("TOKENMEM_SERVE_TOKEN", raising=False)
    for host in ("0.0.0.0", "192.168.1.2", "::"):
        assert main(["--db", url, "serve", "--host", host]) == 2
        assert "refusing to serve on" in capsys.readouterr().err and not runs
    free = [free_port() for _ in range(3)]
    assert (
        main(["--db", url, "serve", "--host", "0.0.0.0", "--token", TOKEN, "--port", f"{free[0]}"])
        == 0
    )
    monkeypatch.setenv("TOKENMEM_SERVE_TOKEN", TOKEN)
    assert main(["--db", url, "serve", "--host", "0.0.0.0", "--port", f"{free[1]}"]) == 0
    assert main(["--db", url, "serve", "--port", f"{free[2]}"]) == 0
    assert [bound for _, bound in runs] == [
        ("0.0.0.0", free[0]),
        ("0.0.0.0", free[1]),
        ("127.0.0.1", free[2]),
    ]
    assert all(config.access_log is False for config, _ in runs)  # a ?token= is never logged
    assert TOKEN not in capsys.readouterr().err
    # A port in use, or none at all: a clear error, before "serving" is said.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--db", url, "serve", "--port", f"{port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1 port {port}" in err and "serving" not in err
    for bad in ("99999", "0", "http"):
        with pytest.raises(SystemExit) as exit_:
            main(["--db", url, "serve", "--port", bad])
        assert exit_.value.code == 2
        assert "PORT must be a number from 1 to 65535" in capsys.readouterr().err
    assert len(runs) == 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_on_the_embedded_default_makes_it_as_every_command_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tokenmem serve`` with no --db on a new machine serves the embedded
    default, made and migrated on first use as by every other command (a
    database named by a URL is never migrated: the test above)."""
    import uvicorn

    runs: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: runs.append(server))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert main(["serve", "--port", f"{free_port()}"]) == 0, capsys.readouterr().err
    (server,) = runs
    app = server.config.app
    assert app.state.store.sessions() == []
    assert (tmp_path / "tokenmem" / "tokenmem.sqlite3").exists()


def test_without_the_extra_the_error_names_it() -> None:
    code = "import sys; sys.modules['jinja2'] = None; import tokenmem.web"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "pip install 'tokenmem[web]'" in done.stderr


# --- in a real browser --------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's headless Chromium, driven through its chromedriver: nothing
    is downloaded, and the browser stays off the network."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(
            f"the browser tests need {' and '.join(missing)}: run `sh tests/install-browser.sh` "
            "(apt-get install chromium chromium-driver)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 at a free port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", ws="none", http="h11"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def shot(driver: Any, tmp_path: Path, name: str) -> None:
    """Save a screenshot; with TOKENMEM_SCREENSHOTS=DIR, there too (the
    README's docs/viewer.png is taken this way)."""
    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    keep = os.environ.get("TOKENMEM_SCREENSHOTS")
    if keep:
        shutil.copy(tmp_path / f"{name}.png", Path(keep) / f"{name}.png")


def test_in_the_browser(
    browser: Any, openai_server: FakeOpenAI, store: Store, tmp_path: Path, backend: str
) -> None:
    from selenium.webdriver.common.by import By

    sid = chat_session(openai_server, store)
    store.append("support-42", [Message("human", "Where is my order?")], TokenCounter("o200k_base"))
    with serving(create_app(store)) as base:
        browser.get(base + "/")
        assert browser.title.startswith("Sessions")
        rows = browser.find_elements(By.CSS_SELECTOR, "#sessions tr[data-session]")
        assert [r.get_attribute("data-session") for r in rows] == [sid, "support-42"]
        shot(browser, tmp_path, f"sessions-{backend}")

        # the window a limit and model would send, highlighted as store.window says
        browser.find_element(By.LINK_TEXT, sid).click()
        form = browser.find_element(By.CSS_SELECTOR, "form.bar")
        limit = form.find_element(By.NAME, "limit")
        limit.clear()
        limit.send_keys("60")
        form.find_element(By.NAME, "model").send_keys("gpt-4o-mini")
        form.find_element(By.CSS_SELECTOR, "option[value=messages]").click()
        form.submit()
        highlighted = browser.find_elements(By.CSS_SELECTOR, "tr.in-window")
        counter = TokenCounter.for_model("gpt-4o-mini")
        expected = store.window(sid, Rule(limit=60, mode="messages"), counter)
        assert [int(r.get_attribute("data-position")) for r in highlighted] == [
            w.position for w in expected
        ]
        colour = highlighted[0].value_of_css_property("background-color")
        plain = browser.find_element(By.CSS_SELECTOR, "tr[data-position='0']")
        assert colour != plain.value_of_css_property("background-color")  # seen, not just marked
        # the <script> is shown as text and never ran
        assert browser.execute_script("return window.__pwned === undefined")
        assert "pwned" not in browser.title
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "<script>window.__pwned = 1;" in body
        assert "→ call_1 get_weather(" in body and "← call_1" in body
        shot(browser, tmp_path, f"viewer-{backend}" if backend != "sqlite" else "viewer")

        # the turn log, and a call's prompt as it was sent
        browser.find_element(By.LINK_TEXT, "Turn log").click()
        seqs = browser.find_elements(By.CSS_SELECTOR, "#turns tr[data-seq]")
        assert len(seqs) == len(store.turns(sid)) == 3
        browser.find_element(By.LINK_TEXT, "2").click()
        sent = json.loads(browser.find_element(By.ID, "prompt").text)
        assert sent == store.rebuild_prompt(sid, 2)
        assert browser.execute_script("return window.__pwned === undefined")
        shot(browser, tmp_path, f"turn-{backend}")

        browser.get(f"{base}/verify?id={sid}")
        assert browser.find_element(By.ID, "verdict").text.startswith("intact")

    # off loopback a token is required: without it, nothing but a 401
    with serving(create_app(store, token=TOKEN)) as base:
        browser.delete_all_cookies()
        browser.get(base + "/")
        assert "401 Unauthorized" in browser.find_element(By.TAG_NAME, "body").text
        assert not browser.find_elements(By.ID, "sessions")
        browser.get(f"{base}/?token={TOKEN}")  # sets the cookie, drops the token from the URL
        assert browser.current_url == base + "/"
        assert browser.find_elements(By.CSS_SELECTOR, "#sessions tr[data-session]")
        browser.get(f"{base}/session?id={sid}")
        assert browser.find_element(By.TAG_NAME, "h1").text == f"Session {sid}"
