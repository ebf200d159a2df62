"""The local fast-mode environment and the HAProxy config rewrite that keeps it on loopback."""

from __future__ import annotations

from pathlib import Path

from pacore.serving import fast_mode_env, is_loopback, rewrite_binds

CONFIG = """\
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
  bind 0.0.0.0:8405 ssl
  bind [::]:8406
"""


def test_wildcard_binds_move_to_loopback_and_others_stay():
    out = rewrite_binds(CONFIG, "127.0.0.1")
    assert "bind 127.0.0.1:9101" in out
    assert "bind 127.0.0.1:8000" in out
    assert "bind 127.0.0.1:8404" in out
    assert "bind 127.0.0.1:8405 ssl" in out
    assert "bind 127.0.0.1:8406" in out
    assert rewrite_binds(out, "127.0.0.1") == out  # idempotent: HAProxy reloads reuse the file


def test_fast_mode_env(tmp_path: Path):
    env = fast_mode_env("127.0.0.1", tmp_path)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("pacore-haproxy")
    # The admin socket path (plus Ray's 56-character node id) must fit HAProxy's 97 bytes.
    assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 57 <= 97
    assert len({env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]}) == 2
    public = fast_mode_env("0.0.0.0", tmp_path)
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in public  # listening publicly: HAProxy as is


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
