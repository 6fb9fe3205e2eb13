"""What the alerts stage measures (alerts/measures.py, alerts/evaluate.py), as pure logic:
counts by the policy's own windows, denials and errors as the events carry them, p95
within one latency bin, a record applied once however often it is read, and what each
rule type's value is."""

from __future__ import annotations

import math

import msgspec

import pytest

from hypothesis import given, settings, strategies as st

from quotaflow.alerts import evaluate
from quotaflow.alerts.measures import HIST_BASE, Measures
from quotaflow.alerts.state import Subject
from quotaflow.schemas.alert_rules import parse_rule
from quotaflow.schemas.limits import Policy, Window

POLICY = Policy(windows=(Window(60), Window(3600)), tiers={"FREE": (10, 100), "PRO": (50, None)})
T0 = 1_700_000_040_000  # 40 s into a minute


def rule(**fields):
    return parse_rule({"rule_id": "r", "org_id": "acme", "channels": ["hook"], **fields})


@given(st.lists(st.tuples(st.integers(0, 119_999), st.sampled_from([200, 201, 429, 500, 503]),
                          st.floats(0, 10_000)), max_size=60))
@settings(max_examples=60, deadline=None)
def test_counts_follow_the_windows_and_a_record_read_again_counts_once(events):
    m = Measures()
    rows = [(T0 + dt, status, latency) for dt, status, latency in events]
    m.add(POLICY, 0, 7, rows)
    replay = Measures.from_json(m.to_json())  # as the table keeps it
    assert not replay.fresh(0, 7) and replay.fresh(0, 8) and replay.fresh(1, 0)
    now = T0 + 60_000  # the next minute
    minute = now - now % 60_000
    in_minute = [r for r in rows if minute <= r[0] < minute + 60_000]
    assert m.counted(Window(60), now) == sum(1 for r in in_minute if r[1] != 429)
    assert m.denied(Window(60), now) == sum(1 for r in in_minute if r[1] == 429)
    assert m.errors(Window(60), now) == sum(1 for r in in_minute if r[1] >= 500)
    assert replay.counted(Window(60), now) == m.counted(Window(60), now)
    lat = sorted(r[2] for r in in_minute if r[1] != 429)
    p95 = m.latency_quantile(Window(60), now)
    if not lat:
        assert p95 is None
    else:
        exact = lat[math.ceil(0.95 * len(lat)) - 1]
        assert exact <= p95 <= max(exact, 1.0) * HIST_BASE + 1e-9


def test_each_rule_type_measures_its_value():
    m = Measures()
    m.add(POLICY, 0, 0, [(T0, 200, 10.0)] * 6 + [(T0, 500, 900.0)] * 4 + [(T0, 429, 1.0)] * 3)
    s = Subject("acme")
    assert evaluate.value(rule(type="usage_threshold", window="60s", count=5), s, m, POLICY, T0) == 10
    limit = evaluate.limit_of(rule(type="quota_exceeded", window="60s"), s, POLICY, None, None)
    assert limit == 10
    assert evaluate.value(rule(type="quota_exceeded", window="60s"), s, m, POLICY, T0, limit) == 100.0
    assert evaluate.value(rule(type="usage_threshold", window="60s", percent=80), s, m, POLICY, T0, limit) == 100.0
    assert evaluate.value(rule(type="rate_limit_violations", window="60s"), s, m, POLICY, T0) == 3
    assert evaluate.value(rule(type="error_rate", window="60s", percent=10, min_requests=5), s, m, POLICY, T0) == 40.0
    assert evaluate.value(rule(type="error_rate", window="60s", percent=10, min_requests=11), s, m, POLICY, T0) == 0.0
    assert evaluate.value(rule(type="latency_p95", window="60s", threshold_ms=500, min_requests=5), s, m, POLICY,
                          T0) >= 900
    # a key's override lowers its limit; an unlimited window measures no percentage
    key_rule = rule(type="quota_exceeded", window="3600s", scope="key")
    assert evaluate.limit_of(key_rule, Subject("acme", "k"), POLICY, "PRO", {"3600s": 7}) == 7
    assert evaluate.limit_of(key_rule, Subject("acme"), POLICY, "PRO", None) is None
    assert evaluate.value(key_rule, Subject("acme"), m, POLICY, T0, None) is None
    # the window has ended: nothing counted in it any more
    assert evaluate.value(rule(type="rate_limit_violations", window="60s"), s, m, POLICY, T0 + 60_000) == 0


def test_subjects_of_a_rule():
    assert evaluate.subjects(rule(type="quota_exceeded", window="60s"), "acme", ["a", "b"]) == [Subject("acme")]
    assert evaluate.subjects(rule(type="quota_exceeded", window="60s", scope="key"), "acme", ["a", "b"]) == [
        Subject("acme", "a"), Subject("acme", "b")]
    assert evaluate.subjects(rule(type="quota_exceeded", window="60s", scope="key", api_key_id="c"), "acme",
                             ["a"]) == [Subject("acme", "c")]


