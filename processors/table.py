"""The processor's table: per subject its window counts (window_counts.py), per partition
the next offset to apply (offset_guard.py). Kept in memory; every change a batch makes
goes to a compacted changelog topic (output.py), partitioned like the events topic, and a
processor assigned a partition reads that partition of the changelog back first.

The changelog's records are JSON keys and values (a null value deletes the key), as the
Faust table this replaces wrote them: a changelog written by an earlier version recovers.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from quotaflow.processors.offset_guard import partition_of_next_offset

log = logging.getLogger(__name__)


class Table:
    def __init__(self, bootstrap: str, topic: str):
        self.data: dict[str, Any] = {}
        self.topic = topic
        self._bootstrap = bootstrap

    def keep_partitions(self, assigned: set[int]) -> int:
        """Forget the subjects and next offsets of every partition but ``assigned``; return how
        many entries went. Another processor counts them now: kept here, they would go stale."""
        gone = [key for key, value in self.data.items()
                if (partition_of_next_offset(key) if key.startswith("__") else value["p"]) not in assigned]
        for key in gone:
            del self.data[key]
        return len(gone)

    async def recover(self, partitions: set[int]) -> int:
        """Read these partitions of the changelog from their start to their end as they are
        now; return the records read. The partitions are this processor's from now on
        (their previous owner wrote its last batch before it gave them up), so nothing
        is written to them meanwhile."""
        if not partitions:
            return 0
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024)
        await consumer.start()
        read = 0
        try:
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            await consumer.seek_to_beginning(*tps)
            pending = set(tps)
            while pending:
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
                if not pending:
                    break
                fetched = await consumer.getmany(*pending, timeout_ms=1000, max_records=50_000)
                for tp, records in fetched.items():
                    for record in records:
                        if record.offset < ends[tp]:
                            read += self._apply(record)
        finally:
            await consumer.stop()
        return read

    def _apply(self, record: Any) -> int:
        try:
            key = orjson.loads(record.key)
            if record.value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = orjson.loads(record.value)
        except (orjson.JSONDecodeError, TypeError) as exc:  # not written by a processor: skipped, and said so
            log.error("changelog record not readable; skipped", extra={"partition": record.partition,
                                                                      "offset": record.offset, "error": str(exc)})
            return 0
        return 1
