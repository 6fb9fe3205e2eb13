"""Kafka stopped for 30 s under load, with two collectors publishing at once: the WSGI
middleware in a Flask app (its events spooled by the BackgroundEmitter, requests never
waiting) and the access-log shipper tailing a log that keeps growing (its lines spooled,
its checkpoint moving on with them). Once Kafka is back, every request and every line is
counted once by the real processor: none lost, none twice."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from quotaflow.collector.producer import ProducerCore
from quotaflow.collector.ship.checkpoints import CheckpointFile
from quotaflow.collector.ship.shipper import ShipConfig, Shipper
from quotaflow.deploy import kafka
from quotaflow.gateway.wsgi import flask_route
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key, reservations_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from tests.key_records import SECRETS, new_key
from tests.pipeline import counted, unique, wait_for
from tests.test_ship_files import append, expected_ids, shipped_ids
from tests.wsgi_apps import behind_middleware, flask_shop

OUTAGE_S = 30


class ShipperThread:
    """The shipper on its own event loop, as `quotaflow ship` runs beside a service."""

    def __init__(self, settings, log, state):
        self.core = ProducerCore(settings.kafka_bootstrap, spool_dir=state / "spool", delivery_timeout_s=3,
                                 spool_topics=(EVENTS_TOPIC, DEAD_LETTER_TOPIC))
        self.shipper = Shipper(ShipConfig(paths=(str(log),), state_dir=state, poll_interval_s=0.05,
                                          checkpoint_interval_s=0.1), self.core)
        self.checkpoints = CheckpointFile(state / "checkpoints.json", 3600)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            await self.core.start()
            try:
                await self.shipper.run()
                await asyncio.wait_for(self.core.flush(), 120)  # the spool replayed
            finally:
                await self.core.stop()
        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001  (reported by stop(), in the test's thread)
            self.error = exc

    def checkpoint_offset(self) -> int | None:
        entries = self.checkpoints.load()
        return next(iter(entries.values())).offset if entries else None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.shipper.stop)
        self.thread.join(180)
        assert not self.thread.is_alive() and self.error is None, self.error


@pytest.mark.stack
def test_broker_stopped_30s_the_middlewares_and_the_shippers_events_all_arrive_once(
        live_stack, redis_client, pipeline, tmp_path):
    served_org, logged_org = unique("served"), unique("logged")
    for org in (served_org, logged_org):
        redis_client.hset(org_key(org), ORG_TIER_FIELD, "ENTERPRISE")
    presented, record = new_key(redis_client, served_org)
    key = record.key_id

    app = flask_shop()
    settings = live_stack.model_copy(update={"key_hash_secrets": SECRETS, "gateway_timeout_ms": 5000})
    app.wsgi_app, emitter = behind_middleware(app.wsgi_app, settings, flask_route(app), tmp_path / "spool",
                                              delivery_timeout_s=3)
    log = tmp_path / "access.log"
    written = [0]
    shipper = ShipperThread(live_stack, log, tmp_path / "ship")
    pipeline.start("processor")
    answers: list[tuple[int, str, float, float]] = []  # status, event id, seconds taken, when answered
    stop = threading.Event()

    def serve() -> None:
        client = app.test_client()
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            r = client.get(f"/items/{i}", headers={"Authorization": f"Bearer {presented}"})
            r.close()  # the response is done: as a WSGI server does, close the body (the event is published then)
            answers.append((r.status_code, r.headers.get("X-Quotaflow-Event-Id"), time.monotonic() - started,
                            time.monotonic()))
            i += 1
            stop.wait(0.15)  # ~6 requests a second: under ENTERPRISE's 500 a minute

    def write_log() -> None:  # what a web server in front appends: ~80 lines a second
        while not stop.is_set():
            append(log, logged_org, 20, written[0])
            written[0] += 20
            stop.wait(0.25)

    threads = [threading.Thread(target=serve, daemon=True), threading.Thread(target=write_log, daemon=True)]
    started_ms = int(time.time() * 1000)
    shipper.thread.start()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: emitter.delivered >= 10 and shipper.core.delivered > 0, 60, "deliveries before the outage")
        kafka.stop(live_stack)
        down = time.monotonic()
        try:
            wait_for(lambda: emitter.emitter.spooled > 0 and shipper.core.spooled > 0, OUTAGE_S, "both to spool")
            stop.wait(max(0.0, OUTAGE_S - (time.monotonic() - down)))  # the outage lasts 30 s: the scenario
            # while Kafka is away, the shipper's checkpoint moves on with what it spooled
            at = log.stat().st_size
            wait_for(lambda: (shipper.checkpoint_offset() or 0) >= at, 30, "the checkpoint to move on with the spool")
            spooled = (emitter.emitter.spooled, shipper.core.spooled)
        finally:
            back = time.monotonic()
            kafka.start(live_stack)
        stop.set()
        for t in threads:
            t.join(10)
        emitter.flush(120)
        wait_for(lambda: shipper.shipper.shipped == written[0], 120, "every line shipped")
    finally:
        stop.set()
        emitter.close()
        shipper.stop()
    ended_ms = int(time.time() * 1000)

    assert spooled[0] > 0 and spooled[1] > 0
    assert emitter.failed == 0 and shipper.core.lost == 0
    total = len(answers)
    assert total > 150 and {a[0] for a in answers} == {200} and len({a[1] for a in answers}) == total
    # no request waited for the broker (one that did would take the delivery timeout, 3 s,
    # at least), and requests went on being answered all through the outage
    assert max(a[2] for a in answers) < 3.0
    assert sum(1 for a in answers if down <= a[3] <= back) >= 60
    lines = written[0]
    assert lines > 2000
    ids = asyncio.run(shipped_ids(live_stack, logged_org))
    assert set(ids) == expected_ids(log.read_bytes()) and len(ids) == lines  # every line on Kafka, under its id

    hours = {started_ms // 3_600_000 * 3_600_000, ended_ms // 3_600_000 * 3_600_000}

    def hourly(org: str, api_key_id: str) -> int:
        return sum(counted(redis_client, org, api_key_id, h, "3600s") or 0 for h in hours)

    wait_for(lambda: redis_client.zcard(reservations_key(served_org, key)) == 0 and hourly(logged_org, "k") >= lines,
             120, "every event counted", pipeline.logs)
    pipeline.wait_processor_applied(redis_client)
    assert hourly(served_org, key) == total  # each request once
    assert hourly(logged_org, "k") == lines  # each line once
