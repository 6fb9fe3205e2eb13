"""Batch plans: how the sink stores each Kafka record exactly once in ClickHouse.

A batch is a range of offsets [start, end] of one partition. Before inserting it, the
sink commits offset ``start`` with metadata naming ``end`` (the plan); it inserts the
rows with an insert_deduplication_token derived from the range; then it commits
``end + 1`` with no plan, in one commit with the plan of the next batch when that is
taken already (on the same partition, one offset: its start is ``end + 1``), which
leaves the state the two commits would leave one after the other. A sink that restarts
and finds a plan in the committed metadata re-inserts exactly that range with the same
token: if the first insert had landed, ClickHouse drops the retried block (and, with
deduplicate_blocks_in_dependent_materialized_views, the rollups' blocks too). A crash
inside the engine's own commit can make it drop a block it does not have: the sink
checks every retried batch afterwards (sinks/clickhouse/repair.py).

Tokens are unique per topic, partition and offsets: if the topic is deleted and
recreated (offsets start again at 0) within the tables' deduplication window
(1000 inserts), a new batch could be taken for an old one. Recreating the topic is
not something the pipeline does; reset the sink's group with the topic if you do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLAN = re.compile(r"^qf-sink-plan:v1:end=(\d+)$")


@dataclass(frozen=True, slots=True)
class Range:
    topic: str
    partition: int
    start: int  # first offset of the batch
    end: int  # last offset of the batch, inclusive

    def token(self) -> str:
        return f"{self.topic}/{self.partition}/{self.start}-{self.end}"

    def sub_token(self, first: str, last: str) -> str:
        """Token of the part [first, last] ("offset.index" of its first and last rows) of
        this range, inserted on its own after the whole range was rejected (see sink:
        rejected rows are isolated by halving)."""
        return f"{self.token()}/{first}-{last}"

    def plan_metadata(self) -> str:
        return f"qf-sink-plan:v1:end={self.end}"


def parse_plan(topic: str, partition: int, committed_offset: int, metadata: str | None) -> Range | None:
    """The batch planned but not confirmed when the sink last committed, or None."""
    m = _PLAN.match(metadata or "")
    if m is None or committed_offset < 0:
        return None
    end = int(m.group(1))
    return Range(topic, partition, committed_offset, end) if end >= committed_offset else None
