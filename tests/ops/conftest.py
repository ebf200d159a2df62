"""Operations tests: the files in cluster/, and the graph deployed from them on Ray instances
these tests start and stop themselves, under bounded load on loopback (helpers in opskit.py).
They run in a pytest process of their own (`make test`), one Ray instance per module at a time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def _ray_stopped_between_modules() -> Iterator[None]:
    # A module's Ray instance must be gone before the next module starts its own.
    import ray

    assert not ray.is_initialized(), "a previous module left its Ray instance running"
    yield
    assert not ray.is_initialized(), "this module left its Ray instance running"
