"""Calling other deployments: errors unwrapped to the platform's own, streams cancelled on close."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pacore.errors import PACoreError, UpstreamUnavailableError

__all__ = ["call", "stream"]

# A stream whose replica died before its first item is sent again, to another replica.
_REPLICA_RETRIES = 2


def _unwrap(exc: BaseException) -> BaseException:
    """The platform error a replica raised, rather than Ray's wrapper around it."""
    cause = exc.cause if isinstance(exc, RayTaskError) else None
    if isinstance(cause, PACoreError):
        return cause
    if isinstance(exc, PACoreError):
        return exc
    if isinstance(exc, RayTaskError | RayActorError):
        return UpstreamUnavailableError("a platform component failed; try again")
    return exc


async def call(handle: DeploymentHandle, method: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return await getattr(handle, method).remote(*args, **kwargs)
    except (RayTaskError, RayActorError, PACoreError) as exc:
        raise _unwrap(exc) from None


async def stream(
    handle: DeploymentHandle, method: str, *args: Any, **kwargs: Any
) -> AsyncGenerator[Any, None]:
    """Iterate a streaming method; closing the iterator early cancels the remote generator.

    A replica that dies (scaled in, killed, its node lost) before the first item is replaced
    by another one for the same call, since nothing has reached the caller; after the first
    item the caller gets an UpstreamUnavailableError."""
    for attempt in range(_REPLICA_RETRIES + 1):
        gen: DeploymentResponseGenerator = getattr(
            handle.options(stream=True), method
        ).remote(*args, **kwargs)
        started = finished = False
        try:
            async for item in gen:
                started = True
                yield item
            finished = True
            return
        except RayActorError as exc:
            finished = True
            if started or attempt == _REPLICA_RETRIES:
                raise _unwrap(exc) from None
        except (RayTaskError, PACoreError) as exc:
            finished = True
            raise _unwrap(exc) from None
        finally:
            if not finished:
                gen.cancel()
