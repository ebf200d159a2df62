"""The systems under test and their shared upstream: each started as processes of its own on
loopback, made ready, and stopped by its own handle (never by name, never with ``ray stop``)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from benchmarks import litellm_env, procs
from pacore.serving import free_port

__all__ = [
    "BareChain",
    "Direct",
    "Endpoint",
    "LiteLLM",
    "PACore",
    "Service",
    "StartError",
    "System",
    "Upstream",
]

REPO = Path(__file__).resolve().parent.parent
MODEL = "loopback-model"
UPSTREAM_KEY = "sk-bench"
LITELLM_MASTER_KEY = "sk-bench-master"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
PROBE_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "ready?"}]}


class StartError(Exception):
    """A system could not be started or did not answer; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    """Where the load generator sends its requests, and what it adds to them."""

    chat_url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)


class Service:
    """A child process in a session of its own: its stdout read line by line (to spot readiness),
    everything it writes kept in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log
        self._log_file = log.open("a")
        self._log_lock = threading.Lock()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._log_file, text=True, start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc.stdout,),
                                             daemon=True)
        self._pump_thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self, stdout: IO[str]) -> None:
        for line in stdout:
            with self._log_lock:
                if not self._log_file.closed:
                    self._log_file.write(line)
                    self._log_file.flush()
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for_prefixes(self, prefixes: tuple[str, ...], timeout_s: float) -> dict[str, str]:
        """The values after each of ``prefixes`` on stdout, once all have appeared."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < len(prefixes):
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise StartError(f"{self.name}: not ready in {timeout_s:.0f} s") from None
            if line is None:
                raise StartError(f"{self.name} exited with {self.proc.wait()}: {self.tail()}")
            for prefix in prefixes:
                if line.startswith(prefix):
                    found[prefix] = line[len(prefix):].strip()
        return found

    def tail(self, lines: int = 3) -> str:
        with self._log_lock:
            if not self._log_file.closed:
                self._log_file.flush()
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(t.strip() for t in text[-lines:])[:400] or "no output"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM and a clean exit; then SIGKILL for the session and any process of this
        service that outlived it."""
        if self.proc.poll() is None:
            members = procs.processes(self.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _killpg(self.pid)
                self.proc.wait(timeout=10)
            _reap_leftovers(members)
        # Processes the service left behind may hold its stdout open: do not wait on them.
        self._pump_thread.join(timeout=5)
        with self._log_lock:
            self._log_file.close()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_leftovers(members: list[procs.ProcInfo], grace_s: float = 10.0) -> None:
    """Kill, by pid, the processes of a stopped service that are still the same processes."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = procs.still_alive(members)
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------- upstream


class Upstream:
    """The loopback OpenAI server every system calls, in a process of its own."""

    def __init__(self, workdir: Path, token_delay_ms: float, tokens: int) -> None:
        self.token_delay_ms = token_delay_ms
        self.tokens = tokens
        self.service = Service(
            "upstream",
            [sys.executable, "-m", "pacore.testing.openai_server", "--port", "0",
             "--token-delay-ms", str(token_delay_ms), "--tokens", str(tokens), "--model", MODEL],
            workdir / "upstream.log",
        )
        found = self.service.wait_for_prefixes(("listening on",), 60.0)
        self.base_url = found["listening on"]

    def stop(self) -> None:
        self.service.stop(timeout_s=10)


# ---------------------------------------------------------------------------- systems


class System(ABC):
    """One system under test. ``start`` returns once it answers a chat completion."""

    name: str
    description: str

    def __init__(self) -> None:
        self.service: Service | None = None
        self.ready_s: float | None = None

    @property
    def root_pid(self) -> int | None:
        """The process whose tree is this system (None: nothing of its own runs)."""
        return self.service.pid if self.service is not None else None

    @abstractmethod
    def command(self) -> str:
        """How the system is started, for the report."""

    @abstractmethod
    def start(self, upstream: Upstream, workdir: Path) -> Endpoint: ...

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
        self.service = None

    def _probe(self, endpoint: Endpoint) -> None:
        body = {**PROBE_BODY, "model": endpoint.model, **endpoint.extra_body}
        try:
            r = httpx.post(endpoint.chat_url, json=body, headers=endpoint.headers, timeout=60)
        except httpx.HTTPError as exc:
            raise StartError(f"{self.name}: first request failed: {exc}") from None
        if r.status_code != 200:
            raise StartError(f"{self.name}: first request: HTTP {r.status_code} {r.text[:200]}")


class Direct(System):
    """The floor: the load generator calls the upstream itself."""

    name = "direct"
    description = "the upstream called directly (the floor)"

    def command(self) -> str:
        return "python -m pacore.testing.openai_server (no proxy)"

    def start(self, upstream: Upstream, workdir: Path) -> Endpoint:
        self.ready_s = 0.0
        endpoint = Endpoint(f"{upstream.base_url}/chat/completions", MODEL,
                            {"authorization": f"Bearer {UPSTREAM_KEY}"})
        self._probe(endpoint)
        return endpoint