def test_forgetting_drops_what_no_window_counts():
    m = Measures()
    m.add(POLICY, 0, 0, [(T0, 200, 1.0)])
    assert not m.forget(POLICY, T0 + 61_000)  # the hour still counts it
    assert m.windows["60s"] == [] or all(b[0] >= T0 - 60_000 for b in m.windows["60s"])
    assert not m.forget(POLICY, T0 + 2 * 3_600_000)  # the hourly history is kept for the baselines
    assert m.windows["3600s"] == []


def test_unusual_activity_scores_the_last_hour_against_the_same_hour_of_past_weeks():
    week = 7 * 24 * 3_600_000
    now = T0 + 10 * 3_600_000
    m = Measures()
    for k, n in ((1, 10), (2, 12), (3, 9)):  # the same hour of three past weeks
        m.add(POLICY, 0, k, [(now - k * week - 1_800_000, 200, 1.0)] * n)
    up = rule(type="unusual_activity", score=4, baseline_weeks=3, min_history=3, min_requests=5)
    down = rule(type="unusual_activity", score=4, baseline_weeks=3, min_history=3, min_requests=5, direction="down")
    scale = 1.4826  # the MAD of 9, 10, 12 is 1, scaled as a sigma
    assert evaluate.value(up, Subject("acme"), m, POLICY, now) == pytest.approx(-10 / scale)  # silence now
    assert evaluate.value(down, Subject("acme"), m, POLICY, now) == pytest.approx(10 / scale)
    m.add(POLICY, 0, 9, [(now - 120_000, 200, 1.0)] * 40)  # 40 in the last hour
    assert evaluate.value(up, Subject("acme"), m, POLICY, now) == pytest.approx(30 / scale)
    # an hour later those 40 are out of the last 60 minutes; with fewer than min_history weeks, no score
    assert evaluate.value(up, Subject("acme"), Measures(), POLICY, now) is None


def test_key_expiry_in_seconds_and_never_for_keys_that_will_not_expire():
    from quotaflow.schemas.api_keys import KeyRecord

    base = KeyRecord(key_id="k", org_id="acme", name="n", env="live", display_prefix="qf_live_x", slot_hint="acme",
                     key_hash="0" * 64, secret_id="s")
    soon = msgspec.structs.replace(base, expires_ms=T0 + 90_000)
    assert evaluate.key_expiry(soon, T0) == 90.0
    assert evaluate.key_expiry(soon, T0 + 100_000) == 0.0  # expired: still firing until renewed or revoked
    for never in (base, msgspec.structs.replace(soon, state="revoked"), None):
        assert evaluate.key_expiry(never, T0) == evaluate.NEVER_S
    expiring = rule(type="key_expiring", within_s="1d")
    assert expiring.condition().reached(evaluate.key_expiry(soon, T0))
    assert expiring.condition().cleared(evaluate.NEVER_S)


def _add_one_at_a_time(m: Measures, policy: Policy, partition: int, offset: int, events) -> None:
    """Measures.add as it was written first, an event at a time: the reference for the
    counting by bucket that replaced it."""
    from quotaflow.alerts.measures import COUNTED, DENIED, ERRORS, HIST, HOUR_MS, MINUTE_MS, latency_bin

    for ts_ms, status, latency_ms in events:
        for window in policy.windows:
            bucket = m._bucket(window, ts_ms - ts_ms % window.bucket_ms)
            if status == 429:
                bucket[DENIED] += 1
                continue
            bucket[COUNTED] += 1
            bucket[ERRORS] += status >= 500
            b = latency_bin(latency_ms)
            bucket[HIST][b] = bucket[HIST].get(b, 0) + 1
        if status != 429:
            m.hours[ts_ms - ts_ms % HOUR_MS] = m.hours.get(ts_ms - ts_ms % HOUR_MS, 0) + 1
            m.minutes[ts_ms - ts_ms % MINUTE_MS] = m.minutes.get(ts_ms - ts_ms % MINUTE_MS, 0) + 1
    m.offsets[partition] = max(m.offsets.get(partition, 0), offset + 1)


SLIDING = Policy(windows=(Window(60, sliding=True), Window(3600), Window(86400)), tiers={"FREE": (10, 100, 1000)})


@given(records=st.lists(st.lists(st.tuples(st.integers(-7_200_000, 7_200_000),
                                           st.sampled_from([200, 204, 429, 499, 500, 503]),
                                           st.floats(0, 100_000, allow_nan=False)), max_size=40), max_size=6),
       policy=st.sampled_from([POLICY, SLIDING]))
@settings(max_examples=200, deadline=None)
def test_adding_a_record_by_bucket_equals_adding_its_events_one_at_a_time(records, policy):
    fast, slow = Measures(), Measures()
    for offset, events in enumerate(records):
        rows = [(T0 + dt, status, latency) for dt, status, latency in events]
        fast.add(policy, 0, offset, rows)
        _add_one_at_a_time(slow, policy, 0, offset, rows)
    assert fast == slow
