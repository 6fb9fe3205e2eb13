"""Storing a batch's rows in ClickHouse: each insert retried until ClickHouse takes it,
never skipped; rows it refuses as data (writer.is_rejection) found by halving and
dead-lettered with ClickHouse's reason, stage ``sink``.

Halving is deterministic, so a replayed batch is split the same way and each part
carries the same deduplication token as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, NamedTuple

from quotaflow.core.retry import Pause, retry
from quotaflow.sinks.clickhouse.metrics import EVENTS, INSERT_FAILURES, INSERT_SECONDS, ROWS
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import Rows
from quotaflow.sinks.clickhouse.writer import Writer, is_rejection

log = logging.getLogger(__name__)

INSERT_RETRY_MAX_S = 10.0
DeadLetter = Callable[..., Awaitable[None]]  # (record, index in it, event, reason)


class Stored(NamedTuple):
    parts: list[Rows]  # the parts stored, refused rows left out
    retried: bool  # an insert failed and was sent again: it may have landed in part (see repair.py)


class Inserter:
    def __init__(self, writer: Writer, dead_letter: DeadLetter, pause: Pause):
        """``pause``: between retries; raises GaveUp when the sink is stopping (the
        batch's plan then finishes it)."""
        self.writer = writer
        self._dead_letter = dead_letter
        self._pause = pause
        self._retried = False
        self._last_rejection = ""

    async def store(self, rows: Rows, batch: Range) -> Stored:
        self._retried = False
        parts = await self._store(rows, batch, batch.token())
        return Stored(parts, self._retried)

    async def _store(self, rows: Rows, batch: Range, token: str) -> list[Rows]:
        if await self._insert(rows, token):
            return [rows]
        if len(rows) == 1:
            rec, index, event = rows.source(0)
            log.warning("clickhouse refused an event; dead-lettering it",
                        extra={"partition": rec.partition, "offset": rec.offset, "index": index,
                               "reason": self._last_rejection[:500]})
            await self._dead_letter(rec, index, event, f"clickhouse refused the row: {self._last_rejection}")
            EVENTS.labels("rejected").inc()
            return []
        mid = len(rows) // 2
        stored = []
        for part in (rows.slice(0, mid), rows.slice(mid, len(rows))):
            stored += await self._store(part, batch, batch.sub_token(part.place(0), part.place(len(part) - 1)))
        return stored

    async def _insert(self, rows: Rows, token: str) -> bool:
        """Insert until ClickHouse takes the rows (True) or refuses them as data (False)."""

        async def attempt() -> bool:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.writer.insert, rows, token)
            except Exception as exc:  # any driver/server error: refused data, or retried
                if is_rejection(exc):
                    self._last_rejection = str(exc)
                    return False
                INSERT_FAILURES.inc()
                self._retried = True  # it may have landed in part: the batch is checked once stored
                raise
            INSERT_SECONDS.observe(time.perf_counter() - started)
            return True

        if not await retry(attempt, "clickhouse insert", on=Exception, max_s=INSERT_RETRY_MAX_S, pause=self._pause,
                           logger=log, extra={"rows": len(rows)}):
            return False
        ROWS.inc(len(rows))
        EVENTS.labels("stored").inc(len(rows))
        return True
