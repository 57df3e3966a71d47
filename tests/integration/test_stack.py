"""LocalStack lifecycle in its own directory (separate from the session stack) and the `zerocf stack` CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from stream.devstack import LocalStack


def _cli(stack_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROCF_")}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "stack", *args, "--dir", str(stack_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _kill_9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    try:  # the services are children of this process: reap them
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


@pytest.fixture()
def own_stack(tmp_path: Path) -> Iterator[LocalStack]:
    st = LocalStack(tmp_path / "own-stack")
    try:
        yield st
    finally:
        st.down()


def test_up_status_env_down(own_stack: LocalStack) -> None:
    services = own_stack.up()
    assert set(services) == {"broker", "redis"}
    status = own_stack.status()
    assert status["running"] is True and status["stale"] == []
    env = own_stack.env()
    assert env["ZEROCF_KAFKA_BOOTSTRAP"] == f"127.0.0.1:{services['broker'].port}"
    assert redis.Redis.from_url(env["ZEROCF_REDIS_URL"]).ping()
    assert own_stack.up().keys() == services.keys()  # idempotent: same processes
    assert {n: s.pid for n, s in own_stack.services().items()} == {n: s.pid for n, s in services.items()}

    own_stack.down()
    assert not own_stack.state_path.exists()
    assert own_stack.status() == {"running": False, "services": {}, "stale": []}


def test_stale_state_is_cleaned_after_kill_9(own_stack: LocalStack) -> None:
    old = own_stack.up()
    for svc in old.values():
        _kill_9(svc.pid)
    status = own_stack.status()
    assert status["running"] is False and status["stale"] == ["broker", "redis"]

    new = own_stack.up()
    assert {n: s.pid for n, s in new.items()}.keys() == {"broker", "redis"}
    assert all(new[n].pid != old[n].pid for n in new)
    status = own_stack.status()
    assert status["running"] is True and status["stale"] == []
    assert json.loads(own_stack.state_path.read_text())["services"].keys() == {"broker", "redis"}


def test_cli_env_prints_exports_and_status_exit_codes(own_stack: LocalStack) -> None:
    assert _cli(own_stack.dir, "status").returncode == 1  # nothing running yet
    up = _cli(own_stack.dir, "up")
    assert up.returncode == 0, up.stderr
    out = _cli(own_stack.dir, "env")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(
        r"export ZEROCF_KAFKA_BOOTSTRAP=127\.0\.0\.1:\d+ ZEROCF_REDIS_URL=redis://127\.0\.0\.1:\d+/0\n", out.stdout
    ), out.stdout
    assert out.stdout.split(" ", 1)[1].split() == [f"{k}={v}" for k, v in own_stack.env().items()]
    status = _cli(own_stack.dir, "status")
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
    down = _cli(own_stack.dir, "down")
    assert down.returncode == 0 and own_stack.status()["running"] is False
