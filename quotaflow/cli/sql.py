"""``quotaflow sql``: one read-only SQL statement on the analytics store, through the query
API's ``POST /v1/sql`` (analytics/adhoc.py), as an operator."""

from __future__ import annotations

import argparse
import shutil
import sys
import urllib.error
import urllib.request

import orjson

from quotaflow.cli.registry import Command
from quotaflow.core.settings import Settings


def run_sql(args: argparse.Namespace, settings: Settings) -> int:
    # The operator token of this machine's configuration: never given on the command
    # line, where other users' `ps` would show it.
    token = next((t for t, org in settings.api_tokens.items() if org == "*"), None)
    if token is None:
        print("quotaflow: sql needs an operator token ('*') in QUOTAFLOW_API_TOKENS", file=sys.stderr)
        return 2
    statement = sys.stdin.read() if args.statement == "-" else args.statement
    base = (args.url or f"http://127.0.0.1:{settings.api_port}").rstrip("/")
    request = urllib.request.Request(f"{base}/v1/sql?format={args.format}", data=statement.encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "text/plain; charset=utf-8"})
    try:
        with urllib.request.urlopen(request, timeout=settings.api_query_timeout_s + 30) as response:
            shutil.copyfileobj(response, sys.stdout.buffer)
            sys.stdout.flush()
    except urllib.error.HTTPError as exc:
        try:
            reason = orjson.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            reason = exc.reason
        print(f"quotaflow: {exc.code}: {reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"quotaflow: cannot reach the query API at {base}: {getattr(exc, 'reason', exc)} "
              "(with the embedded engine the sink serves it: quotaflow stack start)", file=sys.stderr)
        return 1
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("statement", help="one SQL statement, or - to read it from standard input")
    p.add_argument("--format", choices=["csv", "json", "parquet"], default="csv", help="output format (default csv)")
    p.add_argument("--url", help="the query API (default http://127.0.0.1:QUOTAFLOW_API_PORT)")


COMMANDS = (
    Command("sql", "run one read-only SQL statement on the analytics store (operators)", run_sql,
            description="Runs one statement through the query API's POST /v1/sql with the operator token of "
                        "QUOTAFLOW_API_TOKENS: read-only, within the API's time and memory bounds and at most "
                        "100,000 rows / 64 MiB of answer. Output to standard output as CSV, JSON or Parquet.",
            arguments=_arguments),
)
