"""The questions the query API answers, as SQL on the raw table or a rollup.

Every query is built here, from fixed SQL fragments chosen by name, and every value a
caller supplies (org, API key, endpoint, times, limit) is a server-side bound
parameter ({name:Type}); caller input is never put into SQL text. Every query is
built from a Scope: a caller scoped to one org always has ``org_id = {org:String}``
in its WHERE clause, whatever else it asks for.

Every query runs within Bounds (execution time, memory, read-only), ClickHouse settings
that the server and the embedded engine both enforce by stopping the query; ``bound_hit``
tells which one stopped it. The size of an answer is bounded by the SQL itself (LIMIT,
at most 3661 buckets of a series), not by max_result_rows: with chDB a query stopped by
max_result_rows could leave the next answer on the same client unreadable (IndexError
in the driver, seen when another client had streamed meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from clickhouse_connect.driver.client import Client

from quotaflow.analytics.scope import Scope
from quotaflow.analytics.window import TimeRange
from quotaflow.schemas.clickhouse import latency
from quotaflow.schemas.clickhouse.tables import (
    ALERT_HISTORY,
    DAY_MS,
    DENIAL_STATUS,
    DENIALS_ROLLUPS,
    ENDPOINT_ROLLUP_OF,
    ERROR_MIN_STATUS,
    HOUR_MS,
    KEY_ROLLUP_OF,
    MINUTE_MS,
    ORG_ROLLUP_OF,
    RAW,
    STATUS_ROLLUP_OF,
    Table,
)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_BUCKET_FN = {MINUTE_MS: "toStartOfMinute", HOUR_MS: "toStartOfHour", DAY_MS: "toStartOfDay"}
_ISO = "'%Y-%m-%dT%H:%i:%SZ'"


@dataclass(frozen=True, slots=True)
class Filters:
    org_id: str | None = None  # an operator may pick one org; a scoped caller gets its own
    api_key_id: str | None = None
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Query:
    question: str
    sql: str
    parameters: dict[str, Any]
    columns: tuple[str, ...]
    time_range: TimeRange
    table: Table  # where the answer is read: the time range's table, or a narrower rollup of its grain (org, endpoint, status, key)
    org_id: str | None  # the org the answer is restricted to (None: every org)


# Questions about orgs as a whole: without an API key or endpoint filter, the org-level
# rollup of the time range's grain answers them.
ORG_LEVEL = frozenset({"summary", "volume", "latency", "orgs", "tiers"})
# Questions per endpoint: without an API key filter, the endpoint-level rollup of the time
# range's grain answers them (an endpoint filter is one of its columns).
ENDPOINT_LEVEL = frozenset({"endpoints"})
# Questions that count requests by status code: without an API key or endpoint filter, the
# status-level rollup of the time range's grain answers them (hour and day grains).
STATUS_LEVEL = frozenset({"status_series", "status"})
# Questions that count requests by API key: without an endpoint filter, the key-level rollup
# of the time range's grain answers them (an API key filter is one of its columns).
KEY_LEVEL = frozenset({"api_keys", "denials"})


class _Source:
    """Aggregate expressions over the raw table or a rollup: the same question reads
    count() from raw events, sum(requests) from a rollup, sum(denials) from an
    org-level rollup (which has no status column)."""

    def __init__(self, table: Table, step_ms: int):
        raw = table.name == RAW
        self.time = "toDateTime(event_time)" if raw else "bucket"
        self.requests = "count()" if raw else "sum(requests)"
        self.errors = f"countIf(status >= {ERROR_MIN_STATUS})" if raw else "sum(errors)"
        if raw:
            self.denials = f"countIf(status = {DENIAL_STATUS})"
        elif table in DENIALS_ROLLUPS:
            self.denials = "sum(denials)"
        else:
            self.denials = f"sumIf(requests, status = {DENIAL_STATUS})"
        self.count_if = "countIf({})" if raw else "sumIf(requests, {})"  # requests whose row meets a condition
        self.request_bytes = "sum(request_bytes)"
        self.response_bytes = "sum(response_bytes)"
        self.latency = latency.quantiles_sql(raw)  # [p50, p95, p99] in ms, the same way from any table
        self.bucket = f"{_BUCKET_FN[step_ms]}({self.time})"


def _tenant(conds: list[str], params: dict[str, Any], org_id: str | None, filters: Filters) -> None:
    """The org and API key conditions every question's filter has, bound as parameters."""
    if org_id is not None:
        conds.append("org_id = {org:String}")
        params["org"] = org_id
    if filters.api_key_id is not None:
        conds.append("api_key_id = {api_key:String}")
        params["api_key"] = filters.api_key_id


