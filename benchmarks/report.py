"""The report: measurements aggregated over repeats, the ratios and goals at the top, written as
markdown and JSON under ``benchmarks/results/``. It reports; it never fails anything."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procs import REPLICA_PREFIX
from benchmarks.stats import Spread, added, ratio, spread

__all__ = ["Goal", "aggregate", "goals", "render", "rerender", "write"]

DIRECT, BARE, LITELLM = "direct", "bare-serve-chain", "litellm"
PA_OFF, PA_ON = "pacore-memory-off", "pacore-memory-on"
SYSTEM_ORDER = (DIRECT, BARE, PA_OFF, PA_ON, LITELLM)
METRICS = ("p50_ms", "p99_ms", "rps", "ttfc_p50_ms", "cpu_ms_per_request", "rss_mb", "ok",
           "errors")

CellKey = tuple[str, str, int]  # (system, mode, concurrency)
Aggregate = dict[CellKey, dict[str, Spread | None]]


def aggregate(cells: Iterable[dict[str, Any]]) -> Aggregate:
    """Every metric of every cell as median and range over the rounds that measured it."""
    rounds: dict[CellKey, list[dict[str, Any]]] = {}
    for cell in cells:
        rounds.setdefault((cell["system"], cell["mode"], cell["concurrency"]), []).append(cell)
    return {key: {m: spread([r.get(m) for r in runs]) for m in METRICS}
            for key, runs in rounds.items()}


def _median(agg: Aggregate, key: CellKey, metric: str) -> float | None:
    found = agg.get(key, {}).get(metric)
    return found.median if found is not None else None


def added_p50(agg: Aggregate, system: str, mode: str, concurrency: int) -> float | None:
    """The system's p50 minus the direct call's, for the same cell."""
    return added(_median(agg, (system, mode, concurrency), "p50_ms"),
                 _median(agg, (DIRECT, mode, concurrency), "p50_ms"))


# ---------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class Goal:
    """A ratio or a quantity held against a limit (``limit`` None: shown for information)."""

    name: str
    value: float | None
    limit: float | None
    at_most: bool
    unit: str
    detail: str

    @property
    def status(self) -> str:
        if self.limit is None:
            return "info"
        if self.value is None:
            return "N/A"
        met = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "PASS" if met else "MISS"

    @property
    def target(self) -> str:
        if self.limit is None:
            return "—"
        return f"{'≤' if self.at_most else '≥'} {self.limit:g}{self.unit}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f} ms"


def _ratio_goal(name: str, mine: float | None, theirs: float | None, limit: float | None,
                at_most: bool, describe: Callable[[float | None], str], mine_label: str,
                theirs_label: str) -> Goal:
    return Goal(name, ratio(mine, theirs), limit, at_most, "x",
                f"{mine_label} {describe(mine)} vs {theirs_label} {describe(theirs)}")


def _per_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} req/s"


def _cpu(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} ms"


def goals(agg: Aggregate, systems: dict[str, dict[str, Any]],
          memory: dict[str, Any] | None = None) -> list[Goal]:
    """The ratios the issue asks for, each against its goal on this machine."""
    off1 = added_p50(agg, PA_OFF, "json", 1)
    out = [
        _ratio_goal("added p50 latency, c=1, vs LiteLLM", off1,
                    added_p50(agg, LITELLM, "json", 1), 0.6, True, _ms, "PA Core", "LiteLLM"),
        _ratio_goal("added p50 latency, c=1, vs bare Serve chain", off1,
                    added_p50(agg, BARE, "json", 1), 1.1, True, _ms, "PA Core", "bare chain"),
        _ratio_goal("CPU time per request (c=64, all processes), vs LiteLLM",
                    _median(agg, (PA_OFF, "json", 64), "cpu_ms_per_request"),
                    _median(agg, (LITELLM, "json", 64), "cpu_ms_per_request"), 0.66, True, _cpu,
                    "PA Core", "LiteLLM"),
        _ratio_goal("throughput, c=16, vs LiteLLM", _median(agg, (PA_OFF, "json", 16), "rps"),
                    _median(agg, (LITELLM, "json", 16), "rps"), None, False, _per_s, "PA Core",
                    "LiteLLM"),
        _ratio_goal("throughput, c=64, vs LiteLLM", _median(agg, (PA_OFF, "json", 64), "rps"),
                    _median(agg, (LITELLM, "json", 64), "rps"), 2.0, False, _per_s, "PA Core",
                    "LiteLLM"),
        _ratio_goal("added time, 16-chunk stream, c=1, vs LiteLLM",
                    added_p50(agg, PA_OFF, "stream", 1), added_p50(agg, LITELLM, "stream", 1),
                    0.5, True, _ms, "PA Core", "LiteLLM"),
        _ratio_goal("memory on vs memory off, added p50 latency, c=1",
                    added_p50(agg, PA_ON, "json", 1), off1, 1.5, True, _ms, "on", "off"),
        _ratio_goal("memory on vs memory off, throughput, c=16",
                    _median(agg, (PA_ON, "json", 16), "rps"),
                    _median(agg, (PA_OFF, "json", 16), "rps"), None, False, _per_s, "on", "off"),
        _ratio_goal("memory on vs memory off, CPU time per request, c=16",
                    _median(agg, (PA_ON, "json", 16), "cpu_ms_per_request"),
                    _median(agg, (PA_OFF, "json", 16), "cpu_ms_per_request"), None, True, _cpu,
                    "on", "off"),
        _quantity_goal("`pacore up` ready time, warm install, whole graph",
                       systems.get(PA_ON, {}).get("ready_s"), 30.0, " s"),
        _quantity_goal("`pacore up` ready time, warm install, no memory or agents",
                       systems.get(PA_OFF, {}).get("ready_s"), None, " s"),
        _quantity_goal("whole graph RSS at idle (all its processes)",
                       systems.get(PA_ON, {}).get("rss_idle_mb"), 2048.0, " MB"),
        _rss_floor_goal(systems),
        _quantity_goal("whole graph PSS at idle (shared pages counted once)",
                       systems.get(PA_ON, {}).get("pss_idle_mb"), None, " MB"),
    ]
    return out + memory_goals(memory)


def _rss_floor_goal(systems: dict[str, dict[str, Any]]) -> Goal:
    """The whole graph's idle RSS against what a bare Serve graph with as many replicas would
    hold: the bare chain's processes other than its replicas (Ray's own, Serve's controller and
    proxies, the driver) plus PA Core's replica count times the bare chain's mean replica."""
    name = "whole graph RSS at idle vs a bare Serve graph of as many replicas"
    bare, mine = systems.get(BARE, {}), systems.get(PA_ON, {})
    groups = bare.get("rss_idle_by_process") or []
    bare_n, my_n = bare.get("serve_replicas_idle"), mine.get("serve_replicas_idle")
    my_rss = spread(mine.get("rss_idle_mb") or [])
    if not groups or not bare_n or not my_n or my_rss is None:
        return Goal(name, None, None, True, "x", "not measured")
    replicas = sum(mb for proc, mb in groups if proc.startswith(REPLICA_PREFIX))
    fixed = sum(mb for proc, mb in groups if not proc.startswith(REPLICA_PREFIX))
    per_replica = replicas / bare_n
    floor = fixed + my_n * per_replica
    return Goal(name, ratio(my_rss.median, floor), None, True, "x",
                f"PA Core {my_rss.median:.0f} MB with {my_n} replicas vs {floor:.0f} MB: the bare "
                f"chain's other processes {fixed:.0f} MB + {my_n} replicas of its "
                f"{per_replica:.0f} MB each")


def _quantity_goal(name: str, values: list[float | None] | None, limit: float | None,
                   unit: str) -> Goal:
    s = spread(values or [])
    detail = "not measured" if s is None else f"median of {s.n}: {_spread_text(s, 1)}{unit}"
    return Goal(name, s.median if s else None, limit, True, unit, detail)


def memory_goals(memory: dict[str, Any] | None) -> list[Goal]:
    """Information rows from the memory benchmark: the batched embedder against raw encoding,
    and each index's filtered search against exact numpy search."""
    if not memory:
        return []
    out: list[Goal] = []
    embed = memory.get("embedder") or {}
    if "deployment_per_s" in embed and "raw_per_s" in embed:
        out.append(Goal("embedder deployment vs raw encode (same batches), throughput",
                        ratio(embed["deployment_per_s"], embed["raw_per_s"]), None, False, "x",
                        f"{embed['deployment_per_s']:.0f} vs {embed['raw_per_s']:.0f} texts/s"))
    runtimes = {r["backend"]: r for r in embed.get("runtimes") or []}
    if {"onnx", "torch"} <= runtimes.keys():
        onnx, torch = runtimes["onnx"], runtimes["torch"]
        out.append(Goal("embedder one short query, ONNX Runtime vs torch (CPU, one thread), p50",
                        ratio(onnx["query_p50_ms"], torch["query_p50_ms"]), None, True, "x",
                        f"{onnx['query_p50_ms']:.2f} vs {torch['query_p50_ms']:.2f} ms"))
        out.append(Goal("embedder batches of 64, ONNX Runtime vs torch (CPU, one thread), "
                        "throughput", ratio(onnx["batch_per_s"], torch["batch_per_s"]), None,
                        False, "x",
                        f"{onnx['batch_per_s']:.0f} vs {torch['batch_per_s']:.0f} texts/s"))
    if {"onnx", "onnx-int8"} <= runtimes.keys():
        fp32, int8 = runtimes["onnx"], runtimes["onnx-int8"]
        out.append(Goal("embedder one short query, int8 vs fp32 (ONNX Runtime, one thread), p50",
                        ratio(int8["query_p50_ms"], fp32["query_p50_ms"]), None, True, "x",
                        f"{int8['query_p50_ms']:.2f} vs {fp32['query_p50_ms']:.2f} ms"))
        out.append(Goal("embedder texts, int8 vs fp32 (ONNX Runtime, one thread), throughput",
                        ratio(int8["batch_per_s"], fp32["batch_per_s"]), None, False, "x",
                        f"{int8['batch_per_s']:.0f} vs {fp32['batch_per_s']:.0f} texts/s"))
        if "cosine_min" in int8:
            out.append(Goal("embedder int8 vectors vs fp32, cosine similarity (lowest)",
                            int8["cosine_min"], None, False, "",
                            f"mean {int8['cosine_mean']:.4f}, lowest {int8['cosine_min']:.4f}"))
    rows = memory.get("index") or []
    exact = {(r.get("points"), r.get("filter")): r.get("p50_ms") for r in rows
             if r.get("index") == "numpy exact"}
    for r in rows:
        base = exact.get((r.get("points"), r.get("filter")))
        if r.get("index") == "numpy exact" or base is None:
            continue
        out.append(Goal(f"memory search p50, {r['index']}, {r['points']} points, "
                        f"filter {r['filter']}, vs exact numpy",
                        ratio(r.get("p50_ms"), base), None, True, "x",
                        f"{r.get('p50_ms', 0):.2f} vs {base:.2f} ms, "
                        f"recall@10 {r.get('recall@10', 0):.3f}"))
    return out


