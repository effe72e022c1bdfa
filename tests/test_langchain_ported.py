"""LangChain's own unit tests of ConversationChain and its memory, ported.

Source: langchain-ai/langchain, ``libs/langchain/tests/unit_tests/chains/
test_conversation.py`` (read with the tool library's ``read_file``). Each test
keeps its name, inputs and assertions; the imports are tokenmem's, the memory
is ``ConversationTokenBufferMemory`` (LangChain parametrises these over its
buffer, window and summary memories, whose rules are the same here), on
SQLite and PostgreSQL. Where a test cannot be ported as written, the
difference is said in its docstring (README, "Moving from LangChain"):

* ``test_conversation_chain_works`` uses a ``DummyLLM`` (a LangChain ``LLM``
  subclass answering "dummy" and remembering its prompt): here, the local
  OpenAI-compatible server on the completions API, which answers "dummy" and
  records each prompt. LangChain's prompt ``"{foo} {bar}"`` with memory key
  ``foo`` and input key ``bar`` is tokenmem's ``"{history} {input}"`` with the
  same keys: a tokenmem template names its two places ``history`` and
  ``input`` whatever the keys are.
* ``test_conversation_chain_errors_bad_prompt`` builds ``PromptTemplate(
  input_variables=[], template="nothing here")``: tokenmem's PromptTemplate
  refuses such a template itself (a ``ValueError`` too), before any chain.
"""

from __future__ import annotations

import asyncio

import pytest

from tokenmem import ConversationChain, ConversationTokenBufferMemory, OpenAI, PromptTemplate, Store

from .openai_server import FakeOpenAI


def test_memory_ai_prefix(store: Store) -> None:
    """Test that ai_prefix in the memory component works."""
    memory = ConversationTokenBufferMemory(memory_key="foo", ai_prefix="Assistant", store=store)
    memory.save_context({"input": "bar"}, {"output": "foo"})
    assert memory.load_memory_variables({}) == {"foo": "Human: bar\nAssistant: foo"}


def test_memory_human_prefix(store: Store) -> None:
    """Test that human_prefix in the memory component works."""
    memory = ConversationTokenBufferMemory(memory_key="foo", human_prefix="Friend", store=store)
    memory.save_context({"input": "bar"}, {"output": "foo"})
    assert memory.load_memory_variables({}) == {"foo": "Friend: bar\nAI: foo"}


def test_memory_async(store: Store) -> None:
    async def run() -> None:
        memory = ConversationTokenBufferMemory(memory_key="foo", ai_prefix="Assistant", store=store)
        await memory.asave_context({"input": "bar"}, {"output": "foo"})
        assert await memory.aload_memory_variables({}) == {"foo": "Human: bar\nAssistant: foo"}

    asyncio.run(run())


def test_conversation_chain_works(openai_server: FakeOpenAI, store: Store) -> None:
    """Test that conversation chain works in basic setting."""
    llm = OpenAI(
        base_url=openai_server.base_url,
        api_key="sk-test",
        max_retries=0,
        api="completions",
        model="gpt-3.5-turbo-instruct",
    )
    prompt = PromptTemplate("{history} {input}")
    memory = ConversationTokenBufferMemory(memory_key="foo", llm=llm, store=store)
    chain = ConversationChain(llm=llm, prompt=prompt, memory=memory, input_key="bar")
    openai_server.reply("dummy", "dummy", "dummy")

    def last_prompt() -> object:
        body = openai_server.requests[-1].body
        assert body is not None
        return body["prompt"]

    chain.run("aaa")
    assert last_prompt() == " aaa"
    chain.run("bbb")
    assert last_prompt() == "Human: aaa\nAI: dummy bbb"

    async def arun() -> None:
        try:
            await chain.arun("ccc")
        finally:
            await llm.aclose()

    asyncio.run(arun())
    assert last_prompt() == "Human: aaa\nAI: dummy\nHuman: bbb\nAI: dummy ccc"


def test_conversation_chain_errors_bad_prompt() -> None:
    """Test that conversation chain raise error with bad prompt."""
    with pytest.raises(ValueError):
        PromptTemplate("nothing here")


def test_conversation_chain_errors_bad_variable(store: Store) -> None:
    """Test that conversation chain raise error with bad variable."""
    llm = OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
    memory = ConversationTokenBufferMemory(memory_key="foo", llm=llm, store=store)
    with pytest.raises(ValueError):
        ConversationChain(llm=llm, memory=memory, input_key="foo")


def test_conversation_memory(store: Store) -> None:
    """Test basic conversation memory functionality."""
    memory = ConversationTokenBufferMemory(memory_key="baz", store=store)
    # This is a good input because the input is not the same as baz.
    good_inputs = {"foo": "bar", "baz": "foo"}
    # This is a good output because these is one variable.
    good_outputs = {"bar": "foo"}
    memory.save_context(good_inputs, good_outputs)
    # This is a bad input because there are two variables that aren't the same as baz.
    bad_inputs = {"foo": "bar", "foo1": "bar"}
    with pytest.raises(ValueError):
        memory.save_context(bad_inputs, good_outputs)
    # This is a bad input because the only variable is the same as baz.
    bad_inputs = {"baz": "bar"}
    with pytest.raises(ValueError):
        memory.save_context(bad_inputs, good_outputs)
    # This is a bad output because it is empty.
    with pytest.raises(ValueError):
        memory.save_context(good_inputs, {})
    # This is a bad output because there are two keys.
    bad_outputs = {"foo": "bar", "foo1": "bar"}
    with pytest.raises(ValueError):
        memory.save_context(good_inputs, bad_outputs)


def test_clearing_conversation_memory(store: Store) -> None:
    """Test clearing the conversation memory."""
    memory = ConversationTokenBufferMemory(memory_key="baz", store=store)
    # This is a good input because the input is not the same as baz.
    good_inputs = {"foo": "bar", "baz": "foo"}
    # This is a good output because there is one variable.
    good_outputs = {"bar": "foo"}
    memory.save_context(good_inputs, good_outputs)

    memory.clear()
    assert memory.load_memory_variables({}) == {"baz": ""}


def test_clearing_conversation_memory_async(store: Store) -> None:
    """Test clearing the conversation memory."""

    async def run() -> None:
        memory = ConversationTokenBufferMemory(memory_key="baz", store=store)
        good_inputs = {"foo": "bar", "baz": "foo"}
        good_outputs = {"bar": "foo"}
        await memory.asave_context(good_inputs, good_outputs)

        await memory.aclear()
        assert await memory.aload_memory_variables({}) == {"baz": ""}

    asyncio.run(run())
