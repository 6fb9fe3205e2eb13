"""``quotaflow demo``: the whole pipeline with demo traffic, watched live, then accounted.

Final line: ``demo: produced=N processed=N stored=N denied_keys=K dead_letters=D lost=L``
Before it, a ``keys:`` line: API keys created, verified, refused and revoked (see _keys).
In the final line, produced counts valid events acknowledged by Kafka, processed the ones the
processor applied, stored the rows ClickHouse holds for them, denied_keys the
keys denied at some point, dead_letters the malformed records dead-lettered, and
lost every valid event not stored plus every malformed one not dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import urllib.error
from dataclasses import dataclass, field

from quotaflow.collector.emitter import Emitter
from quotaflow.core import metrics
from quotaflow.core.errors import OperatorError
from quotaflow.core.redis_clients import SyncClient, sync_client
from quotaflow.core.settings import Settings
from quotaflow.deploy import stack
from quotaflow.deploy.demo_traffic import DEMO_ORGS, TrafficStats, drive
from quotaflow.deploy.observe import PROCESSOR_BACKLOG_METRIC, denied_keys, end_offsets, sink_caught_up
from quotaflow.gateway.limiter import (
    ALLOWED,
    INSUFFICIENT_SCOPE,
    MALFORMED_KEY,
    RATE_LIMITED,
    REVOKED_KEY,
    RateLimiter,
)
from quotaflow.keys.registry import Registry
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC

# Valid events handled once each: counted, late for some window, or refused (429) and so not counted.
PROCESSED = tuple(f'quotaflow_processor_events_total{{outcome="{o}"}}' for o in ("counted", "late", "rejected"))
STORED = "quotaflow_sink_rows_inserted_total"
DRAIN_TIMEOUT_S = 90
# The demo defines no alert rules, so it runs the processor and the sink, not the alerts stage.
DEMO_STAGES = ("processor", "sink")


@dataclass
class Tally:
    processed: int = 0
    stored_live: int = 0
    dead_letters: int = 0
    denied_now: set[str] = field(default_factory=set)
    denied_ever: set[str] = field(default_factory=set)


def _scrape(port: int) -> dict[str, float] | None:
    try:
        return metrics.scrape(port)
    except (urllib.error.URLError, OSError):
        return None


def _processed(sample: dict[str, float] | None) -> int:
    return int(sum((sample or {}).get(name, 0) for name in PROCESSED))


async def _dead_letter_total(settings: Settings) -> int:
    return sum((await end_offsets(settings.kafka_bootstrap, DEAD_LETTER_TOPIC)).values())


class Watcher:
    """Reads the pipeline's progress from its metrics, Redis and Kafka."""

    def __init__(self, settings: Settings, r: SyncClient):
        self.settings = settings
        self.redis = r
        self.base_processed = 0
        self.base_stored = 0
        self.base_dead = 0
        self.tally = Tally()

    async def baseline(self) -> None:
        self.base_processed = _processed(_scrape(self.settings.processor_metrics_port))
        self.base_stored = int((_scrape(self.settings.sink_metrics_port) or {}).get(STORED, 0))
        self.base_dead = await _dead_letter_total(self.settings)

    async def poll(self) -> Tally:
        t = self.tally
        proc = _scrape(self.settings.processor_metrics_port)
        sink = _scrape(self.settings.sink_metrics_port)
        if proc is not None:
            t.processed = _processed(proc) - self.base_processed
        if sink is not None:
            t.stored_live = int(sink.get(STORED, 0)) - self.base_stored
        t.dead_letters = await _dead_letter_total(self.settings) - self.base_dead
        t.denied_now = await asyncio.to_thread(denied_keys, self.redis)
        t.denied_ever |= t.denied_now
        return t


def _line(elapsed: float, stats: TrafficStats, t: Tally) -> str:
    denied = ",".join(sorted(t.denied_now)) or "-"
    return (f"[{elapsed:5.1f}s] produced={stats.valid_sent} processed={t.processed} stored={t.stored_live} "
            f"denied_keys={len(t.denied_now)} ({denied}) dead_letters={t.dead_letters}")


