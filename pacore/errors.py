"""One error hierarchy for the whole platform.

Every failure a client can see is a :class:`PACoreError`. Each class fixes the HTTP status and
the OpenAI error ``type``; an instance adds the message, the ``provider`` it came from, a machine
``code``, the offending ``param`` and whether a retry may help (``retryable``)::

    PACoreError (500, internal_error)
    ├── BadRequestError (400, invalid_request_error)
    │   └── ContextLengthError (400, invalid_request_error, code=context_length_exceeded)
    ├── AuthenticationError (401, authentication_error)
    ├── PermissionDeniedError (403, permission_error)
    ├── NotFoundError (404, not_found_error)
    ├── ConflictError (409, conflict_error)
    ├── PayloadTooLargeError (413, invalid_request_error)
    ├── ValidationError (422, invalid_request_error)
    ├── RateLimitError (429, rate_limit_error, retryable, retry_after)
    ├── UpstreamError (502, upstream_error, retryable)
    ├── UpstreamUnavailableError (503, service_unavailable, retryable, retry_after)
    └── TimeoutError (504, timeout_error, retryable)

Errors cross Ray Serve handles, so they pickle with all their fields. They are turned into the
wire shape exactly once, at the gateway (:meth:`PACoreError.to_wire`); messages must never carry
secrets or internal details, because they are shown to clients as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "ContextLengthError",
    "NotFoundError",
    "PACoreError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "TimeoutError",
    "UpstreamError",
    "UpstreamUnavailableError",
    "ValidationError",
    "error_for_status",
]


class PACoreError(Exception):
    """Base of every error a client may see."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "internal error",
        *,
        provider: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.code = code
        self.param = param
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default pickling replays only positional args; keep every field.
        return (_rebuild, (type(self), self.message, self._fields()))

    def _fields(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "code": self.code,
            "param": self.param,
            "retryable": self.retryable,
            "retry_after": self.retry_after,
        }

    def to_wire(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, provider={self.provider!r}, code={self.code!r})"


def _rebuild(cls: type[PACoreError], message: str, fields: dict[str, Any]) -> PACoreError:
    return cls(message, **fields)


class ConfigurationError(PACoreError):
    """The platform is configured in a way it must not run with."""


class BadRequestError(PACoreError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    def __init__(self, message: str = "the prompt is longer than the model's context", **kw: Any) -> None:
        kw.setdefault("code", "context_length_exceeded")
        super().__init__(message, **kw)


class AuthenticationError(PACoreError):
    status = 401
    type = "authentication_error"


class PermissionDeniedError(PACoreError):
    status = 403
    type = "permission_error"


class NotFoundError(PACoreError):
    status = 404
    type = "not_found_error"


class ConflictError(PACoreError):
    status = 409
    type = "conflict_error"


class PayloadTooLargeError(PACoreError):
    status = 413
    type = "invalid_request_error"


class ValidationError(PACoreError):
    status = 422
    type = "invalid_request_error"


class RateLimitError(PACoreError):
    status = 429
    type = "rate_limit_error"
    default_retryable = True


class UpstreamError(PACoreError):
    status = 502
    type = "upstream_error"
    default_retryable = True


class UpstreamUnavailableError(PACoreError):
    status = 503
    type = "service_unavailable"
    default_retryable = True


class TimeoutError(PACoreError):  # the platform's own timeout; shadows the builtin on purpose
    status = 504
    type = "timeout_error"
    default_retryable = True


_BY_STATUS: dict[int, type[PACoreError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: TimeoutError,
    409: ConflictError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
    502: UpstreamError,
    503: UpstreamUnavailableError,
    504: TimeoutError,
    529: UpstreamUnavailableError,  # Anthropic's "overloaded"
}


def error_for_status(
    status: int,
    message: str,
    *,
    provider: str | None = None,
    retry_after: float | None = None,
    code: str | None = None,
) -> PACoreError:
    """Map an upstream HTTP status to the platform error a client should see.

    Upstream 4xx that are the caller's fault keep their meaning (a bad key is still a 401); any
    other upstream 5xx becomes a retryable 502.
    """
    if "context" in message.lower() and status in (400, 413, 422) and (
        "length" in message.lower() or "too long" in message.lower() or "window" in message.lower()
    ):
        return ContextLengthError(message, provider=provider)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = UpstreamError if status >= 500 else BadRequestError
    return cls(message, provider=provider, retry_after=retry_after, code=code)
