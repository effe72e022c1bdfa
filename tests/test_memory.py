"""The LangChain-compatible memory: the reference notebook, parameters, persistence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmem import (
    ChatOpenAI,
    ConfigurationError,
    ConversationTokenBufferMemory,
    InvalidInputError,
    Message,
    OpenAI,
    Store,
    TokenCounter,
)


def test_reference_notebook_default_store() -> None:
    llm = OpenAI()
    memory = ConversationTokenBufferMemory(llm=llm, max_token_limit=10)
    memory.save_context({"input": "hi"}, {"output": "whats up"})
    memory.save_context({"input": "not much you"}, {"output": "not much"})
    assert memory.load_memory_variables({}) == {"history": "Human: not much you\nAI: not much"}


def test_reference_notebook_second_snippet_one_window_two_formats(store: Store) -> None:
    """The notebook's second snippet (return_messages=True, llm=OpenAI(),
    limit 10): LangChain counts for the model — a completion model the
    rendered string — whatever return_messages is, so the messages are the
    string's window: [HumanMessage 'not much you', AIMessage 'not much']."""
    memory = ConversationTokenBufferMemory(
        llm=OpenAI(), max_token_limit=10, return_messages=True, store=store
    )
    memory.save_context({"input": "hi"}, {"output": "whats up"})
    memory.save_context({"input": "not much you"}, {"output": "not much"})
    assert memory.load_memory_variables({}) == {
        "history": [Message("human", "not much you"), Message("ai", "not much")]
    }
    assert memory.buffer_as_str == "Human: not much you\nAI: not much"
    # A chat model counts OpenAI's chat formula, also for the string.
    chat = ConversationTokenBufferMemory(
        llm=ChatOpenAI(), max_token_limit=10, store=store, session_id=memory.session_id
    )
    assert chat.load_memory_variables({}) == {"history": "AI: not much"}
    assert chat.buffer_as_messages == [Message("ai", "not much")]


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base"])
def test_reference_example_counts_newlines(store: Store, encoding: str) -> None:
    memory = ConversationTokenBufferMemory(max_token_limit=10, store=store, encoding=encoding)
    memory.save_context({"input": "hi"}, {"output": "whats up"})
    memory.save_context({"input": "not much you"}, {"output": "not much"})
    history = memory.load_memory_variables({})["history"]
    assert history == "Human: not much you\nAI: not much"
    assert TokenCounter(encoding).count(history) == 10
    # One token less and the older line no longer fits.
    memory.max_token_limit = 9
    assert memory.load_memory_variables({}) == {"history": "AI: not much"}


def test_return_messages(store: Store, o200k: TokenCounter) -> None:
    memory = ConversationTokenBufferMemory(max_token_limit=100, return_messages=True, store=store)
    memory.save_context({"input": "hi"}, {"output": "whats up"})
    history = memory.load_memory_variables({})["history"]
    assert [(m.type, m.content) for m in history] == [("human", "hi"), ("ai", "whats up")]
    # OpenAI's chat formula: 3 per message + role + content, 3 for the reply priming.
    cost = 3 + (3 + 1 + 1) + (3 + 1 + o200k.count("whats up"))
    memory.max_token_limit = cost
    assert len(memory.buffer) == 2
    memory.max_token_limit = cost - 1
    assert memory.buffer == [Message("ai", "whats up")]
    assert memory.buffer_as_str == "Human: hi\nAI: whats up"


def test_chinese_prefixes(store: Store) -> None:
    memory = ConversationTokenBufferMemory(
        max_token_limit=30, human_prefix="人类", ai_prefix="人工智能", store=store
    )
    memory.save_context({"input": "你好"}, {"output": "最近怎么样"})
    memory.save_context({"input": "没什么，你呢"}, {"output": "一般般"})
    history = memory.load_memory_variables({})["history"]
    assert history.startswith("人类: ") and "\n人工智能: 一般般" in history
    assert TokenCounter("o200k_base").count(history) <= 30


def test_memory_key_and_variables(store: Store) -> None:
    memory = ConversationTokenBufferMemory(memory_key="chat", store=store)
    memory.save_context({"input": "a", "chat": "ignored"}, {"output": "b"})
    assert memory.memory_variables == ["chat"]
    assert memory.load_memory_variables({}) == {"chat": "Human: a\nAI: b"}


