"""Per-key minute counting and the decision derived from it (pure logic, no servers)."""

from processors.decisions import decide
from processors.limits import DEFAULT_LIMITS, MINUTE_MS, parse_tier
from processors.window_counts import COUNTED, LATE, REDELIVERED, apply_event
from schemas.tiers import Tier

W = 1_795_000_020_000 - 1_795_000_020_000 % MINUTE_MS  # a minute boundary


def run(events, state=None):
    outcomes = []
    for ts, partition, offset in events:
        outcome, new = apply_event(state, ts, partition, offset, MINUTE_MS)
        outcomes.append(outcome)
        state = new if new is not None else state
    return outcomes, state


def test_counts_within_a_window_and_restarts_in_the_next():
    outcomes, state = run([(W + 1, 0, 10), (W + 59_999, 0, 11), (W + 60_000, 0, 12)])
    assert outcomes == [COUNTED, COUNTED, COUNTED]
    assert state == {"w": W + 60_000, "c": 1, "p": 0, "o": 12}


def test_redelivered_records_are_not_counted_twice():
    _, state = run([(W + i, 2, 100 + i) for i in range(5)])
    outcomes, again = run([(W + 3, 2, 103), (W + 4, 2, 104), (W + 5, 2, 105)], state)
    assert outcomes == [REDELIVERED, REDELIVERED, COUNTED]
    assert again["c"] == 6


def test_same_offset_in_another_partition_is_a_different_record():
    outcomes, state = run([(W, 0, 7), (W + 1, 1, 7)])
    assert outcomes == [COUNTED, COUNTED] and state["c"] == 2


def test_events_for_a_closed_window_are_late():
    outcomes, state = run([(W + 60_500, 0, 1), (W + 59_000, 0, 2)])
    assert outcomes == [COUNTED, LATE]
    assert state == {"w": W + 60_000, "c": 1, "p": 0, "o": 1}


def test_decision_denies_exactly_at_the_tier_limit():
    limits = DEFAULT_LIMITS[Tier.FREE]
    assert limits.per_minute == 10
    for count, allowed, remaining in [(1, True, 9), (9, True, 1), (10, False, 0), (14, False, 0)]:
        d = decide("k", "o", "FREE", limits, {"w": W, "c": count, "p": 0, "o": count}, now_ms=W + 5)
        assert (d.allowed, d.remaining, d.count, d.limit) == (allowed, remaining, count, 10)
        assert d.reset_ms == W + MINUTE_MS and d.window_s == 60
        assert d.denies_at(W + 5) is (not allowed)
        assert d.denies_at(W + MINUTE_MS) is False  # a deny ends when its window resets


def test_tier_defaults_and_unknown_tier():
    assert [(t.value, l.per_minute, l.per_hour, l.per_day) for t, l in DEFAULT_LIMITS.items()] == [
        ("FREE", 10, 100, 1_000), ("STARTER", 30, 500, 5_000), ("PROFESSIONAL", 100, 2_000, 20_000),
        ("SCALE", 200, 5_000, 50_000), ("ENTERPRISE", 500, 10_000, 100_000)]
    assert parse_tier(b"SCALE") is Tier.SCALE
    assert parse_tier(None) is Tier.FREE
    assert parse_tier("GOLD") is Tier.FREE
