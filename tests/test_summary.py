"""ConversationSummaryBufferMemory on SQLite and PostgreSQL, its summaries
written by a local OpenAI-compatible server over real HTTP."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from tokenmem import (
    ChatOpenAI,
    ConfigurationError,
    ConversationSummaryBufferMemory,
    ConversationTokenBufferMemory,
    Message,
    ModelError,
    OpenAI,
    Store,
)
from tokenmem import summaries as rows_of
from tokenmem.aio import AsyncStore
from tokenmem.models import SUMMARIES, TURNS, utcnow
from tokenmem.summary import SUMMARY_PROMPT, SUMMARY_PROMPT_ZH
from tokenmem.validate import SessionKey
from tokenmem.window import CHAT_ROLES, chat_prompt_tokens, count_message

from .conftest import async_twin
from .openai_server import FakeOpenAI
from .test_owners import record
from .test_readme import block, run_block

MODELS = ["chat", "completions"]  # ChatOpenAI (chat formula), OpenAI (the rendered string)


def model(server: FakeOpenAI, api: str = "chat") -> ChatOpenAI | OpenAI:
    kind = ChatOpenAI if api == "chat" else OpenAI
    return kind(base_url=server.base_url, api_key="k", max_retries=0, timeout=5.0)


def summary_memory(
    server: FakeOpenAI, store: Store | AsyncStore, api: str = "chat", **options: Any
) -> ConversationSummaryBufferMemory:
    options.setdefault("max_token_limit", 60)
    return ConversationSummaryBufferMemory(llm=model(server, api), store=store, **options)


def exchange(i: int) -> tuple[dict[str, str], dict[str, str]]:
    return (
        {"input": f"Question {i}: what about the weather in city number {i}?"},
        {"output": f"Answer {i}: it is sunny there, {i} degrees."},
    )


def sent(server: FakeOpenAI, index: int = -1) -> str:
    """The summarizer's prompt as the server received it."""
    body = server.requests[index].body
    if "messages" in body:
        (message,) = body["messages"]
        assert message["role"] == "user"
        return str(message["content"])
    return str(body["prompt"])


def new_lines(memory: ConversationSummaryBufferMemory, row: rows_of.Summary) -> str:
    """The lines of the messages ``row`` replaced, as the model got them."""
    history = {m.position: m for m in memory.history()}
    fell = [history[p] for p in range(row.first_position, row.last_position + 1)]
    prefix = {"human": memory.human_prefix, "ai": memory.ai_prefix}
    return "\n".join(f"{prefix[m.type]}: {m.content}" for m in fell)


def used(memory: ConversationSummaryBufferMemory) -> int:
    """The loaded history's tokens, counted as the memory's model is:
    messages by OpenAI's chat formula, a string as rendered."""
    if memory.llm.api == "chat":
        loaded = memory.summary_window(return_messages=True)
        messages = [Message("system", loaded.summary.content)] if loaded.summary else []
        messages += [w.message for w in loaded.window]
        entries = [{"role": CHAT_ROLES[m.type], "content": m.content} for m in messages]
        return chat_prompt_tokens(entries, memory.counter)
    history = memory.load_memory_variables({})["history"]
    assert isinstance(history, str)
    return memory.counter.count(history)


def audit(memory: ConversationSummaryBufferMemory) -> None:
    """What must hold whenever the summaries have caught up: they replace
    contiguous ranges from the session's first message, never overlapping;
    the newest is sent, and the window starts right after it; the summaries'
    ranges and the window account for every stored message, once; the
    history fits the limit."""
    rows = memory.summaries()
    start = 0
    for row in rows:
        assert (row.first_position, row.seq) == (start, rows[0].seq + rows.index(row))
        assert row.last_position >= row.first_position
        start = row.last_position + 1
    loaded = memory.summary_window()
    positions = [w.position for w in loaded.window]
    if rows:
        assert loaded.summary == rows[-1]
        assert positions[:1] == [rows[-1].last_position + 1]
    covered = [p for row in rows for p in range(row.first_position, row.last_position + 1)]
    assert covered + positions == [m.position for m in memory.history()]
    assert used(memory) <= memory.max_token_limit
    if loaded.summary is not None:
        history = memory.load_memory_variables({})["history"]
        assert isinstance(history, str) and history.startswith(f"System: {loaded.summary.content}")


# --- what the issue asks ---------------------------------------------------------------


