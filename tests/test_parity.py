"""Twins stay equal by test, not by care (simonw/llm's test_async_parity):
every public method of Store is on AsyncStore, and every method of the
memory, the chain and the LangChain adapters has its ``a``-prefixed twin,
with the same parameters, awaited, and both documented."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from tokenmem import (
    ConversationChain,
    ConversationSummaryBufferMemory,
    ConversationTokenBufferMemory,
    Store,
)
from tokenmem.aio import AsyncStore
from tokenmem.langchain import ConversationTokenBufferMemory as LangChainMemory
from tokenmem.langchain import SQLTokenWindowHistory


def public(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        name: f
        for name, f in vars(cls).items()
        if inspect.isfunction(f) and (not name.startswith("_") or name == "__init__")
    }


def shape(f: Callable[..., Any], typed: bool) -> list[tuple[object, ...]]:
    return [
        (p.name, p.kind, p.default, p.annotation if typed else None)
        for p in inspect.signature(f).parameters.values()
    ]


def check(method: Callable[..., Any], twin: Callable[..., Any], name: str) -> None:
    # The same parameters; the constructors differ only in the engine's type.
    typed = name != "__init__"
    assert shape(method, typed) == shape(twin, typed), name
    if typed:
        assert inspect.iscoroutinefunction(twin) or inspect.isasyncgenfunction(twin), name
        assert not (inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method))
    assert inspect.getdoc(method) and inspect.getdoc(twin), name


def test_store_and_async_store() -> None:
    sync, async_ = public(Store), public(AsyncStore)
    assert set(sync) == set(async_), set(sync) ^ set(async_)
    for name, method in sync.items():
        check(method, async_[name], name)
        # The same words, the async twin adding at most a paragraph of its own.
        assert (inspect.getdoc(async_[name]) or "").startswith(
            (inspect.getdoc(method) or "").split("\n\n")[0]
        ), name


@pytest.mark.parametrize(
    ("cls", "sync_only"),
    [
        # properties and LangChain attributes have no awaitable form
        (ConversationTokenBufferMemory, {"__init__", "rule", "memory_variables", "buffer"}),
        (ConversationChain, {"__init__"}),
        # its own methods and overrides (the rest is the class above)
        (ConversationSummaryBufferMemory, {"__init__"}),
        # aget_messages is the twin of the property messages (LangChain's shape)
        (SQLTokenWindowHistory, {"__init__", "aget_messages"}),
        (LangChainMemory, {"model_post_init"}),
    ],
)
def test_a_twins(cls: type, sync_only: set[str]) -> None:
    methods = public(cls)
    twins = {name for name in methods if name.startswith("a") and name[1:] in methods}
    plain = set(methods) - twins - sync_only
    assert plain, cls
    for name in sorted(plain):
        assert f"a{name}" in methods, f"{cls.__name__}.{name} has no async twin"
        check(methods[name], methods[f"a{name}"], name)
