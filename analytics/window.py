"""Which time range a question covers, at which step its series is bucketed, and which
table answers it: a TimeRange (not to be confused with a rate-limit window,
schemas/limits.py Window).

All times are UTC, ranges are half-open [start, end) in epoch milliseconds.

- A timeframe (1h, 24h, 7d, 30d) ends at the end of the current step, so "24h" is the
  24 hours up to and including the current hour, and its buckets are whole.
- The series step follows the span: minute up to 6 hours, hour up to 8 days, day
  beyond.
- The answer comes from the coarsest rollup no coarser than the step whose buckets fit
  the range exactly (both ends aligned) and whose retention still covers its start;
  from the raw table when no rollup fits (ends not on a minute). Every answer is then
  exact for the range asked. Only when the data is older than what the raw table and
  the fitting rollups keep is the range widened to the buckets of a rollup that still
  has it; the answer says which range it covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from quotaflow.schemas.clickhouse.tables import DAY_MS, HOUR_MS, MINUTE_MS, RAW_TABLE, ROLLUPS, Table

TIMEFRAMES = {"1h": HOUR_MS, "24h": DAY_MS, "7d": 7 * DAY_MS, "30d": 30 * DAY_MS}
STEP_NAMES = {MINUTE_MS: "minute", HOUR_MS: "hour", DAY_MS: "day"}
MAX_SPAN_MS = 3660 * DAY_MS  # ten years: anything longer is a mistake
MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01, as events' ts_ms


class BadTimeRange(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TimeRange:
    start_ms: int
    end_ms: int
    step_ms: int  # bucket size of series
    table: Table  # raw table or the rollup that answers

    @property
    def step(self) -> str:
        return STEP_NAMES[self.step_ms]


def series_step(span_ms: int) -> int:
    if span_ms <= 6 * HOUR_MS:
        return MINUTE_MS
    if span_ms <= 8 * DAY_MS:
        return HOUR_MS
    return DAY_MS


def _floor(ms: int, grain: int) -> int:
    return ms - ms % grain


def _ceil(ms: int, grain: int) -> int:
    return -(-ms // grain) * grain


def _retained(table: Table, start_ms: int, now_ms: int, retention_days: dict[str, int]) -> bool:
    return start_ms >= now_ms - retention_days[table.name] * DAY_MS


def for_range(start_ms: int, end_ms: int, now_ms: int, retention_days: dict[str, int]) -> TimeRange:
    """The time range for an explicit range; retention_days is {table name: days}."""
    if end_ms <= start_ms:
        raise BadTimeRange("the range must end after it starts")
    if start_ms < 0 or end_ms > MAX_TIME_MS:
        raise BadTimeRange("the range must lie between 1970 and 2100")
    if end_ms - start_ms > MAX_SPAN_MS:
        raise BadTimeRange("the range may span at most 3660 days")
    step = series_step(end_ms - start_ms)
    for table in reversed(ROLLUPS):  # coarsest first: fewest rows to read
        if (table.grain_ms <= step and start_ms % table.grain_ms == 0 and end_ms % table.grain_ms == 0
                and _retained(table, start_ms, now_ms, retention_days)):
            return TimeRange(start_ms, end_ms, step, table)
    if _retained(RAW_TABLE, start_ms, now_ms, retention_days):
        return TimeRange(start_ms, end_ms, step, RAW_TABLE)
    for table in ROLLUPS:  # finest first: widen as little as possible
        start, end = _floor(start_ms, table.grain_ms), _ceil(end_ms, table.grain_ms)
        if _retained(table, start, now_ms, retention_days) or table is ROLLUPS[-1]:
            return TimeRange(start, end, max(step, table.grain_ms), table)
    raise AssertionError("unreachable: the day rollup always answers")


def for_timeframe(name: str, now_ms: int, retention_days: dict[str, int]) -> TimeRange:
    """The time range of a named timeframe (1h, 24h, 7d, 30d) asked at now_ms."""
    if name not in TIMEFRAMES:
        raise BadTimeRange(f"timeframe must be one of {', '.join(TIMEFRAMES)}")
    span = TIMEFRAMES[name]
    end = _ceil(now_ms + 1, series_step(span))  # the current step is included, even at its first ms
    return for_range(end - span, end, now_ms, retention_days)
