"""Memory benchmarks: the batched Embedder deployment against raw encoding, and the vector indexes
against exact numpy search (latency and recall), printed as markdown tables.

    python -m benchmarks.memory [--quick]

The index part uses random unit vectors (384-d) with realistic payloads: it measures the index,
not the embeddings. Numbers are ratios within one run on one machine; nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pacore.memory.vector import (
    IndexFilter,
    QdrantEdgeIndex,
    QdrantServerIndex,
    VectorIndex,
    VectorPoint,
)

__all__ = ["run"]

DIM = 384
USERS = 20
PROVIDERS = ("openai", "anthropic", "ollama", "vllm")
TAGS = ("work", "personal", "code", "travel", "health", "finance", "ideas", "archive")
YEAR_S = 365 * 86400.0
T0 = 1_700_000_000.0
FILTERS = ("user", "user+provider+role+since")

_WORDS = (
    "python list sort sorted key lambda reverse database index query vector embedding model "
    "latency throughput cluster replica deploy serve request token stream batch memory search "
    "user conversation message tag provider route fallback agent network firewall cloud"
).split()


# ---------------------------------------------------------------------------- embedder


def _sentences(n: int, rng: np.random.Generator) -> list[str]:
    lengths = rng.integers(6, 40, n)
    return [" ".join(rng.choice(_WORDS, int(k))) + f" #{i}" for i, k in enumerate(lengths)]


def _fake_replica_context(max_ongoing_requests: int) -> None:
    """``serve.batch`` reads the replica's config when its queue starts; outside a replica we
    provide one, exactly as Ray's own batching tests do."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig
    from ray.serve.context import _set_internal_replica_context
    from ray.serve.schema import ReplicaRank

    _set_internal_replica_context(
        replica_id=ReplicaID(
            "bench", deployment_id=DeploymentID(name="Embedder", app_name="bench")
        ),
        servable_object=None,
        _deployment_config=DeploymentConfig(max_ongoing_requests=max_ongoing_requests),
        rank=ReplicaRank(rank=0, node_rank=0, local_rank=0),
        world_size=1,
    )


def bench_embedder(quick: bool) -> dict[str, Any]:
    from deployments.embedder import DEFAULT_OPTIONS, EmbedderDeployment
    from pacore.config import Settings
    from pacore.memory.embedder import Embedder

    n, batch = (256, 64) if quick else (1024, 64)
    texts = _sentences(n, np.random.default_rng(1))
    embedder = Embedder(device="auto", batch_size=batch)
    _fake_replica_context(DEFAULT_OPTIONS["max_ongoing_requests"])
    settings = Settings(embedding_batch_size=batch, embedding_batch_wait_s=0.005)

    def raw_whole() -> float:
        t = time.perf_counter()
        embedder.encode(texts, batch_size=batch)
        return time.perf_counter() - t

    def raw_batches() -> float:
        # The same batches the deployment forms (texts in arrival order, `batch` at a time);
        # encode() of the whole list also sorts all texts by length first, which a server
        # that cannot see future requests cannot do.
        t = time.perf_counter()
        for i in range(0, n, batch):
            embedder.encode(texts[i : i + batch], batch_size=batch)
        return time.perf_counter() - t

    async def batched() -> float:
        dep = EmbedderDeployment(settings, embedder=embedder)
        await asyncio.gather(*(dep.embed([t]) for t in texts[:batch]))  # warm the queue
        t = time.perf_counter()
        await asyncio.gather(*(dep.embed([t]) for t in texts))
        return time.perf_counter() - t

    embedder.encode(texts[:batch])  # warm-up
    whole_s, batches_s, served_s = [], [], []
    for _ in range(2 if quick else 3):  # interleaved, best of each, so drift hits all three
        whole_s.append(raw_whole())
        batches_s.append(raw_batches())
        served_s.append(asyncio.run(batched()))
    whole, same, served = n / min(whole_s), n / min(batches_s), n / min(served_s)
    return {
        "texts": n,
        "batch_size": batch,
        "device": embedder.device,
        "raw_whole_per_s": whole,
        "raw_per_s": same,
        "deployment_per_s": served,
        "ratio": served / same,
        "ratio_vs_whole": served / whole,
        "backend": embedder.backend,
        "precision": embedder.precision,
        "runtimes": bench_runtimes(texts, batch) if embedder.device == "cpu" else [],
    }


