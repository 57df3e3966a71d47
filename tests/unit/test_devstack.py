"""Finding the local stack's binaries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream.devstack import redis_binary


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
