"""Versioned DDL migrations from schemas/clickhouse/NNNN_name.sql, applied once each
and recorded in the schema_migrations table (so applying twice is a no-op)."""

from __future__ import annotations

import logging
import re
from importlib import resources

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

MIGRATIONS_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    applied_at DateTime DEFAULT now()
)
ENGINE = MergeTree ORDER BY version
"""


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped, in order."""
    out = []
    for entry in resources.files("quotaflow.schemas.clickhouse").iterdir():
        m = _FILE.match(entry.name)
        if m:
            out.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(out)


def statements(sql: str) -> list[str]:
    """Split a migration into statements on ';' at the end of a line; drop comments."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip()]


def migrate(client: Client, upto: int | None = None) -> list[int]:
    """Apply what is missing (up to version ``upto``, when given); return the versions applied now."""
    client.command(MIGRATIONS_TABLE_DDL)
    done = {row[0] for row in client.query("SELECT version FROM schema_migrations").result_rows}
    applied = []
    for version, name, sql in available():
        if version in done or (upto is not None and version > upto):
            continue
        for stmt in statements(sql):
            client.command(stmt)
        client.insert("schema_migrations", [[version, name]], column_names=["version", "name"])
        log.info("migration applied", extra={"version": version, "migration": name})
        applied.append(version)
    return applied
