"""ClickHouse storage benchmark: sink ingest and dashboard queries, each with its baseline
measured in the same run.

1. Sink ingest: BENCH_SINK_EVENTS events (default 2M: the sink's first second, spent
   filling its first batch, is then a small part of the time) are put on the events topic, in
   records of BENCH_EVENTS_PER_RECORD events (default 500, as the emitter sends them), in
   time order over the last hour, then `quotaflow sink` (a real subprocess, embedded
   engine) is started and timed from its readiness until every row is inserted:
   ``sink_rows_per_s``. Baselines on the same rows: decoding and validating them in
   Python (``sink_decode_rows_per_s``); a direct insert of the already decoded rows
   through the same writer, materialized views included (``direct_insert_rows_per_s``);
   the same with the times shuffled over the hour (``direct_insert_shuffled_times_rows_per_s``,
   the cost of a stream out of time order); and the engine alone inserting the same
   rows from memory (``engine_insert_rows_per_s``). CPU a row, of each process at work:
   ``sink_cpu_us_per_row`` (the sink, its engine included), ``sink_redis_cpu_us_per_row``
   (the duplicate check), ``sink_kafka_cpu_us_per_row``; ``direct_insert_cpu_us_per_row``
   and ``engine_insert_cpu_us_per_row`` beside them. On a machine of few cores these bound
   the sink: its rows/s cannot pass the cores over the CPU a row of all three processes
   (``sink_cpu_bound_rows_per_s``), nor any sink's, with the same duplicate check, the
   cores over the engine's, Redis's and Kafka's (``engine_cpu_bound_rows_per_s``).
2. Queries: BENCH_QUERY_EVENTS events (default 10M) generated inside ClickHouse
   (INSERT ... SELECT FROM numbers(), through the rollup views), then a dashboard of
   questions (analytics/queries.py) for one org over 1h/24h/7d/30d plus an org
   ranking over every org, each asked through the rollup the API would pick and,
   for the same question and range, from the raw table: ``rollup_query_p50/p95_ms``
   and ``raw_query_p50/p95_ms``.

Run: QUOTAFLOW_BENCH_PORT_BASE=35000 .venv/bin/python bench/clickhouse.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from types import SimpleNamespace

import harness  # sets the isolated environment; settings are read later, in harness.up()
import orjson
from aiokafka import AIOKafkaProducer

from quotaflow.analytics import queries
from quotaflow.analytics.scope import Scope
from quotaflow.analytics.window import for_timeframe
from quotaflow.core import metrics
from quotaflow.deploy import stack
from quotaflow.deploy.observe import group_lag
from quotaflow.deploy.procs import Proc
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate
from quotaflow.schemas.clickhouse.tables import RAW_TABLE
from quotaflow.schemas.events import FIELD_NAMES
from quotaflow.schemas.topics import EVENTS_TOPIC, SINK_CLICKHOUSE_GROUP
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import to_rows
from quotaflow.sinks.clickhouse.writer import INSERT_SETTINGS, Writer

SINK_EVENTS = int(os.environ.get("BENCH_SINK_EVENTS", 2_000_000))
QUERY_EVENTS = int(os.environ.get("BENCH_QUERY_EVENTS", 10_000_000))
SINK_BATCH = int(os.environ.get("QUOTAFLOW_SINK_BATCH_SIZE", 10_000))
ROUNDS = int(os.environ.get("BENCH_QUERY_ROUNDS", 5))
BATCH_EVENTS = int(os.environ.get("BENCH_EVENTS_PER_RECORD", 500))  # the emitter's default
SPAN_MS = 3_600_000  # the sink's events are spread over the last hour
ENDPOINTS = ("/v1/orders", "/v1/orders/{id}", "/v1/users/{id}", "/v1/search", "/v1/carts/{id}/items")


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def sink_events(n: int) -> list[tuple[bytes, bytes]]:
    """(key, value) records carrying n valid events over the last hour, as the Python
    emitter publishes a stream of requests: events in time order (within a second), each
    record the next BATCH_EVENTS events of one org, records in the order they fill up."""
    rnd = random.Random(7)
    # Ids of their own each run: the sink's duplicate check remembers the last run's for its window.
    ids = random.Random()
    now = int(time.time() * 1000)
    by_org: dict[str, list[bytes]] = {}
    out = []

    def emit(org: str) -> None:
        chunk = by_org.pop(org)
        out.append((org.encode(), chunk[0] if len(chunk) == 1 else b"[" + b",".join(chunk) + b"]"))

    for i in range(n):
        org = f"ingest-{rnd.randrange(50)}"
        by_org.setdefault(org, []).append(orjson.dumps({
            "schema_version": 1, "event_id": str(uuid.UUID(int=ids.getrandbits(128), version=4)),
            "ts_ms": now - SPAN_MS + i * SPAN_MS // n - rnd.randrange(1000), "org_id": org,
            "api_key_id": f"{org}-k{i % 5}", "service": "bench", "endpoint": ENDPOINTS[i % len(ENDPOINTS)],
            "method": "GET", "status": (200, 200, 200, 404, 429, 500)[i % 6], "latency_ms": rnd.uniform(1, 500),
            "request_bytes": rnd.randrange(2000), "response_bytes": rnd.randrange(20_000),
            "client_ip": f"198.51.100.{i % 250}", "user_agent": "bench/1.0"}))
        if len(by_org[org]) == BATCH_EVENTS:
            emit(org)
    for org in list(by_org):
        emit(org)
    return out


async def produce(bootstrap: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, compression_type="zstd",
                                linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        pending = []
        for key, value in records:
            pending.append(await producer.send(EVENTS_TOPIC, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def record_batches(recs: list, max_records: int, max_bytes: int) -> list[list]:
    """Records grouped as the sink groups them: by count and by bytes."""
    batches, cur, size = [], [], 0
    for rec in recs:
        if cur and (len(cur) >= max_records or size + len(rec.value) > max_bytes):
            batches.append(cur)
            cur, size = [], 0
        cur.append(rec)
        size += len(rec.value)
    return batches + [cur] if cur else batches


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system, all threads) a process has used so far; 0 when unknown."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | None) -> float:
    """The most resident memory a process has held so far (VmHWM), in MiB; 0 when unknown."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return 0.0


