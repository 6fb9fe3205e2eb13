"""TimeBounds: how far an event's time may lie from the arrival of its record."""

from __future__ import annotations

from dataclasses import dataclass

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class TimeBounds:
    """How far an event's time may lie from the time the broker received its record (the
    events topic stamps records with LogAppendTime): ahead by at most a clock's skew,
    behind by at most the raw retention. Judged against the record's time, never a
    stage's own clock, every stage makes the same decision about the same record, on a
    replay too; and no event can move a clock past the time its record arrived."""

    ahead_ms: int
    behind_ms: int

    AHEAD = "ahead"  # stamped further ahead of its record than a clock's skew
    EXPIRED = "expired"  # older than the raw retention: it would never be stored

    def kind(self, ts_ms: int, received_ms: int) -> str | None:
        if ts_ms > received_ms + self.ahead_ms:
            return self.AHEAD
        if ts_ms < received_ms - self.behind_ms:
            return self.EXPIRED
        return None

    def error(self, ts_ms: int, received_ms: int) -> str | None:
        if ts_ms > received_ms + self.ahead_ms:
            return (f"ts_ms: {ts_ms} is {(ts_ms - received_ms) / 1000:.0f} s after the broker received the record "
                    f"(at {received_ms}); at most {self.ahead_ms / 1000:g} s of clock skew is accepted")
        if ts_ms < received_ms - self.behind_ms:
            return (f"ts_ms: {ts_ms} is older than the raw retention ({self.behind_ms // DAY_MS} days) when the broker "
                    f"received the record (at {received_ms}): it would never be stored")
        return None


def time_bounds_from_settings(settings) -> TimeBounds:
    """The bounds configured by QUOTAFLOW_MAX_CLOCK_SKEW_S and QUOTAFLOW_RETENTION_RAW_DAYS,
    shared by every stage that decodes the events topic."""
    return TimeBounds(ahead_ms=int(settings.max_clock_skew_s * 1000), behind_ms=settings.retention_raw_days * DAY_MS)
