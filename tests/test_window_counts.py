"""Counting per subject (a key or an org) in every window, and the durable decision (pure logic, no servers)."""

import hypothesis
from hypothesis import strategies as st

from quotaflow.processors.decisions import decide, org_windows
from quotaflow.processors.window_counts import COUNTED, LATE, REDELIVERED, apply_event
from quotaflow.schemas.limits import window_count, window_reset
from quotaflow.schemas.limits import DEFAULT_TIER_LIMITS, SUBJECT_KEY, SUBJECT_ORG, Policy, Window, policy_from_settings
from quotaflow.schemas.redis_keys import (
    APPLIED_FIELD,
    Decision,
    WindowUsage,
    org_key,
    reservations_key,
    usage_key,
    usage_subject,
)
from quotaflow.schemas.tiers import Tier

MIN, HOUR, DAY = Window(60), Window(3600), Window(86400)
POLICY = Policy(windows=(MIN, HOUR, DAY), tiers=DEFAULT_TIER_LIMITS, late_grace_ms=30_000)
D = 1_795_000_000_000 - 1_795_000_000_000 % 86_400_000  # a day boundary (so also an hour and a minute one)


def run(events, policy=POLICY, state=None):
    outcomes = []
    for ts, partition, offset in events:
        outcome, new = apply_event(state, ts, partition, offset, policy)
        outcomes.append(outcome)
        state = new if new is not None else state
    return outcomes, state


def counts(state, at, policy=POLICY):
    return [window_count(b, w, at) for w, b in zip(policy.windows, state["b"], strict=True)]


def test_defaults_match_the_tiers_of_the_brief():
    assert {t: DEFAULT_TIER_LIMITS[t.value] for t in Tier} == {
        Tier.FREE: (10, 100, 1_000), Tier.STARTER: (30, 500, 5_000), Tier.PROFESSIONAL: (100, 2_000, 20_000),
        Tier.SCALE: (200, 5_000, 50_000), Tier.ENTERPRISE: (500, 10_000, 100_000)}


def test_each_window_restarts_at_its_own_boundary():
    outcomes, state = run([(D + 10_000, 0, 1), (D + 59_999, 0, 2), (D + 60_000, 0, 3)])
    assert outcomes == [COUNTED] * 3
    assert counts(state, D + 59_999) == [2, 3, 3]
    assert counts(state, D + 60_000) == [1, 3, 3]
    outcomes, state = run([(D + 3_600_000, 0, 4)], state=state)
    assert outcomes == [COUNTED]
    assert counts(state, D + 3_600_000) == [1, 1, 4]
    assert counts(state, D + 59_999) == [0, 3, 4]  # closed minutes are dropped from the state


def test_redelivered_records_are_not_counted_twice():
    _, state = run([(D + i, 2, 100 + i) for i in range(5)])
    outcomes, again = run([(D + 3, 2, 103), (D + 4, 2, 104), (D + 5, 2, 105)], state=state)
    assert outcomes == [REDELIVERED, REDELIVERED, COUNTED]
    assert counts(again, D + 5) == [6, 6, 6]


def test_late_events_count_within_the_grace_period_and_in_longer_windows_only_after():
    # the subject's clock is at D+120s; the minute [D, D+60s) closed 60 s ago, beyond the 30 s grace
    outcomes, state = run([(D + 120_000, 0, 1), (D + 95_000, 0, 2), (D + 1_000, 0, 3)])
    assert outcomes == [COUNTED, COUNTED, LATE]
    assert counts(state, D + 95_000) == [1, 3, 3]  # the late one counts in the hour and the day
    assert counts(state, D + 1_000) == [0, 3, 3]   # but not in its closed minute


def test_sliding_windows_count_the_last_length_at_bucket_precision():
    policy = Policy(windows=(Window(60, sliding=True),), tiers={"FREE": (10,)}, late_grace_ms=0)
    _, state = run([(D + i * 10_000, 0, i) for i in range(9)], policy)  # one event every 10 s, D .. D+80s
    # At D+85s the window (D+25s, D+85s] holds the events at 30..80 s: 6 of them.
    assert counts(state, D + 85_000, policy) == [6]
    # One bucket is 1 s: at D+90.5s the event at 30 s is in the bucket [30 s, 31 s), still overlapping.
    assert counts(state, D + 90_500, policy) == [6]
    assert counts(state, D + 91_000, policy) == [5]
    # it frees a unit when its oldest counted bucket leaves
    assert window_reset(state["b"][0], policy.windows[0], D + 85_000) == D + 30_000 + 1_000 + 60_000


def test_the_durable_decision_denies_at_exactly_the_limit_of_the_key_or_its_org():
    for count, allowed in [(9, True), (10, False)]:
        _, key = run([(D + i, 0, i) for i in range(count)])
        d = decide(key, org_windows(key, POLICY, "FREE", D + 30_000), POLICY, "FREE", {}, now_ms=D + 30_000)
        assert (d.allowed, d.limit, d.remaining) == (allowed, 10, 10 - count if allowed else 0)
        assert d.denied_by == ("" if allowed else "key:60s") and d.window == "key:60s"
        assert d.reset_ms == D + 60_000
    # a key under its own limit is refused when its org is over
    _, key = run([(D + i, 0, i) for i in range(3)])
    _, org = run([(D + i, 0, i) for i in range(30)])
    d = decide(key, org_windows(org, POLICY, "STARTER", D + 1_000), POLICY, "STARTER", {}, now_ms=D + 1_000)
    assert (d.allowed, d.denied_by) == (False, "org:60s")


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(["key", "org"]), st.integers(1, 5), st.integers(0, 7),
                                     st.integers(0, 3)), max_size=6),
                  st.booleans())
