"""tokenmem: LangChain's ConversationTokenBufferMemory, persisted in SQL.

from tokenmem import ConversationTokenBufferMemory, OpenAI
memory = ConversationTokenBufferMemory(llm=OpenAI(), max_token_limit=10)
memory.save_context({"input": "hi"}, {"output": "whats up"})
memory.load_memory_variables({})   # {'history': 'Human: hi\\nAI: whats up'}
"""

from .errors import (
    ConfigurationError,
    EncodingUnavailable,
    InvalidInputError,
    ModelError,
    SchemaError,
    SessionNotFound,
    StoreError,
    TokenmemError,
)
from .llm import OpenAI
from .memory import ConversationTokenBufferMemory, get_buffer_string
from .messages import Message, SessionInfo, StoredMessage
from .store import Store
from .tokens import TokenCounter
from .window import Rule

__all__ = [
    "ConfigurationError",
    "ConversationTokenBufferMemory",
    "EncodingUnavailable",
    "InvalidInputError",
    "Message",
    "ModelError",
    "OpenAI",
    "Rule",
    "SchemaError",
    "SessionInfo",
    "SessionNotFound",
    "Store",
    "StoreError",
    "StoredMessage",
    "TokenCounter",
    "TokenmemError",
    "get_buffer_string",
]
