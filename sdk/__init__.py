"""The PA Core Python client: sync and async clients, streamed answers, typed errors.

    from sdk import Client

    client = Client()                      # PACORE_URL and PACORE_TOKEN from the environment
    print(client.complete("Hello").content)
    with client.stream("Tell me a story") as stream:
        for chunk in stream:
            print(chunk.content, end="", flush=True)
    print(stream.done.usage)

It installs on its own (``pip install ./sdk``) and depends only on httpx and pydantic.
"""

from __future__ import annotations

from sdk._async_client import AsyncClient
from sdk._base import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    CompleteOptions,
)
from sdk._base import VERSION as __version__
from sdk._client import Client
from sdk._exceptions import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionError,
    NotFoundError,
    PACoreError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TimeoutError,
    UpstreamError,
    ValidationError,
)
from sdk._models import (
    Agent,
    AgentPaired,
    Completion,
    CompletionChunk,
    CompletionDone,
    ContextRef,
    Conversation,
    ConversationMessage,
    ConversationPage,
    ConversationSummary,
    Health,
    Login,
    MemoryResult,
    Message,
    MessageUsage,
    Provider,
    ProviderTest,
    Registration,
    Route,
    Routing,
    Token,
    TokenCreated,
    Usage,
    User,
    UserSettings,
)
from sdk._streaming import AsyncCompletionStream, CompletionStream

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "Agent",
    "AgentPaired",
    "AsyncClient",
    "AsyncCompletionStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "CompleteOptions",
    "Completion",
    "CompletionChunk",
    "CompletionDone",
    "CompletionStream",
    "ConflictError",
    "ConnectionError",
    "ContextRef",
    "Conversation",
    "ConversationMessage",
    "ConversationPage",
    "ConversationSummary",
    "Health",
    "Login",
    "MemoryResult",
    "Message",
    "MessageUsage",
    "NotFoundError",
    "PACoreError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Provider",
    "ProviderTest",
    "RateLimitError",
    "Registration",
    "Route",
    "Routing",
    "ServerError",
    "TimeoutError",
    "Token",
    "TokenCreated",
    "UpstreamError",
    "Usage",
    "User",
    "UserSettings",
    "ValidationError",
    "__version__",
]