async def _run(settings: Settings, seconds: float) -> tuple[TrafficStats, Tally, int]:
    r = sync_client(settings)
    for org, tier in DEMO_ORGS.items():
        r.hset(org_key(org), ORG_TIER_FIELD, tier.value)
    print("waiting for the processor and the sink to catch up with earlier events...", flush=True)
    deadline = time.monotonic() + 120
    previous = None
    while True:
        # Caught up: the sink has committed every event; the processor has applied every
        # record by its own offsets (its group's committed offsets can pass records the
        # stream skipped, or lag behind what it applied) and its count stands still (a
        # restarted processor may still be going over records it had seen). So the
        # baseline below leaves only this run's events to count.
        sample = _scrape(settings.processor_metrics_port)
        current = _processed(sample) if sample is not None else None
        if (current is not None and current == previous and sample.get(PROCESSOR_BACKLOG_METRIC) == 0
                and _scrape(settings.sink_metrics_port) is not None
                and await sink_caught_up(settings.kafka_bootstrap)):
            break
        if time.monotonic() > deadline:
            raise OperatorError("the processor or the sink did not catch up within 120 s; see the logs in "
                             f"{settings.state_dir / 'logs'}")
        previous = current
        await asyncio.sleep(1.0)
    watcher = Watcher(settings, r)
    await watcher.baseline()

    stats = TrafficStats()
    emitter = Emitter.from_settings(settings)  # spools to QUOTAFLOW_SPOOL_DIR while Kafka is away
    await emitter.start()
    started = time.monotonic()
    print(f"sending demo traffic for {seconds:g} s from {len(DEMO_ORGS)} orgs "
          f"({', '.join(f'{o}={t.value}' for o, t in DEMO_ORGS.items())})", flush=True)
    traffic = asyncio.create_task(drive(emitter, seconds, stats))
    try:
        while not traffic.done():
            await asyncio.wait({traffic}, timeout=2.0)
            print(_line(time.monotonic() - started, stats, await watcher.poll()), flush=True)
        await traffic
    finally:
        await emitter.stop()
    if emitter.failed:
        print(f"warning: {emitter.failed} events were not acknowledged by Kafka", flush=True)

    print("traffic done; waiting for the pipeline to drain...", flush=True)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        t = await watcher.poll()
        drained = (t.processed >= stats.valid_sent and t.stored_live >= stats.valid_sent
                   and t.dead_letters >= stats.invalid_sent)
        if drained or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    print(_line(time.monotonic() - started, stats, t), flush=True)
    r.close()
    return stats, watcher.tally, emitter.failed


DEMO_SCOPE = "demo:read"
REVOCATION_TIMEOUT_S = 5.0


async def _keys(settings: Settings) -> bool:
    """API keys end to end: a key per demo org created (hash only in the registry), each
    verified by the gateway's check in one round trip, refused for a scope it lacks and
    offline when mistyped, then revoked and refused; what it saw is printed. The keys are
    revoked at the end: a demo run leaves none usable."""
    if not settings.key_hash_secrets:  # a server secret for this run only, never printed
        settings = settings.model_copy(update={"key_hash_secrets": {"demo": secrets.token_urlsafe(32)}})
    limiter = RateLimiter.from_settings(settings.model_copy(update={"gateway_timeout_ms": 2000}))
    try:
        async with Registry(settings) as registry:
            issued = [await registry.create(org, "demo", scopes=(DEMO_SCOPE,), actor="demo") for org in DEMO_ORGS]
            verified = [await limiter.verify(i.key, DEMO_SCOPE) for i in issued]
            # verified: the key's own identity found, then admitted or rate limited (some demo
            # orgs are past their limits by now)
            ok = sum(v.outcome in (ALLOWED, RATE_LIMITED) and (v.org_id, v.api_key_id) == (i.record.org_id, i.record.key_id)
                     for v, i in zip(verified, issued, strict=True))
            admitted = sum(v.outcome == ALLOWED for v in verified)
            first = issued[0]
            scope = (await limiter.verify(first.key, "admin")).outcome
            typo = first.key[:-1] + ("B" if first.key[-1] != "B" else "C")
            mistyped = (await limiter.verify(typo, DEMO_SCOPE)).outcome
            await registry.revoke(first.record.org_id, first.record.key_id, actor="demo")
            returned = time.monotonic()
            while (outcome := (await limiter.verify(first.key, DEMO_SCOPE)).outcome) != REVOKED_KEY:
                if time.monotonic() - returned > REVOCATION_TIMEOUT_S:
                    break
                await asyncio.sleep(0.01)
            refused_ms = (time.monotonic() - returned) * 1000
            for i in issued[1:]:
                await registry.revoke(i.record.org_id, i.record.key_id, actor="demo")
    finally:
        await limiter.aclose()
    print(f"keys: created={len(issued)} verified={ok} (admitted={admitted}) wrong_scope={scope} mistyped={mistyped} "
          f"revoked_refused_after_ms={refused_ms:.0f} (keys shown once: {first.record.display_prefix}..., "
          f"stored as HMACs only)", flush=True)
    return (ok == len(issued) and scope == INSUFFICIENT_SCOPE and mistyped == MALFORMED_KEY
            and outcome == REVOKED_KEY)


