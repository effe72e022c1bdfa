"""tokenmem: LangChain's ConversationTokenBufferMemory, persisted in SQL.

from tokenmem import ConversationTokenBufferMemory, OpenAI
memory = ConversationTokenBufferMemory(llm=OpenAI(), max_token_limit=10)
memory.save_context({"input": "hi"}, {"output": "whats up"})
memory.load_memory_variables({})   # {'history': 'Human: hi\\nAI: whats up'}
"""

from typing import TYPE_CHECKING

__version__ = "0.2.0"

from .audit import TurnRecord
from .chain import ConversationChain
from .digest import Verified
from .errors import (
    ConfigurationError,
    EncodingUnavailable,
    InvalidInputError,
    ModelError,
    SchemaError,
    SessionNotFound,
    StoreError,
    TokenmemError,
    TurnNotFound,
)
from .llm import ChatOpenAI, OpenAI, Reply
from .memory import ConversationTokenBufferMemory
from .messages import Message, SessionInfo, StoredMessage
from .prompt import PromptTemplate
from .reads import SessionStats, WindowMessage
from .store import Store
from .summary import ConversationSummaryBufferMemory, Summary, SummaryWindow
from .tokens import TokenCounter
from .transfer import ImportResult
from .window import Rule, get_buffer_string
from .writes import Erased

if TYPE_CHECKING:  # type checkers see the class; at run time it is imported on use
    from .aio import AsyncStore


def __getattr__(name: str) -> object:
    # AsyncStore needs the "async" extra (SQLAlchemy's asyncio): imported on use.
    if name == "AsyncStore":
        from .aio import AsyncStore

        return AsyncStore
    raise AttributeError(f"module 'tokenmem' has no attribute {name!r}")


__all__ = [
    "AsyncStore",
    "ChatOpenAI",
    "ConfigurationError",
    "ConversationChain",
    "ConversationSummaryBufferMemory",
    "ConversationTokenBufferMemory",
    "EncodingUnavailable",
    "Erased",
    "ImportResult",
    "InvalidInputError",
    "Message",
    "ModelError",
    "OpenAI",
    "PromptTemplate",
    "Reply",
    "Rule",
    "SchemaError",
    "SessionInfo",
    "SessionNotFound",
    "SessionStats",
    "Store",
    "StoreError",
    "StoredMessage",
    "Summary",
    "SummaryWindow",
    "TokenCounter",
    "TokenmemError",
    "TurnNotFound",
    "TurnRecord",
    "Verified",
    "WindowMessage",
    "__version__",
    "get_buffer_string",
]
