"""The agent installs without the cloud's database, vector and embedding stack: it must import with
those packages unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CLOUD_ONLY = (
    "sqlalchemy", "alembic", "asyncpg", "aiosqlite", "qdrant_client", "qdrant_edge",
    "sentence_transformers", "torch", "transformers", "redis", "jwt", "cryptography",
    "pacore.db", "pacore.memory", "pacore.security", "pacore.services",
)

PROBE = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is not part of the agent's install")

    sys.meta_path.insert(0, Block())
    import agent.app, agent.cli, agent.config, agent.link, agent.tools
    import pacore.agents.protocol
    import pacore.providers.custom, pacore.providers.ollama
    print("agent imports cleanly")
    """
)


def test_the_agent_imports_without_the_cloud_stack() -> None:
    probe = PROBE.format(blocked=CLOUD_ONLY)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "agent imports cleanly" in done.stdout
