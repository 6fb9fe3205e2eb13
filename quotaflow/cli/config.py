"""``quotaflow config check``: the configuration as every command reads it, checked whole,
shown with its secrets hidden."""

from __future__ import annotations

import argparse
import shlex

from quotaflow.cli.registry import Command
from quotaflow.core.settings import Settings, effective


def run_config(args: argparse.Namespace, settings: Settings) -> int:
    # The settings have loaded: each value is typed and checked (a bad one stopped the
    # command with a line naming it). What is checked here besides is what the stages
    # check when they start.
    from quotaflow.analytics.app import check_tokens
    from quotaflow.schemas.limits import policy_from_settings

    policy = policy_from_settings(settings)
    check_tokens(settings.api_tokens)
    for variable, value, is_set in effective(settings):
        print(f"{variable}={shlex.quote(value)}" + ("" if is_set else "  # default"))
    kind = "sliding" if settings.sliding_windows else "fixed"
    print(f"configuration valid: {len(policy.windows)} {kind} windows ({', '.join(policy.labels)}), "
          f"{len(policy.tiers)} tiers (default {policy.default_tier}), {len(settings.api_tokens)} API tokens")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check"])


COMMANDS = (
    Command("config", "check the configuration and show it, secrets hidden", run_config,
            description="'check' reads the QUOTAFLOW_* variables as every command does, checks them "
                        "(types, ranges, windows against tier limits, API tokens) and prints each setting "
                        "as a variable, '# default' where it is not set, with URL passwords and API tokens "
                        "shown as ***. An invalid configuration exits with status 2 and one line naming the "
                        "variable, never its value. Nothing is contacted.",
            arguments=_arguments),
)
