"""The alert state machine (alerts/state.py) as pure logic: edge-triggered firing, hysteresis,
for_s, cooldown, repeats, silences and stable ids, by examples and by properties checked
against a reference written here (a Schmitt trigger and a list of what must follow)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from quotaflow.alerts.state import (
    FIRING,
    INACTIVE,
    PENDING,
    AlertState,
    Alerts,
    Subject,
    fingerprint,
    step,
)
from quotaflow.schemas.alert_rules import Silence, parse_rule

ACME = Subject("acme")
S = 1000  # ms


def usage_rule(**over):
    fields = dict(type="usage_threshold", rule_id="daily-80", org_id="acme", window="1d", percent=80,
                  channels=["ops"], hysteresis=0.1)
    fields.update(over)
    return parse_rule(fields)


def kinds(transitions):
    return [(t.kind, t.notify) for t in transitions]


def test_crossing_fires_once_not_on_every_event():
    rule, alerts = usage_rule(), Alerts()
    assert alerts.observe(rule, ACME, 50, 0) == []
    (fired,) = alerts.observe(rule, ACME, 81, 1 * S)
    assert (fired.kind, fired.notify, fired.from_status, fired.to_status) == ("firing", True, INACTIVE, FIRING)
    assert fired.threshold == 80 and fired.value == 81 and fired.episode == 1
    for n, value in enumerate([85, 90, 99, 120, 80], 2):  # still over: nothing more
        assert alerts.observe(rule, ACME, value, n * S) == []
    (resolved,) = alerts.observe(rule, ACME, 10, 10 * S)
    assert (resolved.kind, resolved.notify, resolved.to_status) == ("resolved", True, INACTIVE)
    assert resolved.episode == fired.episode and resolved.notification_id != fired.notification_id


def test_a_value_hovering_at_the_threshold_does_not_flap():
    rule, alerts = usage_rule(hysteresis=0.1), Alerts()  # fires at 80, clears below 72
    out = []
    for n, value in enumerate([79.9, 80.0, 79.9, 80.1, 75, 79, 72.0, 80, 78]):
        out += alerts.observe(rule, ACME, value, n * S)
    assert kinds(out) == [("firing", True)]
    out = alerts.observe(rule, ACME, 71.9, 20 * S)
    assert kinds(out) == [("resolved", True)]


def test_for_duration_holds_in_pending_and_a_dip_cancels_it():
    rule, alerts = usage_rule(for_s="5m"), Alerts()
    assert kinds(alerts.observe(rule, ACME, 90, 0)) == [("pending", False)]
    assert alerts.observe(rule, ACME, 95, 299 * S) == []  # not yet held 300 s
    assert kinds(alerts.observe(rule, ACME, 10, 299 * S + 1)) == [("cancelled", False)]
    assert kinds(alerts.observe(rule, ACME, 90, 400 * S)) == [("pending", False)]
    assert alerts.observe(rule, ACME, None, 500 * S) == []  # no data: keeps waiting
    (fired,) = alerts.observe(rule, ACME, 90, 700 * S)
    assert fired.kind == "firing" and fired.from_status == PENDING and fired.at_ms == 700 * S


def test_no_data_never_turns_the_condition_on():
    rule, alerts = usage_rule(), Alerts()
    for n in range(5):
        assert alerts.observe(rule, ACME, None, n * 3600 * S) == []
    assert alerts.states[fingerprint(rule, ACME)].status == INACTIVE


def test_cooldown_keeps_a_returning_condition_pending_until_it_is_over():
    rule, alerts = usage_rule(cooldown_s="10m"), Alerts()
    assert kinds(alerts.observe(rule, ACME, 90, 0)) == [("firing", True)]
    assert kinds(alerts.observe(rule, ACME, 0, 60 * S)) == [("resolved", True)]
    assert kinds(alerts.observe(rule, ACME, 90, 120 * S)) == [("pending", False)]
    assert alerts.observe(rule, ACME, 95, 599 * S) == []
    (fired,) = alerts.observe(rule, ACME, 95, 600 * S)
    assert fired.kind == "firing" and fired.episode == 2


def test_repeat_interval_notifies_again_while_firing_with_new_ids():
    rule, alerts = usage_rule(repeat_interval_s="1h"), Alerts()
    (fired,) = alerts.observe(rule, ACME, 90, 0)
    assert alerts.observe(rule, ACME, 90, 3599 * S) == []
    (r1,) = alerts.observe(rule, ACME, 90, 3600 * S)
    (r2,) = alerts.observe(rule, ACME, None, 7200 * S)
    assert [r1.kind, r2.kind] == ["repeat", "repeat"]
    assert len({fired.notification_id, r1.notification_id, r2.notification_id}) == 3


def test_a_silence_mutes_the_firing_and_the_firing_is_notified_once_it_ends():
    rule, alerts = usage_rule(), Alerts()
    silence = Silence(silence_id="maint", org_id="acme", rule_id="daily-80", ends_ms=100 * S)
    (fired,) = alerts.observe(rule, ACME, 90, 0, [silence])
    assert fired.kind == "firing" and not fired.notify and fired.muted
    assert alerts.observe(rule, ACME, 90, 50 * S, [silence]) == []
    (late,) = alerts.observe(rule, ACME, None, 100 * S, [silence])
    assert late.kind == "firing" and late.notify and late.notification_id == fired.notification_id
    assert kinds(alerts.observe(rule, ACME, 0, 101 * S, [silence])) == [("resolved", True)]


def test_a_firing_muted_throughout_resolves_without_a_notification():
    rule, alerts = usage_rule(), Alerts()
    silence = Silence(silence_id="org-wide", org_id="acme", ends_ms=10**13)  # every rule of acme
    assert kinds(alerts.observe(rule, ACME, 90, 0, [silence])) == [("firing", False)]
    assert kinds(alerts.observe(rule, ACME, 0, S, [silence])) == [("resolved", False)]


def test_silences_of_another_org_or_rule_do_not_mute():
    rule = usage_rule(org_id="*")  # a global rule
    others = [Silence(silence_id="a", org_id="globex", ends_ms=10**13),
              Silence(silence_id="b", org_id="acme", rule_id="other", ends_ms=10**13),
              Silence(silence_id="c", org_id="acme", starts_ms=5 * S, ends_ms=10**13)]
    (fired,) = Alerts().observe(rule, ACME, 90, 0, others)
    assert fired.notify
    every_org = Silence(silence_id="d", org_id="*", rule_id="daily-80", ends_ms=10**13)
    (fired,) = Alerts().observe(rule, ACME, 90, 0, [every_org])
    assert not fired.notify


def test_key_expiring_fires_below_its_threshold_and_resolves_when_renewed():
    rule, alerts = parse_rule(dict(type="key_expiring", rule_id="exp", org_id="acme", within_s="7d",
                                   channels=["ops"])), Alerts()
    key = Subject("acme", "key_abc")
    assert alerts.observe(rule, key, 8 * 86400, 0) == []
    assert kinds(alerts.observe(rule, key, 6 * 86400, S)) == [("firing", True)]
    assert alerts.observe(rule, key, 5 * 86400, 2 * S) == []
    assert kinds(alerts.observe(rule, key, 90 * 86400, 3 * S)) == [("resolved", True)]


def test_a_disabled_rule_resolves_what_it_fired_and_fires_nothing():
    rule, alerts = usage_rule(), Alerts()
    alerts.observe(rule, ACME, 90, 0)
    off = usage_rule(enabled=False)
    assert kinds(alerts.observe(off, ACME, 95, S)) == [("resolved", True)]
    assert alerts.observe(off, ACME, 95, 2 * S) == []


def test_fingerprints_are_stable_and_distinct_per_subject_and_rule():
    rule = usage_rule()
    assert fingerprint(rule, ACME) == fingerprint(usage_rule(percent=90, severity="critical"), ACME)
    assert len({fingerprint(rule, ACME), fingerprint(rule, Subject("acme", "k1")),
                fingerprint(rule, Subject("globex")), fingerprint(usage_rule(rule_id="other"), ACME),
                fingerprint(usage_rule(org_id="*"), ACME)}) == 5
    # what is hashed cannot be shifted between fields to collide (ids cannot hold the separator)
    assert fingerprint(usage_rule(rule_id="a"), Subject("b", "c")) != fingerprint(usage_rule(rule_id="a"),
                                                                                  Subject("b:c"))


# --- properties -------------------------------------------------------------------------

values = st.floats(min_value=0, max_value=200, allow_nan=False)
observations = st.lists(st.tuples(st.one_of(st.none(), values), st.integers(min_value=0, max_value=600 * S)),
                        max_size=60)


def run(rule, obs, silences=()):
    """[(time, transitions of the step)] for observations given as (value, ms since the last)."""
    state, now, out = None, 0, []
    for value, gap in obs:
        now += gap
        state, transitions = step(rule, ACME, value, now, state, silences)
        out.append((now, value, transitions))
    return out


def schmitt(rule, obs_values):
    """The trigger's output after each value, written independently of alerts/state.py."""
    on, outputs = False, []
    threshold, clear_at = rule.condition().threshold, rule.condition().clear_at
    for value in obs_values:
        if value is not None:
            on = True if value >= threshold else (False if value < clear_at else on)
        outputs.append(on)
    return outputs