# ---------------------------------------------------------------------------- markdown


def _spread_text(s: Spread | None, digits: int) -> str:
    if s is None:
        return "—"
    if s.n == 1 or s.low == s.high:
        return f"{s.median:.{digits}f}"
    return f"{s.median:.{digits}f} ({s.low:.{digits}f}-{s.high:.{digits}f})"


def _goal_rows(items: list[Goal]) -> list[str]:
    rows = ["| goal | value | target | result | measured |", "|---|---:|---:|---|---|"]
    for g in items:
        value = "n/a" if g.value is None else f"{g.value:.2f}{g.unit}"
        rows.append(f"| {g.name} | {value} | {g.target} | {g.status} | {g.detail} |")
    return rows


def _machine_rows(meta: dict[str, Any]) -> list[str]:
    m = meta.get("machine", {})
    rows = [f"- machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
            f"{m.get('ram_gib', '?')} GiB RAM, GPU: {m.get('gpu', 'none')}; {m.get('os', '')}",
            f"- load while measuring (1-min load average at start): {m.get('loadavg', '?')}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())]
    if meta.get("commit"):
        rows.append(f"- commit: {meta['commit']}")
    if meta.get("wall_s"):
        rows.append(f"- the whole run took {meta['wall_s'] / 60:.1f} min")
    rows.append(
        f"- upstream: loopback OpenAI server, {meta.get('tokens')} tokens, "
        f"{meta.get('token_delay_ms')} ms per token; load generator in its own process, "
        f"closed loop, at most {meta.get('max_requests')} requests or "
        f"{meta.get('duration_s')} s per cell after {meta.get('warmup')} warm-up requests; "
        f"{meta.get('repeats')} interleaved rounds")
    return rows


METHOD = (
    "- Every system calls the same loopback upstream (`pacore.testing.openai_server`, its own "
    "process) with the same OpenAI-shaped request; the load generator is one more process "
    "(closed loop, aiohttp: httpx's pool stalls for seconds at 64 concurrent requests, "
    "encode/httpx#3215). Only one system runs at a time; rounds interleave the systems, each "
    "round starting one system later.",
    "- The bare Serve chain has PA Core's depth (ingress → router → provider), its deployment "
    "options and its Serve mode (throughput-optimized, HAProxy on the public port); its hops "
    "forward bytes and its provider calls the upstream with aiohttp.",
    "- PA Core runs through `pacore up` with a fresh data directory per start, the per-user rate "
    "limit off (`PACORE_RATE_LIMIT_PER_MINUTE=0`) and a Ray instance of its own "
    "(`RAY_ADDRESS=local`); the upstream is configured with `PUT /v1/providers/openai`.",
    "- CPU and RSS cover every process of a system (its process tree and session, from /proc); "
    "RSS is summed per process, so pages shared between processes count more than once. Ready "
    "time runs from the start of the command to its first answer (`PACORE_URL` for PA Core).",
)


def _system_rows(systems: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| system | how it runs | status | ready (s) | stop (s) | idle RSS (MB) "
            "| idle CPU (% of a core) |",
            "|---|---|---|---:|---:|---:|---:|"]
    for name in _ordered(systems):
        s = systems[name]
        status = s.get("status", "?") + (f": {s['reason']}" if s.get("reason") else "")
        rows.append(f"| {name} | {s.get('description', '')} (`{s.get('command', '')}`) "
                    f"| {status} | {_spread_text(spread(s.get('ready_s') or []), 1)} "
                    f"| {_spread_text(spread(s.get('stop_s') or []), 1)} "
                    f"| {_spread_text(spread(s.get('rss_idle_mb') or []), 0)} "
                    f"| {_spread_text(spread(s.get('idle_cpu_pct') or []), 0)} |")
    return rows


def _rss_rows(systems: dict[str, dict[str, Any]]) -> list[str]:
    """Where each system's idle memory is, by process name (from its first round)."""
    rows: list[str] = []
    for name in _ordered(systems):
        groups = systems[name].get("rss_idle_by_process")
        if not groups:
            continue
        parts = ", ".join(f"{proc} {mb:.0f}" for proc, mb in groups)
        rows.append(f"- {name} (MB): {parts}")
    return rows


def _ordered(names: Iterable[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(SYSTEM_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _cell_rows(agg: Aggregate) -> list[str]:
    rows = ["| mode | c | system | p50 (ms) | p99 (ms) | added p50 (ms) | req/s "
            "| first chunk p50 (ms) | CPU/request (ms) | RSS (MB) | ok | errors |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, c in sorted({(k[1], k[2]) for k in agg}):
        for system in _ordered({k[0] for k in agg if k[1:] == (mode, c)}):
            m = agg[(system, mode, c)]
            extra = added_p50(agg, system, mode, c) if system != DIRECT else None
            rows.append(
                f"| {mode} | {c} | {system} | {_spread_text(m['p50_ms'], 1)} "
                f"| {_spread_text(m['p99_ms'], 1)} | {'—' if extra is None else f'{extra:+.1f}'} "
                f"| {_spread_text(m['rps'], 0)} | {_spread_text(m['ttfc_p50_ms'], 1)} "
                f"| {_spread_text(m['cpu_ms_per_request'], 2)} | {_spread_text(m['rss_mb'], 0)} "
                f"| {_spread_text(m['ok'], 0)} | {_spread_text(m['errors'], 0)} |")
    return rows


def render(results: dict[str, Any]) -> str:
    """The whole report as markdown: ratios and goals first, then what they come from."""
    meta, systems = results["meta"], results["systems"]
    agg = aggregate(results["cells"])
    title = f"# PA Core benchmark — {meta['date']} on {meta['host']}" + (
        " (quick)" if meta.get("quick") else "")
    lines = [title, ""]
    if meta.get("note"):
        lines += [f"> {meta['note']}", ""]
    lines += ["## Ratios and goals", "", *_goal_rows(goals(agg, systems, results.get("memory"))),
              "", "Values are medians over the rounds; (low-high) is their range. \"Added\" is "
              "the system's p50 minus the direct call's in the same cell.", "",
              "## Machine", "", *_machine_rows(meta), "",
              "## Method", "", *METHOD, "",
              "## Systems", "", *_system_rows(systems), "",
              "## Every cell", "", *_cell_rows(agg), "",
              "CPU/request counts every process of the system over the cell, warm-up included, "
              "and so carries its idle cost too (see the idle CPU above); it is most telling at "
              "high concurrency. Direct calls have no process of their own.", ""]
    memory_rows = _rss_rows(systems)
    if memory_rows:
        lines += ["## Idle memory by process", "", *memory_rows, ""]
    failures = results.get("failures") or []
    if failures:
        lines += ["## Failures", "", *[f"- round {f['round']}, {f['system']}: {f['reason']}"
                                       for f in failures], ""]
    if results.get("memory_table"):
        lines += ["## Memory", "", results["memory_table"].strip(), ""]
    elif results.get("memory_error"):
        lines += ["## Memory", "", f"not measured: {results['memory_error']}", ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``<date>-<host>.md`` and ``.json`` in ``out_dir``; a later run of the same day on the
    same host gets ``<date>-<host>-2`` and so on, never overwriting an earlier one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{results['meta']['date']}-{results['meta']['host']}"
    stem, n = base, 1
    while (out_dir / f"{stem}.md").exists() or (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{base}-{n}"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(render(results))
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(js)
    return md, js


def rerender(json_path: Path) -> Path:
    """The markdown report again, from a run's JSON (written beside it)."""
    md = json_path.with_suffix(".md")
    md.write_text(render(json.loads(json_path.read_text())))
    return md
