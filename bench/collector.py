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

- ``middleware_overhead_p50_us``, ``middleware_overhead_p99_us``: one Starlette app called
  directly (no server, no socket) with and without the ASGI middleware, interleaved
  (BENCH_MIDDLEWARE_REQUESTS each, default 20000): the percentile of the calls through
  the middleware minus the same percentile of the bare calls (the median of 5 stretches
  of the run, each judged alone), each call timed by the
  thread's CPU time (the machines are shared: wall time also counts other processes'
  turns on the core; ``middleware_overhead_wall_p99_us`` is the same by the wall clock).
  The limiter's Redis round trip is excluded (a limiter answering verdicts made before
  the timing); the event is built and handed to a real Emitter, which validates and
  batches it, its batches going to Kafka between the timed calls.
- ``wsgi_overhead_p50_us``, ``wsgi_overhead_p99_us`` (``_wall_p99_us``): the same for a Flask
  app and the WSGI middleware (its route template from Flask's URL map), events to a
  BackgroundEmitter (validated and sent on a thread of its own).
- ``ingest_events_per_s``: `quotaflow ingest` as a process, BENCH_INGEST_EVENTS events
  (default 100000) posted as JSON arrays of 1000 by 8 concurrent clients, from the first
  request to the last 202 (each answered once its events are acknowledged by Kafka).

Run: .venv/bin/python bench/collector.py (``... collector.py shipper``: the shipper's figures only)
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import statistics
import sys
import time
import uuid

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


# --- the middlewares' own cost, and the HTTP ingest's rate ---

MIDDLEWARE_REQUESTS = int(os.environ.get("BENCH_MIDDLEWARE_REQUESTS", 20_000))
INGEST_EVENTS = int(os.environ.get("BENCH_INGEST_EVENTS", 100_000))
BENCH_KEY = "qf_live_" + "a" * 30 + "_000000"  # presented, never parsed: the limiter below answers without Redis


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _ready_verdict():
    """What RateLimiter.verify answers for an admitted key (a fresh reservation id each
    time, as verify makes one), without its Redis round trip."""
    from quotaflow.gateway.limiter import ALLOWED, Verdict
    from quotaflow.schemas.redis_keys import Decision, WindowUsage

    now = int(time.time() * 1000)
    windows = tuple(WindowUsage(subject, f"{n}s", n, 1_000_000, 5, now + n * 1000)
                    for subject in ("key", "org") for n in (60, 3600, 86400))

    def verdict():
        decision = Decision.from_windows(windows, allowed=True, tier="FREE", now_ms=int(time.time() * 1000),
                                         event_id=str(uuid.uuid4()))
        return Verdict(ALLOWED, decision.now_ms, "bench-org", "bench-key", "", decision)

    return verdict


class _NoRedisLimiter:
    """Answers each verify with a verdict made before the timing started: the limiter's
    work (its Redis round trip and parsing the reply) is not the middleware's."""

    verifies_keys = True

    def __init__(self, count: int):
        make = _ready_verdict()
        self._verdicts = iter([make() for _ in range(count)])

    async def verify(self, presented_key, required_scope=None):
        return next(self._verdicts)


class _NoRedisSyncLimiter(_NoRedisLimiter):
    def verify(self, presented_key, required_scope=None):
        return next(self._verdicts)


class _Clocks:
    """Each call timed twice: by the thread's CPU time (what the call costs; on a shared
    machine wall time also counts the moments other processes had the core) and by the
    wall clock (reported beside, for comparison)."""

    def __init__(self):
        self.cpu: list[int] = []
        self.wall: list[int] = []

    def start(self) -> tuple[int, int]:
        return time.thread_time_ns(), time.perf_counter_ns()

    def stop(self, started: tuple[int, int], keep: bool) -> None:
        cpu, wall = time.thread_time_ns() - started[0], time.perf_counter_ns() - started[1]
        if keep:
            self.cpu.append(cpu)
            self.wall.append(wall)


ROUNDS = 5


def _overhead(bare: list[int], wrapped: list[int], p: float) -> float:
    """The percentile of the calls through the middleware minus that of the bare calls, in
    µs: the median of ROUNDS consecutive stretches of the run, each judged alone (a burst
    of another tenant's work on the machine then moves one stretch's figure, not the run's)."""
    n = len(bare) // ROUNDS
    return statistics.median(max(0.0, _pct(wrapped[i * n:(i + 1) * n], p) - _pct(bare[i * n:(i + 1) * n], p)) / 1000
                             for i in range(ROUNDS))


async def middleware_overhead(settings) -> tuple[_Clocks, _Clocks]:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from quotaflow.gateway.asgi import RateLimitMiddleware

    async def item(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/items/{item_id}", item)])
    headers = [(b"host", b"shop"), (b"authorization", f"Bearer {BENCH_KEY}".encode()), (b"user-agent", b"bench")]

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    def scope(i: int) -> dict:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                "path": f"/v1/items/{i}", "raw_path": f"/v1/items/{i}".encode(), "query_string": b"",
                "root_path": "", "headers": headers, "client": ("203.0.113.5", 40000), "server": ("shop", 80)}

    bare, wrapped = _Clocks(), _Clocks()
    async with Emitter(settings.kafka_bootstrap) as emitter:
        limited = RateLimitMiddleware(app, _NoRedisLimiter(MIDDLEWARE_REQUESTS + 1000), emitter, service="bench")
        for i in range(MIDDLEWARE_REQUESTS + 1000):  # the first 1000 of each warm up
            s1, s2 = scope(i), scope(i)
            t = bare.start()
            await app(s1, receive, send)
            bare.stop(t, i >= 1000)
            t = wrapped.start()
            await limited(s2, receive, send)
            wrapped.stop(t, i >= 1000)
            await asyncio.sleep(0)  # the emitter's batches go out here, between requests
        await emitter.flush()
        assert emitter.delivered >= MIDDLEWARE_REQUESTS and emitter.failed == 0, (emitter.delivered, emitter.failed)
    return bare, wrapped


def wsgi_overhead(settings) -> tuple[_Clocks, _Clocks]:
    from flask import Flask
    from werkzeug.test import EnvironBuilder

    from quotaflow.collector.background import BackgroundEmitter
    from quotaflow.gateway.wsgi import RateLimitMiddleware, flask_route

    app = Flask("bench")

    @app.get("/v1/items/<int:item_id>")
    def item(item_id: int):
        return "ok"

    bare_app = app.wsgi_app
    emitter = BackgroundEmitter(Emitter(settings.kafka_bootstrap)).start()
    limited = RateLimitMiddleware(bare_app, _NoRedisSyncLimiter(MIDDLEWARE_REQUESTS + 1000), emitter,
                                  service="bench", route=flask_route(app))

    def start_response(status, headers, exc_info=None):
        return lambda data: None

    def call(wsgi, environ, clocks: _Clocks, keep: bool) -> None:
        t = clocks.start()
        body = wsgi(environ, start_response)
        for _ in body:
            pass
        if hasattr(body, "close"):
            body.close()  # where the WSGI middleware hands the event over
        clocks.stop(t, keep)

    bare, wrapped = _Clocks(), _Clocks()
    try:
        for i in range(MIDDLEWARE_REQUESTS + 1000):
            environs = [EnvironBuilder(path=f"/v1/items/{i}", headers={"Authorization": f"Bearer {BENCH_KEY}",
                                                                      "User-Agent": "bench"},
                                       environ_base={"REMOTE_ADDR": "203.0.113.5"}).get_environ() for _ in range(2)]
            call(bare_app, environs[0], bare, i >= 1000)
            call(limited, environs[1], wrapped, i >= 1000)
        emitter.flush(60)
        assert emitter.delivered >= MIDDLEWARE_REQUESTS and emitter.failed == 0, (emitter.delivered, emitter.failed)
    finally:
        emitter.close()
    return bare, wrapped


def ingest_rate(settings) -> float:
    import json
    import subprocess
    import sys

    import httpx
    import orjson

    token = "bench-ingest-token-0123456789abcdef"
    port = harness.BASE + 150
    env = {**os.environ, "QUOTAFLOW_INGEST_PORT": str(port), "QUOTAFLOW_INGEST_TOKENS": json.dumps({token: "*"}),
           "QUOTAFLOW_SPOOL_DIR": str(settings.state_dir / "bench-ingest-spool"), "QUOTAFLOW_LOG_LEVEL": "WARNING"}
    log = open(settings.state_dir / "bench-ingest.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "quotaflow", "ingest"], stdout=log, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the ingest exited; see bench-ingest.log"
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the ingest did not serve within 60 s"
            time.sleep(0.2)
        bodies = [orjson.dumps([e.to_dict() for e in chunk])
                  for events in [make_events("ingest")[:INGEST_EVENTS]]
                  for chunk in (events[i:i + 1000] for i in range(0, len(events), 1000))]

        async def post_all() -> tuple[int, float]:
            todo = list(bodies)
            accepted = 0
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}

            async def worker(client: httpx.AsyncClient) -> None:
                nonlocal accepted
                while todo:
                    r = await client.post("/v1/events", content=todo.pop(), headers=headers)
                    assert r.status_code == 202, r.text[:500]
                    accepted += r.json()["accepted"]

            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                await client.post("/v1/events", content=bodies[0], headers=headers)  # warm up: metadata, connections
                started = time.perf_counter()
                await asyncio.gather(*(worker(client) for _ in range(8)))
                return accepted, time.perf_counter() - started

        accepted, elapsed = asyncio.run(post_all())
        assert accepted == sum(1 for b in bodies for _ in orjson.loads(b)), accepted
        return accepted / elapsed
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


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
        bare, wrapped = asyncio.run(middleware_overhead(settings))
        harness.report("middleware_overhead_p50_us", _overhead(bare.cpu, wrapped.cpu, 50), "us")
        harness.report("middleware_overhead_p99_us", _overhead(bare.cpu, wrapped.cpu, 99), "us")
        harness.report("middleware_overhead_wall_p99_us", _overhead(bare.wall, wrapped.wall, 99), "us")
        bare, wrapped = wsgi_overhead(settings)
        harness.report("wsgi_overhead_p50_us", _overhead(bare.cpu, wrapped.cpu, 50), "us")
        harness.report("wsgi_overhead_p99_us", _overhead(bare.cpu, wrapped.cpu, 99), "us")
        harness.report("wsgi_overhead_wall_p99_us", _overhead(bare.wall, wrapped.wall, 99), "us")
        harness.report("ingest_events_per_s", ingest_rate(settings), "events/s")
        shipper_figures(settings)
    finally:
        from quotaflow.deploy import stack

        stack.down(settings)


if __name__ == "__main__":
    main()