def _count_stored(settings: Settings, stats: TrafficStats) -> tuple[int, int]:
    """(rows, distinct event ids) ClickHouse holds for this run's events."""
    client = connect(settings.clickhouse_url)
    try:
        row = client.query(
            "SELECT count(), uniqExact(event_id) FROM requests "
            "WHERE org_id IN {orgs:Array(String)} AND service = 'demo-shop' "
            "AND event_time BETWEEN fromUnixTimestamp64Milli({lo:Int64}) AND fromUnixTimestamp64Milli({hi:Int64})",
            parameters={"orgs": list(DEMO_ORGS), "lo": stats.first_ts_ms, "hi": stats.last_ts_ms},
        ).result_rows[0]
        return int(row[0]), int(row[1])
    finally:
        client.close()


def run_demo(settings: Settings, seconds: float) -> int:
    print(f"quotaflow demo: state in {settings.state_dir}", flush=True)
    print("starting the stack (first run downloads Kafka and may install redis-server)...", flush=True)
    started = stack.up(settings)
    for name, running, where in stack.status(settings)[:3]:
        print(f"  {name:<11} {'running' if running else 'stopped':<8} {where}", flush=True)
    env = None
    token = "one of QUOTAFLOW_API_TOKENS"
    if not settings.api_tokens and settings.api_port:
        # The dashboard signs in with a query API token: an operator token for this run only.
        token = secrets.token_urlsafe(18)
        env = {**os.environ, "QUOTAFLOW_API_TOKENS": json.dumps({token: "*"})}
    try:
        for name in DEMO_STAGES:
            stack.start_pipeline_process(settings, name, env=env)
        print("  processor and sink running, each restarted by its supervisor if it exits; logs in",
              settings.state_dir / "logs", flush=True)
        if settings.api_port:
            print(f"  dashboard: http://127.0.0.1:{settings.api_port}/  sign in with {token} "
                  f"(until the demo ends; DEMO_SECONDS=600 for longer)", flush=True)
        stats, tally, failed = asyncio.run(_run(settings, seconds))
        keys_ok = asyncio.run(_keys(settings))
        for name in DEMO_STAGES:
            if (state := stack.pipeline_state(settings, name)) is not None and state.restarts:
                print(f"note: the {name} exited and was restarted {state.restarts} times during the demo; "
                      f"see {stack.pipeline_log(settings, name)}", flush=True)
    finally:
        stack.down(settings, only=list(DEMO_STAGES))
    try:
        rows, distinct = _count_stored(settings, stats)
    finally:
        stack.down(settings, only=started)
    lost = max(stats.valid_sent - distinct, 0) + max(stats.invalid_sent - tally.dead_letters, 0) + failed
    print(f"demo: produced={stats.valid_sent} processed={tally.processed} stored={rows} "
          f"denied_keys={len(tally.denied_ever)} dead_letters={tally.dead_letters} lost={lost}", flush=True)
    ok = lost == 0 and rows == stats.valid_sent and tally.processed == stats.valid_sent and keys_ok
    return 0 if ok else 1
