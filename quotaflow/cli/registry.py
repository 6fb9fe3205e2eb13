"""The commands of ``quotaflow``, one ``Command`` each, from the modules of their groups,
and the argument parser built from them. A new command: a function and a ``Command`` in
its group's module, listed in that module's COMMANDS."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

from quotaflow.core.settings import Settings

Run = Callable[[argparse.Namespace, Settings], int]  # the exit status


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line, in `quotaflow --help`
    run: Run
    description: str | None = None  # in `quotaflow NAME --help`; default: help
    arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda parser: None)
    own_logging: bool = False  # the command sets up logging itself (the Faust worker does)


def host_argument(p: argparse.ArgumentParser) -> None:
    """``--host`` of the commands that serve HTTP: loopback unless told otherwise."""
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: put a "
                                                       "TLS-terminating proxy in front to serve it further)")


def commands() -> tuple[Command, ...]:
    """Every command, in the order `quotaflow --help` lists them: by group."""
    from quotaflow.cli import alerts, config, db, demo, ingest, keys, limits, schema, ship, sql, stack, stages

    return tuple(c for group in (stack, stages, ingest, ship, demo, limits, keys, alerts, schema, db, sql, config)
                 for c in group.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotaflow",
        description="API usage monitoring and rate limiting. Configuration: QUOTAFLOW_* environment variables "
                    "('quotaflow config check' shows them).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands():
        p = sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        command.arguments(p)
        p.set_defaults(command_spec=command)
    return parser