def bench_runtimes(texts: list[str], batch: int, rounds: int = 3) -> list[dict[str, Any]]:
    """The embedder's CPU runtimes on the same model and texts, one thread each (what a replica
    reserving a core gets): ONNX Runtime in fp32 and in int8 (the CPU default), and torch. One
    short query at a time (what a request waits for), and a run of texts (what indexing and a
    loaded server get); the int8 row also says how close its vectors are to fp32's."""
    from pacore.memory.embedder import Embedder

    runtimes = {
        "onnx": Embedder(device="cpu", backend="onnx", precision="fp32", threads=1),
        "onnx-int8": Embedder(device="cpu", backend="onnx", precision="int8", threads=1),
        "torch": Embedder(device="cpu", backend="torch", threads=1),
    }
    query = "When does the release train leave?"
    single: dict[str, list[float]] = {b: [] for b in runtimes}
    batched: dict[str, list[float]] = {b: [] for b in runtimes}
    for _ in range(rounds):  # interleaved, so that drift hits all of them
        for name, e in runtimes.items():
            e.encode([query])
            samples = []
            for _ in range(50):
                t = time.perf_counter()
                e.encode([query])
                samples.append(time.perf_counter() - t)
            single[name].append(float(np.median(samples)) * 1000)
            t = time.perf_counter()
            e.encode(texts[: batch * 2], batch_size=batch)
            batched[name].append(batch * 2 / (time.perf_counter() - t))
    rows: dict[str, dict[str, Any]] = {
        b: {"backend": b, "precision": e.precision, "query_p50_ms": min(single[b]),
            "batch_per_s": max(batched[b])}
        for b, e in runtimes.items()
    }
    exact = runtimes["onnx"].encode(texts, batch_size=batch)
    cosine = np.sum(exact * runtimes["onnx-int8"].encode(texts, batch_size=batch), axis=1)
    rows["onnx-int8"].update(cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()))
    return list(rows.values())


# ---------------------------------------------------------------------------- index data


@dataclass
class Corpus:
    vectors: np.ndarray
    user: np.ndarray
    provider: np.ndarray
    role: np.ndarray
    created: np.ndarray
    tags: list[list[str]]

    def points(self) -> list[VectorPoint]:
        return [
            VectorPoint(
                message_id=f"m{i}",
                chunk=0,
                vector=self.vectors[i],
                user_id=f"u{self.user[i]}",
                conversation_id=f"c{self.user[i]}-{i // 50}",
                role=("user", "assistant")[self.role[i]],
                provider=PROVIDERS[self.provider[i]],
                created_at=float(self.created[i]),
                tags=self.tags[i],
                content=f"message {i}: "
                + " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(30)),
            )
            for i in range(len(self.vectors))
        ]


