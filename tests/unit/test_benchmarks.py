"""The benchmark harness's pure parts: statistics, process accounting, the report, and the load
generator against a real loopback upstream. Nothing here asserts how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import litellm_env, procs, report
from benchmarks.bare_chain import _STREAM
from benchmarks.loadgen import CellSpec, Sample, run_cell, summarize
from benchmarks.stats import added, percentile, ratio, spread
from pacore.testing.openai_server import OpenAIServer

# ---------------------------------------------------------------------------- stats


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = list(np.random.default_rng(3).exponential(10.0, 101))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_spread_is_median_and_range_of_present_values() -> None:
    s = spread([3.0, None, 1.0, 2.0])
    assert s is not None
    assert (s.median, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.relative == pytest.approx(1.0)
    assert spread([None, None]) is None


def test_added_and_ratio_refuse_meaningless_inputs() -> None:
    assert added(12.5, 10.0) == 2.5
    assert added(None, 10.0) is None
    assert ratio(3.0, 6.0) == 0.5
    assert ratio(3.0, 0.0) is None
    assert ratio(3.0, -1.0) is None
    assert ratio(None, 2.0) is None


def test_summarize_counts_failures_apart_from_latencies() -> None:
    samples = [Sample(True, 0.010, 0.002, 16), Sample(True, 0.030, 0.004, 16),
               Sample(False, 1.0, error="HTTP 502: bad")]
    r = summarize(samples, elapsed_s=2.0, warmup=4)
    assert (r.ok, r.errors, r.sent) == (2, 1, 7)
    assert r.rps == 1.0
    assert r.p50_ms == pytest.approx(20.0)
    assert r.ttfc_p50_ms == pytest.approx(3.0)
    assert r.chunks_p50 == 16
    assert r.first_error == "HTTP 502: bad"


# ---------------------------------------------------------------------------- processes


def test_parse_stat_survives_a_command_name_with_spaces_and_parentheses() -> None:
    fields = ["S", "7", "7", "7"] + ["0"] * 7 + ["5", "6", "7", "8"] + ["0"] * 4 + ["4242"]
    info = procs.parse_stat(f"123 (a (b) c) {' '.join(fields)} 0 0")
    assert (info.pid, info.state, info.ppid, info.session) == (123, "S", 7, 7)
    assert info.cpu_ticks == 5 + 6 + 7 + 8
    assert info.start == 4242


def _info(pid: int, ppid: int, session: int, ticks: int = 0) -> procs.ProcInfo:
    return procs.ProcInfo(pid, "S", ppid, session, 1000 + pid, ticks)


def test_select_takes_descendants_and_the_session_but_nothing_else() -> None:
    table = {p.pid: p for p in [
        _info(1, 0, 1), _info(10, 1, 10), _info(11, 10, 10), _info(12, 11, 12),
        _info(13, 1, 10),  # reparented to init, still in the session
        _info(20, 1, 20),  # someone else's
    ]}
    assert [p.pid for p in procs.select(table, 10)] == [10, 11, 12, 13]
    assert procs.select(table, 99) == []


def test_cpu_delta_counts_newcomers_whole_and_takes_back_the_reaped() -> None:
    before = {(1, 0): 100, (2, 0): 40}
    after = {(1, 0): 190, (3, 0): 10}  # 2 ended and was reaped by 1 (its 40 + 20 more)
    expected = (190 - 100 + 10 - 40) / procs.CLK_TCK
    assert procs.cpu_delta_s(before, after) == pytest.approx(expected)


def test_processes_of_a_real_tree_have_memory_and_cpu() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pids = [p.pid for p in procs.processes(os.getpid())]
        assert os.getpid() in pids and child.pid in pids
        assert procs.rss_bytes(os.getpid()) > 0
        names = dict(procs.rss_by_process(os.getpid()))
        assert any(name.startswith("python") for name in names)
        members = procs.processes(child.pid)
        assert procs.still_alive(members) == members
    finally:
        child.kill()
        child.wait()
    assert procs.still_alive(members) == []


def test_serve_replicas_are_counted_by_their_ray_title() -> None:
    title = "ray::ServeReplica:app:Router"
    children = [subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 30']) for _ in range(2)]
    children.append(subprocess.Popen(["bash", "-c", 'exec -a "ray::ServeController" sleep 30']))
    try:
        deadline = time.monotonic() + 10
        while procs.serve_replica_count(os.getpid()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # until both have exec'd under their title
        assert procs.serve_replica_count(os.getpid()) == 2
        assert title in dict(procs.rss_by_process(os.getpid()))
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_process_names() -> None:
    assert procs.process_name(["ray::ServeReplica:pacore:Gateway", ""]) == (
        "ray::ServeReplica:pacore:Gateway")
    assert procs.process_name(["/v/bin/python3", "-m", "pacore.cli", "up"]) == (
        "python3 pacore.cli")
    assert procs.process_name(["/v/bin/python", "-u", "/r/log_monitor.py", "--x"]) == (
        "python log_monitor.py")
    assert procs.process_name(["/usr/bin/haproxy", "-db"]) == "haproxy"
    assert procs.process_name([""]) == "?"


# ---------------------------------------------------------------------------- report


def _cell(system: str, mode: str, c: int, p50: float, rps: float, cpu: float | None,
          rnd: int = 1) -> dict[str, Any]:
    return {"system": system, "mode": mode, "concurrency": c, "round": rnd, "p50_ms": p50,
            "p99_ms": p50 * 2, "rps": rps, "ttfc_p50_ms": p50 / 4 if mode == "stream" else None,
            "cpu_ms_per_request": cpu, "rss_mb": 100.0, "ok": 300, "errors": 0}


def _results(with_litellm: bool = True) -> dict[str, Any]:
    # Added p50 at c=1: PA Core +3, bare +2.9, LiteLLM +6, memory on +4; streams: +5 vs +12.
    # The second round is slower by the same amount for everyone, the direct call included.
    table = {
        report.DIRECT: (20.0, 30.0, 900.0, None),
        report.BARE: (22.9, 31.0, 400.0, 5.0),
        report.PA_OFF: (23.0, 35.0, 250.0, 6.0),
        report.PA_ON: (24.0, 40.0, 100.0, 20.0),
        report.LITELLM: (26.0, 42.0, 120.0, 10.0),
    }
    cells = []
    for system, (json1, stream1, rps64, cpu) in table.items():
        if system == report.LITELLM and not with_litellm:
            continue
        for rnd, jitter in ((1, 0.0), (2, 0.2)):
            cells += [_cell(system, "json", 1, json1 + jitter, 40, cpu, rnd),
                      _cell(system, "stream", 1, stream1 + jitter, 30, cpu, rnd),
                      _cell(system, "json", 16, json1 * 2, rps64 / 2, cpu, rnd),
                      _cell(system, "json", 64, json1 * 4, rps64, cpu, rnd)]
    systems = {name: {"description": name, "command": "x", "status": "ok", "reason": None,
                      "ready_s": [12.0, 14.0], "rss_idle_mb": [1500.0, 1600.0],
                      "idle_cpu_pct": [5.0, 7.0],
                      "rss_idle_by_process": [["ray::IDLE", 300.0], ["raylet", 80.0]]}
               for name in table}
    # The bare chain: three replicas of 150 MB beside 1000 MB of other processes; PA Core with
    # memory runs nine replicas (two of them one deployment's, under one name).
    systems[report.BARE].update(serve_replicas_idle=3, rss_idle_by_process=[
        ["ray::ServeController", 600.0], ["python benchmarks.bare_chain", 400.0],
        ["ray::ServeReplica:bare:BareIngress", 140.0], ["ray::ServeReplica:bare:BareRouter", 150.0],
        ["ray::ServeReplica:bare:BareProvider", 160.0]])
    systems[report.PA_ON].update(serve_replicas_idle=9, rss_idle_mb=[2900.0, 2700.0, 2800.0])
    if not with_litellm:
        systems[report.LITELLM].update(status="skipped", reason="could not install litellm")
    memory = {"embedder": {"deployment_per_s": 450.0, "raw_per_s": 500.0,
                           "runtimes": [{"backend": "onnx", "query_p50_ms": 5.0,
                                         "batch_per_s": 300.0},
                                        {"backend": "onnx-int8", "query_p50_ms": 2.0,
                                         "batch_per_s": 900.0, "cosine_mean": 0.993,
                                         "cosine_min": 0.981},
                                        {"backend": "torch", "query_p50_ms": 15.0,
                                         "batch_per_s": 200.0}]},
              "index": [{"points": 10000, "filter": "user", "index": "numpy exact",
                         "p50_ms": 2.0, "recall@10": 1.0},
                        {"points": 10000, "filter": "user", "index": "qdrant-edge (HNSW)",
                         "p50_ms": 1.0, "recall@10": 0.98}]}
    meta = {"date": "2026-01-02", "host": "box", "quick": True, "note": "quick and noisy",
            "machine": {"cores": 2, "cpu_model": "cpu", "ram_gib": 24.0, "gpu": "none"},
            "versions": {"ray": "2.60.0"}, "repeats": 2, "tokens": 16, "token_delay_ms": 1.0}
    return {"meta": meta, "systems": systems, "cells": cells, "memory": memory,
            "memory_table": "## Embedder\n\n| a |\n|---|\n| 1 |", "failures": []}


def _goal(items: list[report.Goal], start: str) -> report.Goal:
    return next(g for g in items if g.name.startswith(start))


def test_goals_compute_the_ratios_the_issue_names() -> None:
    r = _results()
    items = report.goals(report.aggregate(r["cells"]), r["systems"], r["memory"])
    vs_litellm = _goal(items, "added p50 latency, c=1, vs LiteLLM")
    assert vs_litellm.value == pytest.approx(3.0 / 6.0)
    assert vs_litellm.status == "PASS"
    assert _goal(items, "added p50 latency, c=1, vs bare").status == "PASS"
    assert _goal(items, "CPU time per request").value == pytest.approx(0.6)
    assert _goal(items, "throughput, c=64").value == pytest.approx(250 / 120)
    assert _goal(items, "throughput, c=16").status == "info"
    assert _goal(items, "added time, 16-chunk").value == pytest.approx(5.0 / 12.0)
    assert _goal(items, "memory on vs memory off, added").value == pytest.approx(4.0 / 3.0)
    on_rps = _goal(items, "memory on vs memory off, throughput")
    assert on_rps.value == pytest.approx(100 / 250) and on_rps.status == "info"
    assert _goal(items, "memory on vs memory off, CPU").value == pytest.approx(20 / 6)
    assert _goal(items, "`pacore up` ready time, warm install, whole").value == 13.0
    assert _goal(items, "whole graph RSS at idle (all").status == "MISS"
    floor = _goal(items, "whole graph RSS at idle vs a bare Serve graph")
    assert floor.value == pytest.approx(2800 / (1000 + 9 * 150)) and floor.status == "info"
    assert "9 replicas vs 2350 MB" in floor.detail and "9 replicas of its 150 MB each" in floor.detail
    assert _goal(items, "embedder deployment").value == pytest.approx(0.9)
    assert _goal(items, "embedder one short query, ONNX").value == pytest.approx(1 / 3)
    assert _goal(items, "embedder batches of 64, ONNX").value == pytest.approx(1.5)
    assert _goal(items, "embedder one short query, int8").value == pytest.approx(2 / 5)
    assert _goal(items, "embedder texts, int8").value == pytest.approx(3.0)
    agreement = _goal(items, "embedder int8 vectors vs fp32")
    assert agreement.value == pytest.approx(0.981) and "mean 0.9930" in agreement.detail
    assert _goal(items, "memory search p50, qdrant-edge (HNSW)").value == pytest.approx(0.5)


def test_a_goal_missed_or_unmeasured_says_so() -> None:
    assert report.Goal("x", 0.7, 0.6, True, "x", "").status == "MISS"
    assert report.Goal("x", 1.9, 2.0, False, "x", "").status == "MISS"
    assert report.Goal("x", None, 2.0, False, "x", "").status == "N/A"
    r = _results(with_litellm=False)
    del r["systems"][report.BARE]["serve_replicas_idle"]  # a run from before it was counted
    items = report.goals(report.aggregate(r["cells"]), r["systems"])
    assert _goal(items, "added p50 latency, c=1, vs LiteLLM").status == "N/A"
    assert _goal(items, "whole graph RSS at idle vs a bare").detail == "not measured"
    assert _goal(items, "added p50 latency, c=1, vs bare").status == "PASS"


def test_render_puts_goals_first_and_shows_spread_and_skips() -> None:
    text = report.render(_results(with_litellm=False))
    assert text.index("## Ratios and goals") < text.index("## Machine") < text.index(
        "## Every cell")
    assert "> quick and noisy" in text
    assert "| PASS |" in text and "| N/A |" in text
    assert "skipped: could not install litellm" in text
    assert "23.1 (23.0-23.2)" in text  # PA Core's c=1 p50: median (low-high) of two rounds
    assert "ray::IDLE 300" in text
    assert "## Memory" in text and "## Embedder" in text


def test_write_puts_markdown_and_json_side_by_side(tmp_path: Path) -> None:
    md, js = report.write(_results(), tmp_path)
    assert md.name == "2026-01-02-box.md" and js.name == "2026-01-02-box.json"
    assert json.loads(js.read_text())["meta"]["host"] == "box"
    assert md.read_text().startswith("# PA Core benchmark")
    md.unlink()
    assert report.rerender(js) == md
    assert "## Method" in md.read_text()


def test_a_second_run_of_the_day_keeps_the_first(tmp_path: Path) -> None:
    first = report.write(_results(), tmp_path)
    second = report.write(_results(), tmp_path)
    third = report.write(_results(), tmp_path)
    assert [p.name for p in (*second, *third)] == [
        "2026-01-02-box-2.md", "2026-01-02-box-2.json", "2026-01-02-box-3.md",
        "2026-01-02-box-3.json",
    ]
    assert all(p.exists() for p in (*first, *second, *third))


# ---------------------------------------------------------------------------- load generator


@pytest.fixture
def upstream() -> Any:
    with OpenAIServer(tokens=16, record=False) as server:
        yield server


def _spec(server: OpenAIServer, stream: bool, path: str = "/chat/completions") -> CellSpec:
    body = {"model": "loopback-model", "stream": stream,
            "messages": [{"role": "user", "content": "one two three"}]}
    return CellSpec(url=server.base_url + path, body=body, concurrency=2, max_requests=6,
                    duration_s=30.0, warmup=2)


async def test_loadgen_measures_answers(upstream: OpenAIServer) -> None:
    r = await run_cell(_spec(upstream, stream=False))
    assert (r.ok, r.errors, r.warmup) == (6, 0, 2)
    assert r.p50_ms is not None and r.p99_ms is not None and r.ttfc_p50_ms is None


async def test_loadgen_measures_streams_to_their_first_content_chunk(
    upstream: OpenAIServer,
) -> None:
    r = await run_cell(_spec(upstream, stream=True))
    assert (r.ok, r.errors) == (6, 0)
    assert r.chunks_p50 == 16
    assert r.ttfc_p50_ms is not None and r.p50_ms is not None
    assert r.ttfc_p50_ms <= r.p50_ms


async def test_loadgen_counts_failed_requests(upstream: OpenAIServer) -> None:
    r = await run_cell(_spec(upstream, stream=False, path="/nowhere"))
    assert (r.ok, r.errors) == (0, 6)
    assert r.first_error is not None and r.first_error.startswith("HTTP 404")


def test_loadgen_targets_loopback_only_and_is_bounded() -> None:
    body: dict[str, Any] = {"model": "m", "messages": []}
    with pytest.raises(ValueError, match="loopback"):
        CellSpec(url="http://example.com/v1/chat/completions", body=body, concurrency=1,
                 max_requests=1, duration_s=1)
    with pytest.raises(ValueError):
        CellSpec(url="http://127.0.0.1:1/x", body=body, concurrency=1, max_requests=0,
                 duration_s=1)
    with pytest.raises(ValueError):
        CellSpec(url="http://127.0.0.1:1/x", body=body, concurrency=1, max_requests=1,
                 duration_s=0)


def test_loadgen_worker_answers_one_line_per_spec(upstream: OpenAIServer) -> None:
    spec = json.dumps(asdict(_spec(upstream, stream=True)))
    done = subprocess.run([sys.executable, "-m", "benchmarks.loadgen", "--worker"],
                          input=spec + "\n" + json.dumps({"url": "nope"}) + "\n",
                          capture_output=True, text=True, timeout=60, check=True)
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["ok"] == 6 and first["chunks_p50"] == 16
    assert "error" in second


# ---------------------------------------------------------------------------- the rest


def test_compromised_litellm_releases_are_refused_before_any_install(tmp_path: Path) -> None:
    env = litellm_env.ensure(tmp_path / "venv", version="1.82.8")
    assert not env.ready and env.error is not None and "compromised" in env.error
    assert not (tmp_path / "venv").exists()
    assert litellm_env.installed_version(tmp_path / "venv") is None


def test_bare_ingress_recognizes_stream_bodies() -> None:
    assert _STREAM.search(b'{"model": "m", "stream": true}')
    assert _STREAM.search(b'{"stream":true}')
    assert not _STREAM.search(b'{"model": "m", "stream": false}')


def test_proportional_memory_never_exceeds_resident_memory() -> None:
    import os

    me = os.getpid()
    assert 0 < procs.pss_bytes(me) <= procs.rss_bytes(me)