@pytest.mark.parametrize("api", MODELS)
def test_a_summary_is_made_only_when_messages_fall_out(
    openai_server: FakeOpenAI, store: Store, api: str
) -> None:
    """Saved without summarizing, then caught up: the model is asked exactly
    when the window (in what the current summary leaves) has left messages
    behind that no summary replaces; afterwards the audit holds."""
    openai_server.reply(*(f"Summary number {i}." for i in range(40)))
    memory = summary_memory(openai_server, store, api, summarize_on_save=False)
    asked_at = []
    for i in range(10):
        memory.save_context(*exchange(i))
        loaded = memory.summary_window()
        covered = loaded.summary.last_position + 1 if loaded.summary else 0
        fell_out = loaded.window[0].position > covered
        before = len(openai_server.requests)
        made = memory.catch_up()
        assert (made > 0) == fell_out == (len(openai_server.requests) > before)
        if made:
            asked_at.append(i)
        audit(memory)
    assert asked_at and asked_at[0] > 0  # the first exchanges fit: no summary then
    assert len(memory.summaries()) == len(openai_server.requests)


@pytest.mark.parametrize("api", MODELS)
def test_every_save_keeps_summary_and_window_within_the_limit(
    openai_server: FakeOpenAI, store: Store, api: str
) -> None:
    openai_server.reply(*(f"The human asked about {i} cities; all sunny." for i in range(40)))
    memory = summary_memory(openai_server, store, api, max_token_limit=80)
    for i in range(12):
        memory.save_context(*exchange(i))
        audit(memory)
    assert len(memory.summaries()) >= 3
    assert memory.moving_summary_buffer == memory.summaries()[-1].content
    # Another memory on the session, in the other format, loads the same.
    again = summary_memory(
        openai_server, store, api, session_id=memory.session_id, max_token_limit=80,
        return_messages=True,
    )  # fmt: skip
    history = again.load_memory_variables({})["history"]
    assert history[0] == Message("system", memory.moving_summary_buffer)
    assert history[1:] == memory.buffer_as_messages
    assert again.buffer == history