def test_several_keys_need_input_key(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store)
    with pytest.raises(InvalidInputError, match="input_key"):
        memory.save_context({"input": "a", "lang": "en"}, {"output": "b"})
    with pytest.raises(InvalidInputError, match="output_key"):
        memory.save_context({"input": "a"}, {"answer": "b", "score": "1"})
    keyed = ConversationTokenBufferMemory(
        input_key="q", output_key="a", store=store, session_id=memory.session_id
    )
    keyed.save_context({"q": "question", "lang": "en"}, {"a": "answer", "score": "1"})
    assert memory.buffer == "Human: question\nAI: answer"
    with pytest.raises(InvalidInputError, match="no key 'q'"):
        keyed.save_context({"input": "x"}, {"a": "y"})


def test_an_agent_s_outputs_save_their_output_as_in_langchain(store: Store) -> None:
    """LangChain's BaseChatMemory takes ``"output"`` among several output
    keys (an agent's ``intermediate_steps`` beside it), with a warning."""
    memory = ConversationTokenBufferMemory(store=store)
    with pytest.warns(UserWarning, match="got multiple output keys.*'output' key is being used"):
        memory.save_context({"input": "q"}, {"output": "a", "intermediate_steps": []})
    assert memory.buffer == "Human: q\nAI: a"
    memory.save_context({"input": "q2", "stop": ["\n"]}, {"text": "only key"})
    assert memory.buffer.endswith("Human: q2\nAI: only key")


def test_new_memory_new_session_same_id_same_window(store: Store) -> None:
    first = ConversationTokenBufferMemory(store=store)
    first.save_context({"input": "hi"}, {"output": "hello"})
    assert ConversationTokenBufferMemory(store=store).buffer == ""
    again = ConversationTokenBufferMemory(store=store, session_id=first.session_id)
    assert again.buffer == "Human: hi\nAI: hello"


@pytest.mark.slow
def test_window_survives_another_process(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/shared.sqlite3"
    code = (
        "import sys; from tokenmem import ConversationTokenBufferMemory as M, Store;"
        "s = Store(sys.argv[1], upgrade=True);"
        "M(store=s, session_id='persist').save_context({'input': '你好'}, {'output': 'hello'})"
    )
    subprocess.run([sys.executable, "-c", code, url], check=True)
    memory = ConversationTokenBufferMemory(store=Store(url), session_id="persist")
    assert memory.buffer == "Human: 你好\nAI: hello"


def test_clear_keeps_history_and_erase_deletes(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store)
    memory.save_context({"input": "one"}, {"output": "two"})
    memory.clear()
    assert memory.buffer == ""
    memory.save_context({"input": "three"}, {"output": "four"})
    assert memory.buffer == "Human: three\nAI: four"
    assert [m.content for m in memory.history()] == ["one", "two", "three", "four"]
    assert memory.erase() == 4
    assert memory.buffer == ""
    assert store.count() == 0


def test_pruned_messages_stay_for_audit(store: Store) -> None:
    memory = ConversationTokenBufferMemory(max_token_limit=12, store=store)
    for i in range(20):
        memory.save_context({"input": f"question {i}"}, {"output": f"answer {i}"})
    assert memory.buffer == "Human: question 19\nAI: answer 19"
    history = list(memory.history())
    assert [m.position for m in history] == list(range(40))
    assert [m.turn for m in history] == [i // 2 for i in range(40)]
    assert history[0].content == "question 0" and history[0].text_tokens > 0
    assert all(m.created_at is not None and m.created_at.tzinfo is not None for m in history)


@pytest.mark.parametrize("limit", [0, -5, 2.5, True, "10"])
def test_bad_limit(limit: object) -> None:
    with pytest.raises(ConfigurationError, match="max_token_limit"):
        ConversationTokenBufferMemory(max_token_limit=limit)  # type: ignore[arg-type]


def test_unknown_model_is_clear() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown model 'my-local-llama'.*encoding="):
        ConversationTokenBufferMemory(llm=OpenAI(model="my-local-llama"))
    memory = ConversationTokenBufferMemory(
        llm=OpenAI(model="my-local-llama", encoding="cl100k_base")
    )
    assert memory.counter.encoding_name == "cl100k_base"


def test_model_picks_encoding() -> None:
    assert (
        ConversationTokenBufferMemory(llm=OpenAI(model="gpt-4")).counter.encoding_name
        == "cl100k_base"
    )
    # LangChain's defaults: OpenAI() is gpt-3.5-turbo-instruct, ChatOpenAI() ours gpt-4o-mini
    assert ConversationTokenBufferMemory(llm=OpenAI()).counter.encoding_name == "cl100k_base"
    assert ConversationTokenBufferMemory(llm=ChatOpenAI()).counter.encoding_name == "o200k_base"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (None, "must be a str, not NoneType"),
        (42, "must be a str, not int"),
        (["hi"], "must be a str, not list"),
        ("a\x00b", "NUL"),
        ("\ud800", "not valid Unicode"),
    ],
)
def test_bad_values_write_nothing(store: Store, value: object, match: str) -> None:
    memory = ConversationTokenBufferMemory(store=store)
    memory.save_context({"input": "kept"}, {"output": "kept too"})
    with pytest.raises(InvalidInputError, match=match):
        memory.save_context({"input": "fine"}, {"output": value})
    with pytest.raises(InvalidInputError, match=match):
        memory.save_context({"input": value}, {"output": "fine"})
    assert [m.content for m in memory.history()] == ["kept", "kept too"]


