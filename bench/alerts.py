"""Alerts benchmark: how soon a threshold crossing reaches a webhook, under background
traffic, and whether a SIGKILL of the alerts stage loses or repeats a notification.
Run: .venv/bin/python bench/alerts.py  (QUOTAFLOW_BENCH_PORT_BASE sets its ports)

Brings up a stack of its own and runs the alerts stage under its supervisor (as `quotaflow
stack start` does), with one global rule: a rate-limit violation (one request refused, 429,
in the hour) fires an alert about the org, notified on a signed webhook to a local HTTP
server that verifies each signature (the standardwebhooks package). A separate process
publishes BACKGROUND_EPS events/s of admitted requests (500-event records over 200 orgs,
which the global rule makes the stage measure). Meanwhile the bench makes CROSSINGS
crossings, one fresh org each, one every CROSSING_INTERVAL_S: it publishes the org's one
429 event and notes the time. Halfway through it SIGKILLs the alerts stage; the
supervisor restarts it (at once: it had been up longer than HEALTHY_S; from the standby it
keeps, deploy/supervise.py) and it recovers its tables; the crossings go on.

Prints `name: value unit` lines:
  alert_latency_p50_ms, alert_latency_p99_ms   crossing event produced -> its signed webhook
                                               received (goal p99 <= 2000); crossings made
                                               while the stage was down or restarting are
                                               measured too (alert_latency_max_ms shows them)
  alert_latency_before_kill_p99_ms             the same, crossings before the kill only
  reference_kafka_latency_p50_ms, _p99_ms      the same crossing events produced -> read by a
                                               bare consumer of the events topic in this process
                                               (what the broker and the load alone cost)
  duplicate_notifications                      firings notified with more than one webhook-id
                                               (ids beyond the first, per crossing; goal 0)
  redelivered_notifications                    the same webhook-id received again (a send
                                               repeated after the kill; receivers dedupe on it)
  missed_notifications                         crossings without a firing within MISS_AFTER_S
                                               of the last one (goal 0)
  background_events_per_s                      the background rate achieved
  load_average_1m                              the machine's load at the end (cores are shared)
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import harness

SECRET = "whsec_" + base64.b64encode(b"bench-alerts-webhook-secret-0123").decode()
BACKGROUND_EPS = 10_000
BACKGROUND_ORGS = 200
CROSSINGS = 60
CROSSING_INTERVAL_S = 0.5
MISS_AFTER_S = 60
HEALTHY_S = 10


class Receiver:
    """The webhook: verifies each request's signature, notes when each id arrived."""

    def __init__(self) -> None:
        from standardwebhooks.webhooks import Webhook

        self.first: dict[str, tuple[float, dict]] = {}  # webhook-id -> (first receipt, data)
        self.receipts: list[str] = []
        self.bad_signatures = 0
        verifier = Webhook(SECRET)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                at = time.time()
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    verifier.verify(body.decode(), headers)
                except Exception:
                    receiver.bad_signatures += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                data = json.loads(body)["data"]
                receiver.receipts.append(headers["webhook-id"])
                receiver.first.setdefault(headers["webhook-id"], (at, data))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def background(bootstrap: str, run: str, stop, sent) -> None:
    """BACKGROUND_EPS admitted requests a second, in records of 500 events of one org."""
    from quotaflow.collector.emitter import Emitter
    from quotaflow.schemas.events import RequestEvent

    async def main() -> None:
        orgs = [f"bg-{run}-{i}" for i in range(BACKGROUND_ORGS)]
        async with Emitter(harness.get_settings().kafka_bootstrap, batch_events=500) as emitter:
            started, n = time.monotonic(), 0
            while not stop.is_set():
                for _ in range(500):
                    org = orgs[n // 500 % BACKGROUND_ORGS]
                    await emitter.emit(RequestEvent.new(org_id=org, api_key_id="k", service="bench",
                                                        endpoint="/v1/items/{id}", method="GET", status=200,
                                                        latency_ms=10.0, request_bytes=0, response_bytes=100,
                                                        client_ip="198.51.100.7", user_agent="bench"))
                    n += 1
                ahead = n / BACKGROUND_EPS - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await emitter.flush()
            sent.value = n / (time.monotonic() - started)

    asyncio.run(main())


async def reference_consumer(bootstrap: str, orgs: set[str], seen: dict[str, float], ready: asyncio.Event,
                             stop: asyncio.Event) -> None:
    """When each crossing's record reaches a plain consumer of the events topic."""
    from aiokafka import AIOKafkaConsumer

    from quotaflow.schemas.topics import EVENTS_TOPIC

    consumer = AIOKafkaConsumer(EVENTS_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        for tp in consumer.assignment():
            await consumer.position(tp)  # resolve "latest" now, before any crossing
        ready.set()
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    key = (r.key or b"").decode(errors="replace")
                    if key in orgs and key not in seen:
                        seen[key] = time.time()
    finally:
        await consumer.stop()


async def crossings(settings, run: str, kill_at: int, pipeline_kill) -> tuple[dict[str, float], dict[str, float], int]:
    from quotaflow.collector.emitter import Emitter
    from quotaflow.schemas.events import RequestEvent

    orgs = [f"x-{run}-{i}" for i in range(CROSSINGS)]
    produced: dict[str, float] = {}
    seen: dict[str, float] = {}
    ready, stop = asyncio.Event(), asyncio.Event()
    ref = asyncio.create_task(reference_consumer(settings.kafka_bootstrap, set(orgs), seen, ready, stop))
    await ready.wait()
    async with Emitter(settings.kafka_bootstrap, batch_events=1, linger_ms=0) as emitter:
        for i, org in enumerate(orgs):
            if i == kill_at:
                await asyncio.to_thread(pipeline_kill)
            produced[org] = time.time()
            await emitter.emit(RequestEvent.new(org_id=org, api_key_id="k", service="bench", endpoint="/v1/items/{id}",
                                                method="GET", status=429, latency_ms=1.0, request_bytes=0,
                                                response_bytes=0, client_ip="198.51.100.7", user_agent="bench"))
            await emitter.flush()
            await asyncio.sleep(CROSSING_INTERVAL_S)
    await asyncio.sleep(2)
    stop.set()
    await ref
    return produced, seen, kill_at


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    from quotaflow.alerts.rules import RuleStore
    from quotaflow.deploy import stack
    from quotaflow.deploy.procs import alive
    from quotaflow.schemas.alert_rules import parse_rule

    receiver = Receiver()
    os.environ["QUOTAFLOW_ALERT_CHANNELS"] = json.dumps({"hook": {"type": "webhook", "url": receiver.url,
                                                                  "secret": SECRET}})
    os.environ["QUOTAFLOW_ALERT_RETRY_MAX_S"] = "1"
    os.environ["QUOTAFLOW_SUPERVISE_BACKOFF_INITIAL_S"] = "1"
    # The stage has run about 20 s when it is killed, standing for a stage up for hours: a
    # stage killed after a healthy run is restarted at once (deploy/supervise.py Backoff).
    os.environ["QUOTAFLOW_SUPERVISE_HEALTHY_S"] = str(HEALTHY_S)
    print("bringing up the benchmark stack...", file=__import__("sys").stderr, flush=True)
    settings = harness.up()
    run = uuid.uuid4().hex[:6]
    try:
        asyncio.run(RuleStore(settings.kafka_bootstrap).put(parse_rule(
            {"org_id": "*", "rule_id": f"denied-{run}", "type": "rate_limit_violations", "window": "3600s",
             "min_denials": 1, "channels": ["hook"], "severity": "critical"})))
        stack.start_pipeline_process(settings, "alerts")
        stop, sent = multiprocessing.Event(), multiprocessing.Value("d", 0.0)
        bg = multiprocessing.Process(target=background, args=(settings.kafka_bootstrap, run, stop, sent))
        bg.start()
        time.sleep(5)  # the background traffic at its rate before the first crossing

        def kill() -> None:
            state = stack.pipeline_state(settings, "alerts")
            os.kill(state.pid, signal.SIGKILL)
            while alive(state.pid):
                time.sleep(0.01)

        produced, seen, kill_at = asyncio.run(crossings(settings, run, CROSSINGS // 2, kill))
        deadline = time.time() + MISS_AFTER_S
        firings = lambda: {d["org_id"]: (wid, at) for wid, (at, d) in receiver.first.items() if d["kind"] == "firing"}
        while time.time() < deadline and not set(produced) <= set(firings()):
            time.sleep(0.2)
        stop.set()
        bg.join(60)
        ids_per_org: dict[str, set[str]] = {}
        for wid, (at, d) in receiver.first.items():
            if d["kind"] == "firing" and d["org_id"] in produced:
                ids_per_org.setdefault(d["org_id"], set()).add(wid)
        got = firings()
        latency = {org: (got[org][1] - produced[org]) * 1000 for org in produced if org in got}
        orgs = list(produced)
        before = [latency[o] for o in orgs[:kill_at] if o in latency]
        ref = [(seen[o] - produced[o]) * 1000 for o in orgs if o in seen]
        harness.report("alert_latency_p50_ms", pct(list(latency.values()), 50), "ms")
        harness.report("alert_latency_p99_ms", pct(list(latency.values()), 99), "ms")
        harness.report("alert_latency_max_ms", max(latency.values(), default=float("nan")), "ms")
        harness.report("alert_latency_before_kill_p99_ms", pct(before, 99), "ms")
        harness.report("reference_kafka_latency_p50_ms", pct(ref, 50), "ms")
        harness.report("reference_kafka_latency_p99_ms", pct(ref, 99), "ms")
        harness.report("duplicate_notifications", sum(len(ids) - 1 for ids in ids_per_org.values()), "notifications")
        mine = [w for w in receiver.receipts if w in receiver.first and receiver.first[w][1]["org_id"] in produced]
        harness.report("redelivered_notifications", len(mine) - len(set(mine)), "notifications")
        harness.report("missed_notifications", len(set(produced) - set(got)), "notifications")
        harness.report("bad_signatures", receiver.bad_signatures, "requests")
        harness.report("background_events_per_s", sent.value, "events/s")
        harness.report("crossings", len(produced), "crossings")
        state = stack.pipeline_state(settings, "alerts")
        harness.report("alerts_stage_restarts", state.restarts if state else -1, "restarts")
        harness.report("load_average_1m", os.getloadavg()[0], "runnable")  # a shared machine: how busy it was
    finally:
        stack.down(settings)


if __name__ == "__main__":
    main()