def bench_direct_insert(settings, records: list[tuple[bytes, bytes]]) -> float:
    """Baselines on the same events: Python decode; the insert of decoded rows through the
    sink's writer (encoding + engine); the engine alone inserting the same rows, whose CPU
    a row (us) it returns."""
    arrived_ms = int(time.time() * 1000)  # the broker's time of each record, which to_rows judges events by
    recs = [SimpleNamespace(topic=EVENTS_TOPIC, partition=0, offset=i, key=k, value=v, headers=(), timestamp=arrived_ms)
            for i, (k, v) in enumerate(records)]
    started, cpu = time.perf_counter(), time.process_time()
    batches = []
    for group in record_batches(recs, SINK_BATCH, settings.sink_batch_bytes):
        rows = to_rows(group)
        rows.set_tiers({o: "FREE" for o in rows.org_ids})
        batches.append(rows)
    n = sum(len(rows) for rows in batches)
    harness.report("sink_decode_rows_per_s", n / (time.perf_counter() - started), "rows/s")
    log(f"decode: {(time.process_time() - cpu) / n * 1e6:.2f} us of CPU a row")
    log(f"{n} rows in {len(batches)} batches of up to {SINK_BATCH} records / {settings.sink_batch_bytes} bytes")
    # An engine of its own: its parts are not merged in the background while the sink is timed.
    path = settings.state_dir / "clickhouse-baseline"
    shutil.rmtree(path, ignore_errors=True)
    client = connect(f"chdb://{path}")
    try:
        migrate(client)
        writer = Writer(client)
        started, cpu = time.perf_counter(), time.process_time()
        for i, rows in enumerate(batches):
            writer.insert(rows, Range("bench-baseline", 0, i, i).token() + uuid.uuid4().hex)
        harness.report("direct_insert_rows_per_s", n / (time.perf_counter() - started), "rows/s")
        # Encoding and the engine (parse, views, parts): the engine runs in this process.
        harness.report("direct_insert_cpu_us_per_row", (time.process_time() - cpu) / n * 1e6, "us")
        client.command("CREATE TABLE bench_stage ENGINE = Memory AS SELECT * FROM requests")  # for the engine alone
        # The same rows with their times shuffled over the hour, as if every record of a
        # backlog spanned all of it: what the order of a real stream saves the engine.
        ts = FIELD_NAMES.index("ts_ms")
        times = [t for rows in batches for t in rows.fields[ts]]
        random.Random(11).shuffle(times)
        shuffled, lo = [], 0
        for rows in batches:
            fields = [*rows.fields[:ts], times[lo:lo + len(rows)], *rows.fields[ts + 1:]]
            shuffled.append(dataclasses.replace(rows, fields=fields))
            lo += len(rows)
        started = time.perf_counter()
        for i, rows in enumerate(shuffled):
            writer.insert(rows, Range("bench-shuffled", 0, i, i).token() + uuid.uuid4().hex)
        harness.report("direct_insert_shuffled_times_rows_per_s", n / (time.perf_counter() - started), "rows/s")
        # The engine alone: the same rows again, from the table in memory, through the same views.
        block = max(len(rows) for rows in batches)
        started, cpu = time.perf_counter(), time.process_time()
        client.command("INSERT INTO requests SELECT * FROM bench_stage",
                       settings={**INSERT_SETTINGS, "max_insert_block_size": block, "min_insert_block_size_rows": block})
        harness.report("engine_insert_rows_per_s", n / (time.perf_counter() - started), "rows/s")
        # What any sink pays per row in the engine, even with nothing to parse: with the
        # duplicate check's and Kafka's CPU (bench_sink) it bounds what the cores can store.
        engine_us = (time.process_time() - cpu) / n * 1e6
        harness.report("engine_insert_cpu_us_per_row", engine_us, "us")
        client.command("DROP TABLE bench_stage")
        return engine_us
    finally:
        client.close()
        shutil.rmtree(path, ignore_errors=True)


