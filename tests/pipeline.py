"""Test helpers: pipeline processes as real subprocesses, events, and waiting on them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import uuid
from typing import Callable, Iterator

import pytest

from aiokafka.admin import AIOKafkaAdminClient

from quotaflow.core import metrics
from quotaflow.core.settings import Settings
from quotaflow.deploy import stack
from quotaflow.deploy.procs import alive
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.events import RequestEvent
from quotaflow.schemas.ids import is_valid_id
from quotaflow.schemas.redis_keys import org_key, overrides_key, reservations_key, usage_key
from quotaflow.schemas.topics import EVENTS_TOPIC, SINK_CLICKHOUSE_GROUP
from quotaflow.sinks.clickhouse.plans import Range, parse_plan


@contextlib.contextmanager
def stack_of_its_own(env: dict[str, str]) -> Iterator[Settings]:
    """A stack started afresh from these variables (stack.isolated_env's, and more), set
    meanwhile, so the stages and workers a test starts inherit them; stopped at the end."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = Settings()
        stack.down(settings)
        shutil.rmtree(settings.state_dir, ignore_errors=True)
        try:
            stack.up(settings)
            yield settings
        finally:
            stack.down(settings)


def unique(prefix: str) -> str:
    """Ids unique to one test, so tests sharing the session's stack never see each other's data."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def event(org_id: str, api_key_id: str, ts_ms: int, **over) -> RequestEvent:
    fields = dict(org_id=org_id, api_key_id=api_key_id, service="tests", endpoint="/v1/items/{id}", method="GET",
                  status=200, latency_ms=12.5, request_bytes=0, response_bytes=512, client_ip="198.51.100.7",
                  user_agent="pytest", ts_ms=ts_ms)
    fields.update(over)
    return RequestEvent.new(**fields)


def this_minute() -> int:
    """Start of the current minute (epoch ms): a window for a test's events. Counts are kept
    by event time, so a test that reads counts (``counted``) at this time needs nothing
    more: the minute may end while it runs."""
    now_ms = int(time.time() * 1000)
    return now_ms - now_ms % 60_000


def minute_start(need_s: float = 30) -> int:
    """Start of the current minute, once at least ``need_s`` of it remain (waiting for the
    next minute if not), for tests whose assertions depend on a clock of a component:
    the processor decides with its wall clock (remaining, reset, allowed: processors/counter.py)
    and a gateway checks with Redis's (gateway/check.lua). Their events and the decisions
    must fall in one minute that is still current when the test reads them; a test that
    reads counts only takes this_minute() instead."""
    now = time.time()
    if 60 - now % 60 < need_s:
        time.sleep(60 - now % 60 + 0.05)  # the clocks read are the components' own: nothing to wait on but time
    return this_minute()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, logs: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs()}")
        time.sleep(0.2)


async def publish(settings: Settings, events: list[RequestEvent], raw: list[tuple[bytes, bytes]] = (),
                  batch_events: int = 500) -> None:
    """Publish as the Python emitter does: up to ``batch_events`` events of one org per record."""
    from quotaflow.collector.emitter import Emitter

    async with Emitter(settings.kafka_bootstrap, batch_events=batch_events) as emitter:
        for ev in events:
            await emitter.emit(ev)
        for key, value in raw:
            await emitter.emit_bytes(key, value)
        await emitter.flush()
        assert emitter.failed == 0


class Pipeline:
    """The processor and the sink, started as `quotaflow processor|sink` subprocesses,
    each under its supervisor (`quotaflow supervise`), as the stack and the demo run them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._log_starts: dict[str, int] = {}
        self._killed: dict[str, int] = {}  # stage -> its restarts when kill() killed it

    def start(self, name: str, **env: str) -> int:
        """Start a stage; ``env`` adds variables (settings) for this start only. After
        kill(), wait for the supervisor to restart the stage instead (same variables as
        before). Returns the stage's own pid, once it is ready."""
        log = stack.pipeline_log(self.settings, name)
        self._log_starts.setdefault(name, log.stat().st_size if log.exists() else 0)  # this test's part
        killed_at = self._killed.pop(name, None)
        if killed_at is not None and self.pid(name) is not None:
            assert not env, f"the supervisor restarts the {name} with the variables it was started with"
            return stack.wait_restarted(self.settings, name, after=killed_at)
        return stack.start_pipeline_process(self.settings, name, env={**os.environ, **env})

    def pid(self, name: str) -> int | None:
        """The stage's supervisor (None when the stage is stopped)."""
        return stack.pipeline_proc(self.settings, name).pid()

    def state(self, name: str):
        """What the supervisor records: the stage's own pid, restarts, last exit."""
        return stack.pipeline_state(self.settings, name)

    def stop(self, name: str) -> None:
        stack.stop_pipeline_process(self.settings, name)

    def kill(self, name: str) -> None:
        """SIGKILL the stage itself (not its supervisor), as the OOM killer would; the
        supervisor restarts it, and start(name) waits for that."""
        state = self.state(name)
        assert state is not None and state.pid is not None, f"{name} is not running"
        os.kill(state.pid, signal.SIGKILL)
        wait_for(lambda: not alive(state.pid), 10, f"{name} to die")
        self._killed[name] = state.restarts

    def stop_all(self) -> None:
        for name in stack.PIPELINE:
            self.stop(name)

    def metrics(self, name: str) -> dict[str, float]:
        """Every sample a process exposes (see quotaflow.metrics.scrape); {} if it is not up."""
        try:
            return metrics.scrape(stack.metrics_port(self.settings, name))
        except OSError:
            return {}

    def metric(self, name: str, sample: str) -> float:
        return self.metrics(name).get(sample, 0.0)

    def logs(self, name: str | None = None, lines: int = 40) -> str:
        """What the processes wrote during this test, minus aiokafka's reconnect noise."""
        out = []
        for n in [name] if name else list(stack.PIPELINE):
            path = stack.pipeline_log(self.settings, n)
            if n not in self._log_starts or not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self._log_starts[n])
                text = f.read().decode(errors="replace").splitlines()
            text = [t for t in text if "Unable connect to node" not in t and "Unable to update metadata" not in t]
            out.append(f"--- {n} log ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def wait_caught_up(self, timeout_s: float = 60) -> None:
        """Both consumer groups have committed everything on the events topic."""
        from quotaflow.deploy.observe import pipeline_caught_up

        wait_for(lambda: asyncio.run(pipeline_caught_up(self.settings.kafka_bootstrap)), timeout_s,
                 "processor and sink to commit all events", self.logs)

    def wait_processor_applied(self, redis_client, timeout_s: float = 60) -> None:
        """The processor has applied every record published so far, so nothing published
        can still change a count: a marker event published now on each partition of the
        events topic has been counted. A partition is applied in offset order (a record
        is applied only after the one before it: processors/offset_guard.py), so every
        record before a counted marker was applied, or recognised as redelivered. (Its
        committed offsets may lag far behind; its backlog gauge is sampled once a second
        and may predate the last publication.)"""
        from quotaflow.schemas.events import partition_of

        partitions = self.settings.events_partitions
        markers: dict[int, str] = {}
        while len(markers) < partitions:  # an org of its own on each partition
            org = unique("marker")
            markers.setdefault(partition_of(org, partitions), org)
        at = int(time.time() * 1000)
        asyncio.run(publish(self.settings, [event(org, "marker", at) for org in markers.values()]))
        wait_for(lambda: all(counted(redis_client, org, "marker", at) == 1 for org in markers.values()), timeout_s,
                 "the processor to count a marker on every partition (everything before it applied)", self.logs)

    def wait_sink_caught_up(self, timeout_s: float = 120) -> None:
        """The sink group has committed everything on the events topic (for tests that
        run the sink alone, where wait_caught_up would wait on the processor too)."""
        from quotaflow.deploy.observe import sink_caught_up

        wait_for(lambda: asyncio.run(sink_caught_up(self.settings.kafka_bootstrap)), timeout_s,
                 "the sink to commit every event", self.logs)

    def query_clickhouse(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        """Run a query on the engine. The embedded engine is open in one process at a
        time, so the sink must be stopped first."""
        assert self.pid("sink") is None, "stop the sink before opening the embedded engine"
        client = connect(self.settings.clickhouse_url)
        try:
            return client.query(sql, parameters=parameters or {}).result_rows
        finally:
            client.close()


async def read_all(settings: Settings, topic: str) -> list:
    """Every record of ``topic`` from the beginning to its current end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from quotaflow.deploy.observe import end_offsets

    ends = await end_offsets(settings.kafka_bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out = []
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp.partition] for tp in tps])

        while await behind():
            for recs in (await consumer.getmany(timeout_ms=1000)).values():
                out.extend(recs)
        return out
    finally:
        await consumer.stop()


def counted(redis_client, org_id: str, api_key_id: str | None, at_ms: int, label: str = "60s") -> int | None:
    """What the processors counted for a key (or, with api_key_id None, an org) in the
    window of the default policy labelled ``label`` that contains ``at_ms``; None before any count."""
    from quotaflow.schemas.limits import Window, window_count
    from quotaflow.schemas.redis_keys import decode_buckets, window_field

    raw = redis_client.hget(usage_key(org_id, api_key_id), window_field(label))
    if raw is None:
        return None
    return window_count(decode_buckets(raw), Window(int(label.rstrip("s"))), at_ms)


def decision(redis_client, org_id: str, api_key_id: str):
    from quotaflow.schemas.redis_keys import Decision

    return Decision.from_redis(redis_client.hgetall(usage_key(org_id, api_key_id)))


def stray_keys(redis_client, pairs: list[tuple[str, str]]) -> list[str]:
    """The Redis keys that refused (api_key_id, org_id) pairs would have named had a check
    taken them (an admitted check reserves in the key's and the org's set), that exist."""
    names = []
    for key, org in pairs:
        names += [reservations_key(org, key), usage_key(org, key), overrides_key(org, key)]
        if not is_valid_id(org):
            names += [reservations_key(org), usage_key(org), org_key(org)]
    return [name for name in names if redis_client.exists(name)]


# --- the sink's plans: what it commits before storing a batch (sinks/clickhouse/plans.py) ---

SINK_REPLAYED = "quotaflow_sink_batches_replayed_total"
SINK_REPAIRS = "quotaflow_sink_repairs_total"
SINK_INSERTED = "quotaflow_sink_rows_inserted_total"


def plans_in(committed: dict) -> list[Range]:
    """The plans among the sink group's committed offsets (as list_consumer_group_offsets gives them)."""
    return [plan for tp, om in committed.items() if tp.topic == EVENTS_TOPIC
            if (plan := parse_plan(tp.topic, tp.partition, om.offset, om.metadata)) is not None]


async def committed(settings) -> dict:
    """The sink group's committed offsets and metadata."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return await admin.list_consumer_group_offsets(SINK_CLICKHOUSE_GROUP)
    finally:
        await admin.close()


def pending_plans(settings) -> list[Range]:
    return plans_in(asyncio.run(committed(settings)))


async def until_a_plan(settings, timeout_s: float) -> None:
    """Return as soon as a plan is committed (a batch is being stored), or after timeout_s."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if plans_in(await admin.list_consumer_group_offsets(SINK_CLICKHOUSE_GROUP)):
                return
            await asyncio.sleep(0.005)
    finally:
        await admin.close()


def kill_sink_mid_batches(pipeline: "Pipeline", settings, rows_first: int, times: int = 3,
                          before_each: Callable[[], None] = lambda: None) -> list[list[Range]]:
    """SIGKILL the running sink ``times`` times, each once it has inserted ``rows_first``
    rows and aimed at the window that matters, between a plan and its commit (a batch is
    stored in tens of ms; the sink may spend longer waiting for records). After each kill
    the sink is started again and, if a plan was left, waited for until it has replayed
    it. Returns the plans pending right after each kill."""
    kills = []
    for _ in range(times):
        wait_for(lambda: pipeline.metric("sink", SINK_INSERTED) >= rows_first, 120, "the sink to be mid-stream",
                 pipeline.logs)
        before_each()
        asyncio.run(until_a_plan(settings, timeout_s=5))
        pipeline.kill("sink")
        kills.append(pending_plans(settings))
        pipeline.start("sink")
        if kills[-1]:  # the restarted sink first stores the planned batch again, with the same token
            outcome: list[str] = []

            def settled() -> bool:
                if pipeline.metric("sink", SINK_REPLAYED) >= 1:
                    outcome.append("replayed")
                # The killed sink's last commit may reach the broker after the read above (sent
                # before the kill): then no plan is left, and no replay counted. A replay is
                # counted before it clears its plan, so that order tells the two apart.
                elif not pending_plans(settings) and pipeline.metric("sink", SINK_REPLAYED) < 1:
                    outcome.append("committed before the kill")
                return bool(outcome)

            wait_for(settled, 120, "the planned batch to be replayed", pipeline.logs)
            if outcome[0] != "replayed":
                kills[-1] = []  # that kill did not land between a plan and its commit
    return kills
