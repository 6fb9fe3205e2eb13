"""The ``quotaflow`` command. Every setting comes from QUOTAFLOW_* environment variables
(quotaflow/core/settings.py); flags only choose what to do.

One module per group of commands (stack.py, stages.py, limits.py, config.py, ...), each
listing its ``Command``s; registry.py builds the parser from them. Here: loading the
settings and turning every failure into one line on stderr, never a traceback with a
secret in it."""

from __future__ import annotations

import sys

from quotaflow.cli import failures
from quotaflow.cli.registry import build_parser
from quotaflow.core.logs import setup_logging
from quotaflow.core.redact import redact
from quotaflow.core.settings import ConfigError, describe_error, get_settings

# Exit statuses besides 0 and a command's own: a configuration to fix, a failure at run time.
INVALID_CONFIGURATION = 2
FAILED = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command_spec
    try:
        settings = get_settings()
    except Exception as exc:  # names the variable and the problem, never the value
        print(f"quotaflow: invalid configuration: {describe_error(exc)}", file=sys.stderr)
        return INVALID_CONFIGURATION
    if not command.own_logging:
        setup_logging(settings.log_level, settings.log_format)
    try:
        return command.run(args, settings)
    except ConfigError as exc:
        print(f"quotaflow: invalid configuration: {' '.join(redact(exc).split())}", file=sys.stderr)
        return INVALID_CONFIGURATION
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = failures.describe(exc, settings)
        if message is not None:
            print(f"quotaflow: {message}", file=sys.stderr)
        else:  # a bug: the traceback helps, with its secrets hidden
            import traceback

            print("quotaflow: unexpected error (please report it):\n" + redact(traceback.format_exc()).rstrip(),
                  file=sys.stderr)
        return FAILED
