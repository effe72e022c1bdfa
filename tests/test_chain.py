"""ConversationChain against a local OpenAI-compatible server, over real HTTP."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import text

from tokenmem import (
    ChatOpenAI,
    ConfigurationError,
    ConversationChain,
    ConversationTokenBufferMemory,
    InvalidInputError,
    ModelError,
    OpenAI,
    PromptTemplate,
    Store,
    TokenCounter,
)
from tokenmem.window import chat_prompt_tokens

from .openai_server import FakeOpenAI

KEY = "sk-test-secret-0123456789"


def make_chain(
    server: FakeOpenAI, store: Store, *, limit: int = 60, verbose: bool = False, **llm: object
) -> ConversationChain:
    options: dict[str, object] = {
        "base_url": server.base_url,
        "api_key": KEY,
        "max_retries": 0,
        "timeout": 5.0,
        **llm,
    }
    model = ChatOpenAI(**options)  # type: ignore[arg-type]
    memory = ConversationTokenBufferMemory(llm=model, max_token_limit=limit, store=store)
    lines: list[str] = []
    chain = ConversationChain(llm=model, memory=memory, verbose=verbose, log=lines.append)
    chain.lines = lines  # type: ignore[attr-defined]
    return chain


def sent(server: FakeOpenAI) -> list[dict[str, str]]:
    body = server.requests[-1].body
    assert body is not None
    messages: list[dict[str, str]] = body["messages"]
    return messages


def test_request_carries_the_window_and_the_input(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store, limit=30)
    openai_server.reply("Hello! I am doing well.", "Documentation is fun.", "Yes, I know it.")
    assert chain.predict(input="Hi there!") == "Hello! I am doing well."
    chain.predict(input="I'm writing some documentation.")
    expected = [w.message for w in chain.memory.window(return_messages=True)]
    assert 0 < len(expected) < 4  # the limit pruned the oldest messages
    chain.predict(input="It is about tokenmem, heard of it?")
    messages = sent(openai_server)
    assert messages[0] == {"role": "system", "content": chain.prompt.system_text}
    assert messages[-1] == {"role": "user", "content": "It is about tokenmem, heard of it?"}
    assert messages[1:-1] == [
        {"role": {"human": "user", "ai": "assistant"}[m.type], "content": m.content}
        for m in expected
    ]
    # The window sent fits the limit under the chat formula (3 per message + priming).
    counter = chain.memory.counter
    assert chat_prompt_tokens(messages[1:-1], counter) <= 30
    assert openai_server.requests[-1].body["model"] == "gpt-4o-mini"  # type: ignore[index]
    history = list(chain.memory.history())
    assert [m.content for m in history] == [
        "Hi there!",
        "Hello! I am doing well.",
        "I'm writing some documentation.",
        "Documentation is fun.",
        "It is about tokenmem, heard of it?",
        "Yes, I know it.",
    ]


def test_audit_log_rebuilds_every_prompt_exactly(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store, limit=30)
    for i in range(6):
        chain.predict(input=f"question number {i} about the weather")
    openai_server.fail(500)
    with pytest.raises(ModelError):
        chain.predict(input="this one fails")
    turns = store.turns(chain.memory.session_id)
    assert [t.outcome for t in turns] == ["ok"] * 6 + ["error"]
    assert [t.seq for t in turns] == list(range(7))
    assert [t.turn for t in turns] == [0, 1, 2, 3, 4, 5, None]
    for turn, request in zip(turns, openai_server.requests, strict=True):
        assert request.body is not None
        assert (
            store.rebuild_prompt(chain.memory.session_id, turn.seq or 0) == request.body["messages"]
        )
        assert turn.prompt_tokens == chat_prompt_tokens(
            request.body["messages"], chain.memory.counter
        )
    ok = turns[0]
    assert ok.api_prompt_tokens is not None and ok.api_completion_tokens is not None
    assert ok.latency_ms > 0 and ok.model == "gpt-4o-mini" and ok.created_at is not None
    assert turns[-1].error_type == "InternalServerError" and turns[-1].api_prompt_tokens is None


def test_retries_then_failure_saves_nothing(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store, max_retries=2)
    openai_server.fail(500, times=2)
    assert chain.predict(input="flaky") == "echo: flaky"
    assert len(openai_server.requests) == 3
    openai_server.fail(429, times=3)
    with pytest.raises(ModelError, match="RateLimitError") as info:
        chain.predict(input="rate limited")
    assert info.value.error_type == "RateLimitError"
    assert len(openai_server.requests) == 6
    assert [m.content for m in chain.memory.history()] == ["flaky", "echo: flaky"]
    assert [t.outcome for t in store.turns(chain.memory.session_id)] == ["ok", "error"]


def test_timeout(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store, timeout=0.3)
    openai_server.delay(2.0)
    with pytest.raises(ModelError) as info:
        chain.predict(input="slow")
    assert info.value.error_type == "APITimeoutError"
    assert chain.memory.load_memory_variables({}) == {"history": ""}


@pytest.mark.parametrize(("effect", "error_type"), [("empty", "EmptyReply"), ("refuse", "Refusal")])
def test_empty_or_refused_reply_saves_nothing(
    openai_server: FakeOpenAI, store: Store, effect: str, error_type: str
) -> None:
    chain = make_chain(openai_server, store)
    openai_server.empty_reply() if effect == "empty" else openai_server.refuse()
    with pytest.raises(ModelError) as info:
        chain.predict(input="hello")
    assert info.value.error_type == error_type
    assert store.turns(chain.memory.session_id)[0].error_type == error_type
    assert list(chain.memory.history()) == []


def test_missing_key_is_reported_at_call_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm = ChatOpenAI()  # constructing needs no key
    chain = ConversationChain(llm=llm, memory=ConversationTokenBufferMemory(llm=llm, store=store))
    with pytest.raises(ModelError, match="OPENAI_API_KEY") as info:
        chain.predict(input="hi")
    assert info.value.error_type == "NoAPIKey"


def test_environment_base_url_and_key(
    openai_server: FakeOpenAI, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    llm = ChatOpenAI(max_retries=0)
    chain = ConversationChain(llm=llm, memory=ConversationTokenBufferMemory(llm=llm, store=store))
    assert chain.predict(input="from the environment") == "echo: from the environment"
    assert openai_server.requests[-1].headers["authorization"] == f"Bearer {KEY}"


def test_streaming_saves_only_a_complete_reply(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store)
    openai_server.reply("one two three four five")
    chunks = list(chain.stream(input="count"))
    assert len(chunks) > 1 and "".join(chunks) == "one two three four five"
    assert [m.content for m in chain.memory.history()] == ["count", "one two three four five"]
    assert store.turns(chain.memory.session_id)[0].api_prompt_tokens is not None

    openai_server.reply("six seven eight nine ten")
    openai_server.break_stream(after_chunks=2)
    got = []
    with pytest.raises(ModelError):
        for chunk in chain.stream(input="again"):
            got.append(chunk)
    assert len(got) == 2
    assert len(list(chain.memory.history())) == 2
    assert [t.outcome for t in store.turns(chain.memory.session_id)] == ["ok", "error"]


def test_async_predict_and_stream(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store)
    openai_server.reply("async hello", "streamed async reply")

    async def run() -> tuple[str, list[str]]:
        try:
            first = await chain.apredict(input="hi async")
            chunks = [c async for c in chain.astream(input="stream async")]
        finally:
            await chain.llm.aclose()  # type: ignore[attr-defined]
        return first, chunks

    first, chunks = asyncio.run(run())
    assert first == "async hello" and "".join(chunks) == "streamed async reply"
    assert [m.content for m in chain.memory.history()] == [
        "hi async",
        "async hello",
        "stream async",
        "streamed async reply",
    ]
    assert sent(openai_server)[-2] == {"role": "assistant", "content": "async hello"}


def test_verbose_output_and_no_secret_anywhere(
    openai_server: FakeOpenAI, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    chain = make_chain(openai_server, store, verbose=True)
    with caplog.at_level(logging.DEBUG, logger="tokenmem.chain"):
        chain.predict(input="Hi there!")
        chain.predict(input="Second question")
    out = "\n".join(chain.lines)  # type: ignore[attr-defined]
    assert out.count("> Entering new ConversationChain chain...") == 2
    assert out.count("> Finished chain.") == 2
    assert "Prompt after formatting:" in out
    assert "Human: Hi there!\nAI: echo: Hi there!\nHuman: Second question" in out
    assert f"System: {chain.prompt.system_text}" in out
    assert KEY not in out and KEY not in caplog.text
    with store.engine.connect() as conn:
        for table in ("tokenmem_sessions", "tokenmem_messages", "tokenmem_turns"):
            dump = str(conn.execute(text(f"SELECT * FROM {table}")).all())
            assert KEY not in dump


def test_budget_from_the_model_never_overflows(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store, limit=10_000, context_size=220)
    chain.reserve_tokens = 50
    counter = chain.memory.counter
    for i in range(12):
        chain.predict(input=f"message {i}: " + "lorem ipsum dolor sit amet " * (i % 4 + 1))
        prompt_tokens = chat_prompt_tokens(sent(openai_server), counter)
        assert prompt_tokens <= 220 - 50
    turns = store.turns(chain.memory.session_id)
    assert all(t.token_budget < 10_000 for t in turns)
    assert len(sent(openai_server)) > 3  # the window still holds some history
    with pytest.raises(ConfigurationError, match="reserved"):
        chain.predict(input="word " * 400)


def test_completion_api_gets_the_rendered_string(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store, api="completions", model="gpt-3.5-turbo-instruct")
    openai_server.reply("hi there", "and hello again")
    chain.predict(input="hello")
    chain.predict(input="and again")
    body = openai_server.requests[-1].body
    assert body is not None and "messages" not in body
    prompt = body["prompt"]
    assert prompt.endswith(
        "Current conversation:\nHuman: hello\nAI: hi there\nHuman: and again\nAI:"
    )
    assert store.rebuild_prompt(chain.memory.session_id, 1) == prompt
    assert store.turns(chain.memory.session_id)[1].prompt_tokens == TokenCounter(
        "cl100k_base"
    ).count(prompt)


def test_chinese_conversation_end_to_end(openai_server: FakeOpenAI, store: Store) -> None:
    llm = ChatOpenAI(
        base_url=openai_server.base_url,
        api_key=KEY,
        max_retries=0,
        api="completions",
        model="gpt-3.5-turbo-instruct",
    )
    memory = ConversationTokenBufferMemory(
        llm=llm, max_token_limit=60, human_prefix="人类", store=store
    )
    lines: list[str] = []
    chain = ConversationChain(llm=llm, memory=memory, language="zh", verbose=True, log=lines.append)
    openai_server.reply(" 你好！我过得很好。你呢？", " 听起来很充实！你在写什么文档？")
    chain.predict(input="你好，近来怎么样？")
    chain.predict(input="我正在写一些文档！")
    prompt = openai_server.requests[-1].body["prompt"]  # type: ignore[index]
    assert (
        "当前对话：\n人类: 你好，近来怎么样？\nAI:  你好！我过得很好。你呢？\n"
        "人类: 我正在写一些文档！\nAI:" in prompt
    )
    out = "\n".join(lines)
    assert (
        "> 进入新的 ConversationChain 链..." in out
        and "格式化后的提示：" in out
        and "> 完成链。" in out
    )
    history = memory.load_memory_variables({})["history"]
    assert history.endswith("人类: 我正在写一些文档！\nAI:  听起来很充实！你在写什么文档？")
    assert memory.counter.count(history) <= 60


def test_custom_templates_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="history"):
        PromptTemplate("no placeholders here")
    with pytest.raises(ConfigurationError, match="other placeholder"):
        PromptTemplate("{history} {input} {extra}")
    custom = PromptTemplate("Be terse.\n{history}\nQ: {input}\nA:")
    assert custom.system_text == "Be terse."
    assert custom.render_text("Human: a", "b") == "Be terse.\nHuman: a\nQ: b\nA:"
    assert PromptTemplate("Use {{json}}.\n{history}\n{input}").system_text == "Use {json}."
    # LangChain's PromptTemplate surface
    assert custom.input_variables == ["history", "input"]
    assert custom.format(history="Human: a", input="b") == custom.render_text("Human: a", "b")
    with pytest.raises(KeyError):
        custom.format(history="only")


def test_rebuild_after_prune_says_so(openai_server: FakeOpenAI, store: Store) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from tokenmem import SessionNotFound
    from tokenmem.models import MESSAGES, utcnow

    chain = make_chain(openai_server, store, limit=200)
    chain.predict(input="first question")
    chain.predict(input="second question")
    with store.engine.begin() as conn:
        conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.position < 2)
            .values(created_at=utcnow() - timedelta(days=9))
        )
    store.prune(timedelta(days=1), owner="")
    with pytest.raises(SessionNotFound, match=r"messages 0\.\.1 \(pruned or erased\)"):
        store.rebuild_prompt(chain.memory.session_id, 1)
    assert (
        store.rebuild_prompt(chain.memory.session_id, 0)
        == openai_server.requests[0].body["messages"]
    )  # type: ignore[index]


def test_a_stream_left_early_is_audited_and_saves_nothing(
    openai_server: FakeOpenAI, store: Store
) -> None:
    chain = make_chain(openai_server, store)
    openai_server.reply("one two three four")
    stream = chain.stream(input="partial")
    assert next(stream) and next(stream)
    stream.close()
    assert list(chain.memory.history()) == []
    (turn,) = store.turns(chain.memory.session_id)
    assert (turn.outcome, turn.error_type) == ("error", "Cancelled")


def test_invoke_returns_the_history_used(openai_server: FakeOpenAI, store: Store) -> None:
    chain = make_chain(openai_server, store, limit=200)
    openai_server.reply("first answer", "second answer")
    first = chain.invoke({"input": "first"})
    assert first == {"input": "first", "history": "", "response": "first answer"}
    second = chain.invoke({"input": "second"})
    # the type load_memory_variables gives (return_messages), as in LangChain
    assert second["history"] == "Human: first\nAI: first answer"
    assert second["response"] == "second answer"
    chain.memory.return_messages = True
    openai_server.reply("third answer")
    third = chain.invoke("third")
    assert [(m.type, m.content) for m in third["history"]][-1] == ("ai", "second answer")
    chain.memory.return_messages = False
    with pytest.raises(ConfigurationError, match="'input'"):
        chain.invoke({"question": "x"})

    text_chain = make_chain(
        openai_server, store, limit=200, api="completions", model="gpt-3.5-turbo-instruct"
    )
    openai_server.reply("hello")
    text_chain.invoke({"input": "a"})
    openai_server.reply("again")
    result = text_chain.invoke({"input": "b"})
    assert result["history"] == "Human: a\nAI: hello"
    assert result["history"] in openai_server.requests[-1].body["prompt"]  # type: ignore[index]


def test_a_long_prefix_and_model_name_are_recorded_on_every_backend(
    openai_server: FakeOpenAI, store: Store
) -> None:
    """Issue 10.4: a 300-character prefix (accepted by the memory) once failed
    on PostgreSQL when the call was recorded, after the model answered: the
    reply was lost and nothing saved."""
    prefix = "人" * 300
    model = OpenAI(
        base_url=openai_server.base_url,
        api_key=KEY,
        max_retries=0,
        model="m" * 300,
        encoding="o200k_base",
    )
    memory = ConversationTokenBufferMemory(
        llm=model, max_token_limit=60, store=store, human_prefix=prefix, ai_prefix=prefix[:280]
    )
    chain = ConversationChain(llm=model, memory=memory)
    openai_server.reply("kept")
    assert chain.predict(input="hello") == "kept"
    (turn,) = store.turns(memory.session_id)
    assert (turn.outcome, turn.human_prefix, turn.ai_prefix, turn.model) == (
        "ok",
        prefix,
        prefix[:280],
        "m" * 300,
    )
    assert [m.content for m in memory.history()] == ["hello", "kept"]


def test_a_model_name_that_cannot_be_stored_is_refused_before_the_call(
    openai_server: FakeOpenAI, store: Store
) -> None:
    model = OpenAI(
        base_url=openai_server.base_url, api_key=KEY, model="gpt\x00", encoding="o200k_base"
    )
    memory = ConversationTokenBufferMemory(llm=model, max_token_limit=60, store=store)
    with pytest.raises(InvalidInputError, match="NUL"):
        ConversationChain(llm=model, memory=memory)
    assert openai_server.requests == []


def test_ainvoke_is_invoke_awaited(openai_server: FakeOpenAI, store: Store) -> None:
    """chain.py's error message pointed to an ``ainvoke`` that did not exist."""
    chain = make_chain(openai_server, store)
    openai_server.reply("first", "second")
    sync = chain.invoke({"input": "one"})

    async def run() -> dict[str, object]:
        try:
            return await chain.ainvoke({"input": "two"})
        finally:
            await chain.llm.aclose()  # type: ignore[attr-defined]

    got = asyncio.run(run())
    assert set(got) == set(sync) == {"input", "history", "response"}
    assert got["input"] == "two" and got["response"] == "second"
    assert got["history"] == "Human: one\nAI: first"
    with pytest.raises(ConfigurationError, match="'input'"):
        asyncio.run(chain.ainvoke({"question": "x"}))


