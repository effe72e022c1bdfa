"""tokenmem inside LangChain (the ``langchain`` extra: ``pip install
'tokenmem[langchain]'``, which installs langchain-core).

* :class:`SQLTokenWindowHistory`, a ``BaseChatMessageHistory`` whose
  ``messages`` are a session's token window, selected in SQL: the drop-in for
  ``RunnableWithMessageHistory`` in place of ``SQLChatMessageHistory`` and
  ``trim_messages``::

      from langchain_core.runnables.history import RunnableWithMessageHistory
      from tokenmem import Store
      from tokenmem.langchain import SQLTokenWindowHistory

      store = Store("postgresql+psycopg://127.0.0.1/app")
      chat = RunnableWithMessageHistory(
          prompt | model,
          lambda session_id: SQLTokenWindowHistory(
              session_id, store=store, max_token_limit=2000
          ),
          input_messages_key="input",
          history_messages_key="history",
      )

* :class:`ConversationTokenBufferMemory`, LangChain's memory of that name as
  a ``BaseMemory`` for LangChain's own ``ConversationChain`` (it needs
  langchain-classic, imported when the class is first used).
* :func:`from_langchain` and :func:`to_langchain` convert messages.

Importing :mod:`tokenmem` never imports LangChain; importing this module
without langchain-core raises an ``ImportError`` naming the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    import langchain_core  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "tokenmem.langchain needs LangChain: pip install 'tokenmem[langchain]'",
        name=exc.name,
    ) from exc

from .history import METADATA_KEY, SQLTokenWindowHistory, from_langchain, to_langchain

if TYPE_CHECKING:  # type checkers see the class; at run time it is imported on use
    from .memory import ConversationTokenBufferMemory


def __getattr__(name: str) -> object:
    # The BaseMemory lives in langchain-classic, which the extra does not
    # install (a chain that uses one has it): imported on use.
    if name == "ConversationTokenBufferMemory":
        try:
            from .memory import ConversationTokenBufferMemory
        except ImportError as exc:
            if exc.name is None or not exc.name.startswith("langchain_classic"):
                raise
            raise ImportError(
                "tokenmem.langchain.ConversationTokenBufferMemory is a BaseMemory of "
                "langchain-classic: pip install langchain-classic",
                name=exc.name,
            ) from exc
        return ConversationTokenBufferMemory
    raise AttributeError(f"module 'tokenmem.langchain' has no attribute {name!r}")


__all__ = [
    "METADATA_KEY",
    "ConversationTokenBufferMemory",
    "SQLTokenWindowHistory",
    "from_langchain",
    "to_langchain",
]
