"""A batch's duplicate check (schemas/dedup.py), sent in parts while the rest of the
batch is still being read, so that Redis answers one part while Python reads the next
records. The parts reach Redis one after another, in order, as a single call would."""

from __future__ import annotations

import asyncio
import itertools

from quotaflow.processors.backend import RedisBackend
from quotaflow.processors.records import Record


class BatchDuplicateChecks:
    PART_EVENTS = 10_000

    def __init__(self, backend: RedisBackend):
        self.backend = backend
        self._parts: list[asyncio.Future] = []
        self._records: list[Record] = []
        self._events = 0

    def add(self, record: Record) -> None:
        self._records.append(record)
        self._events += len(record.rows)
        if self._events >= self.PART_EVENTS:
            self._send()

    async def results(self) -> list[bool]:
        """Per event of the records added, in their order: already counted from another record?"""
        self._send()
        return list(itertools.chain.from_iterable(await asyncio.gather(*self._parts)))

    def cancel(self) -> None:
        for part in self._parts:
            part.cancel()

    def _send(self) -> None:
        if self._records:
            groups = [(r.org_id, r.partition, *r.row_values()) for r in self._records]
            self._parts.append(asyncio.ensure_future(self._check(self._parts[-1] if self._parts else None, groups)))
            self._records, self._events = [], 0

    async def _check(self, previous: asyncio.Future | None, groups: list) -> list[bool]:
        if previous is not None:
            await previous
        return await self.backend.duplicates(groups)
