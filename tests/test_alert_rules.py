"""Alert rules as typed records (schemas/alert_rules.py): every type parses, every bad field
is refused with an error naming it, and hostile input never gets past the models."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from quotaflow.schemas.alert_rules import (
    RULE_TYPES,
    InvalidRule,
    KeyExpiring,
    RuleRecord,
    UnusualActivity,
    UsageThreshold,
    parse_rule,
    rule_key,
)

BASE = dict(rule_id="r1", org_id="acme", channels=["ops-mail"])
ONE_OF_EACH = [
    dict(type="usage_threshold", window="1d", percent=80, scope="key", api_key_id="key_abc"),
    dict(type="usage_threshold", window="60s", count=5000),
    dict(type="rate_limit_violations", window="1h", min_denials=10),
    dict(type="quota_exceeded", window="3600s", scope="key"),
    dict(type="error_rate", window="5m", percent=5, min_requests=100),
    dict(type="latency_p95", window="5m", threshold_ms=750),
    dict(type="unusual_activity", score=5, direction="both"),
    dict(type="key_expiring", within_s="14d"),
]


def test_every_type_has_an_example():
    assert {e["type"] for e in ONE_OF_EACH} == set(RULE_TYPES)


@pytest.mark.parametrize("fields", ONE_OF_EACH, ids=lambda f: f["type"])
def test_each_rule_type_parses_and_round_trips_through_its_record(fields):
    rule = parse_rule({**BASE, **fields, "severity": "critical", "for_s": "2m", "cooldown_s": 600,
                       "repeat_interval_s": "4h"})
    assert rule.type == fields["type"] and rule.severity == "critical"
    assert (rule.for_s, rule.cooldown_s, rule.repeat_interval_s) == (120, 600, 4 * 3600)
    record = RuleRecord(rule=rule, created_ms=1, updated_ms=2, actor="ops")
    assert RuleRecord.decode(record.encode()) == record
    condition = rule.condition()
    assert condition.reached(condition.threshold) and not condition.cleared(condition.threshold)


def test_thresholds_in_the_units_the_evaluator_measures():
    assert parse_rule({**BASE, **ONE_OF_EACH[0]}).condition().threshold == 80
    assert parse_rule({**BASE, **ONE_OF_EACH[1]}).condition().threshold == 5000
    assert parse_rule({**BASE, **ONE_OF_EACH[3]}).condition().threshold == 100
    expiring = parse_rule({**BASE, **ONE_OF_EACH[7]})
    assert isinstance(expiring, KeyExpiring) and expiring.condition().direction == "below"
    assert expiring.condition().reached(13 * 86400) and not expiring.condition().reached(15 * 86400)
    usage = parse_rule({**BASE, **ONE_OF_EACH[1]})
    assert isinstance(usage, UsageThreshold) and usage.window == "60s"


@pytest.mark.parametrize("fields, named", [
    (dict(type="usage_threshold", window="1d"), "percent, count: give exactly one"),
    (dict(type="usage_threshold", window="1d", percent=80, count=3), "percent, count: give exactly one"),
    (dict(type="usage_threshold", window="1d", percent=-1), "percent:"),
    (dict(type="usage_threshold", window="soon", percent=80), "window:"),
    (dict(type="usage_threshold", percent=80), "window: Field required"),
    (dict(type="usage_threshold", window="1d", percent=80, api_key_id="k"), "api_key_id: only with scope"),
    (dict(type="usage_threshold", window="1d", percent=80, severity="urgent"), "severity:"),
    (dict(type="usage_threshold", window="1d", percent=80, for_s="5 minutes"), "for_s: expected a duration"),
    (dict(type="usage_threshold", window="1d", percent=80, repeat_interval_s=10), "repeat_interval_s: at least 60"),
    (dict(type="usage_threshold", window="1d", percent=80, hysteresis=2), "hysteresis:"),
    (dict(type="usage_threshold", window="1d", percent=80, colour="red"), "colour: unknown field"),
    (dict(type="error_rate", window="1h", percent=101), "percent:"),
    (dict(type="unusual_activity", min_history=10, baseline_weeks=4), "min_history: at most baseline_weeks"),
    (dict(type="key_expiring", within_s=5), "within_s:"),
    (dict(type="nonsense"), "type: unknown rule type"),
    (dict(), "type: missing"),
])
def test_bad_fields_are_refused_naming_the_field(fields, named):
    with pytest.raises(InvalidRule) as raised:
        parse_rule({**BASE, **fields})
    assert named in str(raised.value)


@pytest.mark.parametrize("override, named", [
    (dict(rule_id="has space"), "rule_id: must be 1-64 characters"),
    (dict(org_id="a/b"), "org_id: must be 1-64 characters"),
    (dict(org_id="**"), "org_id:"),
    (dict(channels=[]), "channels:"),
    (dict(channels=["Ops Mail"]), "channels.0: a channel name is"),
    (dict(channels=["a", "a"]), "channels: a channel is listed twice"),
    (dict(channels=[f"c{n}" for n in range(9)]), "channels:"),
])
def test_bad_common_fields_are_refused_naming_the_field(override, named):
    with pytest.raises(InvalidRule) as raised:
        parse_rule({**BASE, "type": "quota_exceeded", "window": "1d", **override})
    assert named in str(raised.value)


def test_a_global_rule_and_its_topic_key():
    rule = parse_rule({**BASE, "org_id": "*", "type": "quota_exceeded", "window": "1d"})
    assert rule.is_global and rule_key(rule.org_id, rule.rule_id) == b"*/r1"


def test_unusual_activity_defaults():
    rule = parse_rule({**BASE, "type": "unusual_activity"})
    assert isinstance(rule, UnusualActivity) and rule.condition().threshold == rule.score == 4.0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.dictionaries(st.sampled_from(["type", "rule_id", "org_id", "channels", "window", "percent",
                                                  "count", "for_s", "scope", "api_key_id", "x"]),
                                 st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=80),
                                           st.lists(st.text(max_size=10), max_size=3),
                                           st.sampled_from(RULE_TYPES)), max_size=11)))
def test_hostile_input_is_a_rule_or_an_invalid_rule_never_another_error(data):
    try:
        rule = parse_rule(data)
    except InvalidRule as exc:
        assert str(exc)
    else:
        assert parse_rule(orjson.loads(rule.model_dump_json())) == rule
