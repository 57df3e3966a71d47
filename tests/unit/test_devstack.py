"""Finding the local stack's binaries."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from stream.devstack import (
    CLUSTER_SLOTS,
    LocalStack,
    ServiceState,
    free_cluster_port,
    redis_binary,
    redis_cluster_argv,
    slot_ranges,
)
from stream.errors import StackError


def test_redis_server_found_through_a_relative_path_entry_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "redis-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "bin")  # relative: the stack starts redis with cwd = its state folder
    found = redis_binary()
    assert os.path.isabs(found) and Path(found) == fake


def test_cluster_slots_are_split_into_contiguous_ranges_covering_each_slot_once() -> None:
    for n in (1, 2, 3, 5):
        ranges = slot_ranges(n)
        assert len(ranges) == n and [s for r in ranges for s in r] == list(range(CLUSTER_SLOTS))
    with pytest.raises(StackError):
        slot_ranges(0)


def test_a_cluster_node_port_leaves_room_for_its_bus_port() -> None:
    for _ in range(20):
        assert free_cluster_port() <= 55535  # redis-server refuses higher ports in cluster mode (bus = port + 10000)


def test_a_cluster_node_runs_in_cluster_mode_in_its_own_folder(tmp_path: Path) -> None:
    argv = redis_cluster_argv(7000, tmp_path / "n0")
    assert argv[argv.index("--dir") + 1] == str(tmp_path / "n0")
    assert argv[argv.index("--cluster-enabled") + 1] == "yes" and "--appendonly" in argv


def test_env_and_status_name_the_cluster_when_one_runs(tmp_path: Path) -> None:
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(4)]  # stand-ins for broker + 3 nodes
    try:
        ports = [s.getsockname()[1] for s in listeners]
        names = ["broker", "redis-cluster-0", "redis-cluster-1", "redis-cluster-2"]
        stack = LocalStack(tmp_path)
        stack._write({n: ServiceState(n, os.getpid(), p, [], "") for n, p in zip(names, ports)})
        assert stack.status()["running"] is True
        assert stack.env()["ZEROCF_REDIS_URL"] == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[1:])
        assert stack.cluster_url() == stack.env()["ZEROCF_REDIS_URL"]
    finally:
        for s in listeners:
            s.close()
    assert LocalStack(tmp_path).cluster_nodes() == []  # gone once their ports close
