"""Kafka with three brokers (issue 17 item 4): what a broker SIGKILLed under a stream of
events and started again costs, and the produce throughput of one broker and of three.

1. One broker (the default stack): events produced as fast as the producer core
   (idempotent, acks=all, zstd) takes them; `produce_events_per_s_1_broker`.
2. Three brokers (QUOTAFLOW_KAFKA_BROKERS=3: topics with 3 replicas, min.insync.replicas=2):
   the same; `produce_events_per_s_3_brokers` (each record written to two more brokers
   before it is acknowledged).
3. On the three, the processor and the sink running: a steady stream of events (through the
   producer core with its disk spool, as collectors publish), the broker leading the most
   partitions of the events topic SIGKILLed, the stream kept going with it dead, the broker
   started again, the stream drained. Then every acknowledged event is looked for in the
   processor's counts (Redis) and the sink's rows (ClickHouse):
   `broker_kill_lost_events` (acknowledged, not counted or not stored) and
   `broker_kill_double_counted_events` (counted or stored more than once), the events
   acknowledged, how many went through the spool, the longest stretch without an
   acknowledgement after the kill, and the processor's and the sink's restarts (0: they
   rode it out).

Run: `.venv/bin/python bench/brokers.py` (QUOTAFLOW_BENCH_PORT_BASE as every benchmark).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.ROOT))  # the drill shared with tests/test_kafka_cluster.py

import redis  # noqa: E402

from quotaflow.collector.producer import ProducerCore  # noqa: E402
from quotaflow.collector.spool import Record  # noqa: E402
from quotaflow.core.settings import Settings  # noqa: E402
from quotaflow.deploy import kafka, stack  # noqa: E402
from quotaflow.schemas.events import encode_batch, partition_key  # noqa: E402
from quotaflow.schemas.topics import EVENTS_TOPIC  # noqa: E402
from tests.broker_drill import (  # noqa: E402
    Stream,
    kafka_copies,
    kill_busiest_broker,
    reckon,
    spread_orgs,
    stored_rows,
)
from tests.pipeline import Pipeline, event, this_minute, wait_for  # noqa: E402

RECORDS = int(os.environ.get("BENCH_BROKERS_RECORDS", "20000"))
EVENTS_PER_RECORD = 10
CHUNK = 4000  # records submitted before waiting for their acknowledgements (within the core's memory bound)
DOWN_S = float(os.environ.get("BENCH_BROKERS_DOWN_S", "20"))  # how long the killed broker stays dead
# The collector's default (QUOTAFLOW_COLLECTOR_DELIVERY_TIMEOUT_S); below the failover time
# (e.g. 3) records go through the spool and some reach Kafka twice.
DELIVERY_TIMEOUT_S = float(os.environ.get("BENCH_BROKERS_DELIVERY_TIMEOUT_S", "10"))


def settings_for(env: dict[str, str]) -> Settings:
    os.environ.update(env)
    return Settings()


def fresh(settings: Settings) -> Settings:
    stack.down(settings)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    stack.up(settings)
    return settings


def records(count: int) -> list[Record]:
    orgs = spread_orgs(4, 4)
    ts = this_minute()
    out = []
    for n in range(count):
        org = orgs[n % len(orgs)]
        out.append(Record(EVENTS_TOPIC, partition_key(org),
                          encode_batch([event(org, f"key-{n % 3}", ts) for _ in range(EVENTS_PER_RECORD)]),
                          events=EVENTS_PER_RECORD))
    return out


async def produce(bootstrap: str, batch: list[Record]) -> float:
    """Events a second the producer core gets acknowledged, CHUNK records at a time."""
    core = ProducerCore(bootstrap)
    await core.start()
    try:
        await core.flush()
        started = time.perf_counter()
        for i in range(0, len(batch), CHUNK):
            for record in batch[i:i + CHUNK]:
                core.submit(record)
            await core.flush()
        elapsed = time.perf_counter() - started
        assert core.lost == 0, f"{core.lost} events lost"
        return core.delivered / elapsed
    finally:
        await core.stop()


def kill_drill(cluster: Settings, env: dict[str, str]) -> None:
    redis_client = redis.Redis.from_url(cluster.redis_url)
    pipeline = Pipeline(cluster)
    spool = Path(tempfile.mkdtemp(prefix="bench-brokers-spool-"))
    try:
        for name in stack.PIPELINE:
            pipeline.start(name, **env)
        orgs = spread_orgs(cluster.events_partitions, 2)
        ts = this_minute()
        stream = Stream(cluster.kafka_bootstrap, spool, orgs, ts, records_per_s=100,
                        delivery_timeout_s=DELIVERY_TIMEOUT_S).start()
        print(f"# stream: 100 records/s of 5 events, delivery timeout {DELIVERY_TIMEOUT_S:g} s, "
              f"broker dead {DOWN_S:g} s", flush=True)

        def processed() -> int:
            return sum(stream.counted_by_org(redis_client).values())

        wait_for(lambda: stream.delivered_count() >= 1000 and processed() >= 500, 120, "the stream to flow",
                 pipeline.logs)
        killed = kill_busiest_broker(cluster)
        killed_at = time.monotonic()
        print(f"# SIGKILLed broker {killed.n} (127.0.0.1:{killed.port})", flush=True)
        time.sleep(DOWN_S)  # the stream runs on against the two left
        restart_at = time.monotonic()
        kafka.start(cluster)
        back_at = time.monotonic()
        print(f"# broker {killed.n} back in every ISR {back_at - restart_at:.1f} s after its restart", flush=True)
        acked = stream.delivered_count()
        wait_for(lambda: stream.delivered_count() >= acked + 500, 60, "the stream after the restart")
        stall = stream.longest_stall_s(killed_at, restart_at)
        stream.stop()
        pipeline.wait_processor_applied(redis_client, timeout_s=120)
        pipeline.wait_sink_caught_up()
        restarts = {name: pipeline.state(name).restarts for name in stack.PIPELINE}
        pipeline.stop("sink")
        result = reckon(stream, redis_client, stored_rows(pipeline.query_clickhouse, orgs))
        harness.report("broker_kill_lost_events", result.lost_counted + result.lost_stored, "events")
        harness.report("broker_kill_double_counted_events", result.double_counted + result.double_stored, "events")
        harness.report("broker_kill_acknowledged_events", result.acknowledged, "events")
        harness.report("broker_kill_counted_events", result.counted, "events")
        harness.report("broker_kill_stored_rows", result.stored_rows, "rows")
        harness.report("broker_kill_spooled_events", len(stream.spooled), "events")
        harness.report("broker_kill_events_in_kafka_twice", sum(n > 1 for n in kafka_copies(cluster, orgs).values()),
                       "events")
        harness.report("broker_kill_longest_produce_stall_s", stall, "s")
        harness.report("broker_kill_stage_restarts", sum(restarts.values()), "restarts")
        if stream.lost:
            print(f"# the producer core lost {stream.lost} events (neither acknowledged nor spooled)")
    finally:
        pipeline.stop_all()
        redis_client.close()
        shutil.rmtree(spool, ignore_errors=True)


def main() -> None:
    batch = records(RECORDS)
    single_env = stack.isolated_env(harness.BASE, harness.ROOT / f".quotaflow-bench-{harness.BASE}", Path(
        os.environ["QUOTAFLOW_CACHE_DIR"]))
    single = fresh(settings_for(single_env))
    try:
        one = asyncio.run(produce(single.kafka_bootstrap, batch))
    finally:
        stack.down(single)
    cluster_env = stack.isolated_env(harness.BASE, harness.ROOT / f".quotaflow-bench-{harness.BASE}-brokers3",
                                     Path(os.environ["QUOTAFLOW_CACHE_DIR"]), brokers=3)
    cluster = fresh(settings_for(cluster_env))
    try:
        three = asyncio.run(produce(cluster.kafka_bootstrap, batch))
        harness.report("produce_events_per_s_1_broker", one, "events/s")
        harness.report("produce_events_per_s_3_brokers", three, "events/s")
        print(f"# {RECORDS} records of {EVENTS_PER_RECORD} events, acks=all, idempotent, zstd; "
              f"3 brokers: replication factor 3, min.insync.replicas=2", flush=True)
        kill_drill(cluster, cluster_env)
    finally:
        stack.down(cluster)


if __name__ == "__main__":
    main()
