"""One way to reach ClickHouse: the embedded engine (chdb://PATH) or a server (http(s)://)."""

from __future__ import annotations

from pathlib import Path

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from quotaflow.core.redact import redact


class ClickHouseUnavailable(RuntimeError):
    pass


def connect(url: str) -> Client:
    """A clickhouse-connect client for ``url``. The embedded engine can be open
    in one process at a time; that process is the sink (or whoever runs alone)."""
    if url.startswith("chdb://"):
        Path(url.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    elif not url.startswith(("http://", "https://")):
        raise ValueError(f"QUOTAFLOW_CLICKHOUSE_URL must start with chdb://, http:// or https://, got {redact(url)!r}")
    try:
        if url.startswith("chdb://"):
            return clickhouse_connect.get_client(dsn=url)
        # No session: one client may then serve several threads at once (the query API does).
        return clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)
    except Exception as exc:  # the driver raises several types; all mean the same to callers
        hint = ""
        if url.startswith("chdb://") and "EmbeddedServer" in str(exc):
            hint = " (is another process using the embedded engine? Normally the sink does; stop it first)"
        # The URL may carry a password, and the driver's message may repeat it: both redacted.
        raise ClickHouseUnavailable(redact(f"cannot open ClickHouse at {url}: {exc}{hint}")) from exc
