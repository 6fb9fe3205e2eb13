"""Collectors: how fast the producer core's disk spool is replayed once Kafka is back,
beside the same events produced directly in the same run.

- ``direct_produce_events_per_s``: BENCH_COLLECTOR_EVENTS events (default 100000, 100
  orgs) emitted by an emitter and flushed, from its start to the last acknowledgement:
  the reference.
- ``spool_write_events_per_s``: the same events emitted while Kafka is unreachable (no
  broker at the address): all of them written to the spool (fsync'd) by the emitter's stop.
- ``spool_replay_events_per_s``: a new emitter over that spool, the broker there: from its
  start until every event was acknowledged and the spool is empty.

Run: .venv/bin/python bench/collector.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import harness

from quotaflow.collector.emitter import Emitter
from quotaflow.schemas.events import RequestEvent

EVENTS = int(os.environ.get("BENCH_COLLECTOR_EVENTS", 100_000))
ORGS = 100


def make_events(run: str) -> list[RequestEvent]:
    now = int(time.time() * 1000)
    return [RequestEvent.new(org_id=f"{run}-o{i % ORGS}", api_key_id=f"{run}-k{i % 1000}", service="bench",
                             endpoint="/v1/items/{id}", method="GET", status=200, latency_ms=3.5, request_bytes=0,
                             response_bytes=512, client_ip="198.51.100.7", user_agent="bench", ts_ms=now + i % 1000)
            for i in range(EVENTS)]


async def direct(settings, events: list[RequestEvent]) -> float:
    started = time.perf_counter()
    async with Emitter(settings.kafka_bootstrap) as emitter:
        for ev in events:
            await emitter.emit(ev)
        await emitter.flush()
        assert emitter.delivered == len(events) and emitter.failed == 0, (emitter.delivered, emitter.failed)
    return len(events) / (time.perf_counter() - started)


async def spool_write(spool, events: list[RequestEvent]) -> float:
    nowhere = f"127.0.0.1:{harness.BASE + 398}"  # nothing listens there
    started = time.perf_counter()
    emitter = Emitter(nowhere, spool_dir=spool, spool_max_bytes=1024 ** 3, delivery_timeout_s=1, stop_timeout_s=0)
    await emitter.start()
    for ev in events:
        await emitter.emit(ev)
    await emitter.stop()
    assert emitter.spooled == len(events), (emitter.spooled, emitter.failed)
    return len(events) / (time.perf_counter() - started)


async def replay(settings, spool, expected: int) -> float:
    started = time.perf_counter()
    async with Emitter(settings.kafka_bootstrap, spool_dir=spool, spool_max_bytes=1024 ** 3) as emitter:
        await emitter.flush()
        elapsed = time.perf_counter() - started
        assert emitter.delivered == expected and emitter.failed == 0, (emitter.delivered, emitter.failed)
    assert not list(spool.glob("*.qfspool"))
    return expected / elapsed


def main() -> None:
    settings = harness.up()
    spool = settings.state_dir / "bench-spool"
    shutil.rmtree(spool, ignore_errors=True)
    try:
        asyncio.run(direct(settings, make_events("warm")[:5000]))  # topic metadata, connections, JIT-free warm-up
        harness.report("direct_produce_events_per_s", asyncio.run(direct(settings, make_events("direct"))), "events/s")
        events = make_events("spool")
        harness.report("spool_write_events_per_s", asyncio.run(spool_write(spool, events)), "events/s")
        harness.report("spool_replay_events_per_s", asyncio.run(replay(settings, spool, len(events))), "events/s")
    finally:
        from quotaflow.deploy import stack

        stack.down(settings)


if __name__ == "__main__":
    main()
