"""ClickHouse test data shared by the storage, sink and analytics tests: events and the
Kafka records the sink reads them from, batches stored as the sink stores them, what
the tables should hold (computed here from the events) and what they hold, and bulk
rows for questions heavy enough to hit the query bounds."""

from __future__ import annotations

import math
import random
import struct
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from types import SimpleNamespace

from quotaflow.schemas.clickhouse.latency import ABSOLUTE_ERROR_MS, RELATIVE_ERROR
from quotaflow.schemas.clickhouse import latency
from quotaflow.schemas.clickhouse.tables import KEY_ROLLUPS, LATENCY_QUANTILES, LATENCY_ROLLUPS, RAW, STATUS_ROLLUPS
from quotaflow.schemas.events import RequestEvent
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import to_rows
from quotaflow.sinks.clickhouse.writer import Writer

DAY_S = 86_400
HOUR = 3_600_000  # ms
BULK_KEYS = 50_000


def events(n: int, seed: int, org: str = "acme", now_s: float | None = None) -> list[RequestEvent]:
    """Events over the last three days, spread over keys, endpoints and statuses."""
    rnd = random.Random(seed)
    now_ms = int((now_s or time.time()) * 1000)
    return [RequestEvent.new(
        org_id=org, api_key_id=f"{org}-key-{rnd.randrange(3)}", service="shop",
        endpoint=rnd.choice(["/v1/orders", "/v1/orders/{id}", "/v1/users/{id}"]), method=rnd.choice(["GET", "POST"]),
        status=rnd.choice([200, 200, 200, 201, 404, 429, 500, 503]), latency_ms=round(rnd.uniform(0.5, 900), 3),
        request_bytes=rnd.randrange(0, 5000), response_bytes=rnd.randrange(0, 50_000), client_ip="203.0.113.9",
        user_agent="pytest", ts_ms=now_ms - rnd.randrange(0, 3 * DAY_S * 1000)) for _ in range(n)]


def records(evs: list[RequestEvent], partition: int = 0, first_offset: int = 0) -> list:
    """Kafka records as the consumer hands them to the sink (the fields it reads)."""
    return [SimpleNamespace(topic="quotaflow.requests.v1", partition=partition, offset=first_offset + i,
                            key=e.org_id.encode(), value=e.encode(), timestamp=e.ts_ms, headers=())
            for i, e in enumerate(evs)]


def store(writer: Writer, evs: list[RequestEvent], tiers: dict[str, str], first_offset: int = 0) -> Range:
    recs = records(evs, first_offset=first_offset)
    rows = to_rows(recs)
    rows.set_tiers(tiers)
    batch = Range(recs[0].topic, 0, recs[0].offset, recs[-1].offset)
    writer.insert(rows, batch.token())
    return batch


def float32(x: float) -> float:
    """``x`` as ClickHouse stores it in a Float32 column (latency_ms)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def latency_bounds(latencies: list[float], level: float) -> tuple[float, float]:
    """The values a latency quantile may take (schemas/clickhouse/latency.py): within
    RELATIVE_ERROR (ABSOLUTE_ERROR_MS below LOWEST_MS) of the exact nearest-rank quantile of
    the latencies as stored (Float32), the request of rank ceil(level * n); 1e-9 for the
    rounding of the bucket's bounds."""
    ordered = sorted(map(float32, latencies))
    exact = ordered[max(math.ceil(level * len(ordered)), 1) - 1]
    slack = max(RELATIVE_ERROR * exact, ABSOLUTE_ERROR_MS) + 1e-9 * exact
    return exact - slack, exact + slack