@settings(max_examples=300, deadline=None)
@given(obs=observations, hysteresis=st.sampled_from([0, 0.05, 0.1, 0.5]))
def test_one_firing_per_upward_crossing_and_one_resolved_per_downward(obs, hysteresis):
    rule = usage_rule(hysteresis=hysteresis)
    steps = run(rule, obs)
    outputs = schmitt(rule, [v for v, _ in obs])
    for (_, _, transitions), before, after in zip(steps, [False] + outputs, outputs):
        assert len(transitions) <= 1
        expected = [] if before == after else [("firing", True)] if after else [("resolved", True)]
        assert kinds(transitions) == expected


@settings(max_examples=300, deadline=None)
@given(obs=st.lists(st.tuples(st.floats(min_value=72.0, max_value=100), st.integers(0, 60 * S)), max_size=80))
def test_hovering_between_clear_and_threshold_fires_at_most_once(obs):
    steps = run(usage_rule(hysteresis=0.1), obs)  # clear_at 72: never cleared
    notified = [t for _, _, ts in steps for t in ts]
    assert len(notified) <= 1 and all(t.kind == "firing" for t in notified)


@settings(max_examples=300, deadline=None)
@given(obs=observations, for_s=st.integers(0, 900), cooldown_s=st.integers(0, 1800),
       repeat=st.one_of(st.none(), st.integers(60, 3600)), silence_end=st.integers(0, 3000 * S))
