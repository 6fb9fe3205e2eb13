"""``quotaflow demo``: the whole pipeline on the local stack, with traffic, for a while."""

from __future__ import annotations

import argparse
import os

from quotaflow.cli.registry import Command
from quotaflow.core.settings import Settings


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.deploy.demo import run_demo

    return run_demo(settings, seconds=args.seconds)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", 60)),
                   help="how long to send traffic (default: $DEMO_SECONDS or 60)")


COMMANDS = (
    Command("demo", "start everything, drive demo traffic, print a live summary", run_demo,
            description="Starts the stack, the processor and the sink, sends traffic from several orgs "
                        "of different tiers (some over their limits, some invalid), prints a summary "
                        "every 2 s and a final line, then stops what it started.",
            arguments=_arguments),
)
