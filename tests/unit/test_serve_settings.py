"""The serve-only settings: declared once, flags of `zerocf serve` with their env names, ranges checked."""

from __future__ import annotations

import argparse

import pytest

from stream.config import load, settings_of
from stream.errors import ConfigError
from workers.cli import build_parser
from workers.serving.settings import ServeSettings


def test_every_serve_setting_is_a_flag_of_serve_naming_its_variable() -> None:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    text = " ".join(sub.choices["serve"].format_help().split())
    for s in settings_of(ServeSettings):
        assert s.flag in text and s.env in text, s.env
    args = build_parser().parse_args(["serve", "--redis-timeout-s", "0.1", "--stale-s", "30"])
    assert (args.redis_timeout_s, args.stale_s, args.max_connections) == (0.1, 30.0, None)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ZEROCF_SERVE_REDIS_TIMEOUT_S": "0"}, "ZEROCF_SERVE_REDIS_TIMEOUT_S=0.0 must be in [0.001, 60]"),
        ({"ZEROCF_SERVE_MAX_CONNECTIONS": "0"}, "ZEROCF_SERVE_MAX_CONNECTIONS=0 must be in [1, 100000]"),
        ({"ZEROCF_SERVE_REQUEST_TIMEOUT_S": "nan"}, "ZEROCF_SERVE_REQUEST_TIMEOUT_S=nan must be in"),
        ({"ZEROCF_SERVE_STALE_S": "-1"}, "ZEROCF_SERVE_STALE_S=-1.0 must be in"),
        ({"ZEROCF_SERVE_COMPUTE_SLOTS": "x"}, "ZEROCF_SERVE_COMPUTE_SLOTS='x' is not a valid int"),
    ],
)
def test_bad_values_are_config_errors_that_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load(ServeSettings, env)