def test_the_chain_is_checked_when_it_is_built(store: Store) -> None:
    """As LangChain's ConversationChain validates at construction: an input
    key that is the memory's key, a foreign prompt or model object."""
    model = OpenAI(api_key=KEY, base_url="http://127.0.0.1:9/v1")
    memory = ConversationTokenBufferMemory(llm=model, store=store)
    with pytest.raises(ConfigurationError, match="The input key history was also found"):
        ConversationChain(llm=model, memory=memory, input_key="history")
    with pytest.raises(ConfigurationError, match="prompt must be a tokenmem PromptTemplate"):
        ConversationChain(llm=model, memory=memory, prompt="{history} {input}")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"llm must be a tokenmem model.*not object"):
        ConversationChain(llm=object(), memory=memory)  # type: ignore[arg-type]
    ConversationChain(llm=model, memory=memory, input_key="question")


def test_the_chain_s_langchain_surface(openai_server: FakeOpenAI, store: Store) -> None:
    """run, __call__, invoke(str), batch and their async twins, input_keys
    and output_keys, as LangChain's Chain has them."""
    chain = make_chain(openai_server, store, limit=200)
    assert (chain.input_keys, chain.output_keys) == (["input"], ["response"])
    openai_server.reply("one", "two", "three", "four", "five", "six", "seven", "eight")
    assert chain.run("a") == "one"
    assert chain.run(input="b") == "two"
    assert chain("c")["response"] == "three"
    assert chain.invoke("d")["input"] == "d"
    assert [r["response"] for r in chain.batch(["e", {"input": "f"}])] == ["five", "six"]
    with pytest.raises(ConfigurationError, match="run takes one positional input"):
        chain.run("x", input="y")

    async def go() -> tuple[str, list[dict[str, object]]]:
        try:
            return await chain.arun("g"), await chain.abatch(["h"])
        finally:
            await chain.llm.aclose()  # type: ignore[attr-defined]

    ran, batched = asyncio.run(go())
    assert (ran, batched[0]["response"]) == ("seven", "eight")
    contents = [m.content for m in chain.memory.history()]
    assert contents[::2] == list("abcdefgh")  # in order, one after the other


def test_verbose_output_is_langchain_s_byte_for_byte(
    openai_server: FakeOpenAI, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Printed as LangChain's StdOutCallbackHandler prints a ConversationChain
    (langchain_core/callbacks/stdout.py, LLMChain.prep_prompts): the start
    line in bold, the prompt in bold italic green, a blank line, the end."""
    model = OpenAI(
        base_url=openai_server.base_url,
        api_key=KEY,
        max_retries=0,
        api="completions",
        model="gpt-3.5-turbo-instruct",
    )
    memory = ConversationTokenBufferMemory(llm=model, max_token_limit=60, store=store)
    chain = ConversationChain(llm=model, memory=memory, verbose=True)
    openai_server.reply(" Fine, thanks.")
    capsys.readouterr()
    chain.predict(input="Hi there!")
    prompt = openai_server.requests[-1].body["prompt"]  # type: ignore[index]
    assert capsys.readouterr().out == (
        "\n\n\033[1m> Entering new ConversationChain chain...\033[0m\n"
        "Prompt after formatting:\n"
        f"\u001b[32;1m\033[1;3m{prompt}\u001b[0m\n"
        "\n\033[1m> Finished chain.\033[0m\n"
    )