def test_the_binding_window_is_the_last_to_free_of_those_denying_else_the_nearest_its_limit(spec, allowed):
    # The rule as stated (Decision.from_windows computes it with loops, for speed)
    now = D
    windows = tuple(WindowUsage(subject, f"{i}s", 60, limit, used, now + 1_000 * reset)
                    for i, (subject, limit, used, reset) in enumerate(spec))
    d = Decision.from_windows(windows, allowed=allowed, tier="FREE", now_ms=now)
    denying = [w for w in windows if w.used >= w.limit] if not allowed else []
    binding = (max(denying, key=lambda w: w.reset_ms) if denying
               else min(windows, key=lambda w: (w.remaining, w.reset_ms)) if windows else None)
    assert d.window == (binding.name if binding else "")
    assert d.denied_by == (binding.name if denying else "")
    assert (d.limit, d.reset_ms) == ((binding.limit, binding.reset_ms) if binding else (0, now))
    assert d.remaining == (0 if not allowed or binding is None else binding.remaining)


@hypothesis.given(st.booleans(), st.text(max_size=20), st.integers(0, 2**40), st.integers(0, 2**40),
                  st.integers(0, 2**53), st.text(max_size=30), st.text(max_size=30), st.integers(0, 2**53))
def test_the_durable_decision_reads_back_from_its_usage_hash_as_written(allowed, tier, limit, remaining, reset_ms,
                                                                         window, denied_by, now_ms):
    d = Decision(allowed=allowed, tier=tier, limit=limit, remaining=remaining, reset_ms=reset_ms, window=window,
                 denied_by=denied_by, now_ms=now_ms)
    field, value = d.redis_fields()
    as_redis_answers = {field.encode(): value, b"w:60s": b"1:1", APPLIED_FIELD.encode(): b"0:1"}  # HGETALL: bytes
    assert Decision.from_redis(as_redis_answers) == d
    assert Decision.from_redis({b"w:60s": b"1:1"}) is None  # counts, no decision yet


def test_usage_hash_names_read_back_as_their_subjects():
    assert usage_subject(usage_key("acme", "key-1")) == ("acme", "key-1")
    assert usage_subject(usage_key("acme")) == ("acme", None)
    assert usage_subject(org_key("acme")) is None and usage_subject(reservations_key("acme", "k")) is None


def test_overrides_replace_the_tier_limit_of_the_key_only():
    assert POLICY.limits(SUBJECT_KEY, "ENTERPRISE", {"60s": 5}) == (5, 10_000, 100_000)
    assert POLICY.limits(SUBJECT_ORG, "ENTERPRISE", {"60s": 5}) == (500, 10_000, 100_000)
    assert POLICY.limits(SUBJECT_KEY, "GOLD") == (10, 100, 1_000)  # unknown tier: the default


def test_policy_from_settings_reads_windows_modes_and_tiers():
    from quotaflow.core.settings import Settings

    # As the environment gives them (QUOTAFLOW_WINDOWS, QUOTAFLOW_TIER_LIMITS), checked when they load.
    s = Settings(windows="1,60", sliding_windows=True, tier_limits='{"FREE": [2, null], "PAID": [100, 1000]}',
                 late_grace_s=5, reservation_ttl_s=30)
    p = policy_from_settings(s)
    assert p.windows == (Window(1, True), Window(60, True)) and p.labels == ("1s", "60s")
    assert p.tiers == {"FREE": (2, None), "PAID": (100, 1000)}
    assert (p.late_grace_ms, p.reservation_ttl_ms) == (5_000, 30_000)


def test_a_run_of_events_counts_exactly_as_its_events_one_by_one():
    # apply_events takes a shortcut when no event of the run can be late; either way the
    # outcomes and the state must be those of apply_event, event by event.
    import copy
    import random

    from quotaflow.processors.window_counts import apply_events

    rnd = random.Random(3)
    sliding = Policy(windows=(Window(60, sliding=True), Window(3600)), tiers={"FREE": (10, 100)}, late_grace_ms=5_000)
    for policy in (POLICY, sliding):
        state, position, shortcuts = None, 0, 0
        for _ in range(400):
            spread = rnd.choice((1_000, 60_000, 200_000, 4_000_000))
            clock = state["m"] if state else D
            base = clock - rnd.choice((0, 0, 0, 20_000, 100_000, 5_000_000)) + rnd.randrange(-10_000, 60_000)
            positions, ts = [], []
            if state is not None and rnd.random() < 0.2:  # a redelivered prefix
                position = max(state["o"] - rnd.randrange(1, 4), 0)
            for _ in range(rnd.randrange(1, 30)):
                position += rnd.randrange(1, 3)
                positions.append(position)
                ts.append(base + rnd.randrange(spread))
            partition = rnd.choice((0, 0, 0, 1))  # a subject that moved to another partition
            if rnd.random() < 0.05:
                state = {**(state or {"p": 0, "o": 0, "m": D}), "b": [[]]}  # counted under another policy
            expected, one_by_one = run(list(zip(ts, [partition] * len(ts), positions, strict=True)), policy, copy.deepcopy(state))
            got, after = apply_events(copy.deepcopy(state), ts, partition, positions, policy)
            assert dict(got) == {o: expected.count(o) for o in set(expected)}
            assert (after if after is not None else state) == one_by_one
            shortcuts += LATE not in expected and REDELIVERED not in expected
            state = one_by_one
        assert 50 < shortcuts < 390, shortcuts  # both ways were taken
