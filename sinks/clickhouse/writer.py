"""Inserting rows into the raw table (through INGEST, see tables.py) with a deduplication
token, and telling errors that mean "this data is refused" from errors that mean "try
again later".

The code path is the same for the embedded engine and for a server over HTTP: one
clickhouse-connect client, one insert per batch with per-query settings. The columns go
as one JSONCompactColumns document (orjson, in C) that ClickHouse parses (in C++):
encoding them in the driver's Native format from Python cost several times more than
the engine's insert itself. (Hand-built Native, per-value caches and all, still cost 2x
the orjson document in Python for ~10% less engine time: measured, not worth it.)
"""

from __future__ import annotations

import time

import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, DataError

from quotaflow.schemas.clickhouse.tables import INGEST, RAW_COLUMNS
from quotaflow.schemas.topics import EVENTS_RETENTION_MS
from quotaflow.sinks.clickhouse.metrics import STEP_SECONDS
from quotaflow.sinks.clickhouse.rows import Rows

# ClickHouse error codes that mean the data itself was refused: retrying the same rows
# cannot succeed. Anything else (connection, memory, too many parts, a missing table
# or column) is retried until it works: stalling is visible and loses nothing, while
# dead-lettering on an operator error would throw away good events by the million.
REJECTED_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    376,  # CANNOT_PARSE_UUID
    407,  # DECIMAL_OVERFLOW
    469,  # VIOLATED_CONSTRAINT
    675,  # CANNOT_PARSE_IPV4
    676,  # CANNOT_PARSE_IPV6
})


TOO_MANY_PARTS = 252  # also "too many parts" under merge pressure: retried, unless it names the insert's partitions


def is_rejection(exc: BaseException) -> bool:
    """True if ClickHouse (or the driver, before sending) refused the data itself: the rows
    are then halved until each part goes in or is a single refused row. A block over the
    partition bound is refused too: its halves cover fewer days (a single row, one)."""
    if isinstance(exc, DataError) and exc.code is None:
        return True  # the driver could not encode a value
    if isinstance(exc, DatabaseError) and exc.code == TOO_MANY_PARTS:
        return "partitions for single INSERT block" in str(exc)
    return isinstance(exc, DatabaseError) and exc.code in REJECTED_CODES


def partitions_bound(retention_raw_days: int) -> int:
    """Day partitions one batch can touch: its events lie within the raw retention before
    their records' arrival (schemas.events.TimeBounds), and a batch's records arrived
    within the events topic's retention of each other; a day more at each end."""
    return retention_raw_days + EVENTS_RETENTION_MS // 86_400_000 + 2


# Never reached: blocks are squashed until their input ends (see INSERT_SETTINGS).
WHOLE = 1 << 62

# Settings of every insert, besides its token and block size.
INSERT_SETTINGS = {
    "insert_deduplicate": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    # Each view's output for the batch's block is squashed into one block. ClickHouse names
    # the blocks a view outputs by number in the deduplication token of the view's table, so
    # a retry whose view splits its output otherwise than the first attempt did is stored
    # again in part. And how a view's GROUP BY splits its output is not fixed: after a large
    # aggregation of the same view query in the process, the engine's hash table statistics
    # (process-wide, kept across engines) make the next one two-level, several blocks, and the
    # one after it (the retry, the statistics now from this batch) one block. Squashing only
    # at a bound would still split where the pieces fall; never reached, it waits for the end.
    # (The batch itself is one block: max_insert_block_size.)
    "min_insert_block_size_rows": WHOLE,
    "min_insert_block_size_bytes": WHOLE,
    # The rollup views' GROUP BY already gives one row per key in a block: no need for
    # the engine to sort-merge equal keys again on insert.
    "optimize_on_insert": 0,
    # The six rollup views of a block are computed in parallel threads, not one after
    # the other: an insert then keeps both cores of a small machine busy.
    "parallel_view_processing": 1,
}


class Writer:
    """Inserts Rows as one block each, so that a retried insert has the same block
    structure as the first attempt and its token deduplicates all of it."""

    FORMAT = "JSONCompactColumns"

    def __init__(self, client: Client, max_partitions: int = partitions_bound(30)):
        self.client = client
        self.max_partitions = max_partitions  # per insert: partitions_bound

    def insert(self, rows: Rows, token: str | None, table: str = INGEST) -> None:
        """Insert into ``table`` (INGEST, or a table with its columns). With no token the
        insert is not deduplicated: the caller has found from the data what is missing."""
        started = time.perf_counter()
        try:
            data = orjson.dumps(rows.columns)
        except orjson.JSONEncodeError as exc:  # a value JSON cannot carry: that data is refused
            raise DataError(f"cannot encode rows: {exc}") from exc
        settings = {
            **INSERT_SETTINGS,
            "max_partitions_per_insert_block": self.max_partitions,
            # One block whatever the batch size: the token must cover the whole insert.
            "max_insert_block_size": max(len(rows), 1),
        }
        if token is None:
            settings["insert_deduplicate"] = 0
        else:
            settings["insert_deduplication_token"] = token
        encoded = time.perf_counter()
        STEP_SECONDS.labels("encode").inc(encoded - started)
        self.client.raw_insert(table, list(RAW_COLUMNS), data, fmt=self.FORMAT, settings=settings)
        STEP_SECONDS.labels("engine").inc(time.perf_counter() - encoded)
