"""Retention: each table's TTL set from the retention settings, on every `quotaflow db
migrate` and sink start, so that changing a setting takes effect without a migration.

A TTL is only altered when it differs from the setting: MODIFY TTL makes ClickHouse
recompute the TTL of every existing part, which is not free on a large table.
"""

from __future__ import annotations

import logging
import re

from clickhouse_connect.driver.client import Client

from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse.tables import TABLES, Table

log = logging.getLogger(__name__)
_TTL_DAYS = re.compile(r"\bTTL\s+(.+?)\s*\+\s*toIntervalDay\((\d+)\)")


def wanted_days(settings: Settings) -> dict[str, int]:
    return {t.name: int(getattr(settings, t.retention_setting)) for t in TABLES}


def current_days(client: Client, table: Table) -> int | None:
    """The retention in days of the table's TTL as ClickHouse reports it, or None."""
    rows = client.query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
                        parameters={"t": table.name}).result_rows
    if not rows:
        raise RuntimeError(f"table {table.name} does not exist; run the migrations first")
    m = _TTL_DAYS.search(rows[0][0])
    return int(m.group(2)) if m and m.group(1) == table.ttl_expr else None


def apply(client: Client, settings: Settings) -> dict[str, int]:
    """Set every TTL that differs from the settings; return {table: days} of those changed."""
    days_by_table = wanted_days(settings)
    changed = {}
    for table in TABLES:
        days = days_by_table[table.name]
        if current_days(client, table) == days:
            continue
        # Both parts come from our own constants and an int setting, never from a caller.
        client.command(f"ALTER TABLE {table.name} MODIFY TTL {table.ttl_expr} + INTERVAL {days:d} DAY")
        log.info("retention set", extra={"table": table.name, "days": days})
        changed[table.name] = days
    return changed
