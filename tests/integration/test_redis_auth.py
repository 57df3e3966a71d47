"""Redis AUTH end to end: the store works through a password URL, and a wrong or missing password fails at
start-up with a message that says what to fix (never the password itself)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from stream.devstack import free_port, redis_argv
from stream.errors import ConfigError
from workers.store import FactorStore

SECRET = "s3cret-Pa55"


@pytest.fixture()
def auth_redis(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        redis_argv(port, tmp_path, "--requirepass", SECRET),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, password=SECRET).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_password_url_works_and_wrong_or_missing_password_is_a_clear_error(auth_redis: int) -> None:
    store = FactorStore.connect(f"redis://:{SECRET}@127.0.0.1:{auth_redis}/0", "authns")
    assert store.ensure_model(4) == 1
    for url in (f"redis://:wrong@127.0.0.1:{auth_redis}/0", f"redis://127.0.0.1:{auth_redis}/0"):
        with pytest.raises(ConfigError) as err:
            FactorStore.connect(url, "authns")
        assert "ZEROCF_REDIS_URL" in str(err.value) and "wrong" not in str(err.value)


def test_worker_exits_2_with_the_fix_in_the_message(auth_redis: int, zerocf_env: dict[str, str]) -> None:
    env = {**zerocf_env, "ZEROCF_REDIS_URL": f"redis://:wrong@127.0.0.1:{auth_redis}/0"}
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "lmf", "--until-idle"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rejected the credentials" in proc.stderr and ":***@" in proc.stderr and "wrong" not in proc.stderr
