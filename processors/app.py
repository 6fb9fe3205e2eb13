"""The Faust app: the processor's wiring. The agent reads the events topic in batches
and hands each to RequestCounter (counter.py: what a batch does, and the guarantee);
timers repeat the offset guard's seeks and set the backlog gauge; Worker stops
within seconds when asked.

The processor's modules, one job each: counter.py (a batch), records.py (a record's
events as columns), duplicate_checks.py (a batch's duplicate check), subjects.py
(what is counted, and its table keys), window_counts.py and decisions.py (pure
logic), offset_guard.py and offset_probe.py (gap-free input), backend.py (Redis),
output.py (the processor's producer), stopping.py (giving up on a stop), stall_watch.py
(ending a process frozen past its session), metrics.py;
key_registry.py (the API key registry's materializer: the keys topic into Redis, its agent
and watch wired here too).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import ConsumerNotStarted
from faust.types import TP

from quotaflow.core.redis_clients import async_client
from quotaflow.core.settings import Settings
from quotaflow.processors import key_registry, stopping
from quotaflow.processors.backend import RedisBackend
from quotaflow.processors.counter import RequestCounter
from quotaflow.processors.metrics import BACKLOG, READY
from quotaflow.processors.offset_guard import OffsetGuard
from quotaflow.processors.offset_probe import OffsetProbe
from quotaflow.processors.output import Output
from quotaflow.processors.stall_watch import StallWatch, check_membership
from quotaflow.schemas.events import time_bounds_from_settings
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC, PROCESSOR_APP_ID

log = logging.getLogger(__name__)

TABLE_NAME = "window-counts"
SESSION_TIMEOUT_S = 15.0


def create_app(settings: Settings) -> faust.App:
    policy = policy_from_settings(settings)
    app = faust.App(
        PROCESSOR_APP_ID,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        # Faust's own directory: one per process, so several processors run side by side on
        # one host (each has a metrics port of its own), none in the working directory.
        datadir=str(data_dir(settings)),
        # A standby copy is useless to the memory store: it drops what it holds of partitions
        # it is not active for after every recovery, and a partition it takes over is read
        # from the changelog's start anyway. Reading the other processors' changelogs would
        # only cost each of them.
        table_standby_replicas=0,
        topic_partitions=settings.events_partitions,
        topic_replication_factor=settings.kafka_replication_factor,  # its changelog: 3 replicas on 3 brokers
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=settings.processor_commit_interval_s,
        # After a broker restart the first rebalance can see topics without
        # leaders and assign nothing; fresh metadata within seconds makes the
        # group leader notice and rebalance again (default: 5 minutes).
        consumer_metadata_max_age_ms=5000,
        # A worker killed without leaving the group holds its partitions until
        # its session times out; Faust's default of 60 s stalls a restart that long.
        broker_session_timeout=SESSION_TIMEOUT_S,
        # Batches of thousands: fetch and buffer that much at a time.
        broker_max_poll_records=settings.processor_batch_size * 2,
        stream_buffer_maxsize=settings.processor_batch_size * 4,
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
    events_topic = app.topic(EVENTS_TOPIC, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw",
                             partitions=settings.events_partitions)
    table = app.Table(TABLE_NAME, default=None, partitions=settings.events_partitions,
                      schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"),
                      # Every batch rewrites the subjects it touches: roll segments often so the log
                      # cleaner compacts them, and a restart recovers one record per subject, not
                      # one per batch.
                      extra_topic_configs={"segment.ms": str(5 * 60_000), "min.cleanable.dirty.ratio": "0.1"})

    running: dict[str, Any] = {}  # while the agent runs: its counter, probe and output

    @app.on_rebalance_complete.connect
    async def _ready(sender: Any, **kwargs: Any) -> None:
        if "counter" in running:
            running["counter"].guard.reset()
            # What this process counted on partitions now another's is out of date from now
            # on: forget it (a partition that comes back is recovered from its changelog).
            running["counter"].keep_partitions({tp.partition for tp in app.consumer.assignment()
                                                if tp.topic == EVENTS_TOPIC})
        READY.set(1)

    @app.timer(1.0)
    async def _reseek() -> None:
        if "counter" in running:
            counter = running["counter"]
            partitions = running["output"].known_events_partitions()
            if partitions and partitions != counter.partitions:  # partitions added: orgs move (counts restart)
                log.warning("the events topic's partition count changed; orgs are counted on their new partitions",
                            extra={"before": counter.partitions, "after": partitions})
                counter.partitions = partitions
            guard = counter.guard
            await guard.reseek_stale()
            assigned = [tp.partition for tp in app.consumer.assignment() if tp.topic == EVENTS_TOPIC]
            if not assigned:  # another processor of the group holds every partition
                BACKLOG.set(0)
                return
            try:
                ends = await running["probe"].end_offsets(assigned)
                starts = await running["probe"].start_offsets(assigned)
            except KafkaError as exc:  # a broker restart: look again next time
                log.debug("end offsets unavailable", extra={"error": str(exc)})
                return
            await guard.unstick(ends)
            BACKLOG.set(guard.backlog(ends, starts))

    @app.agent(events_topic)
    async def count_requests(stream: faust.StreamT) -> None:
        redis = async_client(settings)
        probe = OffsetProbe(settings.kafka_bootstrap, EVENTS_TOPIC)
        await probe.start()
        output = Output(settings.kafka_bootstrap, table.changelog_topic.get_topic_name(), DEAD_LETTER_TOPIC,
                        EVENTS_TOPIC)
        await output.start()

        async def seek(partition: int, offset: int) -> None:
            log.warning("records skipped by the stream; seeking back", extra={"partition": partition, "offset": offset})
            await seek_stream(app, TP(EVENTS_TOPIC, partition), offset)

        running["probe"], running["output"] = probe, output
        backend = RedisBackend(redis, policy, dedup_window_s=settings.dedup_window_s)
        # Frozen for half a session, this process may have lost its partitions to another
        # without knowing it yet: it ends rather than write a batch its successor counted on.
        watch = StallWatch(SESSION_TIMEOUT_S / 2)
        watch.start()

        def before_writes() -> None:
            watch.check()
            check_membership(group_generation(app), app.consumer_generation_id)

        counter = running["counter"] = RequestCounter(table, output, backend,
                                                      OffsetGuard(table.data, probe.first_offset, seek),
                                                      time_bounds_from_settings(settings),
                                                      await output.events_partitions(), before_writes=before_writes)
        try:
            async for batch in stream.take_events(settings.processor_batch_size,
                                                  within=settings.processor_batch_seconds):
                await counter.handle(batch)
        except stopping.Stopped:
            log.info("stopping: the batch in progress is left unacknowledged, to be read again")
        finally:
            watch.stop()
            running.clear()
            await output.stop()
            await probe.stop()
            await redis.aclose()

    key_registry.wire(app, settings)
    return app


def group_generation(app: faust.App) -> int | None:
    """The group generation the consumer is in now, from aiokafka's coordinator as Faust reads
    it on an assignment (-1 once the group expelled it); None where that is not at hand."""
    try:
        return app.consumer._thread._ensure_consumer()._coordinator.generation
    except (AttributeError, ConsumerNotStarted):
        return None


def data_dir(settings: Settings) -> Path:
    """Faust's directory for this process: in the state dir, named after its metrics port."""
    port = settings.processor_metrics_port
    return settings.state_dir / (f"processor-data-{port}" if port else "processor-data")


