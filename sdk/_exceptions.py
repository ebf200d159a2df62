"""The exceptions the client raises, mapped from the API's error shape and HTTP status.

Every error answer of the API reads ``{"error": {"message", "type", "param", "code"}}``; the
client raises the class its status names, carrying those fields and the ``x-request-id`` of the
answer (quote it when reporting a problem)::

    PACoreError                  base of everything the client raises
    ├── BadRequestError          400, and any other 4xx without a class of its own
    ├── AuthenticationError      401: missing, invalid, expired or revoked token
    ├── PermissionDeniedError    403
    ├── NotFoundError            404
    ├── ConflictError            409
    ├── PayloadTooLargeError     413: the request body is over the server's limit
    ├── ValidationError          422: the request body does not match the API
    ├── RateLimitError           429: ``retry_after`` seconds, when the server said
    ├── ServerError              500, and any other 5xx without a class of its own
    │   └── UpstreamError        502/503: the model provider failed or is unavailable
    ├── TimeoutError             504, or no answer within the client's timeout (status None)
    └── ConnectionError          the server could not be reached, or the connection broke

``TimeoutError`` and ``ConnectionError`` shadow the builtins inside this package on purpose;
refer to them as ``sdk.TimeoutError`` and ``sdk.ConnectionError``. An ``error`` event in the
middle of a stream has no status of its own: its ``type`` picks the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ConnectionError",
    "NotFoundError",
    "PACoreError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "TimeoutError",
    "UpstreamError",
    "ValidationError",
    "error_from_body",
]


class PACoreError(Exception):
    """Base of every error the client raises.

    ``status`` is the HTTP status (None when no answer came), ``type``/``code``/``param`` come
    from the API's error body, and ``request_id`` is the answer's ``x-request-id``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id

    def __str__(self) -> str:
        head = f"{self.status} " if self.status is not None else ""
        tail = f" (request id {self.request_id})" if self.request_id else ""
        return f"{head}{self.message}{tail}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status!r}, "
            f"type={self.type!r}, code={self.code!r}, request_id={self.request_id!r})"
        )


class BadRequestError(PACoreError):
    """400: the server refused the request as malformed or impossible."""


class AuthenticationError(PACoreError):
    """401: no token, or one that is invalid, expired or revoked."""


class PermissionDeniedError(PACoreError):
    """403: the token may not do this."""


class NotFoundError(PACoreError):
    """404: no such resource for this user (or no such route)."""


class ConflictError(PACoreError):
    """409: the resource already exists or changed meanwhile."""


class PayloadTooLargeError(PACoreError):
    """413: the request body is larger than the server accepts."""


class ValidationError(PACoreError):
    """422: a field is missing, unknown or out of range (``param`` names it)."""


class RateLimitError(PACoreError):
    """429: too many requests; ``retry_after`` is the server's advice in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


class ServerError(PACoreError):
    """5xx: the platform failed to answer."""


class UpstreamError(ServerError):
    """502/503: the model provider failed or is unavailable; ``retry_after`` as advised."""

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


class TimeoutError(PACoreError):
    """No answer in time: the server's 504, or the client's timeout (``status`` None)."""


class ConnectionError(PACoreError):
    """The server could not be reached, or the connection broke before the answer ended."""


_BY_STATUS: dict[int, type[PACoreError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    502: UpstreamError,
    503: UpstreamError,
    504: TimeoutError,
}

# In-stream errors carry no status; the API's error types name the class instead.
_BY_TYPE: dict[str, type[PACoreError]] = {
    "invalid_request_error": BadRequestError,
    "authentication_error": AuthenticationError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "conflict_error": ConflictError,
    "rate_limit_error": RateLimitError,
    "upstream_error": UpstreamError,
    "service_unavailable": UpstreamError,
    "timeout_error": TimeoutError,
    "internal_error": ServerError,
}


def _class_for(status: int | None, error_type: str | None) -> type[PACoreError]:
    if status is not None:
        found = _BY_STATUS.get(status)
        if found is not None:
            return found
        return ServerError if status >= 500 else BadRequestError
    return _BY_TYPE.get(error_type or "", ServerError)


def error_from_body(
    body: Any,
    *,
    status: int | None,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> PACoreError:
    """The exception for an error answer (``body`` as decoded JSON, or anything else)."""
    error: Mapping[str, Any] = {}
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        error = body["error"]
    message = error.get("message") or (f"HTTP {status}" if status else "request failed")
    error_type = error.get("type")
    cls = _class_for(status, error_type)
    fields: dict[str, Any] = {
        "status": status,
        "type": error_type,
        "code": error.get("code"),
        "param": error.get("param"),
        "request_id": request_id,
    }
    if cls in (RateLimitError, UpstreamError):
        fields["retry_after"] = retry_after
    return cls(str(message), **fields)
