"""The error hierarchy: statuses, wire shape, pickling across processes, upstream status mapping."""

from __future__ import annotations

import pickle

import pytest

from pacore import errors
from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    ContextLengthError,
    NotFoundError,
    PACoreError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    TimeoutError,
    UpstreamError,
    UpstreamUnavailableError,
    ValidationError,
    error_for_status,
)

CLASSES: list[tuple[type[PACoreError], int, str, bool]] = [
    (PACoreError, 500, "internal_error", False),
    (ConfigurationError, 500, "internal_error", False),
    (BadRequestError, 400, "invalid_request_error", False),
    (ContextLengthError, 400, "invalid_request_error", False),
    (AuthenticationError, 401, "authentication_error", False),
    (PermissionDeniedError, 403, "permission_error", False),
    (NotFoundError, 404, "not_found_error", False),
    (ConflictError, 409, "conflict_error", False),
    (PayloadTooLargeError, 413, "invalid_request_error", False),
    (ValidationError, 422, "invalid_request_error", False),
    (RateLimitError, 429, "rate_limit_error", True),
    (UpstreamError, 502, "upstream_error", True),
    (UpstreamUnavailableError, 503, "service_unavailable", True),
    (TimeoutError, 504, "timeout_error", True),
]


def test_every_public_error_is_covered() -> None:
    public = {getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)}
    assert public == {cls for cls, *_ in CLASSES}


@pytest.mark.parametrize(("cls", "status", "kind", "retryable"), CLASSES)
def test_status_type_and_retryable(
    cls: type[PACoreError], status: int, kind: str, retryable: bool
) -> None:
    err = cls("something failed")
    assert (err.status, err.type, err.retryable) == (status, kind, retryable)
    assert isinstance(err, PACoreError) and isinstance(err, Exception)
    assert str(err) == err.message == "something failed"
    assert cls("x", retryable=not retryable).retryable is (not retryable)


def test_context_length_is_a_bad_request_with_its_code() -> None:
    err = ContextLengthError()
    assert isinstance(err, BadRequestError)
    assert err.code == "context_length_exceeded"
    assert ContextLengthError("long", code="custom").code == "custom"


@pytest.mark.parametrize(("cls", "status", "kind", "retryable"), CLASSES)
def test_pickling_keeps_every_field(
    cls: type[PACoreError], status: int, kind: str, retryable: bool
) -> None:
    err = cls("bad thing", provider="openai", code="some_code", param="messages",
              retryable=not retryable, retry_after=1.5)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls
    assert (copy.message, copy.provider, copy.code, copy.param, copy.retryable, copy.retry_after) == (
        "bad thing", "openai", "some_code", "messages", not retryable, 1.5
    )
    assert copy.to_wire() == err.to_wire()


def test_pickling_defaults_survive() -> None:
    copy = pickle.loads(pickle.dumps(RateLimitError("slow down")))
    assert (copy.retryable, copy.retry_after, copy.provider) == (True, None, None)


def test_to_wire_is_the_openai_error_shape() -> None:
    err = BadRequestError("bad model", provider="anthropic", code="model_not_found", param="model")
    assert err.to_wire() == {
        "error": {"message": "bad model", "type": "invalid_request_error", "param": "model",
                  "code": "model_not_found"}
    }
    # The provider is internal routing detail, not part of the wire shape.
    assert "provider" not in err.to_wire()["error"]


def test_repr_names_the_class() -> None:
    assert repr(NotFoundError("no such thing", provider="p")) == (
        "NotFoundError('no such thing', provider='p', code=None)"
    )


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequestError),
    (401, AuthenticationError),
    (403, PermissionDeniedError),
    (404, NotFoundError),
    (408, TimeoutError),
    (409, ConflictError),
    (413, BadRequestError),
    (418, BadRequestError),
    (422, BadRequestError),
    (429, RateLimitError),
    (500, UpstreamError),
    (501, UpstreamError),
    (502, UpstreamError),
    (503, UpstreamUnavailableError),
    (504, TimeoutError),
    (529, UpstreamUnavailableError),
    (599, UpstreamError),
])
def test_error_for_status(status: int, cls: type[PACoreError]) -> None:
    err = error_for_status(status, "upstream said no", provider="p", retry_after=2.0, code="c")
    assert type(err) is cls
    assert (err.message, err.provider, err.retry_after, err.code) == (
        "upstream said no", "p", 2.0, "c"
    )


def test_overloaded_529_is_retryable() -> None:
    assert error_for_status(529, "Overloaded").retryable


@pytest.mark.parametrize("message", [
    "This model's maximum context length is 8192 tokens",
    "prompt is too long for the context: 210000 tokens > 200000 maximum",
    "input exceeds the context window",
])
def test_context_length_messages(message: str) -> None:
    err = error_for_status(400, message, provider="p")
    assert isinstance(err, ContextLengthError)
    assert (err.code, err.provider) == ("context_length_exceeded", "p")


def test_context_words_alone_are_not_context_length() -> None:
    assert type(error_for_status(400, "missing context field")) is BadRequestError
    assert type(error_for_status(500, "context length exceeded")) is UpstreamError
