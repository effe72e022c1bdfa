"""tokenmem as an OpenAI Agents SDK session: the newest items that fit a token budget.

Needs the ``agents`` extra (``pip install 'tokenmem[agents]'``)::

    from agents import Agent, Runner
    from tokenmem import Store
    from tokenmem.agents import TokenmemSession

    store = Store("sqlite:///agents.db", upgrade=True)  # one per process
    session = TokenmemSession("user-123", store=store, max_token_limit=4000)
    result = await Runner.run(agent, "What is the weather in Paris?", session=session)

:class:`TokenmemSession` implements the SDK's ``Session`` protocol over a
tokenmem :class:`~tokenmem.Store` or :class:`~tokenmem.aio.AsyncStore`
(SQLite or PostgreSQL). Items are stored exactly as the SDK gives them —
messages, function calls and their outputs, reasoning items, any other
Responses API item — one row each, counted once when saved
(:mod:`tokenmem.chat` has the rules). Its methods run the store's own
operations (:mod:`tokenmem.writes`, :mod:`tokenmem.reads`), each in one
transaction: natively on an AsyncStore, in a worker thread on a Store.

* ``get_items()`` is what the Runner sends the model: the token window, one
  SQL statement — the newest items that fit ``max_token_limit`` (the chat
  formula), whole units only: a function call and its outputs, a reasoning
  item and the item after it, are all in or all out; a unit still waiting
  for its outputs, or orphaned (never answered), is left out.
* ``get_items(limit)`` is the protocol's "latest ``limit`` items", exactly
  as stored: the Runner's own bookkeeping (resuming an interrupted run,
  rewinding a retried turn) compares it with what it wrote, so it must
  not be a window. ``SessionSettings(limit=...)`` therefore gives the
  SDK's count-based history, as with its other sessions.
* ``add_items(items)``: one transaction, checked (:func:`tokenmem.chat.from_items`).
* ``pop_item()`` removes the newest item for good — the Runner uses it to
  take back a retried turn's items — leaving the session as it was before
  that item was added (:func:`tokenmem.writes.pop`).
* ``clear_session()`` is tokenmem's clear: the window starts empty, every
  item stays in the history (``tokenmem history``, :meth:`Store.history`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Engine

from . import reads, writes
from .aio import _to_completion
from .chat import as_openai, from_items
from .engine import logger
from .errors import ConfigurationError, InvalidInputError, TokenmemError
from .memory import _store
from .store import Store
from .tokens import TokenCounter, encoding_for_model
from .validate import prepare_append
from .window import Rule

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from agents.memory import SessionSettings
    from sqlalchemy import Connection

    from .aio import AsyncStore

__all__ = ["TokenmemSession"]

T = TypeVar("T")


def _settings_class() -> type[SessionSettings]:
    """The SDK's SessionSettings: the ``agents`` extra, imported on use."""
    try:
        from agents.memory import SessionSettings
    except ImportError as exc:
        raise ConfigurationError(
            "TokenmemSession needs the OpenAI Agents SDK: pip install 'tokenmem[agents]'"
        ) from exc
    return SessionSettings


