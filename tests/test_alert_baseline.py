"""The unusual-activity score (alerts/baseline.py): median/MAD against the same hours of past
weeks, the recent hours while that history is short, nothing while both are."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import assume, given, settings, strategies as st

from quotaflow.alerts.baseline import MAD_SCALE, robust_score, unusual

# Request counts per hour (or their means): no subnormal floats, which no count comes near and
# whose products with k lose their precision (Hypothesis found history [0, 1, 5e-324]).
volumes = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_subnormal=False)


def test_a_spike_scores_high_against_a_steady_seasonal_baseline():
    seasonal = [1000, 1040, 980, 1010]
    score = unusual(3000, seasonal, [], min_history=3)
    assert score is not None and score.basis == "seasonal" and score.median == 1005
    assert score.score > 10
    assert unusual(1020, seasonal, [], min_history=3).score < 1


def test_one_past_incident_in_the_baseline_does_not_hide_the_next():
    clean = unusual(3000, [1000, 1040, 980, 1010, 990], [])
    with_outage = unusual(3000, [1000, 1040, 0, 1010, 990], [])
    with_spike = unusual(3000, [1000, 1040, 50_000, 1010, 990], [])
    assert with_outage.score > 10 and with_spike.score > 10
    assert abs(with_spike.median - clean.median) <= 20


def test_short_history_falls_back_to_recent_hours_then_to_nothing():
    assert unusual(500, [100], [100, 110, 90, 95], min_history=3).basis == "recent"
    assert unusual(500, [100, 100], [100], min_history=3) is None


def test_directions():
    history = [100, 105, 95, 100]
    assert unusual(10, history, [], direction="up").score < 0
    assert unusual(10, history, [], direction="down").score > 5
    assert unusual(10, history, [], direction="both").score == unusual(10, history, [], direction="down").score


def test_a_flat_or_quiet_baseline_does_not_turn_one_request_into_an_alert():
    assert unusual(101, [100, 100, 100, 100], []).score == pytest.approx(0.1)  # MAD 0: floored at 10 % of 100
    assert unusual(3, [0, 0, 0, 1], [], min_requests=20) is None  # a handful of requests: nothing to say


@settings(max_examples=300, deadline=None)
@given(value=volumes, history=st.lists(volumes, min_size=3, max_size=20), k=st.floats(min_value=1.5, max_value=100))
def test_the_score_does_not_depend_on_the_unit(value, history, k):
    """Scaled by k, value and history score the same (the floors scale when set relative)."""
    assume(statistics.median(history) > 0)
    a, _, _ = robust_score(value, history, absolute_floor=0)
    b, _, _ = robust_score(value * k, [h * k for h in history], absolute_floor=0)
    assert b == pytest.approx(a, rel=1e-6, abs=1e-6)


@settings(max_examples=300, deadline=None)
@given(low=volumes, high=volumes, history=st.lists(volumes, min_size=3, max_size=20))
def test_more_traffic_never_scores_lower_upwards(low, high, history):
    low, high = sorted((low, high))
    assert robust_score(high, history)[0] >= robust_score(low, history)[0]


@settings(max_examples=300, deadline=None)
@given(history=st.lists(st.floats(min_value=900, max_value=1100), min_size=5, max_size=20),
       outlier=st.floats(min_value=0, max_value=1e7))
def test_one_outlier_moves_the_median_and_scale_little(history, outlier):
    _, median, scale = robust_score(1000, history)
    _, median2, scale2 = robust_score(1000, history + [outlier])
    spread = max(history) - min(history)
    assert abs(median2 - median) <= spread
    assert scale2 <= max(scale, MAD_SCALE * spread, 0.1 * max(history)) + 1e-9