def bench_sink(settings, n: int) -> dict[str, float]:
    """Times the sink; returns the CPU a row (us) of the sink, Redis and Kafka processes."""
    env = {**os.environ, "QUOTAFLOW_SINK_BATCH_SIZE": str(SINK_BATCH)}
    started = time.perf_counter()
    pids = {"sink": stack.start_pipeline_process(settings, "sink", env=env),
            "redis": Proc("redis", settings.state_dir / "run").pid(), "kafka": Proc("kafka", settings.state_dir / "run").pid()}
    ready = time.perf_counter()
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    log(f"sink ready after {ready - started:.1f} s (engine open, migrations, group join)")
    port = settings.sink_metrics_port
    while metrics.scrape(port).get("quotaflow_sink_rows_inserted_total", 0) < n:
        time.sleep(0.1)
    done = time.perf_counter()
    log(f"sink: peak resident memory {peak_rss_mb(pids['sink']):.0f} MiB (batches of up to "
        f"{settings.sink_batch_bytes >> 20} MiB of records)")
    per_row = {name: (cpu_seconds(pid) - cpu[name]) / n * 1e6 for name, pid in pids.items()}
    for name, us in per_row.items():  # the sink's own, and what it costs Redis (duplicate check) and Kafka
        harness.report("sink_cpu_us_per_row" if name == "sink" else f"sink_{name}_cpu_us_per_row", us, "us")
    scraped = metrics.scrape(port)
    inserts = scraped.get("quotaflow_sink_insert_seconds_count", 0)
    if inserts:
        log(f"sink: {inserts:.0f} inserts, {n / inserts:.0f} rows and "
            f"{scraped['quotaflow_sink_insert_seconds_sum'] / inserts * 1000:.0f} ms each on average")
    steps = {name.split('"')[1]: value for name, value in scraped.items()
             if name.startswith("quotaflow_sink_step_seconds_total{")}
    batches = scraped.get("quotaflow_sink_insert_seconds_count", 0) or 1
    log("sink steps, ms per batch (us per row): " + ", ".join(
        f"{step} {seconds / batches * 1000:.0f} ({seconds / n * 1e6:.2f})" for step, seconds in steps.items()))
    while asyncio.run(group_lag(settings.kafka_bootstrap, SINK_CLICKHOUSE_GROUP, EVENTS_TOPIC)):
        time.sleep(0.2)
    stack.pipeline_proc(settings, "sink").stop()
    harness.report("sink_rows_per_s", n / (done - ready), "rows/s")
    log(f"sink batch size {SINK_BATCH}; {n} rows in {done - ready:.1f} s")
    return per_row


