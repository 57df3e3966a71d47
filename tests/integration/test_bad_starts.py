"""Every bad start fails clearly: one line that names the fix, exit status 2, within seconds, no traceback.

Each case is a ``zerocf`` command with one broken setting, run against the session's real broker and Redis.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from stream import kafka_util
from stream.config import StreamConfig, load
from tests.helpers import run_zerocf


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def assert_clean_failure(done: object, pattern: str) -> None:
    rc, err = done.returncode, done.stderr  # type: ignore[attr-defined]
    assert rc == 2, f"exit {rc}, expected 2:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err[-2000:]
    assert re.search(pattern, errors[0]), errors[0]


BAD_SETTINGS = [
    pytest.param(("ingest", "--until-idle"), {"ZEROCF_KAFKA_BOOTSTRAP": "[::1:9092"}, r"closing .\]", id="ipv6"),
    pytest.param(("ingest", "--until-idle"), {"ZEROCF_KAFKA_BOOTSTRAP": "h:port"}, r"KAFKA_BOOTSTRAP.*port", id="port"),
    pytest.param(("lmf", "--until-idle"), {"ZEROCF_METRICS_PORT": "abc"}, r"ZEROCF_METRICS_PORT='abc'", id="nan-port"),
    pytest.param(("ingest", "--until-idle"), {"ZEROCF_IDLE_SECONDS": "nan"}, r"ZEROCF_IDLE_SECONDS", id="nan-idle"),
    pytest.param(("lmf", "--until-idle"), {"ZEROCF_IDLE_SECONDS": "nan"}, r"ZEROCF_IDLE_SECONDS", id="nan-idle-lmf"),
    pytest.param(("serve",), {"ZEROCF_SERVE_PORT": "80000"}, r"ZEROCF_SERVE_PORT", id="serve-port-range"),
]


@pytest.mark.parametrize(("argv", "env", "pattern"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_and_exit_2(
    zerocf_env: dict[str, str], argv: tuple[str, ...], env: dict[str, str], pattern: str
) -> None:
    assert_clean_failure(run_zerocf({**zerocf_env, **env}, *argv, timeout=30, check=False), pattern)


@pytest.mark.parametrize("command", [("ingest", "--until-idle"), ("lmf", "--until-idle"), ("als", "--once")])
def test_a_busy_metrics_port_is_one_line_and_exit_2(
    zerocf_env: dict[str, str], busy_port: int, command: tuple[str, ...]
) -> None:
    cfg = load(StreamConfig, zerocf_env)
    kafka_util.ensure_topics(cfg.kafka, {t: cfg.events_partitions for t in cfg.topics.all()})
    done = run_zerocf({**zerocf_env, "ZEROCF_METRICS_PORT": str(busy_port)}, *command, timeout=60, check=False)
    assert_clean_failure(done, rf"127\.0\.0\.1:{busy_port}.*ZEROCF_METRICS_PORT")
