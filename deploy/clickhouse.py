"""ClickHouse for the local stack: the embedded engine (chDB) in a directory of the
state dir, opened by whichever process uses it (the sink, normally); or a
server given by QUOTAFLOW_CLICKHOUSE_URL, which is only checked."""

from __future__ import annotations

from pathlib import Path

from quotaflow.core.errors import OperatorError
from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable, connect


def prepare(settings: Settings) -> str:
    """Make sure ClickHouse can be used; return a one-line description."""
    url = settings.clickhouse_url
    if settings.clickhouse_embedded:
        path = Path(url.removeprefix("chdb://"))
        path.mkdir(parents=True, exist_ok=True)
        try:
            import chdb  # noqa: F401  (the embedded engine ships as a wheel)
        except ImportError as exc:
            raise OperatorError(f"the embedded ClickHouse engine (chdb) is not installed: {exc}") from None
        return f"embedded engine (chDB) at {path}"
    try:
        client = connect(url)
        version = client.server_version
        client.close()
    except ClickHouseUnavailable as exc:
        raise OperatorError(str(exc)) from None
    return f"server {url.split('@')[-1]} (ClickHouse {version})"