def test_missing_keys_and_non_dicts(store: Store) -> None:
    memory = ConversationTokenBufferMemory(store=store)
    with pytest.raises(InvalidInputError, match="0 keys"):
        memory.save_context({}, {"output": "x"})
    with pytest.raises(InvalidInputError, match="must be a dict"):
        memory.save_context("hi", {"output": "x"})  # type: ignore[arg-type]
    assert store.count() == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<|endoftext|>",
        "<|endofprompt|> and <|fim_prefix|>",
        "  spaced \r\n ",
        "😀👍🏽",
        "x" * 200_000,
    ],
)
def test_lossless_values(store: Store, text: str) -> None:
    memory = ConversationTokenBufferMemory(store=store, max_token_limit=100_000)
    memory.save_context({"input": text}, {"output": text})
    stored = list(memory.history())
    assert [m.content for m in stored] == [text, text]
    assert stored[0].text_tokens == TokenCounter("o200k_base").count(" " + text)


def test_failed_transaction_writes_nothing(store: Store) -> None:
    """A database error in the middle of an exchange rolls both messages back."""
    memory = ConversationTokenBufferMemory(store=store)
    with pytest.raises(InvalidInputError):
        store.append(
            memory.session_id,
            [Message("human", "ok"), Message("robot", "bad role")],  # type: ignore[arg-type]
            memory.counter,
        )
    assert store.count() == 0


def test_a_database_failure_mid_exchange_writes_nothing(store: Store) -> None:
    """The second message's INSERT fails inside the database (a trigger):
    the session bump and the first message roll back with it."""
    from sqlalchemy import text

    from tokenmem import StoreError

    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON tokenmem_messages "
                    "WHEN NEW.content = 'boom' BEGIN SELECT RAISE(ABORT, 'boom'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF NEW.content = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; "
                    "RETURN NEW; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON tokenmem_messages "
                    "FOR EACH ROW EXECUTE FUNCTION boom()"
                )
            )
    memory = ConversationTokenBufferMemory(store=store, session_id="atomic")
    memory.save_context({"input": "first"}, {"output": "fine"})
    with pytest.raises(StoreError, match="boom"):
        memory.save_context({"input": "kept?"}, {"output": "boom"})
    assert [m.content for m in memory.history()] == ["first", "fine"]
    assert store.session("atomic").next_position == 2  # the counters rolled back too
    memory.save_context({"input": "next"}, {"output": "works"})
    assert [m.position for m in memory.history()] == [0, 1, 2, 3]


def test_chat_memory_is_langchain_s_history_surface(store: Store) -> None:
    """memory.chat_memory: messages, add_user_message, add_ai_message, clear."""
    memory = ConversationTokenBufferMemory(store=store, max_token_limit=30)
    history = memory.chat_memory
    history.add_user_message("hi")
    history.add_ai_message("whats up")
    assert [(m.type, m.content) for m in history.messages] == [("human", "hi"), ("ai", "whats up")]
    assert memory.load_memory_variables({}) == {"history": "Human: hi\nAI: whats up"}
    assert [m.turn for m in memory.history()] == [0, 1]  # each its own turn
    with pytest.raises(InvalidInputError, match="message"):
        history.add_user_message(None)  # type: ignore[arg-type]
    history.clear()
    assert history.messages == [] and len(list(memory.history())) == 2


def test_a_langchain_model_object_names_the_model_by_model_name(store: Store) -> None:
    """langchain_openai's OpenAI and ChatOpenAI name their model
    ``model_name`` (no ``.model``): counted for it, LangChain not imported."""

    class ChatOpenAI:  # the attribute langchain_openai's models have
        model_name = "gpt-4"

    memory = ConversationTokenBufferMemory(llm=ChatOpenAI(), store=store)  # type: ignore[arg-type]
    assert memory.counter.encoding_name == "cl100k_base"
    with pytest.raises(ConfigurationError, match=r"llm must name its model .*not object"):
        ConversationTokenBufferMemory(llm=object(), store=store)  # type: ignore[arg-type]
