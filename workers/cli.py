"""The ``zerocf`` command: one entry point, one subcommand per stage.

Each command module exposes ``register(subparsers)``, which adds its parser (flags generated from its config
class by :func:`stream.config.add_flags`) and sets ``func`` to a ``run(args) -> int`` function. The
environment is read here, once: every ``ZEROCF_*`` variable must be declared by some config class (a typo is
an error, named), and ``args.env`` carries the mapping on to the command, which builds its frozen config with
:func:`stream.config.load`. A :class:`~stream.errors.ZerocfError` ends the command with its message and exit
code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from stream.config import (
    DefaultsHelpFormatter,
    RuntimeSettings,
    add_flags,
    check_unknown_env,
    env_markdown,
    flag_overrides,
    known_env_vars,
    load,
    settings_of,
)
from stream.errors import ZerocfError

log = logging.getLogger(__name__)

# Modules that register subcommands, in help order.
COMMAND_MODULES = (
    "stream.devstack",
    "stream.ingest",
    "stream.replay.produce",
    "workers.online.worker",
    "workers.batch.worker",
    "workers.serving.cli",
    "workers.serving.server",
    "workers.serving.items_cli",
    "stream.erasure",
    "workers.evaluation.cli",
    "workers.evaluation.demo",
)
CONFIG_CLASSES = (
    "stream.config:StreamConfig",
    "stream.devstack:StackConfig",
    "workers.config:LMFConfig",
    "workers.config:ALSConfig",
    "workers.config:ServeConfig",
    "workers.serving.settings:ServeSettings",
)


def all_config_classes() -> list[type]:
    """Every config class that exists in this install (for env checking and the README reference)."""
    out = []
    for spec in CONFIG_CLASSES:
        mod, _, name = spec.partition(":")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``zerocf`` parser with every installed subcommand."""
    parser = argparse.ArgumentParser(
        prog="zerocf",
        description="zerocf: a streaming, online-learning recommender for implicit feedback "
        "(Kafka in, factors in Redis). `zerocf COMMAND --help` lists a command's "
        "flags; every flag also has a ZEROCF_* environment variable.",
    )
    add_flags(parser, RuntimeSettings, skip=("metrics_port", "metrics_host"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a command whose optional dependency is not installed
            if exc.name != mod:
                raise
            continue
        module.register(sub)
    cfg = sub.add_parser(
        "config",
        help="print every ZEROCF_* variable with its value here (or the reference table)",
        description="Print every ZEROCF_* variable as VAR=value (from the environment, else the default; "
        "secrets shown as ***), or with --markdown the reference table of the README.",
    )
    cfg.add_argument("--markdown", action="store_true", help="print the reference table (variable, default, flag)")
    cfg.set_defaults(func=_run_config)
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    return parser


def _run_config(args: argparse.Namespace) -> int:
    classes = all_config_classes()
    if args.markdown:
        sys.stdout.write(env_markdown(*classes))
        return 0
    for f in sorted(settings_of(*classes), key=lambda f: f.env):
        value = args.env.get(f.env)
        shown = "" if value is None and f.default is None else str(f.default if value is None else value)
        if f.meta.get("secret") and value:
            shown = "***"
        sys.stdout.write(f"{f.env}={shown}{'' if value is None else '  # from the environment'}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zerocf`` console script."""
    from stream.runtime import setup_logging

    env = dict(os.environ)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.env = env
    try:
        runtime = load(RuntimeSettings, env, flag_overrides(args, RuntimeSettings))
        setup_logging(runtime.log_level, runtime.log_json)
        check_unknown_env(env, known_env_vars(*all_config_classes()))
        return int(args.func(args) or 0)
    except ZerocfError as exc:
        if not logging.getLogger().handlers:
            setup_logging()
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `zerocf config | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