class Worker(faust.Worker):
    """Faust's worker, stopping within seconds when asked (SIGTERM, SIGINT).

    The retry loops give up the batch in progress (processors/stopping.py), and the
    consumer no longer waits for every event taken from the stream to be acknowledged:
    events it took and never handed out would keep it waiting for ever. Unacknowledged
    records are read again after the restart, which the table recognises. On a
    rebalance it still waits (stream_wait_empty), so a batch of a revoked partition
    ends before its next owner recovers the table."""

    def _schedule_shutdown(self, signal: Any) -> None:
        stopping.request()
        with warnings.catch_warnings():  # "reconfiguring late": deliberate, for the shutdown only
            warnings.simplefilter("ignore")
            self.app.conf.stream_wait_empty = False
        super()._schedule_shutdown(signal)


async def seek_stream(app: faust.App, tp: TP, offset: int) -> None:
    """Seek the agent's stream back to ``offset``. Faust runs its aiokafka consumer in a
    thread of its own, and its Consumer.seek calls that consumer from ours: the fetcher,
    between listing and reading its fetched partitions, then finds one gone (KeyError in
    fetched_records, which stops the worker). seek_wait runs the seek in the consumer's
    thread. A partition revoked meanwhile cannot be sought: the guard repeats seeks that
    did not take, and a rebalance repositions the stream anyway."""
    try:
        await app.consumer.seek_wait({tp: offset})
    except (KafkaError, asyncio.TimeoutError, AssertionError) as exc:
        log.warning("seek failed; it will be repeated", extra={"partition": tp.partition, "error": repr(exc)})
