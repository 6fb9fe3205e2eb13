"""An emitter for threaded services (WSGI: Flask, Django): the Emitter on an event loop
of its own, in a thread of its own.

``emit`` is called from request threads and never waits: it appends the event to a
deque and, when the loop is not already about to drain it, wakes the loop (one write
to its self-pipe), which takes what has gathered 5 ms later. The loop validates and batches the events (Emitter.emit), and the
producer core sends them, spooling to disk what Kafka does not take in time. So a
request thread pays for an append, never for Kafka, the disk or validation.

    emitter = BackgroundEmitter(Emitter.from_settings(settings)).start()
    ...                               # emitter.emit(event) from any thread
    emitter.close()                   # at exit: flush (bounded), spool what is left
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Mapping

from quotaflow.collector.emitter import Emitter
from quotaflow.collector.producer import EVENTS, LOST
from quotaflow.schemas.events import RequestEvent

log = logging.getLogger(__name__)

# How long the loop waits after an event arrives before taking what has gathered. The
# emitter holds events for up to its batch_ms (50 ms) anyway; waking the loop's thread
# for each event would hand the GIL back and forth with the request threads per request.
DRAIN_DELAY_S = 0.005
MAX_PENDING = 100_000


class BackgroundEmitter:
    def __init__(self, emitter: Emitter, *, start_timeout_s: float = 30.0):
        self.emitter = emitter
        self.start_timeout_s = start_timeout_s
        self._pending: collections.deque = collections.deque()
        self._scheduled = False  # a drain is on its way to the loop
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.lost = 0  # events dropped at MAX_PENDING or after close (the emitter's own losses are in .failed)
        self._closed = False
        self._lost_logged = -60.0

    def start(self) -> "BackgroundEmitter":
        """Start the loop's thread and the emitter in it (with a spool, it starts whether
        Kafka is reachable or not)."""
        self._thread = threading.Thread(target=self._run, name="quotaflow-emitter", daemon=True)
        self._thread.start()
        if not self._started.wait(self.start_timeout_s):
            raise TimeoutError(f"the emitter did not start within {self.start_timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.run(self._main())  # which also cancels and awaits what aiokafka left running at the end

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.emitter.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self._drain()
            await self.emitter.stop()

    def emit(self, event: RequestEvent | Mapping[str, Any]) -> None:
        """Queue one event from any thread, without waiting (a mapping is validated in
        the loop; an invalid one is dead-lettered there, never raised here). Past
        MAX_PENDING events not yet taken by the loop (stopped, or starved of CPU), an event
        is lost, counted and logged, rather than held without bound."""
        if len(self._pending) >= MAX_PENDING or self._closed:
            self.lost += 1
            EVENTS.labels(LOST).inc()
            now = time.monotonic()
            if now - self._lost_logged >= 60:
                self._lost_logged = now
                log.error("background emitter closed, or its loop not taking events: dropping new ones",
                          extra={"pending": len(self._pending), "lost": self.lost, "closed": self._closed})
            return
        self._pending.append(event)
        if self._scheduled:
            return
        with self._lock:
            if self._scheduled or self._loop is None or self._loop.is_closed():
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._schedule_drain)
        except RuntimeError:  # the loop closed meanwhile (close() ran): nothing will send it
            log.warning("event emitted after the emitter was closed; not published")

    def _schedule_drain(self) -> None:
        asyncio.ensure_future(self._drain(DRAIN_DELAY_S))

    async def _drain(self, delay_s: float = 0.0) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)  # let events gather: one wake-up and one GIL hand-over for many
        with self._lock:
            self._scheduled = False  # from here on a new emit wakes the loop again
        pending = self._pending
        while pending:
            await self.emitter.emit(pending.popleft())

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything emitted so far is acknowledged by Kafka (or spooled and
        replayed), at most ``timeout_s``."""
        async def flushed() -> None:
            await self._drain()
            await self.emitter.flush()

        asyncio.run_coroutine_threadsafe(flushed(), self._loop).result(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop: what is queued is handed to the emitter, which waits up to its stop
        timeout for Kafka and spools the rest."""
        self._closed = True
        if self._loop is None or self._stop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    @property
    def delivered(self) -> int:
        return self.emitter.delivered

    @property
    def failed(self) -> int:
        return self.emitter.failed + self.lost
