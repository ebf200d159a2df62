"""The local fast-mode environment and the HAProxy config rewrite that keeps it on loopback."""

from __future__ import annotations

from pathlib import Path

from pacore.serving import LOOPBACK_ENV, fast_mode_env, is_loopback, resendable, rewrite_binds

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
    assert env[LOOPBACK_ENV] == "1"
    assert "empty-response" in env["RAY_SERVE_HAPROXY_RETRY_ON"]
    # The admin socket path (plus Ray's 56-character node id) must fit HAProxy's 97 bytes.
    assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 57 <= 97
    assert len({env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]}) == 2
    public = fast_mode_env("0.0.0.0", tmp_path)
    # Listening publicly: HAProxy still through the wrapper (requests resendable), binds as is.
    assert public["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("pacore-haproxy")
    assert LOOPBACK_ENV not in public


def test_requests_are_buffered_whole_so_that_they_can_be_resent():
    config = "defaults\n    option abortonclose\n    option splice-request\n" \
             "    option splice-response\n    retry-on conn-failure empty-response\n"
    out = resendable(config)
    assert "option http-buffer-request" in out and "splice-request" not in out
    assert "option splice-response" in out  # answers may still be spliced
    assert resendable(out) == out


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
