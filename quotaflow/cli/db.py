"""``quotaflow db migrate``: the ClickHouse schema and its retention."""

from __future__ import annotations

import argparse
import sys

from quotaflow.cli.registry import Command
from quotaflow.core.redact import redact
from quotaflow.core.settings import Settings


def run_db(args: argparse.Namespace, settings: Settings) -> int:
    if args.cluster is not None:
        from quotaflow.schemas.clickhouse.cluster import check_cluster, script

        try:
            check_cluster(args.cluster)
        except ValueError as exc:
            print(f"quotaflow: {exc}", file=sys.stderr)
            return 2
        sys.stdout.write(script(args.cluster))
        return 0
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
    p.add_argument("--cluster", metavar="NAME",
                   help="print the schema for a ClickHouse server cluster NAME (replicated tables on every "
                        "shard, Distributed tables over them under the usual names), to apply with "
                        "clickhouse-client; nothing is applied or connected to")


COMMANDS = (
    Command("db", "ClickHouse schema migrations and retention", run_db,
            description="'migrate' applies the missing migrations and sets each table's TTL from the "
                        "QUOTAFLOW_RETENTION_*_DAYS settings. Run it with the sink stopped.",
            arguments=_arguments),
)
