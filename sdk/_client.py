"""The synchronous client, :class:`Client`, and its resource namespaces."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx
from pydantic import BaseModel

from sdk._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Call,
    CompleteOptions,
    RetryPolicy,
    TimeoutParam,
    build_request,
    complete_body,
    default_headers,
    error_for_response,
    error_for_transport,
    resolve_base_url,
    resolve_token,
    segment,
    settings_body,
    without_none,
)
from sdk._models import (
    Agent,
    AgentPaired,
    Completion,
    Conversation,
    ConversationPage,
    ConversationSummary,
    Health,
    Login,
    MemoryResult,
    Provider,
    ProviderTest,
    Registration,
    Token,
    TokenCreated,
    User,
    UserSettings,
)
from sdk._streaming import CompletionStream

__all__ = ["Client"]

M = TypeVar("M", bound=BaseModel)


class Client:
    """A client of the PA Core API.

    ``base_url`` and ``token`` default to the ``PACORE_URL`` and ``PACORE_TOKEN`` environment
    variables (and the URL to ``http://127.0.0.1:8000``). ``timeout`` is in seconds or an
    ``httpx.Timeout``; every method also takes ``timeout=`` for itself. Requests the server
    refuses with 429/503 are retried ``max_retries`` times, after its ``retry-after`` or a
    jittered backoff; a completion that may have started is never sent twice::

        with Client() as client:
            answer = client.complete("What is Ray Serve?")
            print(answer.content, answer.usage.total_tokens)
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        #: The bearer token sent with every request; assign a new one (e.g. after login).
        self.token = resolve_token(token)
        self._retry = RetryPolicy(max_retries=max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, headers=default_headers(headers))
        self.auth = Auth(self)
        self.tokens = Tokens(self)
        self.providers = Providers(self)
        self.settings = Settings(self)
        self.conversations = Conversations(self)
        self.memory = Memory(self)
        self.agents = Agents(self)

    # ------------------------------------------------------------------ completions

    def complete(
        self,
        prompt: str | None = None,
        *,
        timeout: TimeoutParam = None,
        **options: Unpack[CompleteOptions],
    ) -> Completion:
        """A whole answer (give ``prompt`` or ``messages=``); see :class:`CompleteOptions`."""
        call = Call(
            "POST", "/v1/complete", complete_body(prompt, options, stream=False), resendable=False
        )
        return self._fetch(call, Completion, timeout)

    def stream(
        self,
        prompt: str | None = None,
        *,
        timeout: TimeoutParam = None,
        **options: Unpack[CompleteOptions],
    ) -> CompletionStream:
        """Ask for an answer streamed as it is produced: an iterator of chunks whose ``done``
        (usage, conversation id) is set at the end. Errors before the first byte raise here."""
        call = Call(
            "POST", "/v1/complete", complete_body(prompt, options, stream=True), resendable=False
        )
        return CompletionStream(self._send(call, timeout, stream=True))

    def health(self, *, timeout: TimeoutParam = None) -> Health:
        """The platform's health; ``status`` is ``degraded`` when a component is unavailable."""
        call = Call("GET", "/health", authenticated=False, accept=frozenset({503}))
        return self._fetch(call, Health, timeout)

    # ------------------------------------------------------------------ transport

    def _send(
        self, call: Call, timeout: TimeoutParam = None, *, stream: bool = False
    ) -> httpx.Response:
        request = build_request(self._http, self.base_url, self.token, call, timeout)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._retry.delay_after_failure(attempt, exc, call)
                if delay is None:
                    raise error_for_transport(exc, self.base_url) from None
            else:
                if response.is_success or response.status_code in call.accept:
                    return response
                delay = self._retry.delay_after_status(attempt, response)
                response.read()
                response.close()
                if delay is None:
                    raise error_for_response(response)
            time.sleep(delay)
            attempt += 1

    def _fetch(self, call: Call, model: type[M], timeout: TimeoutParam = None) -> M:
        return model.model_validate(self._send(call, timeout).json())

    def _fetch_list(self, call: Call, model: type[M], timeout: TimeoutParam = None) -> list[M]:
        return [model.model_validate(item) for item in self._send(call, timeout).json()]

    def close(self) -> None:
        """Release the connection pool (only one this client made itself)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class Auth(_Resource):
    """Accounts: register, log in, and who the token belongs to."""

    def register(self, email: str, password: str) -> Registration:
        """Create an account; the answer carries a session token for it."""
        body = {"email": email, "password": password}
        call = Call("POST", "/v1/auth/register", body, resendable=False, authenticated=False)
        return self._client._fetch(call, Registration)

    def login(self, email: str, password: str) -> Login:
        """A new session token (assign it to ``client.token`` to use it)."""
        body = {"email": email, "password": password}
        return self._client._fetch(Call("POST", "/v1/auth/login", body, authenticated=False), Login)

    def me(self) -> User:
        """The user the client's token belongs to."""
        return self._client._fetch(Call("GET", "/v1/auth/me"), User)


class Tokens(_Resource):
    """Long-lived API tokens of the user."""

    def create(self, name: str, *, expires_in_days: int | None = None) -> TokenCreated:
        """A new API token; its secret is in the answer only, this once."""
        body = without_none(name=name, expires_in_days=expires_in_days)
        call = Call("POST", "/v1/auth/tokens", body, resendable=False)
        return self._client._fetch(call, TokenCreated)

    def list(self) -> builtins.list[Token]:
        return self._client._fetch_list(Call("GET", "/v1/auth/tokens"), Token)

    def revoke(self, token_id: str) -> None:
        """Revoke a token by id: it stops working at once."""
        self._client._send(Call("DELETE", f"/v1/auth/tokens/{segment(token_id, 'token_id')}"))


class Providers(_Resource):
    """The user's model providers (their keys are stored encrypted and never returned)."""

    def configure(
        self,
        name: str,
        kind: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        default_model: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Provider:
        """Create or replace provider ``name`` (the user's label) of ``kind`` (anthropic,
        openai, custom, ollama, vllm)."""
        body = without_none(
            kind=kind, api_key=api_key, base_url=base_url, default_model=default_model
        )
        if options is not None:
            body["options"] = dict(options)
        call = Call("PUT", f"/v1/providers/{segment(name, 'name')}", body)
        return self._client._fetch(call, Provider)

    def list(self) -> builtins.list[Provider]:
        """Every configured provider, with a live ``healthy`` flag."""
        return self._client._fetch_list(Call("GET", "/v1/providers"), Provider)

    def test(self, name: str) -> ProviderTest:
        """A live call to the provider with the stored configuration."""
        call = Call("POST", f"/v1/providers/{segment(name, 'name')}/test")
        return self._client._fetch(call, ProviderTest)

    def delete(self, name: str) -> None:
        self._client._send(Call("DELETE", f"/v1/providers/{segment(name, 'name')}"))


class Settings(_Resource):
    """The user's routing settings: default provider, residency, per-query-type routing."""

    def get(self) -> UserSettings:
        return self._client._fetch(Call("GET", "/v1/settings"), UserSettings)

    def put(self, settings: UserSettings | Mapping[str, Any]) -> UserSettings:
        """Replace the settings whole; names must be providers the user has."""
        return self._client._fetch(
            Call("PUT", "/v1/settings", settings_body(settings)), UserSettings
        )


class Conversations(_Resource):
    """Conversation history."""

    def list(
        self, *, limit: int = 20, cursor: str | None = None, tag: str | None = None
    ) -> ConversationPage:
        """One page, newest first; pass ``page.next_cursor`` as ``cursor`` for the next."""
        params = without_none(limit=limit, cursor=cursor, tag=tag)
        return self._client._fetch(
            Call("GET", "/v1/conversations", params=params), ConversationPage
        )

    def iter(self, *, tag: str | None = None, page_size: int = 50) -> Iterator[ConversationSummary]:
        """Every conversation (with ``tag``, if given), fetching pages as it goes."""
        cursor: str | None = None
        while True:
            page = self.list(limit=page_size, cursor=cursor, tag=tag)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def get(self, conversation_id: str) -> Conversation:
        """A conversation with its messages."""
        path = f"/v1/conversations/{segment(conversation_id, 'conversation_id')}"
        return self._client._fetch(Call("GET", path), Conversation)

    def delete(self, conversation_id: str) -> None:
        """Delete a conversation, its messages and their memory."""
        path = f"/v1/conversations/{segment(conversation_id, 'conversation_id')}"
        self._client._send(Call("DELETE", path))

    def tag(self, conversation_id: str, tags: Sequence[str]) -> ConversationSummary:
        """Replace the conversation's tags."""
        path = f"/v1/conversations/{segment(conversation_id, 'conversation_id')}/tags"
        return self._client._fetch(Call("PUT", path, {"tags": list(tags)}), ConversationSummary)


class Memory(_Resource):
    """Search of everything the user's conversations remember, by meaning."""

    def search(
        self,
        query: str,
        *,
        limit: int = 10,
        conversation_id: str | None = None,
        provider: str | None = None,
        tags: Sequence[str] | None = None,
        role: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> builtins.list[MemoryResult]:
        """Remembered messages closest in meaning to ``query``, best first."""
        filters = without_none(
            conversation_id=conversation_id,
            provider=provider,
            tags=list(tags) if tags is not None else None,
            role=role,
            since=since.isoformat() if since else None,
            until=until.isoformat() if until else None,
        )
        body = {"query": query, "limit": limit, "filters": filters}
        response = self._client._send(Call("POST", "/v1/memory/search", body))
        return [MemoryResult.model_validate(r) for r in response.json()["results"]]


class Agents(_Resource):
    """On-prem agents paired to the user."""

    def pair(self, name: str) -> AgentPaired:
        """Pair a new agent; its token is in the answer only, this once."""
        call = Call("POST", "/v1/agents", {"name": name}, resendable=False)
        return self._client._fetch(call, AgentPaired)

    def list(self) -> builtins.list[Agent]:
        """Paired agents, whether connected now, and what they announced."""
        return self._client._fetch_list(Call("GET", "/v1/agents"), Agent)

    def revoke(self, agent_id: str) -> None:
        """Unpair an agent: its token stops working and its socket is closed."""
        self._client._send(Call("DELETE", f"/v1/agents/{segment(agent_id, 'agent_id')}"))
