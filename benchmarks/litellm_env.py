"""The LiteLLM Proxy that PA Core is compared with: its own virtual environment, pinned release.

LiteLLM lives in ``benchmarks/.venv-litellm`` so that its dependency pins never touch PA Core's
environment. The release is pinned exactly; 1.82.7 and 1.82.8 were compromised on PyPI and are
refused even if someone edits the pin.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LITELLM_VERSION", "VENV_DIR", "LiteLLMEnv", "ensure"]

LITELLM_VERSION = "1.108.7"
COMPROMISED = frozenset({"1.82.7", "1.82.8"})
VENV_DIR = Path(__file__).resolve().parent / ".venv-litellm"
INSTALL_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class LiteLLMEnv:
    """Where LiteLLM can be run from, or why it cannot (``error`` set, ``python`` None)."""

    python: Path | None
    version: str | None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.python is not None and self.error is None


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path = VENV_DIR) -> str | None:
    """The LiteLLM release installed in ``venv``, or None."""
    python = _python(venv)
    if not python.exists():
        return None
    probe = "from importlib.metadata import version; print(version('litellm'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or None if done.returncode == 0 else None


def ensure(venv: Path = VENV_DIR, version: str = LITELLM_VERSION, log: Path | None = None) -> LiteLLMEnv:
    """The LiteLLM environment, created and installed first if missing; never raises for a
    failed install (the caller reports the system as skipped with the returned reason)."""
    if version in COMPROMISED:
        return LiteLLMEnv(None, None, f"litellm {version} is a compromised release; refusing")
    have = installed_version(venv)
    if have == version:
        return LiteLLMEnv(_python(venv), have)
    try:
        if not _python(venv).exists():
            _run([sys.executable, "-m", "venv", str(venv)], log)
        _run([str(_python(venv)), "-m", "pip", "install", "--quiet",
              f"litellm[proxy]=={version}"], log)
    except (OSError, subprocess.SubprocessError) as exc:
        return LiteLLMEnv(None, None, f"could not install litellm[proxy]=={version}: {exc}")
    have = installed_version(venv)
    if have != version:
        return LiteLLMEnv(None, have, f"litellm {version} not importable after install")
    return LiteLLMEnv(_python(venv), have)


def _run(cmd: list[str], log: Path | None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise subprocess.SubprocessError(f"exit {done.returncode}: {tail[0][:300]}")


if __name__ == "__main__":
    env = ensure(log=Path("/dev/stderr"))
    print(env)