def _where(table: Table, time_range: TimeRange, org_id: str | None, filters: Filters) -> tuple[str, dict[str, Any]]:
    if table.name == RAW:
        conds = ["event_time >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')",
                 "event_time < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')"]
    else:
        conds = ["bucket >= toDateTime({start_s:Int64}, 'UTC')", "bucket < toDateTime({end_s:Int64}, 'UTC')"]
    params: dict[str, Any] = {"start_ms": time_range.start_ms, "end_ms": time_range.end_ms,
                              "start_s": time_range.start_ms // 1000, "end_s": time_range.end_ms // 1000}
    _tenant(conds, params, org_id, filters)
    if filters.endpoint is not None:
        conds.append("endpoint = {endpoint:String}")
        params["endpoint"] = filters.endpoint
    return " AND ".join(conds), params


# SQL aliases (n, n_errors, ...) differ from the rollup's column names on purpose: in
# ClickHouse an alias shadows a column of the same name in the whole SELECT, so
# ``sum(requests) AS requests`` would turn ``sumIf(requests, ...)`` into a nested
# aggregate. The answer's column names are Query.columns, matched by position.


def _summary(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    # No requests: no latency (NULL), rather than the figure of an empty state.
    sql = f"""
SELECT n, n_errors, if(n = 0, 0, n_errors / n), n_denials, bytes_in, bytes_out,
       if(n = 0, NULL, lat[1]), if(n = 0, NULL, lat[2]), if(n = 0, NULL, lat[3])
FROM (SELECT {s.requests} AS n, {s.errors} AS n_errors, {s.denials} AS n_denials,
             {s.request_bytes} AS bytes_in, {s.response_bytes} AS bytes_out, {s.latency} AS lat
      FROM {table} WHERE {where})"""
    return sql, ("requests", "errors", "error_rate", "denials", "request_bytes", "response_bytes",
                 "p50_ms", "p95_ms", "p99_ms")


def _volume(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    # Buckets without requests are filled in with zeros: a series has every step.
    sql = f"""
SELECT formatDateTime(b, {_ISO}, 'UTC') AS bucket_iso, n, n_errors, n_denials
FROM (SELECT {s.bucket} AS b, {s.requests} AS n, {s.errors} AS n_errors, {s.denials} AS n_denials
      FROM {table} WHERE {where} GROUP BY b
      ORDER BY b WITH FILL FROM toDateTime({{fill_from_s:Int64}}, 'UTC') TO toDateTime({{end_s:Int64}}, 'UTC')
                          STEP toIntervalSecond({{step_s:UInt32}}))
ORDER BY bucket_iso"""
    return sql, ("bucket", "requests", "errors", "denials")


def _status_series(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    # Requests per bucket and status class, 429 denials apart from the other 4xx; every
    # step is filled in as in volume. Key-level tables only: org rollups have no status.
    classes = [("1xx", "status < 200"), ("2xx", "status >= 200 AND status < 300"),
               ("3xx", "status >= 300 AND status < 400"), ("4xx", f"status >= 400 AND status < 500 AND status != {DENIAL_STATUS}"),
               ("429", f"status = {DENIAL_STATUS}"), ("5xx", "status >= 500")]
    counts = ", ".join(s.count_if.format(cond) + f" AS n_{name}" for name, cond in classes)
    sql = f"""
SELECT formatDateTime(b, {_ISO}, 'UTC') AS bucket_iso, n, {", ".join(f"n_{name}" for name, _ in classes)}
FROM (SELECT {s.bucket} AS b, {s.requests} AS n, {counts}
      FROM {table} WHERE {where} GROUP BY b
      ORDER BY b WITH FILL FROM toDateTime({{fill_from_s:Int64}}, 'UTC') TO toDateTime({{end_s:Int64}}, 'UTC')
                          STEP toIntervalSecond({{step_s:UInt32}}))
ORDER BY bucket_iso"""
    return sql, ("bucket", "requests", *(f"status_{name}" for name, _ in classes))


def _latency(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    # Buckets without requests are left out: no requests is not a latency of 0 ms.
    sql = f"""
SELECT formatDateTime(b, {_ISO}, 'UTC') AS bucket_iso, n, lat[1], lat[2], lat[3]
FROM (SELECT {s.bucket} AS b, {s.requests} AS n, {s.latency} AS lat FROM {table} WHERE {where} GROUP BY b)
ORDER BY bucket_iso"""
    return sql, ("bucket", "requests", "p50_ms", "p95_ms", "p99_ms")


def _status(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    sql = f"""
SELECT concat(toString(intDiv(code, 100)), 'xx') AS class, code, n, n / sum(n) OVER (),
       sum(n) OVER (PARTITION BY class) AS n_class, n_class / sum(n) OVER ()
FROM (SELECT status AS code, {s.requests} AS n FROM {table} WHERE {where} GROUP BY code)
ORDER BY code"""
    return sql, ("status_class", "status", "requests", "rate", "class_requests", "class_rate")


def _endpoints(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    sql = f"""
SELECT m, e, n, n_errors, if(n = 0, 0, n_errors / n), lat[2]
FROM (SELECT method AS m, endpoint AS e, {s.requests} AS n, {s.errors} AS n_errors, {s.latency} AS lat
      FROM {table} WHERE {where} GROUP BY m, e)
ORDER BY n DESC, e, m
LIMIT {{limit:UInt32}}"""
    return sql, ("method", "endpoint", "requests", "errors", "error_rate", "p95_ms")


def _ranking(column: str) -> Callable[[_Source, str, str], tuple[str, tuple[str, ...]]]:
    """Totals per value of ``column`` (one of ours, never a caller's), largest first."""

    def make(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
        sql = f"""
SELECT {column}, {s.requests} AS n, {s.errors} AS n_errors, {s.denials} AS n_denials,
       {s.request_bytes} AS bytes_in, {s.response_bytes} AS bytes_out
FROM {table} WHERE {where}
GROUP BY {column}
ORDER BY n DESC, {column}
LIMIT {{limit:UInt32}}"""
        return sql, (column, "requests", "errors", "denials", "request_bytes", "response_bytes")

    return make


_orgs = _ranking("org_id")
_api_keys = _ranking("api_key_id")


def _tiers(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    # The tier each row was stored with: the org's tier at request time ('' = unknown).
    sql = f"""
SELECT tier, uniqExact(org_id), {s.requests} AS n, {s.errors} AS n_errors, {s.denials} AS n_denials,
       {s.request_bytes} AS bytes_in, {s.response_bytes} AS bytes_out
FROM {table} WHERE {where}
GROUP BY tier
ORDER BY n DESC, tier"""
    return sql, ("tier", "orgs", "requests", "errors", "denials", "request_bytes", "response_bytes")


def _denials(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    # Rate-limit denials are the requests answered with 429, per API key.
    sql = f"""
SELECT k, n_denials, n, n_denials / n
FROM (SELECT api_key_id AS k, {s.denials} AS n_denials, {s.requests} AS n FROM {table} WHERE {where} GROUP BY k)
WHERE n_denials > 0
ORDER BY n_denials DESC, k
LIMIT {{limit:UInt32}}"""
    return sql, ("api_key_id", "denials", "requests", "denial_rate")


# The alert history (schemas/clickhouse/0006): transitions and delivery attempts, oldest
# first, read with FINAL so that a record stored twice is one row. Not a rollup: every
# time range reads the one table, filtered by the row's time.
ALERT_HISTORY_TABLE = Table(ALERT_HISTORY, "at", "toDateTime(at)", 0, "retention_raw_days")
OWN_TABLE = frozenset({"alerts"})  # questions that read a table of their own, not the requests or a rollup


def _alerts(s: _Source, table: str, where: str) -> tuple[str, tuple[str, ...]]:
    sql = f"""
SELECT formatDateTime(at, {_ISO}), toUnixTimestamp64Milli(at), record, org_id, api_key_id, rule_org_id, rule_id,
       rule_type, severity, kind, episode, from_status, to_status, value, threshold, notification_id, muted,
       channel, attempt, outcome, error, fingerprint
FROM {table} FINAL WHERE {where}
ORDER BY at, row_id
LIMIT {{limit:UInt32}}"""
    return sql, ("at", "at_ms", "record", "org_id", "api_key_id", "rule_org_id", "rule_id", "rule_type", "severity",
                 "kind", "episode", "from_status", "to_status", "value", "threshold", "notification_id", "muted",
                 "channel", "attempt", "outcome", "error", "fingerprint")


def _alerts_where(time_range: TimeRange, org_id: str | None, filters: Filters) -> tuple[str, dict[str, Any]]:
    conds = ["at >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')",
             "at < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')"]
    params: dict[str, Any] = {"start_ms": time_range.start_ms, "end_ms": time_range.end_ms}
    _tenant(conds, params, org_id, filters)
    if filters.endpoint is not None:  # alerts are about orgs and keys, never an endpoint: no row matches
        conds.append("length({endpoint:String}) = 0")
        params["endpoint"] = filters.endpoint
    return " AND ".join(conds), params


QUESTIONS: dict[str, Callable[[_Source, str, str], tuple[str, tuple[str, ...]]]] = {
    "summary": _summary,
    "volume": _volume,
    "status_series": _status_series,
    "latency": _latency,
    "status": _status,
    "endpoints": _endpoints,
    "orgs": _orgs,
    "tiers": _tiers,
    "api_keys": _api_keys,
    "denials": _denials,
    "alerts": _alerts,
}


def build(question: str, scope: Scope, time_range: TimeRange, filters: Filters = Filters(),
          limit: int = DEFAULT_LIMIT) -> Query:
    """The query answering ``question`` for ``scope``; raises Forbidden if the scope may
    not read the org asked for, KeyError for an unknown question."""
    make = QUESTIONS[question]
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    org_id = scope.org_filter(filters.org_id)
    if question == "alerts":
        where, params = _alerts_where(time_range, org_id, filters)
        sql, columns = _alerts(_Source(time_range.table, time_range.step_ms), ALERT_HISTORY, where)
        params.update(limit=limit)
        return Query(question, sql.strip(), params, columns, time_range, ALERT_HISTORY_TABLE, org_id)
    table = time_range.table
    if question in ORG_LEVEL and filters.api_key_id is None and filters.endpoint is None and table.name in ORG_ROLLUP_OF:
        table = ORG_ROLLUP_OF[table.name]
    elif question in ENDPOINT_LEVEL and filters.api_key_id is None and table.name in ENDPOINT_ROLLUP_OF:
        table = ENDPOINT_ROLLUP_OF[table.name]
    elif question in STATUS_LEVEL and filters.api_key_id is None and filters.endpoint is None \
            and table.name in STATUS_ROLLUP_OF:
        table = STATUS_ROLLUP_OF[table.name]
    elif question in KEY_LEVEL and filters.endpoint is None and table.name in KEY_ROLLUP_OF:
        table = KEY_ROLLUP_OF[table.name]
    where, params = _where(table, time_range, org_id, filters)
    sql, columns = make(_Source(table, time_range.step_ms), table.name, where)
    params.update(limit=limit, step_s=time_range.step_ms // 1000,
                  fill_from_s=(time_range.start_ms - time_range.start_ms % time_range.step_ms) // 1000)
    return Query(question, sql.strip(), params, columns, time_range, table, org_id)


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one query may use. ClickHouse stops a query that goes beyond either of them
    (TIMEOUT_EXCEEDED, MEMORY_LIMIT_EXCEEDED); the embedded engine (chDB) honours both as
    a server does."""

    max_execution_time_s: float = 30.0
    max_memory_usage: int = 1024 ** 3

    def settings(self) -> dict[str, Any]:
        return {"max_execution_time": self.max_execution_time_s, "timeout_overflow_mode": "throw",
                "max_memory_usage": self.max_memory_usage,
                # Reads only, whatever the SQL became; settings (these) may still be set.
                "readonly": 2}


@dataclass(frozen=True, slots=True)
class BoundHit:
    setting: str  # the ClickHouse setting (or limit) that stopped the query
    message: str  # for the caller: which bound, and what to do


def bound_hit(exc: BaseException, bounds: Bounds) -> BoundHit | None:
    """The bound that stopped a query, from the error ClickHouse raised; None if the
    error was something else. The driver raises one type for every server error, so the
    error's name in the message (the same from a server and from chDB) decides."""
    text = str(exc)
    if "TIMEOUT_EXCEEDED" in text:
        return BoundHit("max_execution_time", f"query exceeded max_execution_time={bounds.max_execution_time_s:g}s; "
                                              "ask for a shorter range or try again later")
    if "MEMORY_LIMIT_EXCEEDED" in text:
        if "Query memory limit" in text or "max_memory_usage" in text:
            return BoundHit("max_memory_usage", f"query exceeded max_memory_usage={bounds.max_memory_usage} bytes; "
                                                "ask for a shorter range or fewer rows")
        return BoundHit("server_memory", "the analytics store is short of memory (its total limit); try again later")
    if "TOO_MANY_ROWS_OR_BYTES" in text or "TOO_MANY_ROWS" in text:  # a server profile's own limits
        return BoundHit("rows", "query exceeded the analytics store's limit on rows; ask for a shorter range")
    return None


def run(client: Client, query: Query, bounds: Bounds = Bounds()) -> list[dict[str, Any]]:
    """Rows of the answer, each a dict of column -> value."""
    result = client.query(query.sql, parameters=query.parameters, settings=bounds.settings())
    return [dict(zip(query.columns, row, strict=True)) for row in result.result_rows]


def open_stream(client: Client, query: Query, bounds: Bounds = Bounds()) -> Iterator[tuple]:
    """Start the query (errors are raised here) and return its rows as they come from
    ClickHouse, block by block."""
    blocks = client.query_row_block_stream(query.sql, parameters=query.parameters, settings=bounds.settings())

    def rows() -> Iterator[tuple]:
        with blocks:
            for block in blocks:
                yield from block

    return rows()


def ask(client: Client, question: str, scope: Scope, time_range: TimeRange, filters: Filters = Filters(),
        limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """build + run: the Python entry point for one question."""
    return run(client, build(question, scope, time_range, filters, limit))