def test_notifications_pair_up_and_honour_for_cooldown_and_silences(obs, for_s, cooldown_s, repeat, silence_end):
    rule = usage_rule(for_s=for_s, cooldown_s=cooldown_s, repeat_interval_s=repeat)
    silence = Silence(silence_id="s", org_id="acme", ends_ms=silence_end)
    steps = run(rule, obs, [silence])
    outputs = schmitt(rule, [v for v, _ in obs])
    on_since, firings, ids, open_notified = None, [], set(), None
    for (now, _, transitions), on in zip(steps, outputs):
        if on and on_since is None:
            on_since = now
        for t in transitions:
            if t.kind == "firing" and t.from_status != FIRING:  # a firing begins
                assert on and now - on_since >= for_s * S, "fired before the condition held for for_s"
                assert not firings or now - firings[-1] >= cooldown_s * S, "fired within the cooldown"
                firings.append(now)
            if t.notify:
                assert t.notification_id not in ids, "a notification id used twice"
                ids.add(t.notification_id)
                if t.kind in ("firing", "repeat"):
                    assert now >= silence_end, "notified while muted"
                if t.kind == "firing":
                    assert open_notified is None
                    open_notified = t.episode
                elif t.kind == "resolved":
                    assert open_notified == t.episode, "resolved without its firing"
                    open_notified = None
                else:
                    assert open_notified == t.episode
            elif t.kind == "resolved":
                assert open_notified is None, "a notified firing resolved without a notification"
        if not on:
            on_since = None


