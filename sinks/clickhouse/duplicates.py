"""Events already stored from another Kafka record, taken out of a batch before it is
inserted: an event published twice is stored once, in the raw table and the rollups
alike (the rule, its window and its edges: schemas/dedup.py; the sink's key space:
redis_keys.stored_key).

The check runs on the decoded batch, before its plan is committed and its rows are
inserted, so plans, tokens, halving and the repair of retried batches all work on
the batch without its duplicates. A batch read again (a plan replayed after a crash)
loses exactly the same rows: each of its events is at the place it was first taken
from, and every other copy was seen, within the window, at a place of its own.
An event ClickHouse refuses is dead-lettered once; its later copies are duplicates of it.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from quotaflow.schemas.dedup import INDEX_BITS, Group
from quotaflow.sinks.clickhouse.rows import Rows


def groups(rows: Rows, partition: int) -> list[Group]:
    """The batch's events for the check, in row order: one group per record."""
    ids, ts, orgs, indexes = rows.column("event_id"), rows.column("ts_ms"), rows.column("org_id"), rows.indexes
    out = []
    lo = 0
    for _, run in itertools.groupby(rows.records, key=id):  # a record's rows are consecutive
        hi = lo + len(list(run))
        base = rows.records[lo].offset << INDEX_BITS
        out.append((orgs[lo], partition, ts[lo:hi], ids[lo:hi], [base | i for i in indexes[lo:hi]]))
        lo = hi
    return out


def without(rows: Rows, answers: Sequence[bool]) -> tuple[Rows, int]:
    """(the rows that are not duplicates, in their order; how many were)."""
    n = sum(answers)
    if not n:
        return rows, 0
    kept = rows.take([i for i, dup in enumerate(answers) if not dup])
    kept.skipped = rows.skipped
    return kept, n