def make_corpus(n: int, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # A few heavy users and a long tail, as real memories are.
    weights = 1.0 / np.arange(1, USERS + 1)
    user = rng.choice(USERS, n, p=weights / weights.sum())
    tags = [list(rng.choice(TAGS, int(k), replace=False)) for k in rng.integers(0, 3, n)]
    return Corpus(
        vectors=x,
        user=user,
        provider=rng.integers(0, len(PROVIDERS), n),
        role=rng.integers(0, 2, n),
        created=T0 + rng.uniform(0, YEAR_S, n),
        tags=tags,
    )


@dataclass(frozen=True)
class Query:
    vector: np.ndarray
    user: int
    filters: IndexFilter | None
    mask: Callable[[Corpus], np.ndarray]


def make_queries(corpus: Corpus, n: int, kind: str, seed: int = 7) -> list[Query]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = rng.standard_normal(DIM).astype(np.float32)
        v /= np.linalg.norm(v)
        u = int(rng.integers(0, 3))  # the heavy users: the hard case for latency
        if kind == FILTERS[0]:
            out.append(Query(v, u, None, lambda c, u=u: c.user == u))
        else:
            p, since = int(rng.integers(0, len(PROVIDERS))), T0 + YEAR_S / 4
            f = IndexFilter(provider=PROVIDERS[p], role="assistant", since=since)
            out.append(
                Query(
                    v,
                    u,
                    f,
                    lambda c, u=u, p=p, s=since: (
                        (c.user == u) & (c.provider == p) & (c.role == 1) & (c.created >= s)
                    ),
                )
            )
    return out


def numpy_topk(corpus: Corpus, q: Query, k: int = 10) -> list[str]:
    idx = np.flatnonzero(q.mask(corpus))
    scores = corpus.vectors[idx] @ q.vector
    top = idx[np.argsort(-scores)[:k]] if len(idx) <= k else idx[np.argpartition(-scores, k)[:k]]
    return [f"m{i}" for i in top]


# ---------------------------------------------------------------------------- index bench


def _percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.array(samples) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def bench_numpy(corpus: Corpus, queries: list[Query]) -> dict[str, float]:
    for q in queries[:5]:
        numpy_topk(corpus, q)
    lat = []
    for q in queries:
        t = time.perf_counter()
        numpy_topk(corpus, q)
        lat.append(time.perf_counter() - t)
    p50, p99 = _percentiles(lat)
    return {"p50_ms": p50, "p99_ms": p99, "recall@10": 1.0}


async def bench_index(index: VectorIndex, corpus: Corpus, queries: list[Query]) -> dict[str, float]:
    for q in queries[:5]:  # warm caches (segments are memory-mapped) before timing
        await index.search(q.vector, user_id=f"u{q.user}", limit=10, filters=q.filters)
    lat, recalls = [], []
    for q in queries:
        t = time.perf_counter()
        hits = await index.search(q.vector, user_id=f"u{q.user}", limit=10, filters=q.filters)
        lat.append(time.perf_counter() - t)
        truth = set(numpy_topk(corpus, q))
        got = {h.message_id for h in hits}
        recalls.append(len(truth & got) / max(len(truth), 1))
    p50, p99 = _percentiles(lat)
    return {"p50_ms": p50, "p99_ms": p99, "recall@10": float(np.mean(recalls))}


async def _timed(work: Awaitable[Any]) -> float:
    t = time.perf_counter()
    await work
    return time.perf_counter() - t


async def _measure(
    index: VectorIndex, name: str, corpus: Corpus, build_s: float, n_queries: int
) -> list[dict[str, Any]]:
    rows = []
    for kind in FILTERS:
        queries = make_queries(corpus, n_queries, kind)
        res = await bench_index(index, corpus, queries)
        rows.append({**base_row(len(corpus.vectors), kind, name, build_s), **res})
    return rows


async def bench_size(
    n: int, n_queries: int, tmp: Path, *, local: bool, optimize: bool
) -> list[dict[str, Any]]:
    from qdrant_client import AsyncQdrantClient

    corpus = make_corpus(n)
    points = corpus.points()
    rows = [
        {
            "points": n,
            "filter": kind,
            "index": "numpy exact",
            **bench_numpy(corpus, make_queries(corpus, n_queries, kind)),
        }
        for kind in FILTERS
    ]
    edge = QdrantEdgeIndex.open(tmp / f"edge-{n}", DIM)
    load_s = await _timed(edge.upsert(points))
    rows += await _measure(edge, "qdrant-edge (exact scan)", corpus, load_s, n_queries)
    if optimize:
        opt_s = await _timed(edge.optimize())
        rows += await _measure(edge, "qdrant-edge (HNSW)", corpus, opt_s, n_queries)
    await edge.close()
    if local:
        client = AsyncQdrantClient(location=":memory:")
        index = await QdrantServerIndex.create(client, "bench", DIM)
        load_s = await _timed(index.upsert(points))
        rows += await _measure(index, "qdrant-client local", corpus, load_s, max(n_queries // 4, 5))
        await index.close()
    return rows


async def bench_indexes(
    sizes: list[int], n_queries: int, local_max: int, optimize_max: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="pacore-bench-"))
    try:
        for n in sizes:
            rows += await bench_size(
                n, n_queries, tmp, local=n <= local_max, optimize=n <= optimize_max
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def base_row(n: int, kind: str, index: str, build_s: float) -> dict[str, Any]:
    return {"points": n, "filter": kind, "index": index, "build_s": build_s}


# ---------------------------------------------------------------------------- report


def run(quick: bool = False) -> dict[str, Any]:
    """Run every memory benchmark; return the measurements (also printed as markdown)."""
    embed = bench_embedder(quick)
    sizes = [10_000] if quick else [10_000, 100_000]
    rows = asyncio.run(
        bench_indexes(
            sizes,
            n_queries=30 if quick else 100,
            local_max=10_000,
            optimize_max=10_000 if quick else 100_000,
        )
    )
    _print(embed, rows)
    return {"embedder": embed, "index": rows}


def _print(embed: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print("## Embedder: Embedder deployment (serve.batch) vs raw model.encode\n")
    print(
        "| texts | batch | device | encode(all) (texts/s) | encode per batch (texts/s) "
        "| deployment (texts/s) | vs per batch | vs encode(all) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    e = embed
    print(
        f"| {e['texts']} | {e['batch_size']} | {e['device']} ({e['backend']}) "
        f"| {e['raw_whole_per_s']:.0f} | {e['raw_per_s']:.0f} | {e['deployment_per_s']:.0f} "
        f"| {e['ratio']:.2f}x | {e['ratio_vs_whole']:.2f}x |"
    )
    if e["runtimes"]:
        print("\n## Embedder runtimes on the CPU (one thread each)\n")
        print("| runtime | one short query, p50 (ms) | batches of 64 (texts/s) |")
        print("|---|---:|---:|")
        for r in e["runtimes"]:
            print(f"| {r['backend']} | {r['query_p50_ms']:.2f} | {r['batch_per_s']:.0f} |")
    print("\n## Vector index: filtered top-10 (384-d random unit vectors)\n")
    print(
        "| points | filter | index | build/load (s) | p50 (ms) | p99 (ms) | vs numpy p50 | recall@10 |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    numpy_p50 = {
        (r["points"], r["filter"]): r["p50_ms"] for r in rows if r["index"] == "numpy exact"
    }
    for r in rows:
        ratio = r["p50_ms"] / numpy_p50[(r["points"], r["filter"])]
        build = f"{r['build_s']:.1f}" if "build_s" in r else "-"
        print(
            f"| {r['points']} | {r['filter']} | {r['index']} | {build} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {ratio:.2f}x | {r['recall@10']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="10k points only, fewer texts and queries"
    )
    run(quick=parser.parse_args().quick)


if __name__ == "__main__":
    main()