class PACore(System):
    """PA Core through ``pacore up``: lean (no memory, no agents), or the whole default graph
    with every request using memory."""

    def __init__(self, memory: bool) -> None:
        super().__init__()
        self.memory = memory
        self.name = "pacore-memory-on" if memory else "pacore-memory-off"
        self.description = ("`pacore up`, the whole default graph; requests with use_memory=true"
                            if memory else
                            "`pacore up --no-memory --no-agents`; requests with use_memory=false")

    def _flags(self) -> list[str]:
        return [] if self.memory else ["--no-memory", "--no-agents"]

    def command(self) -> str:
        return " ".join(["pacore up --data-dir D --port P", *self._flags()])

    def start(self, upstream: Upstream, workdir: Path) -> Endpoint:
        data_dir = Path(workdir) / f"{self.name}-{time.monotonic_ns()}"
        port = free_port()
        pacore = shutil.which("pacore") or str(Path(sys.executable).with_name("pacore"))
        # The per-user rate limit (600/min by default) would measure the limiter, not the path;
        # and a Ray instance of its own: without an address, ray.init joins the instance
        # `ray start` last recorded on this machine, if any.
        env = {**os.environ, "PACORE_RATE_LIMIT_PER_MINUTE": "0", "RAY_ADDRESS": "local"}
        cmd = [pacore, "up", "--data-dir", str(data_dir), "--port", str(port), *self._flags()]
        self.service = Service(self.name, cmd, workdir / f"{data_dir.name}.log", env)
        found = self.service.wait_for_prefixes(("PACORE_URL=", "PACORE_TOKEN="), START_TIMEOUT_S)
        self.ready_s = time.monotonic() - self.service.started_at
        url, token = found["PACORE_URL="], found["PACORE_TOKEN="]
        headers = {"authorization": f"Bearer {token}"}
        provider = {"kind": "openai", "api_key": UPSTREAM_KEY, "base_url": upstream.base_url,
                    "default_model": MODEL}
        r = httpx.put(f"{url}/v1/providers/openai", json=provider, headers=headers, timeout=60)
        if r.status_code >= 300:
            raise StartError(f"{self.name}: PUT /v1/providers/openai: HTTP {r.status_code}")
        endpoint = Endpoint(f"{url}/v1/chat/completions", f"openai/{MODEL}", headers,
                            {"use_memory": self.memory})
        self._probe(endpoint)
        return endpoint


class BareChain(System):
    """A bare Serve chain of PA Core's depth in PA Core's Serve mode (benchmarks/bare_chain.py)."""

    name = "bare-serve-chain"
    description = "Ray Serve ingress → router → provider, each only forwarding (fast mode)"

    def command(self) -> str:
        return "python -m benchmarks.bare_chain --port P --upstream U --data-dir D"

    def start(self, upstream: Upstream, workdir: Path) -> Endpoint:
        data_dir = Path(workdir) / f"bare-{time.monotonic_ns()}"
        data_dir.mkdir(parents=True)
        cmd = [sys.executable, "-m", "benchmarks.bare_chain", "--port", str(free_port()),
               "--upstream", upstream.base_url, "--api-key", UPSTREAM_KEY,
               "--data-dir", str(data_dir)]
        self.service = Service(self.name, cmd, workdir / f"{data_dir.name}.log")
        url = self.service.wait_for_prefixes(("BARE_URL=",), START_TIMEOUT_S)["BARE_URL="]
        self.ready_s = time.monotonic() - self.service.started_at
        endpoint = Endpoint(f"{url}/v1/chat/completions", MODEL)
        self._probe(endpoint)
        return endpoint


class LiteLLM(System):
    """LiteLLM Proxy, one worker, from its own virtual environment."""

    name = "litellm"
    description = f"LiteLLM Proxy {litellm_env.LITELLM_VERSION}, one uvicorn worker"

    def __init__(self, env: litellm_env.LiteLLMEnv) -> None:
        super().__init__()
        self.env = env

    def command(self) -> str:
        return "litellm --config C --host 127.0.0.1 --port P --num_workers 1"

    def start(self, upstream: Upstream, workdir: Path) -> Endpoint:
        if not self.env.ready or self.env.python is None:
            raise StartError(self.env.error or "litellm is not installed")
        config = workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {upstream.base_url}\n"
            f"      api_key: {UPSTREAM_KEY}\n"
        )
        port = free_port()
        bin_dir = self.env.python.parent
        env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY,
               # The bundled cost map, not a fetch that fails (and retries) without internet.
               "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "VIRTUAL_ENV": str(bin_dir.parent),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = [str(bin_dir / "litellm"), "--config", str(config), "--host", "127.0.0.1",
               "--port", str(port), "--num_workers", "1"]
        self.service = Service(self.name, cmd, workdir / f"litellm-{port}.log", env)
        url = f"http://127.0.0.1:{port}"
        self._wait_live(url)
        self.ready_s = time.monotonic() - self.service.started_at
        endpoint = Endpoint(f"{url}/v1/chat/completions", MODEL,
                            {"authorization": f"Bearer {LITELLM_MASTER_KEY}"})
        self._probe(endpoint)
        return endpoint

    def _wait_live(self, url: str) -> None:
        assert self.service is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.service.proc.poll() is not None:
                raise StartError(f"litellm exited with {self.service.proc.returncode}: "
                                 f"{self.service.tail()}")
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise StartError(f"litellm did not answer in {START_TIMEOUT_S:.0f} s")
