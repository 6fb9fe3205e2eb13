"""Emitter: puts RequestEvents on the events topic from Python services.

``emit`` never waits for Kafka: it appends the event to its org's open batch,
and a batch goes out as one record (a JSON array, keyed by the org) when it is
full or ``batch_ms`` old (50 ms by default: an org sending 100 requests a second
then makes 20 records a second, not 100). Stream processors pay per record as well as
per event (quotaflow's about 30 µs of CPU a record), so batching is what lets one
processor keep up with tens of thousands of requests a second spread over many orgs. The cost is up to ``batch_ms`` more decision lag; admission itself
does not wait for it (gateways reserve in Redis). Below that, the producer core (collector/producer.py) sends the records: aiokafka
batches them, compresses them (zstd) and produces idempotently (acks=all, no
duplicates on retry). Input that is not a valid event is not raised into the request
path: it goes to the dead-letter topic with the reason, and is logged and counted.

``emit`` awaits nothing that can wait on Kafka or the disk. Given a spool directory
(``spool_dir``; ``Emitter.from_settings`` takes QUOTAFLOW_SPOOL_DIR), records Kafka
does not take in time go to a disk spool and are replayed when it is back, also by
the next emitter over the same directory after a restart: at-least-once to Kafka,
exactly-once downstream by event_id (see collector/producer.py). Without one, as
before, they wait in memory (bounded: ``memory_bytes``) and what fails is lost,
counted in ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import orjson

from quotaflow.collector.producer import EVENTS, ProducerCore
from quotaflow.collector.spool import Record
from quotaflow.schemas import deadletter
from quotaflow.schemas.events import (
    MAX_EVENTS_PER_RECORD,
    RequestEvent,
    SchemaError,
    encode_batch,
    partition_key,
    validate,
)
from quotaflow.schemas.ids import show
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC

if TYPE_CHECKING:
    from quotaflow.core.settings import Settings

log = logging.getLogger(__name__)

EMITTED = EVENTS  # quotaflow_collector_events_total{outcome}


class Emitter:
    def __init__(self, bootstrap_servers: str, *, batch_events: int = 500, batch_ms: int = 50, linger_ms: int = 5,
                 max_batch_bytes: int = 1024 * 1024, compression: str = "zstd", topic: str = EVENTS_TOPIC,
                 spool_dir: Path | str | None = None, spool_max_bytes: int = 256 * 1024 * 1024,
                 spool_segment_bytes: int = 16 * 1024 * 1024, memory_bytes: int = 32 * 1024 * 1024,
                 delivery_timeout_s: float = 10.0, stop_timeout_s: float = 10.0):
        if not 1 <= batch_events <= MAX_EVENTS_PER_RECORD:
            raise ValueError(f"batch_events must be 1..{MAX_EVENTS_PER_RECORD}, got {batch_events}")
        self.topic = topic
        self.batch_events = batch_events
        self.batch_s = batch_ms / 1000
        self.core = ProducerCore(
            bootstrap_servers, linger_ms=linger_ms, max_batch_bytes=max_batch_bytes, compression=compression,
            spool_dir=spool_dir, spool_max_bytes=spool_max_bytes, spool_segment_bytes=spool_segment_bytes,
            spool_topics=(topic, DEAD_LETTER_TOPIC), memory_bytes=memory_bytes,
            delivery_timeout_s=delivery_timeout_s, stop_timeout_s=stop_timeout_s)
        self.dead_lettered = 0
        self._open: dict[str, list[RequestEvent]] = {}  # org -> events not yet sent
        self._linger: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: "Settings", **options: Any) -> "Emitter":
        """An emitter of the configured broker, batching as QUOTAFLOW_COLLECTOR_BATCH_MS /
        _BATCH_EVENTS / _LINGER_MS say, spooling to QUOTAFLOW_SPOOL_DIR within its bounds
        (QUOTAFLOW_SPOOL_MAX_BYTES, QUOTAFLOW_SPOOL_SEGMENT_BYTES)."""
        spool = dict(spool_dir=settings.spool_dir, spool_max_bytes=settings.spool_max_bytes,
                     spool_segment_bytes=settings.spool_segment_bytes,
                     memory_bytes=settings.collector_memory_bytes,
                     delivery_timeout_s=settings.collector_delivery_timeout_s,
                     batch_ms=settings.collector_batch_ms, batch_events=settings.collector_batch_events,
                     linger_ms=settings.collector_linger_ms)
        return cls(settings.kafka_bootstrap, **{**spool, **options})

    @property
    def delivered(self) -> int:
        """Events acknowledged by Kafka (directly or replayed from the spool)."""
        return self.core.delivered

    @property
    def failed(self) -> int:
        """Events lost: neither acknowledged nor kept in the spool."""
        return self.core.lost

    @property
    def spooled(self) -> int:
        """Events written to the disk spool (then replayed: counted in delivered too)."""
        return self.core.spooled

    async def start(self) -> None:
        await self.core.start()
        if self.batch_events > 1:
            self._linger = asyncio.create_task(self._send_old_batches())

    async def stop(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._linger
        self._close_batches()
        await self.core.stop()

    async def __aenter__(self) -> "Emitter":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def emit(self, event: RequestEvent | Mapping[str, Any]) -> bool:
        """Queue one event, without waiting for Kafka. A mapping is validated first;
        invalid input is dead-lettered and False returned, whatever it holds: never an
        exception into the request path."""
        if not isinstance(event, RequestEvent):
            try:
                event = validate(event)
            except SchemaError as exc:
                self._dead_letter(event, exc)
                return False
        batch = self._open.get(event.org_id)
        if batch is None:
            self._open[event.org_id] = batch = []
        batch.append(event)
        if len(batch) >= self.batch_events:
            self._send_batch(event.org_id)
        return True

    async def emit_bytes(self, key: bytes | None, value: bytes) -> None:
        """Publish an already encoded record as is, unvalidated, as a publisher in
        another language would; the processors validate it downstream."""
        self.core.submit(Record(self.topic, key, value, events=1))

    async def flush(self) -> None:
        """Send every open batch and wait until Kafka has acknowledged everything (with a
        spool: until the spool is replayed, however long Kafka is away)."""
        self._close_batches()
        await self.core.flush()

    def _close_batches(self) -> None:
        batches, self._open = self._open, {}
        for org, events in batches.items():
            self._submit(org, events)

    async def _send_old_batches(self) -> None:
        while True:
            await asyncio.sleep(self.batch_s)
            self._close_batches()

    def _send_batch(self, org_id: str) -> None:
        events = self._open.pop(org_id, None)
        if events:
            self._submit(org_id, events)

    def _submit(self, org_id: str, events: list[RequestEvent]) -> None:
        value = events[0].encode() if len(events) == 1 else encode_batch(events)
        self.core.submit(Record(self.topic, partition_key(org_id), value, events=len(events)))

    def _dead_letter(self, doc: Any, exc: SchemaError) -> None:
        self.dead_lettered += 1
        EMITTED.labels("dead_lettered").inc()
        log.warning("invalid event dead-lettered", extra={"reason": str(exc)[:500]})
        try:
            value = orjson.dumps(doc, default=show)
        except (TypeError, ValueError, RecursionError):  # nested too deep, cyclic, keys JSON cannot hold
            value = show(doc).encode()
        headers = deadletter.headers(str(exc), deadletter.STAGE_COLLECTOR, ts_ms=int(time.time() * 1000))
        self.core.submit(Record(DEAD_LETTER_TOPIC, None, value, tuple(headers), events=0))
