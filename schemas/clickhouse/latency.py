"""Latency in the rollups: per row, a count of requests per log-spaced latency bucket,
whose merge has a bounded size however many rows are merged; the quantiles are read from
the cumulative counts. One scheme for every table and every question: the contract between
the migration that fills the rollups (0007_latency_buckets.sql writes BUCKET_SQL out) and
the query API, which reads every latency quantile through ``quantiles_sql``.

Buckets: 0 holds [0, LOWEST_MS); bucket b >= 1 holds [LOWEST_MS * GROWTH**(b-1),
LOWEST_MS * GROWTH**b), GROWTH = 2**(1/16) (16 buckets an octave, each 4.4 % wide), up to
the schema's largest latency (24 h, bucket MAX_BUCKET): no latency an event may carry
falls outside, so there is no open-ended overflow bucket.

The state is ClickHouse's ``quantilesExactWeighted`` of the bucket numbers weighted by
their counts: a hash map bucket -> count, merged by adding counts (at most MAX_BUCKET + 1
entries, whatever was merged), and read as the bucket holding the request of rank
ceil(level * n) in latency order (nearest rank). That bucket's geometric midpoint
(``representative_ms``) is the answer. So the answer for a level lies within a factor
sqrt(GROWTH) of the exact nearest-rank quantile of the raw latencies:

    |answer - exact| <= RELATIVE_ERROR * exact   (RELATIVE_ERROR = 2**(1/32) - 1 ~ 2.2 %)
    |answer - exact| <= ABSOLUTE_ERROR_MS        below LOWEST_MS (0.05 ms)

whichever table (raw or rollup) answers: the raw table is read through the same buckets,
so a range answered from raw events and the same range from a rollup give the same figure.
tests/test_latency_buckets.py checks the bound against exact quantiles.
"""

from __future__ import annotations

import math

from quotaflow.schemas.clickhouse.tables import LATENCY_QUANTILES
from quotaflow.schemas.event_fields import LATENCY_MAX_MS

LOWEST_MS = 0.1
PER_OCTAVE = 16
GROWTH = 2.0 ** (1 / PER_OCTAVE)
RELATIVE_ERROR = math.sqrt(GROWTH) - 1
ABSOLUTE_ERROR_MS = LOWEST_MS / 2
MAX_BUCKET = 1 + math.floor(math.log2(LATENCY_MAX_MS / LOWEST_MS) * PER_OCTAVE)  # 475

# The rollups' latency column and its type (schemas/clickhouse/0007_latency_buckets.sql).
COLUMN = "latency_hist"
_LEVELS = ", ".join(f"{q:g}" for q in LATENCY_QUANTILES)
STATE_TYPE = f"AggregateFunction(quantilesExactWeighted({_LEVELS}), UInt16, UInt64)"

# The bucket of a row's latency_ms (Float32), as the migration's views compute it. NaN and
# anything below LOWEST_MS go to bucket 0; anything above the schema's largest to the last.
BUCKET_SQL = (f"if(NOT (latency_ms >= {LOWEST_MS:g}), toUInt16(0), "
              f"toUInt16(least(1 + floor(log2(latency_ms / {LOWEST_MS:g}) * {PER_OCTAVE}), {MAX_BUCKET})))")


def bucket(latency_ms: float) -> int:
    """The bucket of a latency, as BUCKET_SQL computes it (for a Float32 value)."""
    if not latency_ms >= LOWEST_MS:
        return 0
    return min(1 + math.floor(math.log2(latency_ms / LOWEST_MS) * PER_OCTAVE), MAX_BUCKET)


def bounds_ms(b: int) -> tuple[float, float]:
    """[low, high) of a bucket."""
    return (0.0 if b == 0 else LOWEST_MS * GROWTH ** (b - 1)), LOWEST_MS * GROWTH ** b


def representative_ms(b: int) -> float:
    """What a quantile falling in bucket b is reported as: its geometric midpoint (the
    arithmetic one for bucket 0), within RELATIVE_ERROR of every latency of the bucket."""
    return LOWEST_MS / 2 if b == 0 else LOWEST_MS * 2.0 ** ((b - 0.5) / PER_OCTAVE)


_REPRESENTATIVE_SQL = f"if(b = 0, {LOWEST_MS / 2:g}, {LOWEST_MS:g} * exp2((b - 0.5) / {PER_OCTAVE}))"


def quantiles_sql(raw: bool) -> str:
    """The p50, p95 and p99 (LATENCY_QUANTILES) in ms, as an Array(Float64) aggregate:
    from the raw table's latency_ms, or merging a rollup's states. The one way every
    question computes a latency quantile."""
    if raw:
        counts = f"quantilesExactWeighted({_LEVELS})({BUCKET_SQL}, toUInt64(1))"
    else:
        counts = f"quantilesExactWeightedMerge({_LEVELS})({COLUMN})"
    return f"arrayMap(b -> {_REPRESENTATIVE_SQL}, {counts})"