@settings(max_examples=200, deadline=None)
@given(obs=observations, cut=st.integers(0, 60))
def test_a_step_replayed_from_the_stored_state_gives_the_same_transitions(obs, cut):
    """What a processor restarted from its table sees: the state as stored (JSON), the
    same steps, the same transitions and ids."""
    rule = usage_rule(for_s=30, cooldown_s=60, repeat_interval_s=120)
    state, now = None, 0
    for n, (value, gap) in enumerate(obs):
        now += gap
        if n == cut and state is not None:
            state = AlertState.decode(state.encode())
        replay = step(rule, ACME, value, now, state)
        again = step(rule, ACME, value, now, AlertState.decode(state.encode()) if state else None)
        assert replay == again
        state = replay.state


@settings(max_examples=300, deadline=None)
@given(obs=observations, for_s=st.integers(0, 900), cooldown_s=st.integers(0, 1800),
       repeat=st.one_of(st.none(), st.integers(60, 3600)), silence_end=st.integers(0, 3000 * S),
       late=st.integers(1, 5000))
def test_history_row_ids_are_distinct_and_the_same_when_a_step_is_replayed_later(obs, for_s, cooldown_s, repeat,
                                                                                 silence_end, late):
    """Every transition has a row id of its own (the history table keeps one row per id: a
    shared one would drop a transition), and a step replayed from the stored state after a
    crash, some ms later, writes a transition of the same kind under the same id (a second
    row for a pending or cancelled one was the bug: its id held the time)."""
    rule = usage_rule(for_s=for_s, cooldown_s=cooldown_s, repeat_interval_s=repeat)
    silences = [Silence(silence_id="s", org_id="acme", ends_ms=silence_end)]
    state, now, rows = None, 0, []
    for value, gap in obs:
        now += gap
        done = step(rule, ACME, value, now, state, silences)
        stored = AlertState.decode(state.encode()) if state else None
        replayed = step(rule, ACME, value, now + late, stored, silences)
        for t, r in zip(done.transitions, replayed.transitions):
            assert t.row_id
            if (t.kind, t.notify, t.muted) == (r.kind, r.notify, r.muted):
                assert r.row_id == t.row_id, (t, r)
        rows += [t.row_id for t in done.transitions]
        state = done.state
    assert len(rows) == len(set(rows)), rows


def test_a_muted_firing_and_its_notification_after_the_silence_are_two_rows():
    rule, alerts = usage_rule(), Alerts()
    silence = Silence(silence_id="maint", org_id="acme", rule_id="daily-80", ends_ms=100 * S)
    (held,) = alerts.observe(rule, ACME, 90, 0, [silence])
    (late,) = alerts.observe(rule, ACME, None, 100 * S, [silence])
    assert held.notification_id == late.notification_id and held.row_id != late.row_id


def test_pending_and_cancelled_rows_are_named_by_the_pending_period_not_the_clock():
    rule = usage_rule(for_s="5m")
    first = step(rule, ACME, 90, 1_000)
    again = step(rule, ACME, 90, 9_000)  # the same step replayed 8 s later
    assert [t.kind for t in first.transitions] == ["pending"] and first.transitions[0].row_id == \
        again.transitions[0].row_id
    (cancelled,) = step(rule, ACME, 10, 20_000, first.state).transitions
    (pending2,) = step(rule, ACME, 95, 30_000, step(rule, ACME, 10, 20_000, first.state).state).transitions
    assert cancelled.kind == "cancelled" and pending2.kind == "pending"
    assert len({first.transitions[0].row_id, cancelled.row_id, pending2.row_id}) == 3
