"""A broker SIGKILLed under a stream of events, and what the pipeline made of it: shared by
tests/test_kafka_cluster.py and bench/brokers.py.

The stream goes through the producer core every collector uses (collector/producer.py:
idempotent, acks=all, a disk spool for what Kafka does not acknowledge in time), from a
thread of its own, at a steady rate, to orgs spread over every partition of the events
topic (so the killed broker leads some of them). Each record's outcome is kept: its events
are *acknowledged* when Kafka acknowledged it, or when it went to the spool and the spool
was then replayed and acknowledged in full. The reckoning compares them with what the
processor counted in Redis and the sink stored in ClickHouse, event by event where the
store allows (ClickHouse) and key by key where it counts (Redis).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from quotaflow.collector.producer import DELIVERED, SPOOLED, ProducerCore
from quotaflow.collector.spool import Record
from quotaflow.core.settings import Settings
from quotaflow.deploy import kafka
from quotaflow.deploy.procs import alive, wait_until
from quotaflow.schemas.events import encode_batch, partition_key, partition_of
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.pipeline import counted, event, unique


def spread_orgs(partitions: int, per_partition: int) -> list[str]:
    """Orgs whose events land on every partition, ``per_partition`` each."""
    orgs: dict[int, list[str]] = collections.defaultdict(list)
    while any(len(orgs[p]) < per_partition for p in range(partitions)):
        org = unique("drill")
        bucket = orgs[partition_of(org, partitions)]
        if len(bucket) < per_partition:
            bucket.append(org)
    return [org for p in range(partitions) for org in orgs[p]]


@dataclass
class Stream:
    """Events of ``orgs`` x ``keys_per_org`` keys, ``events_per_record`` of one key per
    record, ``records_per_s`` records a second, all stamped ``ts_ms`` (one window: the
    counts read later are those of that window)."""

    bootstrap: str
    spool_dir: Path
    orgs: list[str]
    ts_ms: int
    keys_per_org: int = 2
    events_per_record: int = 5
    records_per_s: float = 60.0
    delivery_timeout_s: float = 10.0
    submitted: dict[tuple[str, str], set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    delivered: set[str] = field(default_factory=set)  # acknowledged directly
    delivered_at: list[float] = field(default_factory=list)  # time.monotonic() of each acknowledgement
    spooled: set[str] = field(default_factory=set)  # not acknowledged in time: spooled, replayed
    lost: int = 0
    spool_drained: bool = False
    failure: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="drill-stream", daemon=True)
        self.core: ProducerCore | None = None

    def keys(self) -> list[tuple[str, str]]:
        return [(org, f"key-{k}") for org in self.orgs for k in range(self.keys_per_org)]

    def counted_by_org(self, redis_client) -> dict[str, int]:
        """What the processor has counted of the stream so far, per org (in its window)."""
        out = dict.fromkeys(self.orgs, 0)
        for org, key in self.keys():
            out[org] += counted(redis_client, org, key, self.ts_ms) or 0
        return out

    def start(self) -> "Stream":
        self._thread.start()
        return self

    def delivered_count(self) -> int:
        """Events acknowledged so far, directly or replayed from the spool."""
        core = self.core
        return 0 if core is None else core.delivered

    def stop(self, timeout_s: float = 120) -> None:
        """Stop submitting; wait until everything submitted is acknowledged (the spool
        replayed) or the time is up."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self.failure is not None:
            raise self.failure
        if self._thread.is_alive():
            raise AssertionError(f"the stream did not drain within {timeout_s:.0f} s")

    def longest_stall_s(self, start: float, end: float) -> float:
        """The longest time between start and end without an acknowledgement."""
        with self._lock:
            times = [start] + [t for t in self.delivered_at if start < t < end] + [end]
        return max(b - a for a, b in zip(times, times[1:]))

    def acknowledged(self) -> set[str]:
        """Event ids Kafka acknowledged: directly, or through the spool once it was replayed."""
        return self.delivered | (self.spooled if self.spool_drained else set())

    def _run(self) -> None:
        try:
            asyncio.run(self._stream())
        except BaseException as exc:  # surfaced by stop()
            self.failure = exc

    async def _stream(self) -> None:
        core = self.core = ProducerCore(self.bootstrap, spool_dir=self.spool_dir,
                                        delivery_timeout_s=self.delivery_timeout_s, stop_timeout_s=0)
        await core.start()
        keys = self.keys()
        pending = []
        n = 0
        started = time.monotonic()
        while not self._stop.is_set():
            org, key = keys[n % len(keys)]
            events = [event(org, key, self.ts_ms) for _ in range(self.events_per_record)]
            ids = [str(ev.event_id) for ev in events]
            with self._lock:
                self.submitted[(org, key)].update(ids)
            outcome = core.submit(Record(EVENTS_TOPIC, partition_key(org), encode_batch(events), events=len(events)),
                                  want_outcome=True)
            outcome.add_done_callback(lambda fut, ids=ids: self._outcome(fut.result(), ids))
            pending.append(outcome)
            n += 1
            await asyncio.sleep(max(0.0, started + n / self.records_per_s - time.monotonic()))
        await asyncio.gather(*pending)
        await core.flush()  # the spool replayed: every spooled record acknowledged
        self.spool_drained = core.spool.empty()
        self.lost = core.lost
        await core.stop()

    def _outcome(self, outcome: str, ids: list[str]) -> None:
        with self._lock:
            if outcome == DELIVERED:
                self.delivered.update(ids)
                self.delivered_at.append(time.monotonic())
            elif outcome == SPOOLED:
                self.spooled.update(ids)


