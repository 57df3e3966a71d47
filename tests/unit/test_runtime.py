"""The health/metrics endpoint: where it binds and how a bad address fails."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from stream.config import RuntimeSettings, load
from stream.errors import ConfigError
from stream.runtime import start_http


def test_metrics_bind_loopback_by_default_and_the_image_opens_them() -> None:
    assert load(RuntimeSettings, {}).metrics_host == "127.0.0.1"
    assert load(RuntimeSettings, {"ZEROCF_METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"
    server = start_http(0, lambda: (True, {"ok": True}))
    try:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_metrics_port_is_a_config_error_that_names_the_fix() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}.*ZEROCF_METRICS_PORT"):
            start_http(port, lambda: (True, {}))
    finally:
        busy.close()


def test_an_unknown_metrics_interface_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ZEROCF_METRICS_HOST"):
        start_http(0, lambda: (True, {}), host="203.0.113.7")  # TEST-NET-3: never a local address
