"""The ``zerocf`` command: one entry point, one subcommand per stage.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
``run(args) -> int`` function. The environment is read here, once: every ``ZEROCF_*`` variable must be
declared by some config class (a typo is an error, named), and ``args.env`` carries the mapping on to the
command, which builds its frozen config with :func:`stream.config.load`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stream.config import check_unknown_env, known_env_vars, load, setting
from stream.errors import ZerocfError

log = logging.getLogger(__name__)

# Modules that register subcommands, in help order.
COMMAND_MODULES = ("stream.ingest", "stream.produce", "workers.lmf_worker", "workers.als_worker",
                   "workers.lookup_cli", "workers.serve", "workers.evaluation_cli", "workers.demo")
CONFIG_CLASSES = ("stream.config:StreamConfig", "workers.cli:StackConfig", "workers.config:LMFConfig",
                  "workers.config:ALSConfig", "workers.config:ServeConfig")



@dataclass(frozen=True)
class StackConfig:
    """Where ``zerocf stack`` keeps its state file and logs."""

    stack_dir: str = setting("", "STACK_DIR", "directory of the local stack's state and logs "
                                              "(default ~/.cache/zerocf/stack)")

    @property
    def path(self) -> Path:
        return Path(self.stack_dir).expanduser() if self.stack_dir else Path.home() / ".cache/zerocf/stack"


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


def _stack(args: argparse.Namespace) -> int:
    from stream.stack import LocalStack

    cfg = load(StackConfig, args.env, {"stack_dir": args.dir})
    stack = LocalStack(cfg.path)
    if args.action == "up":
        services = stack.up()
        for name, svc in services.items():
            log.info("%s: 127.0.0.1:%d pid %d (log %s)", name, svc.port, svc.pid, svc.log)
        print(" ".join(f"{k}={v}" for k, v in stack.env().items()))
    elif args.action == "down":
        stack.down()
    elif args.action == "status":
        status = stack.status()
        print(json.dumps(status, indent=1))
        return 0 if status["running"] else 1
    elif args.action == "env":
        print("export " + " ".join(f"{k}={v}" for k, v in stack.env().items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerocf", description="zerocf: a streaming, online-learning recommender for implicit feedback (Kafka in, factors in Redis).")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env ZEROCF_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("stack", help="start/stop the local broker + Redis (dev, tests, demo)")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", default=None, help="state directory (env ZEROCF_STACK_DIR)")
    p.set_defaults(func=_stack)
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zerocf`` console script."""
    from stream.runtime import setup_logging

    env = dict(os.environ)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.env = env
    level = args.log_level or env.get("ZEROCF_LOG_LEVEL", "INFO")
    setup_logging(level, env.get("ZEROCF_LOG_JSON", "").lower() in ("1", "true", "yes", "on"))
    try:
        check_unknown_env(env, known_env_vars(*all_config_classes()))
        return int(args.func(args) or 0)
    except ZerocfError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
