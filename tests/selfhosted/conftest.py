"""Fixtures for self-hosted model tests: a tiny local Llama, engines on it, one Serve instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pacore.engines.config import SelfHostedModel
from pacore.engines.cpu import CPUEngine
from pacore.testing.tiny_model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir: Path) -> SelfHostedModel:
    return SelfHostedModel(
        name="tiny", engine="cpu", model=str(tiny_model_dir), max_tokens=4000, device="cpu"
    )


@pytest.fixture
def engine(tiny_spec: SelfHostedModel) -> Iterator[CPUEngine]:
    # One per test: the engine's lock belongs to the event loop of the test that uses it.
    eng = CPUEngine.load(tiny_spec, offline=True)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def serve_instance() -> Iterator[None]:
    """A small local Ray with Serve and no HTTP proxy, torn down after the session.

    When another suite of the same session already started Ray, that instance is used and left
    for its owner to stop.
    """
    import ray
    from ray import serve

    owner = not ray.is_initialized()
    if owner:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        if owner:
            serve.shutdown()
            ray.shutdown()
