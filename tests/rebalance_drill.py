"""Several processors of one group while gateways check: shared by
tests/test_processors_group.py and bench/processors.py.

Processors are `quotaflow processor` subprocesses, each with a metrics port (and so a Faust
directory: processors/app.py data_dir) of its own. Gateways are RateLimiter.check calls
from tasks of one event loop on a thread of their own, each publishing its request's event
as a metering gateway does (the reservation's id and time; 429 when refused), and each
decision is kept: what was admitted, per key and org and window, is compared with the limits
(over-admission) and with what the processors counted (every admitted event once).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from quotaflow.core import metrics
from quotaflow.core.settings import Settings
from quotaflow.schemas.limits import SUBJECT_KEY, SUBJECT_ORG, Policy

COUNTED = 'quotaflow_processor_events_total{outcome="counted"}'
READY = "quotaflow_processor_ready"
FENCED = "quotaflow_processor_writes_fenced_total"


def scrape(port: int) -> dict[str, float]:
    """A process's metrics; {} while it is not serving them (starting, or dead)."""
    try:
        return metrics.scrape(port)
    except OSError:
        return {}


@dataclass
class Processor:
    """One `quotaflow processor` process, unsupervised, logging to ``log``."""

    port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self) -> "Processor":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "quotaflow", "processor"], stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env,
                                              "QUOTAFLOW_PROCESSOR_METRICS_PORT": str(self.port)})
        return self

    def counted(self) -> float:
        return scrape(self.port).get(COUNTED, 0.0)

    def ready(self) -> bool:
        return scrape(self.port).get(READY) == 1.0

    def kill(self) -> None:
        """SIGKILL, as the OOM killer does: no goodbye to the group, a batch cut anywhere."""
        assert self.proc is not None and self.proc.poll() is None, f"processor on {self.port} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def tail(self, chars: int = 3000) -> str:
        return f"--- processor on {self.port} ---\n" + (self.log.read_text(errors="replace")[-chars:]
                                                         if self.log.exists() else "(no log)")


@dataclass
class GatewayLoad:
    """``gateways`` tasks each checking every one of ``keys`` ((org, key) pairs), together
    ``rate_per_key`` checks of each key a second, until stopped; every decision kept as
    (org, key, Redis time ms, allowed)."""

    settings: Settings
    keys: list[tuple[str, str]]
    rate_per_key: float = 4.0
    gateways: int = 4
    decisions: list[tuple[str, str, int, bool]] = field(default_factory=list)
    unenforced: int = 0  # checks that failed open (Redis unanswered): none may
    failed_events: int = 0  # events the emitter could not deliver: none may
    failure: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateways", daemon=True)

    def start(self) -> "GatewayLoad":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self.failure is not None:
            raise self.failure
        assert not self._thread.is_alive(), "the gateways did not stop"

    def admitted(self) -> int:
        return sum(d[3] for d in self.decisions)

    def _run(self) -> None:
        try:
            asyncio.run(self._gateways())
        except BaseException as exc:  # surfaced by stop()
            self.failure = exc

    async def _gateways(self) -> None:
        from quotaflow.collector.emitter import Emitter
        from quotaflow.gateway.limiter import RateLimiter
        from quotaflow.schemas.events import RequestEvent

        limiter = RateLimiter.from_settings(self.settings)
        emitter = Emitter(self.settings.kafka_bootstrap, batch_events=100)
        await emitter.start()
        interval = self.gateways / self.rate_per_key  # each task checks every key once per round

        async def gateway() -> None:
            n = 0
            started = time.monotonic()
            while not self._stop.is_set():
                for org, key in self.keys:  # every gateway checks every key: they race for the same units
                    d = await limiter.check(key, org)
                    self.unenforced += not d.enforced
                    self.decisions.append((org, key, d.now_ms, d.allowed))
                    await emitter.emit(RequestEvent.new(
                        event_id=d.event_id, ts_ms=d.now_ms, org_id=org, api_key_id=key, service="drill",
                        endpoint="/v1/things", method="GET", status=200 if d.allowed else 429, latency_ms=1.0,
                        request_bytes=0, response_bytes=10, client_ip="192.0.2.1", user_agent="drill"))
                n += 1
                await asyncio.sleep(max(0.0, started + n * interval - time.monotonic()))

        try:
            await asyncio.gather(*(gateway() for _ in range(self.gateways)))
            await emitter.flush()
            self.failed_events = emitter.failed
        finally:
            await emitter.stop()
            await limiter.aclose()


def worst_ratio(decisions: list[tuple[str, str, int, bool]], policy: Policy, tier: str) -> float:
    """Admitted / limit in the worst instance of any limited window, of any key or org
    (fixed windows: epoch-aligned). 1.000 means some window was filled exactly; above, over-admitted."""
    admitted: collections.Counter = collections.Counter()
    key_limits, org_limits = policy.limits(SUBJECT_KEY, tier), policy.limits(SUBJECT_ORG, tier)
    for org, key, at_ms, allowed in decisions:
        if not allowed:
            continue
        for w, window in enumerate(policy.windows):
            instance = at_ms // window.length_ms
            if key_limits[w] is not None:
                admitted[("key", org, key, w, instance)] += 1
            if org_limits[w] is not None:
                admitted[("org", org, None, w, instance)] += 1
    worst = 0.0
    for (scope, _, _, w, _), n in admitted.items():
        limit = (key_limits if scope == "key" else org_limits)[w]
        worst = max(worst, n / limit)
    return worst


def admitted_per_day(decisions: list[tuple[str, str, int, bool]]) -> dict[tuple[str, str | None, int], int]:
    """(org, key or None for the org, day start ms) -> admitted requests: what the processors must count."""
    out: collections.Counter = collections.Counter()
    for org, key, at_ms, allowed in decisions:
        if allowed:
            day = at_ms - at_ms % 86_400_000
            out[(org, key, day)] += 1
            out[(org, None, day)] += 1
    return dict(out)


async def group_state(bootstrap: str) -> tuple[str, int]:
    """The processors' consumer group: its state ("Stable", "PreparingRebalance", ...) and members
    (("", 0) while the broker names no coordinator for it)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from quotaflow.schemas.topics import PROCESSOR_EVENTS_GROUP

    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([PROCESSOR_EVENTS_GROUP])
        _, _, state, _, _, members, *_ = response.groups[0]
        return state, len(members)
    except KafkaError:  # no coordinator yet (the group's first member still joining): no group yet
        return "", 0
    finally:
        await admin.close()