def expected_groups(evs: list[RequestEvent], grain_s: int) -> Counter:
    """Requests per (bucket, org, key, endpoint, method, status), computed here from the events."""
    return Counter((e.ts_ms // 1000 // grain_s * grain_s, e.org_id, e.api_key_id, e.endpoint, e.method, e.status)
                   for e in evs)


def expected_org_groups(evs: list[RequestEvent], grain_s: int, tier: dict[str, str]) -> Counter:
    """Requests per (bucket, org, tier), computed here from the events and the tier of each org."""
    return Counter((e.ts_ms // 1000 // grain_s * grain_s, e.org_id, tier[e.org_id]) for e in evs)


def expected_endpoint_groups(evs: list[RequestEvent], grain_s: int) -> Counter:
    """Requests per (bucket, org, endpoint, method), computed here from the events."""
    return Counter((e.ts_ms // 1000 // grain_s * grain_s, e.org_id, e.endpoint, e.method) for e in evs)


def expected_status_groups(evs: list[RequestEvent], grain_s: int) -> Counter:
    """Requests per (bucket, org, status), computed here from the events."""
    return Counter((e.ts_ms // 1000 // grain_s * grain_s, e.org_id, e.status) for e in evs)


def expected_key_groups(evs: list[RequestEvent], grain_s: int) -> Counter:
    """(requests, 5xx, 429s) per (bucket, org, API key), computed here from the events."""
    out: dict = {}
    for e in evs:
        k = (e.ts_ms // 1000 // grain_s * grain_s, e.org_id, e.api_key_id)
        n, err, den = out.get(k, (0, 0, 0))
        out[k] = (n + 1, err + (e.status >= 500), den + (e.status == 429))
    return Counter(out)


def stored_status_groups(client, table: str) -> Counter:
    sql = f"SELECT toUnixTimestamp(bucket), org_id, status, sum(requests) FROM {table} GROUP BY ALL"
    return Counter({tuple(r[:-1]): r[-1] for r in client.query(sql).result_rows})


def stored_key_groups(client, table: str) -> Counter:
    sql = (f"SELECT toUnixTimestamp(bucket), org_id, api_key_id, sum(requests), sum(errors), sum(denials) "
           f"FROM {table} GROUP BY ALL")
    return Counter({tuple(r[:3]): tuple(r[3:]) for r in client.query(sql).result_rows})


def assert_status_and_key_rollups(client, evs: list[RequestEvent]) -> None:
    """The status-level and key-level rollups (0011) hold each event once, group by group."""
    for table in STATUS_ROLLUPS:
        assert stored_status_groups(client, table.name) == expected_status_groups(evs, table.grain_ms // 1000), \
            table.name
    for table in KEY_ROLLUPS:
        assert stored_key_groups(client, table.name) == expected_key_groups(evs, table.grain_ms // 1000), table.name


def stored_endpoint_groups(client, table: str) -> Counter:
    sql = f"SELECT toUnixTimestamp(bucket), org_id, endpoint, method, sum(requests) FROM {table} GROUP BY ALL"
    return Counter({tuple(r[:-1]): r[-1] for r in client.query(sql).result_rows})


def stored_org_groups(client, table: str) -> Counter:
    sql = f"SELECT toUnixTimestamp(bucket), org_id, tier, sum(requests) FROM {table} GROUP BY ALL"
    return Counter({tuple(r[:-1]): r[-1] for r in client.query(sql).result_rows})


def stored_groups(client, table: str) -> Counter:
    if table == RAW:
        sql = ("SELECT toUnixTimestamp(toStartOfMinute(toDateTime(event_time))), org_id, api_key_id, endpoint, method, "
               "status, count() FROM requests GROUP BY ALL")
    else:
        sql = f"SELECT toUnixTimestamp(bucket), org_id, api_key_id, endpoint, method, status, sum(requests) FROM {table} GROUP BY ALL"
    return Counter({tuple(r[:-1]): r[-1] for r in client.query(sql).result_rows})


def insert_bulk(client, org: str, rows: int, now_ms: int, every_1000th: str | None = None) -> None:
    """Rows straight into the raw table (the rollup views fill the rest): ``org`` over the
    20 hours before now_ms, with many keys and endpoints; every 1000th row of
    ``every_1000th`` instead, if given. Partition 999999 is no Kafka partition, so the
    sink's checks of its own batches never take these rows for its own."""
    other = every_1000th or org
    client.command(f"""
        INSERT INTO requests (event_id, event_time, org_id, api_key_id, service, endpoint, method, status, latency_ms,
                              request_bytes, response_bytes, client_ip, user_agent, schema_version, kafka_partition,
                              kafka_offset, tier)
        SELECT generateUUIDv4(), fromUnixTimestamp64Milli(toInt64({now_ms} - number * 37 % (20 * {HOUR})), 'UTC'),
               if(number % 1000 = 0, {{other:String}}, {{org:String}}), concat('k', toString(number % {BULK_KEYS})),
               's', concat('/v1/e', toString(number % 1000)), 'GET', if(number % 7 = 0, 429, 200), number % 1000, 1, 1,
               toIPv6('::1'), 'ua', 1, 999999, number, 'FREE'
        FROM numbers({rows})""", parameters={"org": org, "other": other})


def insert_latencies(client, org: str, latencies: list[float], now_ms: int, span_ms: int, seed: int) -> None:
    """Rows straight into the raw table, spread over span_ms before now_ms (the views fill
    the rollups), in three blocks: states merged across rows and parts."""
    rnd = random.Random(seed)
    columns = ["event_id", "event_time", "org_id", "api_key_id", "service", "endpoint", "method", "status",
               "latency_ms", "request_bytes", "response_bytes", "client_ip", "user_agent", "schema_version",
               "kafka_partition", "kafka_offset", "tier"]
    rows = [[uuid.UUID(int=i), datetime.fromtimestamp((now_ms - rnd.randrange(span_ms)) / 1000, timezone.utc), org,
             f"k{rnd.randrange(3)}", "s", rnd.choice(["/a", "/b"]), "GET", rnd.choice([200, 500]), x, 0, 0, "::1", "ua",
             1, 999999, i, "FREE"] for i, x in enumerate(latencies)]
    for part in (rows[: len(rows) // 3], rows[len(rows) // 3: 2 * len(rows) // 3], rows[2 * len(rows) // 3:]):
        if part:
            client.insert(RAW, part, column_names=columns, settings={"max_partitions_per_insert_block": 0})


def latency_answers(client, org: str) -> dict[str, list[float]]:
    """An org's p50, p95 and p99 from the raw table and from every rollup."""
    out = {RAW: client.query(f"SELECT {latency.quantiles_sql(raw=True)} FROM {RAW} WHERE org_id = {{o:String}}",
                             parameters={"o": org}).result_rows[0][0]}
    for table in LATENCY_ROLLUPS:
        out[table.name] = client.query(f"SELECT {latency.quantiles_sql(raw=False)} FROM {table.name} "
                                       "WHERE org_id = {o:String}", parameters={"o": org}).result_rows[0][0]
    return out


def check_latencies(answers: dict[str, list[float]], latencies: list[float]) -> None:
    """Every answer within the stated bound of the exact quantile."""
    for level, i in zip(LATENCY_QUANTILES, range(3), strict=True):
        lo, hi = latency_bounds(latencies, level)
        for table, got in answers.items():
            assert lo <= got[i] <= hi, (table, level, got[i], lo, hi)
