"""``quotaflow schema export``: the event JSON Schema, for publishers in other languages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quotaflow.cli.registry import Command
from quotaflow.core.settings import Settings


def run_schema(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.schemas.events import render_json_schema

    data = render_json_schema()
    if args.output == "-":
        sys.stdout.write(data.decode())
    else:
        Path(args.output).write_bytes(data)
        print(f"wrote {args.output}")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["export"])
    p.add_argument("--output", default="-", help="file to write (default: stdout)")


COMMANDS = (
    Command("schema", "export the event JSON Schema for publishers in other languages", run_schema,
            arguments=_arguments),
)
