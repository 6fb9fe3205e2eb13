"""The processor's wiring. Its events consumer (consumer.py) reads the events topic in
batches and hands each to RequestCounter (counter.py: what a batch does, and the
guarantee), the table of its partitions recovered first (table.py); a timer repeats the
offset guard's seeks and sets the backlog gauge; Worker stops within seconds when asked.
The Faust app runs them, and the API key registry's materializer (key_registry.py).

The processor's modules, one job each: consumer.py (the events topic: group, batches,
commits), table.py (the counts, and their changelog read back), counter.py (a batch),
records.py (a record's events as columns), duplicate_checks.py (a batch's duplicate
check), subjects.py (what is counted, and its table keys), window_counts.py and
decisions.py (pure logic), offset_guard.py and offset_probe.py (gap-free input),
backend.py (Redis), output.py (the processor's producer), stopping.py (giving up on a
stop), stall_watch.py (ending a process frozen past its session), metrics.py;
key_registry.py (the API key registry's materializer: the keys topic into Redis, its agent
and watch wired here too).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError

from quotaflow.core.errors import OperatorError
from quotaflow.core.redis_clients import async_client
from quotaflow.core.settings import Settings
from quotaflow.processors import key_registry, stopping
from quotaflow.processors.backend import RedisBackend
from quotaflow.processors.consumer import SESSION_TIMEOUT_S, EventsConsumer
from quotaflow.processors.counter import RequestCounter
from quotaflow.processors.metrics import BACKLOG, READY
from quotaflow.processors.offset_guard import OffsetGuard
from quotaflow.processors.offset_probe import OffsetProbe
from quotaflow.processors.output import Output
from quotaflow.processors.stall_watch import StallWatch, check_membership
from quotaflow.processors.table import Table
from quotaflow.schemas.events import time_bounds_from_settings
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC, PROCESSOR_APP_ID, WINDOW_COUNTS_TOPIC

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> faust.App:
    policy = policy_from_settings(settings)
    app = faust.App(
        PROCESSOR_APP_ID,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        # Faust's own directory: one per process, so several processors run side by side on
        # one host (each has a metrics port of its own), none in the working directory.
        datadir=str(data_dir(settings)),
        topic_replication_factor=settings.kafka_replication_factor,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        consumer_metadata_max_age_ms=5000,
        broker_session_timeout=SESSION_TIMEOUT_S,
    )
    running: dict[str, Any] = {}  # while counting: its counter, consumer, probe and output

    @app.timer(1.0)
    async def _reseek() -> None:
        if "counter" in running:
            counter, consumer = running["counter"], running["consumer"]
            partitions = running["output"].known_events_partitions()
            if partitions and partitions != counter.partitions:  # partitions added: orgs move (counts restart)
                log.warning("the events topic's partition count changed; orgs are counted on their new partitions",
                            extra={"before": counter.partitions, "after": partitions})
                counter.partitions = partitions
            guard = counter.guard
            await guard.reseek_stale()
            assigned = consumer.assigned()
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

    @app.task
    async def count_requests() -> None:
        redis = async_client(settings)
        probe = OffsetProbe(settings.kafka_bootstrap, EVENTS_TOPIC)
        await probe.start()
        output = Output(settings.kafka_bootstrap, WINDOW_COUNTS_TOPIC, DEAD_LETTER_TOPIC, EVENTS_TOPIC)
        await output.start()
        table = Table(settings.kafka_bootstrap, WINDOW_COUNTS_TOPIC)
        partitions = await output.events_partitions()
        if (have := await output.changelog_partitions()) < partitions:
            raise OperatorError(f"the processor's changelog topic {WINDOW_COUNTS_TOPIC} has {have} partitions, the "
                                f"events topic {partitions}: run 'quotaflow stack up' (it creates the topics)")
        backend = RedisBackend(redis, policy, dedup_window_s=settings.dedup_window_s)
        # Frozen for half a session, this process may have lost its partitions to another
        # without knowing it yet: it ends rather than write a batch its successor counted on.
        watch = StallWatch(SESSION_TIMEOUT_S / 2)

        async def assigned(now: set[int], new: set[int]) -> None:
            counter.guard.reset()
            forgotten = table.keep_partitions(now - new)
            records = await table.recover(new)
            log.info("partitions assigned", extra={"partitions": sorted(now), "recovered": sorted(new),
                                                   "changelog_records": records, "forgotten": forgotten})
            READY.set(1)

        consumer = EventsConsumer(settings, assigned)

        async def before_writes() -> None:
            watch.check()
            live = consumer.live_generation() if await consumer.confirm_membership() else -1
            check_membership(live, consumer.generation)

        counter = RequestCounter(table, output, backend, OffsetGuard(table.data, probe.first_offset, consumer.seek),
                                 time_bounds_from_settings(settings), partitions, before_writes=before_writes)
        running.update(counter=counter, consumer=consumer, probe=probe, output=output)
        watch.start()
        try:
            await consumer.start()
            await consumer.run(counter.read, counter.count)
        except stopping.Stopped:
            log.info("stopping: the batch in progress is left unacknowledged, to be read again")
        except Exception as exc:  # counting stopped: the process ends, and its supervisor starts it again
            log.exception("the events consumer failed")
            await app.crash(exc)
        finally:
            watch.stop()
            running.clear()
            await consumer.stop()
            await output.stop()
            await probe.stop()
            await redis.aclose()

    key_registry.wire(app, settings)
    return app


def data_dir(settings: Settings) -> Path:
    """Faust's directory for this process: in the state dir, named after its metrics port."""
    port = settings.processor_metrics_port
    return settings.state_dir / (f"processor-data-{port}" if port else "processor-data")


class Worker(faust.Worker):
    """Faust's worker, stopping within seconds when asked (SIGTERM, SIGINT).

    The retry loops give up the batch in progress (processors/stopping.py): it is not
    committed, so it is read again after the restart, which the table recognises. The
    key registry's stream is not waited for either: what it did not apply it reads again."""

    def _schedule_shutdown(self, signal: Any) -> None:
        stopping.request()
        with warnings.catch_warnings():  # "reconfiguring late": deliberate, for the shutdown only
            warnings.simplefilter("ignore")
            self.app.conf.stream_wait_empty = False
        super()._schedule_shutdown(signal)
