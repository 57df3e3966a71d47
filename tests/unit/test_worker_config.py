"""workers.config checks added by issue 11: the Redis URL, the Spark backend, the checkpoint's default home."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from stream.config import load
from stream.errors import ConfigError
from workers.config import ALSConfig, LMFConfig, ServeConfig, check_redis_url, state_dir


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0?db=x", "Invalid value for 'db'"),
        ("redis://127.0.0.1:6379/?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:6379/notadb", "the path '/notadb' is not a database number"),
        ("rediss://h:6380/1/2", "the path '/1/2' is not a database number"),
        ("redis://h:port/0", "Port could not be cast"),
        ("http://h:6379/0", "must start with redis://"),
    ],
)
@pytest.mark.parametrize("cls", [LMFConfig, ALSConfig, ServeConfig])
def test_a_bad_redis_url_is_a_config_error_naming_the_variable(cls: type, url: str, message: str) -> None:
    with pytest.raises(ConfigError, match="ZEROCF_REDIS_URL") as e:
        load(cls, {"ZEROCF_REDIS_URL": url})
    assert message in str(e.value)


def test_the_password_never_appears_in_a_redis_url_error() -> None:
    with pytest.raises(ConfigError) as e:
        check_redis_url("redis://:hunter2@cache:6379/x")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:1",
        "redis://h:1/",
        "redis://h:1/15",
        "rediss://:p@h:1/2?socket_timeout=1.5",
        "unix:///tmp/r.sock?db=3",
    ],
)
def test_good_redis_urls_pass(url: str) -> None:
    check_redis_url(url)


def test_the_spark_backend_needs_pyspark_at_load_time(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def no_pyspark(name: str, *a: Any) -> Any:
        return None if name == "pyspark" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", no_pyspark)
    with pytest.raises(ConfigError, match=r"ZEROCF_ALS_BACKEND=spark needs pyspark.*pip install -e '\.\[spark\]'"):
        load(ALSConfig, {"ZEROCF_ALS_BACKEND": "spark"})
    assert load(ALSConfig, {}).als_backend == "numpy"


def test_the_checkpoint_defaults_to_the_state_directory_per_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert load(ALSConfig, {"ZEROCF_TOPIC_PREFIX": "shop"}).checkpoint_path == tmp_path / "xdg/zerocf/als/shop"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load(ALSConfig, {}).checkpoint_path == tmp_path / "home/.local/state/zerocf/als/zerocf"
    explicit = load(ALSConfig, {"ZEROCF_ALS_CHECKPOINT_DIR": "/var/lib/zerocf/als"})
    assert explicit.checkpoint_path == Path("/var/lib/zerocf/als")
    assert state_dir({"XDG_STATE_HOME": "relative/ignored", "HOME": "/h"}) == Path("/h/.local/state/zerocf")
