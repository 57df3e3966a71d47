"""The one settings -> flags mechanism (stream.config): every command's flags come from its config class."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from stream.config import (
    KAFKA_FIELDS,
    TOP_LEVEL,
    StreamConfig,
    add_flags,
    flag_overrides,
    load,
    settings_of,
)
from stream.errors import ConfigError
from workers.cli import build_parser
from workers.config import ALSConfig, LMFConfig, ServeConfig

# command -> (config class, settings it does not expose as flags)
COMMANDS: dict[str, tuple[type, tuple[str, ...]]] = {
    "ingest": (StreamConfig, TOP_LEVEL),
    "lmf": (LMFConfig, TOP_LEVEL),
    "als": (ALSConfig, TOP_LEVEL),
    "serve": (ServeConfig, TOP_LEVEL + KAFKA_FIELDS),
}


def _subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser: argparse.ArgumentParser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_cli_setting_is_a_flag_with_default_and_env_in_help(command: str) -> None:
    cls, skipped = COMMANDS[command]
    text = " ".join(_subparser(command).format_help().split())
    for s in settings_of(cls):
        if not s.meta.get("cli", True) or s.name in skipped:
            assert s.flag not in text.split(), f"{s.flag} should not be a flag of {command}"
            continue
        assert s.flag in text, f"zerocf {command} --help lacks {s.flag}"
        assert s.env in text, f"zerocf {command} --help does not name {s.env}"
    assert "(default" in text


def test_secrets_are_never_flags() -> None:
    flags = " ".join(_subparser("lmf").format_help().split())
    for s in settings_of(LMFConfig):
        if s.meta.get("secret"):
            assert s.flag not in flags


def test_flags_override_env_and_convert() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, LMFConfig)
    args = parser.parse_args(["--lr", "0.2", "--adagrad", "--init", "foldin", "--metrics-port", "9100"])
    cfg = load(LMFConfig, {"ZEROCF_LMF_LR": "0.5", "ZEROCF_LMF_NEGATIVES": "3"}, flag_overrides(args, LMFConfig))
    assert (cfg.lr, cfg.negatives, cfg.adagrad, cfg.init, cfg.runtime.metrics_port) == (0.2, 3, True, "foldin", 9100)
    off = load(LMFConfig, {"ZEROCF_LMF_ADAGRAD": "1"}, flag_overrides(parser.parse_args(["--no-adagrad"]), LMFConfig))
    assert off.adagrad is False


def test_shared_settings_are_declared_once() -> None:
    envs = [s.env for s in settings_of(LMFConfig)]
    assert len(envs) == len(set(envs))
    assert {"ZEROCF_TOPIC_PREFIX", "ZEROCF_IDLE_SECONDS", "ZEROCF_POLL_TIMEOUT_MS"} <= set(envs)
    owners = {f.name: cls.__name__ for cls in (StreamConfig, LMFConfig) for f in dataclasses.fields(cls)}
    assert owners["idle_seconds"] == "LMFConfig"  # inherited: the same field object serves both


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ZEROCF_LMF_LR": "-1"}, "ZEROCF_LMF_LR=-1.0 must be in [1e-06, 10]"),
        ({"ZEROCF_IDLE_SECONDS": "nan"}, "ZEROCF_IDLE_SECONDS=nan must be in [0.01, 3600]"),
        ({"ZEROCF_LMF_INIT": "zeros"}, "ZEROCF_LMF_INIT='zeros'; use one of random, foldin"),
        ({"ZEROCF_FACTORS": "many"}, "ZEROCF_FACTORS='many' is not a valid int; fix the value"),
        ({"ZEROCF_LMF_ADAGRAD": "maybe"}, "ZEROCF_LMF_ADAGRAD='maybe' is not a valid bool"),
    ],
)
def test_config_errors_are_worded_one_way(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(LMFConfig, env)
    assert str(exc.value).startswith(message)


def test_top_level_flags_configure_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr("stream.runtime.setup_logging", lambda level, json_lines: seen.update(l=level, j=json_lines))
    assert cli.main(["--log-level", "ERROR", "--log-json", "stack", "status", "--dir", "/nonexistent/zerocf"]) == 1
    assert seen == {"l": "ERROR", "j": True}


def test_config_command_prints_values_and_hides_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.cli import main

    monkeypatch.setenv("ZEROCF_FACTORS", "16")
    monkeypatch.setenv("ZEROCF_KAFKA_SASL_PASSWORD", "hunter2")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "ZEROCF_FACTORS=16  # from the environment" in out
    assert "ZEROCF_KAFKA_SASL_PASSWORD=***" in out and "hunter2" not in out
    assert f"ZEROCF_LMF_LR={LMFConfig().lr}\n" in out
    assert main(["config", "--markdown"]) == 0
    assert "| `ZEROCF_FACTORS` | `64` | `--factors` |" in capsys.readouterr().out