def test_the_request_holds_langchains_prompt(openai_server: FakeOpenAI, store: Store) -> None:
    """The model gets LangChain's SUMMARY_PROMPT with the previous summary
    and the new lines (``get_buffer_string`` of what fell out), as one user
    message (LangChain's LLMChain sends a chat model its prompt so)."""
    assert SUMMARY_PROMPT.startswith(
        "Progressively summarize the lines of conversation provided, adding onto the "
        "previous summary returning a new summary.\n\nEXAMPLE\nCurrent summary:\n"
    )
    assert SUMMARY_PROMPT.endswith(
        "Current summary:\n{summary}\n\nNew lines of conversation:\n{new_lines}\n\nNew summary:"
    )
    openai_server.reply("First summary.", "Second summary.", "Third summary.")
    memory = summary_memory(openai_server, store, max_token_limit=50, human_prefix="Person")
    for i in range(3):
        memory.save_context(*exchange(i))
    first, second = memory.summaries()[:2]
    assert sent(openai_server, 0) == SUMMARY_PROMPT.format(
        summary="", new_lines=new_lines(memory, first)
    )
    assert sent(openai_server, 1) == SUMMARY_PROMPT.format(
        summary="First summary.", new_lines=new_lines(memory, second)
    )
    assert "Person: Question 0: what about the weather in city number 0?" in sent(openai_server, 0)
    assert openai_server.requests[0].body["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("api", MODELS)
def test_chinese(openai_server: FakeOpenAI, store: Store, api: str) -> None:
    openai_server.reply("人类问了天气。", "人类又问了天气。", "还是天气。")
    memory = summary_memory(
        openai_server, store, api, language="zh", human_prefix="人类", max_token_limit=50
    )
    for i in range(3):
        memory.save_context({"input": f"第{i}个城市的天气怎么样？"}, {"output": f"晴天，{i}度。"})
    first, second = memory.summaries()[:2]
    assert sent(openai_server, 0).startswith("逐步总结所提供的对话内容")
    assert sent(openai_server, 0) == SUMMARY_PROMPT_ZH.format(
        summary="", new_lines=new_lines(memory, first)
    )
    assert new_lines(memory, first).startswith("人类: 第0个城市的天气怎么样？")
    assert sent(openai_server, 1) == SUMMARY_PROMPT_ZH.format(
        summary="人类问了天气。", new_lines=new_lines(memory, second)
    )
    if api == "completions":
        assert openai_server.requests[0].body["model"] == "gpt-3.5-turbo-instruct"
    audit(memory)


def test_a_failed_call_keeps_the_exchange_and_the_next_save_catches_up(
    openai_server: FakeOpenAI, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    memory = summary_memory(openai_server, store, max_token_limit=50)
    memory.save_context(*exchange(0))
    assert openai_server.requests == []  # it fits
    openai_server.fail(500, times=2)
    with caplog.at_level(logging.WARNING, logger="tokenmem.summary"):
        memory.save_context(*exchange(1))
        memory.save_context(*exchange(2))
    assert len(openai_server.requests) == 2
    assert "no summary made" in caplog.text and "InternalServerError" in caplog.text
    assert [m.content for m in memory.history()][-2:] == [
        v for d in exchange(2) for v in d.values()
    ]
    assert memory.summaries() == []
    # The history is the window alone meanwhile: what fell out is neither sent nor lost.
    assert memory.load_memory_variables({})["history"] == memory.buffer_as_str
    openai_server.reply("Caught up.")
    memory.save_context(*exchange(3))
    (row,) = memory.summaries()
    assert (row.first_position, row.content) == (0, "Caught up.")
    assert "Question 0" in sent(openai_server) and "Answer 2" in sent(openai_server)
    audit(memory)


def test_catch_up_raises_what_save_context_logs(openai_server: FakeOpenAI, store: Store) -> None:
    memory = summary_memory(openai_server, store, max_token_limit=40, summarize_on_save=False)
    for i in range(3):
        memory.save_context(*exchange(i))
    assert openai_server.requests == []
    openai_server.fail(429)
    with pytest.raises(ModelError) as failed:
        memory.catch_up()
    assert failed.value.error_type == "RateLimitError" and memory.summaries() == []
    openai_server.reply("One.", "Two.", "Three.", "Four.")
    assert memory.prune() >= 1  # LangChain's name: it deletes nothing
    assert memory.catch_up() == 0  # nothing left
    audit(memory)


def test_the_audit_after_a_long_conversation(openai_server: FakeOpenAI, store: Store) -> None:
    """The window's messages, the current summary's range and the older
    summaries' ranges are every stored message, once."""
    openai_server.reply(*(f"Running summary {i}." for i in range(80)))
    memory = summary_memory(openai_server, store, max_token_limit=70)
    for i in range(30):
        memory.save_context(*exchange(i))
    audit(memory)
    assert len(memory.summaries()) >= 10
    assert len(list(memory.history())) == 60


# --- the running summary and the rest of the session ------------------------------------


def test_clear_starts_a_new_running_summary(openai_server: FakeOpenAI, store: Store) -> None:
    openai_server.reply(*(f"Summary {i}." for i in range(20)))
    memory = summary_memory(openai_server, store, max_token_limit=50)
    for i in range(4):
        memory.save_context(*exchange(i))
    assert memory.moving_summary_buffer.startswith("Summary")
    memory.clear()
    assert memory.moving_summary_buffer == ""
    assert memory.load_memory_variables({}) == {"history": ""}
    before, asked = len(memory.summaries()), len(openai_server.requests)
    for i in range(4, 7):
        memory.save_context(*exchange(i))
    newest = memory.summaries()[before]
    assert newest.first_position == 8  # where clear() started the window
    assert newest.seq == before  # numbered on
    assert sent(openai_server, asked).count("Current summary:\n\n") == 1  # not the old one
    assert memory.load_memory_variables({})["history"].startswith(
        f"System: {memory.summaries()[-1].content}\nHuman: "
    )


def test_a_pinned_prompt_goes_first_then_the_summary(
    openai_server: FakeOpenAI, store: Store
) -> None:
    openai_server.reply(*(f"Summary {i}." for i in range(10)))
    memory = summary_memory(openai_server, store, max_token_limit=70)
    memory.chat_memory.add_message(Message("system", "Answer in one sentence."))
    for i in range(5):
        memory.save_context(*exchange(i))
    history = memory.load_memory_variables({})["history"]
    assert history.startswith(
        f"System: Answer in one sentence.\nSystem: {memory.moving_summary_buffer}"
    )
    assert "Answer in one sentence" not in "".join(sent(openai_server, i) for i in range(2))
    loaded = memory.summary_window()
    assert loaded.window[0].pinned and loaded.window[0].position == 0
    # The pinned position is inside the first summary's range, sent as itself.
    assert memory.summaries()[0].first_position == 0
    assert used(memory) <= 70


def test_a_higher_limit_never_resends_what_a_summary_replaced(
    openai_server: FakeOpenAI, store: Store
) -> None:
    openai_server.reply(*["Weather talk."] * 10)
    memory = summary_memory(openai_server, store, max_token_limit=50)
    for i in range(4):
        memory.save_context(*exchange(i))
    last = memory.summaries()[-1].last_position
    wider = summary_memory(openai_server, store, session_id=memory.session_id, max_token_limit=500)
    loaded = wider.summary_window()
    assert loaded.summary is not None and loaded.summary.last_position == last
    assert [w.position for w in loaded.window] == list(range(last + 1, 8))
    assert wider.catch_up() == 0


def test_a_summary_that_does_not_fit_is_left_out(
    openai_server: FakeOpenAI, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    openai_server.reply(*["word " * 80] * 10)
    memory = summary_memory(openai_server, store, max_token_limit=50)
    for i in range(3):
        memory.save_context(*exchange(i))
    made = memory.summaries()
    assert made and all(s.tokens > 50 for s in made)  # made, kept for the audit
    with caplog.at_level(logging.WARNING, logger="tokenmem.summary"):
        assert memory.summary_window().summary is None
    assert f"summary {made[-1].seq} left out: it costs {made[-1].tokens} tokens" in caplog.text
    assert memory.load_memory_variables({})["history"] == memory.buffer_as_str
    assert used(memory) <= 50


def test_prune_and_erase(openai_server: FakeOpenAI, store: Store) -> None:
    """prune deletes the summaries made before its cutoff; the next running
    summary takes a number no turn record holds; erase deletes them all."""
    openai_server.reply(*(f"S{i}." for i in range(20)))
    memory = summary_memory(openai_server, store, max_token_limit=50)
    for i in range(4):
        memory.save_context(*exchange(i))
    made = len(memory.summaries())
    assert made >= 2
    # A chain's call sent the newest summary (its turn stays); the summaries are old.
    store.record_turn(memory.session_id, record("x"), counter=memory.counter)
    with store.engine.begin() as conn:
        conn.execute(update(TURNS).values(summary_seq=made - 1))
        conn.execute(update(SUMMARIES).values(created_at=utcnow() - timedelta(days=40)))
    assert store.prune(timedelta(days=30), owner="").summaries == made
    assert memory.summaries() == [] and memory.moving_summary_buffer == ""
    asked = len(openai_server.requests)
    memory.save_context(*exchange(4))
    first = memory.summaries()[0]
    assert first.seq == made  # after the number the turn log holds
    assert first.first_position == 0  # a new running summary, from the window's start
    assert "Current summary:\n\n" in sent(openai_server, asked)
    assert memory.erase() == 10
    assert memory.summaries() == []


# --- concurrent writers ------------------------------------------------------------------


def test_two_writers_never_add_two_summaries_of_one_range(
    openai_server: FakeOpenAI, store: Store
) -> None:
    """Two memories found the same messages pending and both asked the
    model: the second to add finds a summary newer than the one it built on,
    and adds nothing."""
    memory = summary_memory(openai_server, store, max_token_limit=40, summarize_on_save=False)
    for i in range(4):
        memory.save_context(*exchange(i))
    key, rule = SessionKey.of(memory.session_id), memory._rule(None)
    pending = functools.partial(rows_of.pending, key=key, rule=rule, counter=memory.counter)
    first, second = store.run(pending), store.run(pending)
    assert first == second and first is not None and first.previous is None

    def add(todo: rows_of.Pending, text: str) -> int | None:
        work = functools.partial(
            rows_of.add,
            key=key,
            todo=todo,
            content=text,
            counts=count_message(memory.counter, "system", text, None),
            encoding=memory.counter.encoding_name,
            model="m",
        )
        return store.run(work)

    assert add(first, "one") == 0
    assert add(second, "two") is None  # built on no summary: one exists now
    again = store.run(pending)
    assert again is None or (again.previous is not None and again.first == first.last + 1)
    assert [r.content for r in memory.summaries()] == ["one"]


def test_concurrent_catch_ups(openai_server: FakeOpenAI, store: Store) -> None:
    """Two processes' memories catch up at once (the model slow): one
    summary per range, numbered in order."""
    memories = [
        summary_memory(openai_server, store, max_token_limit=40, summarize_on_save=False)
        for _ in range(2)
    ]
    memories[1].session_id = memories[0].session_id
    for i in range(4):
        memories[0].save_context(*exchange(i))
    openai_server.delay(0.3, times=2)
    openai_server.reply("A.", "B.", "C.", "D.")
    threads = [threading.Thread(target=m.catch_up) for m in memories]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit(memories[0])
    rows = memories[0].summaries()
    assert [r.seq for r in rows] == list(range(len(rows)))
    assert len(openai_server.requests) >= len(rows)


# --- async, the surface, configuration ---------------------------------------------------


def test_the_async_twins_do_what_the_sync_methods_do(openai_server: FakeOpenAI, db: Engine) -> None:
    replies = ["A summary."] * 20  # the same whichever run takes it
    sync_store = Store(db, upgrade=True)
    openai_server.reply(*replies)
    memory = summary_memory(openai_server, sync_store, session_id="sync")
    for i in range(6):
        memory.save_context(*exchange(i))
    expected = (memory.load_memory_variables({}), memory.summary_window().window)
    expected_rows = [(r.first_position, r.last_position, r.content) for r in memory.summaries()]

    async def run(store: Store | AsyncStore, name: str) -> Any:
        openai_server.reply(*replies)
        twin = summary_memory(openai_server, store, session_id=name)
        for i in range(6):
            await twin.asave_context(*exchange(i))
        loaded = await twin.asummary_window()
        rows = [(r.first_position, r.last_position, r.content) for r in await twin.asummaries()]
        result = (await twin.aload_memory_variables({}), loaded.window, rows)
        await twin.llm.aclose()  # type: ignore[attr-defined]
        return result

    async def on_async_store() -> Any:
        store = AsyncStore(async_twin(db))
        try:
            return await run(store, "async")
        finally:
            await store.close()

    for got in (asyncio.run(on_async_store()), asyncio.run(run(sync_store, "thread"))):
        assert got[0] == expected[0]
        assert [w.message for w in got[1]] == [w.message for w in expected[1]]
        assert got[2] == expected_rows


def test_configuration(openai_server: FakeOpenAI, store: Store) -> None:
    class LangChainModel:  # a LangChain model: counts, but tokenmem cannot call it
        model_name = "gpt-4o-mini"

    with pytest.raises(ConfigurationError, match="llm must be a tokenmem model"):
        ConversationSummaryBufferMemory(llm=LangChainModel(), store=store)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ConversationSummaryBufferMemory(store=store)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="should have"):
        summary_memory(openai_server, store, prompt="Summarize {history}")
    with pytest.raises(ConfigurationError, match="language"):
        summary_memory(openai_server, store, language="fr")

    class Template:  # LangChain's PromptTemplate: its text is .template
        template = "Old: {summary}\nNew: {new_lines}\nShorter:"

    openai_server.reply(*["Short."] * 10)
    memory = summary_memory(openai_server, store, prompt=Template(), max_token_limit=40)
    assert memory.prompt == Template.template
    for i in range(3):
        memory.save_context(*exchange(i))
    assert sent(openai_server, 0).startswith("Old: \nNew: Human: Question 0")
    assert sent(openai_server, 1).startswith("Old: Short.\nNew: ")
    assert isinstance(memory, ConversationTokenBufferMemory)
    assert repr(memory).startswith("ConversationSummaryBufferMemory(session_id=")


def test_the_readme_example(openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's block runs as written (the embedded SQLite store), its
    model the local server, and shows what it prints."""
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    openai_server.reply("A trip to Kyoto.")
    assert run_block(block("Summaries of what fell out of the window")) == 2
    (request,) = openai_server.requests
    assert "New lines of conversation:\nHuman: I'm planning a trip to Kyoto.\n\n" in sent(
        openai_server
    )
    assert request.body["model"] == "gpt-4o-mini"


def test_the_summary_memory_takes_every_parameter_of_the_buffer_memory() -> None:
    """The subclass repeats its base's parameters (typed, keyword-only): the
    same names, kinds and defaults, so none is forgotten when the base grows."""
    base = inspect.signature(ConversationTokenBufferMemory.__init__).parameters
    summary = inspect.signature(ConversationSummaryBufferMemory.__init__).parameters
    for name, parameter in base.items():
        if name == "llm":  # required here: it writes the summaries
            assert summary[name].default is inspect.Parameter.empty
            continue
        assert name in summary, name
        assert (summary[name].kind, summary[name].default) == (parameter.kind, parameter.default)