async def leaders(bootstrap: str) -> dict[int, int]:
    """Broker id -> partitions of the events topic it leads."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        (topic,) = await admin.describe_topics([EVENTS_TOPIC])
        out: dict[int, int] = collections.Counter()
        for p in topic["partitions"]:
            out[p["leader"]] += 1
        return dict(out)
    finally:
        await admin.close()


def kill_busiest_broker(settings: Settings) -> kafka.Node:
    """SIGKILL the broker leading the most partitions of the events topic (the first such)."""
    led = asyncio.run(leaders(settings.kafka_bootstrap))
    node = kafka.nodes(settings)[max(sorted(led), key=lambda b: led[b]) - 1]
    pid = node.proc.pid()
    assert pid is not None, f"broker {node.n} is not running"
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid), 10), f"broker {node.n} (pid {pid}) did not die"
    return node


@dataclass
class Reckoning:
    acknowledged: int  # events Kafka acknowledged
    counted: int  # what the processor counted for the stream's keys
    lost_counted: int  # acknowledged, not counted (by key: how far each key's count is short)
    double_counted: int  # counted more than once (by key: how far each key's count is over)
    stored_rows: int
    lost_stored: int  # acknowledged, no row in ClickHouse
    double_stored: int  # rows beyond the first of an event id

    @property
    def exact(self) -> bool:
        return not (self.lost_counted or self.double_counted or self.lost_stored or self.double_stored)


def reckon(stream: Stream, redis_client, rows: dict[str, int]) -> Reckoning:
    """What the processor counted (Redis) and the sink stored (``rows``: event id -> rows
    in ClickHouse) against what Kafka acknowledged. Every event submitted must have been
    acknowledged (the spool replayed): a key's count is then short of its events by
    what was lost, and over them by what was counted twice."""
    acknowledged = stream.acknowledged()
    lost_counted = double_counted = total = 0
    for (org, key), ids in stream.submitted.items():
        got = counted(redis_client, org, key, stream.ts_ms) or 0
        want = len(ids & acknowledged)
        total += got
        lost_counted += max(0, want - got)
        double_counted += max(0, got - len(ids))
    return Reckoning(acknowledged=len(acknowledged), counted=total, lost_counted=lost_counted,
                     double_counted=double_counted, stored_rows=sum(rows.values()),
                     lost_stored=len(acknowledged - rows.keys()),
                     double_stored=sum(n - 1 for n in rows.values() if n > 1))


def kafka_copies(settings: Settings, orgs: list[str]) -> collections.Counter:
    """Event id -> copies of it on the events topic, for the stream's orgs: more than one
    where a record was acknowledged too late, spooled and sent again (at-least-once)."""
    import orjson

    from tests.pipeline import read_all

    wanted = {partition_key(org) for org in orgs}
    copies: collections.Counter = collections.Counter()
    for record in asyncio.run(read_all(settings, EVENTS_TOPIC)):
        if record.key in wanted:
            doc = orjson.loads(record.value)
            copies.update(ev["event_id"] for ev in (doc if isinstance(doc, list) else [doc]))
    return copies


def stored_rows(query, orgs: list[str]) -> dict[str, int]:
    """Event id -> rows of it in the raw table, for the stream's orgs (``query``: a
    function running SQL with parameters, e.g. Pipeline.query_clickhouse)."""
    from quotaflow.schemas.clickhouse.tables import RAW

    return {str(event_id): n for event_id, n in
            query(f"SELECT event_id, count() FROM {RAW} WHERE org_id IN {{orgs:Array(String)}} GROUP BY event_id",
                  {"orgs": orgs})}
