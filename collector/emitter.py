"""Emitter: puts RequestEvents on the events topic from Python services.

``emit`` only appends to the producer's in-memory batch (it awaits only when
that buffer is full); batching, zstd compression and the idempotent producer
(acks=all, no duplicates on retry) come from aiokafka. Input that is not a valid
event is not raised into the request path: it goes to the dead-letter topic
with the reason, and is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from schemas import deadletter
from schemas.events import RequestEvent, SchemaError, validate
from schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC

log = logging.getLogger(__name__)

EMITTED = Counter("quotaflow_collector_events_total", "Events handed to Kafka by the emitter, by outcome", ["outcome"])


class Emitter:
    def __init__(self, bootstrap_servers: str, *, linger_ms: int = 20, max_batch_bytes: int = 256 * 1024,
                 compression: str = "zstd", topic: str = EVENTS_TOPIC):
        self.topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            enable_idempotence=True,  # implies acks=all; retries never duplicate
            compression_type=compression,
            linger_ms=linger_ms,
            max_batch_size=max_batch_bytes,
        )
        self.delivered = 0
        self.failed = 0
        self.dead_lettered = 0
        self._pending: set[asyncio.Future] = set()

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self.flush()
        await self._producer.stop()

    async def __aenter__(self) -> "Emitter":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def emit(self, event: RequestEvent | Mapping[str, Any]) -> bool:
        """Queue one event. A mapping is validated first; invalid input is
        dead-lettered and False returned."""
        if not isinstance(event, RequestEvent):
            try:
                event = validate(event)
            except SchemaError as exc:
                await self._dead_letter(event, exc)
                return False
        await self._send(self.topic, event.partition_key, event.encode(), None)
        return True

    async def emit_bytes(self, key: bytes | None, value: bytes) -> None:
        """Publish an already encoded record as is, unvalidated, as a publisher in
        another language would; the processors validate it downstream."""
        await self._send(self.topic, key, value, None)

    async def flush(self) -> None:
        await self._producer.flush()
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _send(self, topic: str, key: bytes | None, value: bytes, headers: list | None) -> None:
        fut = await self._producer.send(topic, value=value, key=key, headers=headers)
        self._pending.add(fut)
        fut.add_done_callback(self._on_done)

    def _on_done(self, fut: asyncio.Future) -> None:
        self._pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self.failed += 1
            EMITTED.labels("failed").inc()
            log.error("event delivery failed", extra={"error": repr(None if fut.cancelled() else fut.exception())})
        else:
            self.delivered += 1
            EMITTED.labels("delivered").inc()

    async def _dead_letter(self, doc: Any, exc: SchemaError) -> None:
        self.dead_lettered += 1
        EMITTED.labels("dead_lettered").inc()
        log.warning("invalid event dead-lettered", extra={"reason": str(exc)})
        try:
            value = orjson.dumps(doc, default=repr)
        except TypeError:
            value = repr(doc).encode()
        headers = deadletter.headers(str(exc), deadletter.STAGE_COLLECTOR, ts_ms=int(time.time() * 1000))
        fut = await self._producer.send(DEAD_LETTER_TOPIC, value=value, headers=headers)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
