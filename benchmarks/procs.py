"""Processes of a system under test, from /proc: which they are, their CPU time and their memory.

A system is everything descended from the process the harness started (Ray's GCS, raylet,
workers, HAProxy, LiteLLM's worker) plus anything left in that process's session. CPU time counts
each process's own time and that of children it already reaped, so nothing is counted twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuSnapshot",
    "ProcInfo",
    "cpu_delta_s",
    "processes",
    "pss_bytes",
    "rss_by_process",
    "rss_bytes",
    "serve_replica_count",
    "snapshot",
    "still_alive",
]

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc/<pid>/stat shows it."""

    pid: int
    state: str  # R, S, D, Z, …
    ppid: int
    session: int
    start: int  # clock ticks after boot: with the pid, names a process even after pid reuse
    cpu_ticks: int  # utime + stime + cutime + cstime


def parse_stat(text: str) -> ProcInfo:
    """Fields of /proc/<pid>/stat; the command name may hold spaces and parentheses."""
    pid = int(text[: text.index(" ")])
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    ppid, session = int(rest[1]), int(rest[3])
    cpu = sum(int(rest[i]) for i in (11, 12, 13, 14))
    return ProcInfo(pid, rest[0], ppid, session, int(rest[19]), cpu)


def _all() -> dict[int, ProcInfo]:
    out: dict[int, ProcInfo] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            info = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # gone between listing and reading
        out[info.pid] = info
    return out


def select(table: dict[int, ProcInfo], root: int) -> list[ProcInfo]:
    """``root``, its descendants, and whatever else lives in the session it leads."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = [root] if root in table else []
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    found.update(p.pid for p in table.values() if p.session == root)
    return [table[p] for p in sorted(found)]


def processes(root: int) -> list[ProcInfo]:
    return select(_all(), root)


def still_alive(members: list[ProcInfo]) -> list[ProcInfo]:
    """Those of ``members`` that are still running as the same processes (not a reused pid)."""
    alive = []
    for p in members:
        try:
            now = parse_stat((PROC / str(p.pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if now.start == p.start and now.state != "Z":
            alive.append(p)
    return alive


CpuSnapshot = dict[tuple[int, int], int]


def snapshot(root: int) -> CpuSnapshot:
    """CPU ticks of every process of the system, keyed by (pid, start time)."""
    return {(p.pid, p.start): p.cpu_ticks for p in processes(root)}


def cpu_delta_s(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU seconds spent between two snapshots (a process born in between counts whole).

    A process that ended in between was, as a rule, reaped by a parent of the same system, whose
    children's time then grew by the whole life of it: its share before the first snapshot is
    taken back out.
    """
    ticks = sum(t - before.get(key, 0) for key, t in after.items())
    ticks -= sum(t for key, t in before.items() if key not in after)
    return max(ticks, 0) / CLK_TCK


def _resident(pid: int) -> int:
    try:
        return int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def rss_bytes(root: int) -> int:
    """Resident memory summed over the system's processes."""
    return sum(_resident(p.pid) for p in processes(root))


def _proportional(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_bytes(root: int) -> int:
    """Proportional memory summed over the system's processes: a page shared by n processes
    (the interpreter, Ray's core library, the SDKs) counts 1/n in each, so the sum is what the
    system occupies, where summed RSS counts every shared page once per process."""
    return sum(_proportional(p.pid) for p in processes(root))


def process_name(argv: list[str]) -> str:
    """A short name for a process: Ray's title (``ray::ServeReplica:app:Gateway``), a Python
    program's script or module, or the executable."""
    if not argv or not argv[0]:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    exe = os.path.basename(argv[0])
    if not exe.startswith("python"):
        return exe
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return f"{exe} {next(args, '?')}"
        if arg and not arg.startswith("-"):
            return f"{exe} {os.path.basename(arg)}"
    return exe


REPLICA_PREFIX = "ray::ServeReplica:"


def _named(root: int) -> list[tuple[int, str]]:
    out = []
    for p in processes(root):
        try:
            argv = (PROC / str(p.pid) / "cmdline").read_text().split("\0")
        except OSError:
            continue  # gone since it was listed
        out.append((p.pid, process_name(argv)))
    return out


def rss_by_process(root: int) -> list[tuple[str, float]]:
    """Resident MiB of the system's processes, grouped by name, largest first."""
    groups: dict[str, float] = {}
    for pid, name in _named(root):
        groups[name] = groups.get(name, 0.0) + _resident(pid) / 2**20
    return sorted(groups.items(), key=lambda kv: -kv[1])


def serve_replica_count(root: int) -> int:
    """How many Ray Serve replicas the system runs (a deployment's replicas share one name)."""
    return sum(1 for _, name in _named(root) if name.startswith(REPLICA_PREFIX))