class TokenmemSession:
    """An OpenAI Agents SDK session (its ``Session`` protocol) whose history
    is the newest items that fit ``max_token_limit`` tokens.

    ``store`` is a :class:`~tokenmem.Store`, an
    :class:`~tokenmem.aio.AsyncStore`, an Engine or a URL (default: the
    embedded SQLite file, or ``TOKENMEM_DATABASE_URL``), as for
    :class:`~tokenmem.ConversationTokenBufferMemory`; ``owner`` scopes the
    session. Items are counted with ``encoding``, else the encoding of
    ``model`` (default gpt-4o-mini's). ``session_settings`` is the SDK's
    (its ``limit``, if set, replaces the token window with the newest
    ``limit`` items, as in the SDK's own sessions). Raises
    :class:`ConfigurationError` without the SDK installed."""

    session_id: str
    session_settings: SessionSettings | None

    def __init__(
        self,
        session_id: str,
        *,
        store: Store | AsyncStore | Engine | str | None = None,
        owner: str | None = None,
        max_token_limit: int = 2000,
        model: str | None = None,
        encoding: str | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        settings = _settings_class()
        if isinstance(max_token_limit, bool) or not isinstance(max_token_limit, int):
            raise ConfigurationError("max_token_limit must be an int")
        if max_token_limit <= 0:
            raise ConfigurationError("max_token_limit must be positive")
        self.counter = TokenCounter(encoding or encoding_for_model(model or "gpt-4o-mini"))
        self.max_token_limit = max_token_limit
        self.store = _store(store)
        self._key = self.store._key(session_id, owner)  # checked, in the store's owner scope
        self.session_id = session_id
        self.owner = owner
        self.session_settings = settings() if session_settings is None else session_settings

    def __repr__(self) -> str:
        return (
            f"TokenmemSession({self.session_id!r}, max_token_limit={self.max_token_limit}, "
            f"encoding={self.counter.encoding_name!r})"
        )

    async def _run(self, work: Callable[[Connection], T]) -> T:
        """``work`` in one transaction of the store, run to its end even if
        the caller is cancelled (the SDK needs to know whether a write happened)."""
        store = self.store
        if isinstance(store, Store):
            return await _to_completion(asyncio.to_thread(store.run, work))
        return await store.run(work)

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The session's items, oldest first, each exactly as it was added.

        Without ``limit`` (and no ``session_settings.limit``): the token
        window — the newest items that fit ``max_token_limit``, whole units
        only (a function call with its outputs, a reasoning item with the
        item after it), a system or developer message pinned first. With
        ``limit``: the newest ``limit`` items since the last clear, exactly
        (what the protocol promises, and the Runner's bookkeeping needs).
        Raises :class:`ConfigurationError` when the pinned messages alone
        are over the limit."""
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        if limit is None:
            rule = Rule(limit=self.max_token_limit, mode="messages")
            work = functools.partial(
                reads.window_rows, key=self._key, rule=rule, counter=self.counter
            )
            rows = await self._run(work)
            found = [as_openai(w.message) for w in reads.window_messages(rows)]
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidInputError(f"limit must be None or an int >= 0, not {limit!r}")
        elif limit == 0:
            found = []
        else:
            tail = functools.partial(reads.tail, key=self._key, limit=limit)
            found = [as_openai(m) for m in await self._run(tail)]
        return cast("list[TResponseInputItem]", found)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Add ``items`` (Responses API input items) in one transaction, all
        or none, checked first (:class:`InvalidInputError` naming the item;
        their order is never refused: see :mod:`tokenmem.chat`). One call is
        one turn of the session's history."""
        if not items:
            return
        messages = from_items(cast("list[Any]", items))
        prepared = prepare_append(self._key, [messages], self.counter, items=True)
        stored = await self._run(functools.partial(writes.append, p=prepared))
        if stored[0].encoding != self.counter.encoding_name:  # the model changed
            await self._recount_step()

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove the newest item (since the last clear) and return it, or
        None when there is none. The session is left as it was before the
        item was added: a function call whose output is popped waits for it
        again; a unit whose first item is popped is gone."""
        popped = await self._run(functools.partial(writes.pop, key=self._key))
        return None if popped is None else cast("TResponseInputItem", as_openai(popped))

    async def clear_session(self) -> None:
        """Start an empty window (and history for ``get_items``); every item
        stays in the stored history."""
        await self._run(functools.partial(writes.clear, key=self._key))

    async def _recount_step(self) -> None:
        """One batch of the recount that items counted with another encoding
        than the session's ask for, after their commit: an error is logged,
        not raised (the items are saved), as the store does."""
        store, owner = self.store, self._key.owner
        try:
            if isinstance(store, Store):
                await asyncio.to_thread(
                    store.recount, self._key.name, self.counter, owner=owner, batches=1
                )
            else:
                await store.recount(self._key.name, self.counter, owner=owner, batches=1)
        except TokenmemError as exc:
            encoding = self.counter.encoding_name
            logger.warning("recounting session %r for %s: %s", self.session_id, encoding, exc)
