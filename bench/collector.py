"""Collectors: how fast the producer core's disk spool is replayed once Kafka is back,
beside the same events produced directly in the same run.

- ``direct_produce_events_per_s``: BENCH_COLLECTOR_EVENTS events (default 100000, 100
  orgs) emitted by an emitter and flushed, from its start to the last acknowledgement:
  the reference.
- ``spool_write_events_per_s``: the same events emitted while Kafka is unreachable (no
  broker at the address): all of them written to the spool (fsync'd) by the emitter's stop.
- ``spool_replay_events_per_s``: a new emitter over that spool, the broker there: from its
  start until every event was acknowledged and the spool is empty.
- ``shipper_lines_per_s``: the access-log shipper (collector/ship/) over a file of
  BENCH_SHIP_LINES nginx JSON lines (default 400000; 50 orgs, paths with raw ids mapped by
  route templates), pinned to one core: from its start until Kafka acknowledged every line.
  Beside it ``baseline_read_lines_per_s``: the same file read in the same chunks and split
  into lines, nothing else, on the same core. ``shipper_lines_per_cpu_s``: the same lines per
  second of CPU time the process used (the machine's other work left out; its load is
  printed as ``load_average_1m``).

Run: .venv/bin/python bench/collector.py (``... collector.py shipper``: the shipper's figures only)
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import time

import harness

from quotaflow.collector.emitter import Emitter
from quotaflow.core import gc_tuning
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


SHIP_LINES = int(os.environ.get("BENCH_SHIP_LINES", 400_000))


def write_access_log(path, lines: int) -> None:
    """nginx JSON lines (log_format ... escape=json), as README recommends the format."""
    import orjson

    now = time.time()
    with open(path, "wb") as f:
        for start in range(0, lines, 10_000):
            f.write(b"".join(orjson.dumps({
                "time": f"{now + i / 1000:.3f}", "method": "GET" if i % 5 else "POST",
                "path": f"/v1/users/{i % 9973}/orders" if i % 3 else f"/v1/items/{i}", "status": "200",
                "request_bytes": "", "response_bytes": str(200 + i % 700), "latency": "0.004",
                "client_ip": f"198.51.100.{i % 250}", "user_agent": "Mozilla/5.0 (X11; Linux x86_64) bench/1.0",
                "org_id": f"ship-o{i % 50}", "api_key_id": f"ship-k{i % 500}", "event_id": "", "event_ts": ""})
                + b"\n" for i in range(start, min(lines, start + 10_000))))


def baseline_read(path) -> float:
    from quotaflow.collector.ship.shipper import CHUNK_BYTES

    started = time.perf_counter()
    lines, at = 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while data := os.pread(fd, CHUNK_BYTES, at):
            last = data.rfind(b"\n")
            lines += len(data[:last].split(b"\n"))
            at += last + 1
    finally:
        os.close(fd)
    assert lines == SHIP_LINES, lines
    return lines / (time.perf_counter() - started)


async def ship(settings, path, state) -> tuple[float, float]:
    from quotaflow.collector.producer import ProducerCore
    from quotaflow.collector.ship.shipper import Shipper, ShipConfig
    from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC

    started, cpu = time.perf_counter(), time.process_time()
    core = ProducerCore(settings.kafka_bootstrap, spool_dir=state / "spool", spool_max_bytes=1024 ** 3,
                        spool_topics=(EVENTS_TOPIC, DEAD_LETTER_TOPIC))
    shipper = Shipper(ShipConfig(paths=(str(path),), routes=("/v1/users/{id}/orders",), state_dir=state), core)
    await core.start()
    try:
        await shipper.run(until_idle=True)
    finally:
        await core.stop()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert (shipper.shipped, shipper.dead_lettered, core.spooled, core.lost) == (SHIP_LINES, 0, 0, 0), (
        shipper.shipped, shipper.dead_lettered, core.spooled, core.lost)
    return SHIP_LINES / elapsed, SHIP_LINES / cpu


def shipper_figures(settings) -> None:
    """shipper_lines_per_s and baseline_read_lines_per_s, on one core (this process pinned)."""
    work = settings.state_dir / "bench-ship"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "access.log"
    write_access_log(path, SHIP_LINES)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    gc_thresholds = gc.get_threshold()
    gc_tuning.for_streaming()  # as `quotaflow ship` runs
    try:
        harness.report("baseline_read_lines_per_s", baseline_read(path), "lines/s")
        per_s, per_cpu_s = asyncio.run(ship(settings, path, work / "state"))
        harness.report("shipper_lines_per_s", per_s, "lines/s")
        # the same run per second of CPU the shipper's process used: what a core of its own
        # would give on a machine shared with other work (the load average says how much)
        harness.report("shipper_lines_per_cpu_s", per_cpu_s, "lines/s")
        harness.report("load_average_1m", os.getloadavg()[0], "")
    finally:
        gc.unfreeze()
        gc.set_threshold(*gc_thresholds)
        os.sched_setaffinity(0, cores)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    settings = harness.up()
    if sys.argv[1:] == ["shipper"]:
        try:
            shipper_figures(settings)
        finally:
            from quotaflow.deploy import stack

            stack.down(settings)
        return
    spool = settings.state_dir / "bench-spool"
    shutil.rmtree(spool, ignore_errors=True)
    try:
        asyncio.run(direct(settings, make_events("warm")[:5000]))  # topic metadata, connections, JIT-free warm-up
        harness.report("direct_produce_events_per_s", asyncio.run(direct(settings, make_events("direct"))), "events/s")
        events = make_events("spool")
        harness.report("spool_write_events_per_s", asyncio.run(spool_write(spool, events)), "events/s")
        harness.report("spool_replay_events_per_s", asyncio.run(replay(settings, spool, len(events))), "events/s")
        shipper_figures(settings)
    finally:
        from quotaflow.deploy import stack

        stack.down(settings)


if __name__ == "__main__":
    main()
