"""The exceptions tokenmem raises.

Everything tokenmem raises on purpose derives from :class:`TokenmemError`, so a
service can catch one type::

    TokenmemError
    ├── ConfigurationError      bad settings: a non-positive limit, an unknown model
    │   └── EncodingUnavailable a tiktoken encoding that cannot be loaded offline
    ├── InvalidInputError       a value that cannot be stored: not a string, NUL, lone surrogate
    ├── SessionNotFound         no such session (for this owner)
    │   └── TurnNotFound        the session has no model call with that number
    ├── SchemaError             the database is not at tokenmem's migration head
    ├── StoreError              the database failed (wraps SQLAlchemy's error)
    └── ModelError              the model call failed (wraps the OpenAI SDK's error)

``InvalidInputError`` and ``ConfigurationError`` are also ``ValueError`` so code
written against LangChain's ``ValueError`` keeps working.
"""

from __future__ import annotations


class TokenmemError(Exception):
    """Base class of every error tokenmem raises on purpose."""


class ConfigurationError(TokenmemError, ValueError):
    """A setting is invalid: the message says which and what to do."""


class EncodingUnavailable(ConfigurationError):
    """A tiktoken encoding could not be loaded (offline, or unknown)."""

    def __init__(self, message: str, *, encoding: str) -> None:
        super().__init__(message)
        self.encoding = encoding


class InvalidInputError(TokenmemError, ValueError):
    """A value given to save or load cannot be stored losslessly."""


class SessionNotFound(TokenmemError, LookupError):
    """The session does not exist (or belongs to another owner)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class TurnNotFound(SessionNotFound):
    """The session exists but has no recorded model call numbered ``seq``."""

    def __init__(self, session_id: str, seq: int) -> None:
        LookupError.__init__(self, f"no turn {seq} in session {session_id!r}")
        self.session_id = session_id
        self.seq = seq


class SchemaError(TokenmemError):
    """The database schema is not at tokenmem's migration head."""

    def __init__(self, message: str, *, current: str | None, head: str) -> None:
        super().__init__(message)
        self.current = current
        self.head = head


class StoreError(TokenmemError):
    """The database failed; ``__cause__`` holds the driver's exception."""


class ModelError(TokenmemError):
    """The model call failed; ``__cause__`` holds the SDK's exception, if any.

    ``error_type`` names the failure: the SDK's exception class
    (``RateLimitError``, ``APITimeoutError``, ...), ``EmptyReply``,
    ``Refusal`` or ``NoAPIKey``."""

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type
