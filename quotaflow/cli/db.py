"""``quotaflow db migrate``: the ClickHouse schema and its retention."""

from __future__ import annotations

import argparse
import sys

from quotaflow.cli.registry import Command
from quotaflow.core.redact import redact
from quotaflow.core.settings import Settings


def run_db(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.schemas.clickhouse import retention
    from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable, connect
    from quotaflow.schemas.clickhouse.migrate import migrate

    try:
        client = connect(settings.clickhouse_url)
    except ClickHouseUnavailable as exc:
        print(f"quotaflow: {redact(exc)}", file=sys.stderr)
        return 1
    try:
        applied = migrate(client)
        changed = retention.apply(client, settings)
    finally:
        client.close()
    print(f"applied migrations: {applied or 'none (up to date)'}")
    print("retention: " + (", ".join(f"{table} {days} days" for table, days in changed.items())
                           if changed else "unchanged (as configured)"))
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["migrate"])


COMMANDS = (
    Command("db", "ClickHouse schema migrations and retention", run_db,
            description="'migrate' applies the missing migrations and sets each table's TTL from the "
                        "QUOTAFLOW_RETENTION_*_DAYS settings. Run it with the sink stopped.",
            arguments=_arguments),
)