GENERATE = """
INSERT INTO requests (event_id, event_time, org_id, api_key_id, service, endpoint, method, status, latency_ms,
                      request_bytes, response_bytes, client_ip, user_agent, schema_version, kafka_partition,
                      kafka_offset, tier)
SELECT generateUUIDv4(number),
       fromUnixTimestamp64Milli(toInt64({now_ms:Int64} - intDiv(number * {span_ms:Int64}, {n:UInt64})), 'UTC'),
       concat('org-', toString(h)), concat('org-', toString(h), '-key-', toString(number % 7)),
       'bench', arrayElement({endpoints:Array(String)}, 1 + number % 5), if(number % 4 = 0, 'POST', 'GET'),
       arrayElement([200, 200, 200, 201, 204, 400, 404, 429, 500, 503], 1 + intHash32(number) % 10),
       (intHash32(number * 3) % 100000) / 100.0, intHash32(number * 5) % 5000, intHash32(number * 7) % 50000,
       toIPv6('::ffff:198.51.100.7'), 'bench/1.0', 1, 0, number,
       arrayElement(['FREE', 'STARTER', 'PROFESSIONAL', 'SCALE', 'ENTERPRISE'], 1 + h % 5)
-- 100 orgs; org-0, the largest customer, sends a fifth of all requests
FROM (SELECT number, if(intHash64(number) % 5 = 0, 0, 1 + intHash64(number * 11) % 99) AS h
      FROM numbers({lo:UInt64}, {count:UInt64}))
"""


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def bench_queries(url: str, n: int) -> None:
    client = connect(url)
    try:
        migrate(client)
        started = time.perf_counter()
        now_ms, chunk = int(time.time() * 1000), 1_000_000  # chunks: bounded memory for the views' states
        for lo in range(0, n, chunk):
            client.command(GENERATE, parameters={"now_ms": now_ms, "span_ms": 30 * 86_400_000, "n": n, "lo": lo,
                                                 "count": min(chunk, n - lo), "endpoints": list(ENDPOINTS)},
                           settings={"max_partitions_per_insert_block": 0})
        harness.report("generate_query_events_s", time.perf_counter() - started, "s")
        log(f"{n} events generated into requests and its rollups")
        org = "org-0"
        orgs_in = client.query("SELECT count() FROM requests WHERE org_id = {o:String}", parameters={"o": org})
        log(f"{org} holds {orgs_in.result_rows[0][0]} of {n} events")
        days = retention.wanted_days(harness.get_settings())
        questions = ("summary", "volume", "latency", "status", "endpoints", "api_keys", "denials")
        timed: dict[str, list[float]] = {"rollup": [], "raw": []}
        for _ in range(ROUNDS):
            now = int(time.time() * 1000)
            for timeframe in ("1h", "24h", "7d", "30d"):
                window = for_timeframe(timeframe, now, days)
                asks = [(q, Scope.org(org)) for q in questions] + [("orgs", Scope.operator())]
                for question, scope in asks:
                    for source, w in (("rollup", window), ("raw", dataclasses.replace(window, table=RAW_TABLE))):
                        query = queries.build(question, scope, w, limit=100)
                        t = time.perf_counter()
                        rows = queries.run(client, query)
                        timed[source].append((time.perf_counter() - t) * 1000)
                        assert rows or question == "denials", (question, timeframe, source)
        for source in ("rollup", "raw"):
            harness.report(f"{source}_query_p50_ms", percentile(timed[source], 0.50), "ms")
            harness.report(f"{source}_query_p95_ms", percentile(timed[source], 0.95), "ms")
        log(f"{len(timed['rollup'])} queries per source: 8 questions x 4 timeframes x {ROUNDS} rounds")
    finally:
        client.close()


def main() -> None:
    settings = harness.get_settings()
    started = stack.up(settings)
    try:
        run(settings)
    finally:
        stack.down(settings, only=["sink", *started])


def run(settings) -> None:
    stack.pipeline_proc(settings, "sink").stop()
    shutil.rmtree(settings.state_dir / "clickhouse", ignore_errors=True)  # a fresh engine every run
    # Whatever earlier runs left on the topic is skipped: the sink starts from the end.
    asyncio.run(_skip_old_events(settings))
    log(f"producing {SINK_EVENTS} events to Kafka")
    records = sink_events(SINK_EVENTS)
    asyncio.run(produce(settings.kafka_bootstrap, records))
    engine_us = bench_direct_insert(settings, records)
    sink_us = bench_sink(settings, SINK_EVENTS)
    cores = os.cpu_count() or 1
    # Every core busy, with nothing else to do: what the sink could store at most on this
    # machine, and what any sink could that stores through these tables with the same
    # duplicate check (Redis) and reading (Kafka), if nothing else cost anything: no
    # decoding, no validation, no parsing in the engine.
    harness.report("sink_cpu_bound_rows_per_s", cores * 1e6 / sum(sink_us.values()), "rows/s")
    harness.report("engine_cpu_bound_rows_per_s", cores * 1e6 / (engine_us + sink_us["redis"] + sink_us["kafka"]),
                   "rows/s")
    bench_queries(settings.clickhouse_url, QUERY_EVENTS)


async def _skip_old_events(settings) -> None:
    """Commit the sink group at the end of the events topic."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from quotaflow.deploy.observe import end_offsets

    ends = await end_offsets(settings.kafka_bootstrap, EVENTS_TOPIC)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=SINK_CLICKHOUSE_GROUP,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(EVENTS_TOPIC, p) for p in ends]
        consumer.assign(tps)
        await consumer.commit({tp: ends[tp.partition] for tp in tps})
    finally:
        await consumer.stop()


if __name__ == "__main__":
    main()
