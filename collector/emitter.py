"""Emitter: puts RequestEvents on the events topic from Python services.

``emit`` never waits for Kafka: it appends the event to its org's open batch,
and a batch goes out as one record (a JSON array, keyed by the org) when it is
full or ``batch_ms`` old (100 ms by default: an org sending 100 requests a second
then makes 10 records a second, not 100). Stream processors pay per record, not per
event (a Faust processor handles a few thousand records a second), so batching is
what lets one processor keep up with tens of thousands of requests a second spread
over many orgs. The cost is up to ``batch_ms`` more decision lag; admission itself
does not wait for it (gateways reserve in Redis). Below that, aiokafka batches records, compresses them (zstd) and
produces idempotently (acks=all, no duplicates on retry). Input that is not a
valid event is not raised into the request path: it goes to the dead-letter
topic with the reason, and is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from typing import Any, Mapping

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

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

log = logging.getLogger(__name__)

EMITTED = Counter("quotaflow_collector_events_total", "Events handed to Kafka by the emitter, by outcome", ["outcome"])


class Emitter:
    def __init__(self, bootstrap_servers: str, *, batch_events: int = 500, batch_ms: int = 100, linger_ms: int = 5,
                 max_batch_bytes: int = 1024 * 1024, compression: str = "zstd", topic: str = EVENTS_TOPIC):
        if not 1 <= batch_events <= MAX_EVENTS_PER_RECORD:
            raise ValueError(f"batch_events must be 1..{MAX_EVENTS_PER_RECORD}, got {batch_events}")
        self.topic = topic
        self.batch_events = batch_events
        self.batch_s = batch_ms / 1000
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            enable_idempotence=True,  # implies acks=all; retries never duplicate
            compression_type=compression,
            linger_ms=linger_ms,
            max_batch_size=max_batch_bytes,
            max_request_size=max_batch_bytes * 2,
        )
        self.delivered = 0  # events acknowledged by Kafka
        self.failed = 0
        self.dead_lettered = 0
        self._open: dict[str, list[RequestEvent]] = {}  # org -> events not yet sent
        self._pending: set[asyncio.Future] = set()
        self._linger: asyncio.Task | None = None

    async def start(self) -> None:
        await self._producer.start()
        if self.batch_events > 1:
            self._linger = asyncio.create_task(self._send_old_batches())

    async def stop(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._linger
        await self.flush()
        await self._producer.stop()

    async def __aenter__(self) -> "Emitter":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def emit(self, event: RequestEvent | Mapping[str, Any]) -> bool:
        """Queue one event. A mapping is validated first; invalid input is
        dead-lettered and False returned, whatever it holds: never an exception
        into the request path."""
        if not isinstance(event, RequestEvent):
            try:
                event = validate(event)
            except SchemaError as exc:
                await self._dead_letter(event, exc)
                return False
        batch = self._open.setdefault(event.org_id, [])
        batch.append(event)
        if len(batch) >= self.batch_events:
            await self._send_batch(event.org_id)
        return True

    async def emit_bytes(self, key: bytes | None, value: bytes) -> None:
        """Publish an already encoded record as is, unvalidated, as a publisher in
        another language would; the processors validate it downstream."""
        await self._send(key, value, 1)

    async def flush(self) -> None:
        """Send every open batch and wait until Kafka has acknowledged everything."""
        for org in list(self._open):
            await self._send_batch(org)
        await self._producer.flush()
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _send_old_batches(self) -> None:
        while True:
            await asyncio.sleep(self.batch_s)
            for org in list(self._open):
                await self._send_batch(org)

    async def _send_batch(self, org_id: str) -> None:
        events = self._open.pop(org_id, None)
        if events:
            value = events[0].encode() if len(events) == 1 else encode_batch(events)
            await self._send(partition_key(org_id), value, len(events))

    async def _send(self, key: bytes | None, value: bytes, events: int) -> None:
        fut = await self._producer.send(self.topic, value=value, key=key)
        self._pending.add(fut)
        fut.add_done_callback(partial(self._on_done, events))

    def _on_done(self, events: int, fut: asyncio.Future) -> None:
        self._pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self.failed += events
            EMITTED.labels("failed").inc(events)
            log.error("event delivery failed",
                      extra={"events": events, "error": repr(None if fut.cancelled() else fut.exception())})
        else:
            self.delivered += events
            EMITTED.labels("delivered").inc(events)

    async def _dead_letter(self, doc: Any, exc: SchemaError) -> None:
        self.dead_lettered += 1
        EMITTED.labels("dead_lettered").inc()
        log.warning("invalid event dead-lettered", extra={"reason": str(exc)[:500]})
        try:
            value = orjson.dumps(doc, default=show)
        except (TypeError, ValueError, RecursionError):  # nested too deep, cyclic, keys JSON cannot hold
            value = show(doc).encode()
        headers = deadletter.headers(str(exc), deadletter.STAGE_COLLECTOR, ts_ms=int(time.time() * 1000))
        fut = await self._producer.send(DEAD_LETTER_TOPIC, value=value, headers=headers)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
