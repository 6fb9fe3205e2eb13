"""Grouping of notifications per org and rule (alerts/grouping.py) as pure logic: what a
flush takes, the notification it makes, the ids it gives, and that across any crash
between writing a group and striking its alerts' outboxes every notification is sent in
exactly one group notification, each alert's in order."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings, strategies as st

from quotaflow.alerts import grouping
from quotaflow.alerts.notifications import for_transition
from quotaflow.alerts.state import Alerts, Subject
from quotaflow.schemas.alert_notifications import Notification
from quotaflow.schemas.alert_rules import parse_rule

GROUP = grouping.group_key("acme", "keys-80", "acme")


def rule(**over):
    return parse_rule({"type": "usage_threshold", "rule_id": "keys-80", "org_id": "acme", "window": "1d",
                       "percent": 80, "scope": "key", "channels": ["ops"], **over})


def notify(alerts: Alerts, key: str, value: float, at_ms: int, r=None) -> dict | None:
    """The outbox item the stage would append for this step of key's alert, if any."""
    r = r or rule()
    (t,) = alerts.observe(r, Subject("acme", key), value, at_ms) or (None,)
    if t is None or not t.notify:
        return None
    return {"n": msgspec.to_builtins(for_transition(r, Subject("acme", key), t)), "ch": ["ops"], "g": GROUP}


def record(key: str, *items: dict) -> dict:
    return {"s": {"status": "firing"}, "org": "acme", "key": key, "rule": ["acme", "keys-80"], "out": list(items)}


def test_rule_defaults_group_the_rules_about_each_key_only():
    assert rule().group_wait == 2 and rule().group_interval_s == 30
    assert rule(scope="org").group_wait == 0  # one alert per org: nothing to wait for
    assert rule(api_key_id="k1").group_wait == 0
    assert rule(scope="org", group_wait_s="10s").group_wait == 10  # asked for: honoured
    assert rule(group_wait_s=0).group_wait == 0  # a rule about each key, notified one by one


def test_keys_crossing_together_are_one_notification_listing_them():
    alerts = Alerts()
    records = {f"fp-{k}": record(k, notify(alerts, k, 90, 1_000 + i)) for i, k in enumerate(["c", "a", "b"])}
    found = grouping.heads(records.items(), GROUP)
    assert [h.item["n"]["api_key_id"] for h in found] == ["a", "b", "c"]
    done = grouping.flush(None, GROUP, "acme", ["acme", "keys-80"], found, 5_000)
    (item,) = done.items
    n = msgspec.convert(item["n"], Notification)
    assert n.kind == "firing" and [a.api_key_id for a in n.alerts] == ["a", "b", "c"]
    assert n.id.startswith("msg_grp_") and n.api_key_id is None and n.value is None and n.at_ms == 1_002
    assert {a.id for a in n.alerts} == done.claimed and len(done.claimed) == 3
    assert "3 alerts (a, b, c)" in n.summary()
    # the same members in another order: the same id (what a restarted stage gives them)
    again = grouping.flush(None, GROUP, "acme", ["acme", "keys-80"], list(reversed(found)), 9_000)
    assert again.items[0]["n"]["id"] == n.id
    assert all(grouping.strike(records[h.fingerprint], done.claimed)["out"] == [] for h in found)
    assert done.group["m"] == sorted(done.claimed) and done.group["last_ms"] == 5_000


def test_a_group_of_one_keeps_the_alerts_own_id_and_fields():
    alerts = Alerts()
    item = notify(alerts, "a", 90, 1_000)
    done = grouping.flush(None, GROUP, "acme", ["acme", "keys-80"],
                          grouping.heads([("fp-a", record("a", item))], GROUP), 2_000)
    n = msgspec.convert(done.items[0]["n"], Notification)
    assert n.id == item["n"]["id"] and n.api_key_id == "a" and n.value == 90 and len(n.alerts) == 1


def test_a_flush_takes_one_notification_per_alert_and_one_per_kind():
    alerts = Alerts()
    a_fire, b_fire = notify(alerts, "a", 90, 1_000), notify(alerts, "b", 90, 1_000)
    a_resolve = notify(alerts, "a", 10, 1_500)
    records = {"fp-a": record("a", a_fire, a_resolve), "fp-b": record("b", b_fire),
               "fp-x": record("x", {**notify(Alerts(), "x", 90, 1_000), "g": "group|acme|other|acme"}),
               GROUP: {"grp": GROUP, "org": "acme", "out": []}}
    found = grouping.heads(records.items(), GROUP)
    assert {h.fingerprint for h in found} == {"fp-a", "fp-b"}  # a's resolved waits behind its firing
    first = grouping.flush(None, GROUP, "acme", ["acme", "keys-80"], found, 2_000)
    assert [i["n"]["kind"] for i in first.items] == ["firing"]
    records["fp-a"] = grouping.strike(records["fp-a"], first.claimed)
    records["fp-b"] = grouping.strike(records["fp-b"], first.claimed)
    second = grouping.flush(first.group, GROUP, "acme", ["acme", "keys-80"],
                            grouping.heads(records.items(), GROUP, first.group), 40_000)
    assert [i["n"]["kind"] for i in second.items] == ["resolved"]
    assert [i["n"]["kind"] for i in second.group["out"]] == ["firing", "resolved"]


def test_a_group_is_due_after_its_wait_and_not_before_its_interval():
    assert grouping.due_ms(1_000, None, 2, 30) == 3_000
    assert grouping.due_ms(1_000, 0, 2, 30) == 30_000
    assert grouping.due_ms(100_000, 0, 2, 30) == 102_000


# --- property: any interleaving of crossings, flushes and crashes ------------------------------

steps = st.lists(st.one_of(
    st.tuples(st.just("value"), st.sampled_from("abcd"), st.floats(0, 100)),  # an alert's next value
    st.tuples(st.just("flush"), st.booleans(), st.just(0.0)),  # a flush; True: the stage dies between its writes
    st.tuples(st.just("restart"), st.just(False), st.just(0.0)),  # a restarted stage's recovery
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps=steps)
def test_every_notification_is_sent_once_in_order_across_crashes_between_a_flush_s_writes(steps):
    """A flush killed after writing its group and before striking the alerts' outboxes
    leaves its notifications there; alerts go on crossing; the restarted stage strikes what
    the group claimed (alerts/app.py _recover) before it flushes again."""
    alerts, records, group, crashed = Alerts(), {}, None, False
    made: dict[str, list[str]] = {}  # key -> ids of its notifications, in order
    now = 0

    def recover() -> None:
        for fp in list(records):
            records[fp] = grouping.strike(records[fp], set(group["m"])) or records[fp]

    def flush_all(crash: bool) -> bool:
        nonlocal group
        found = grouping.heads(records.items(), GROUP, group)
        if not found:
            return False
        done = grouping.flush(group, GROUP, "acme", ["acme", "keys-80"], found, now)
        group = done.group  # written first
        if not crash:
            for fp in list(records):
                records[fp] = grouping.strike(records[fp], done.claimed) or records[fp]
        return True

    for what, arg, value in steps:
        now += 1_000
        if what == "value":
            item = notify(alerts, arg, value, now)
            if item is not None:
                made.setdefault(arg, []).append(item["n"]["id"])
                records.setdefault(f"fp-{arg}", record(arg))["out"].append(item)
        elif what == "restart" or crashed:  # nothing flushes before the restarted stage recovered
            if crashed:
                recover()
            crashed = False
        else:
            crashed = flush_all(arg) and arg
    if crashed:
        recover()
    while flush_all(False):  # the rest, flushed
        pass
    sent = [a for item in (group or {"out": []})["out"] for a in msgspec.convert(item["n"], Notification).alerts]
    assert sorted(a.id for a in sent) == sorted(i for ids in made.values() for i in ids)  # each once
    for key, ids in made.items():
        assert [a.id for a in sent if a.api_key_id == key] == ids  # each alert's in order
    group_ids = [item["n"]["id"] for item in (group or {"out": []})["out"]]
    assert len(group_ids) == len(set(group_ids))


def test_a_group_s_email_and_slack_message_list_its_alerts():
    from quotaflow.alerts.channels import email, slack
    from quotaflow.core.channels import EmailChannel

    alerts = Alerts()
    records = {f"fp-{k}": record(k, notify(alerts, k, 90 + i, 1_000)) for i, k in enumerate(["a", "b"])}
    done = grouping.flush(None, GROUP, "acme", ["acme", "keys-80"], grouping.heads(records.items(), GROUP), 2_000)
    n = msgspec.convert(done.items[0]["n"], Notification)
    assert Notification.from_body(n.body()) == n
    text = email.message(n, EmailChannel(type="email", to=["ops@example.com"]), "alerts@example.com").get_content()
    assert "Alerts:     2" in text and "  - a: 90" in text and "  - b: 91" in text
    blocks = slack.payload(n)["blocks"]
    assert any(b.get("text", {}).get("text") == "• a: 90\n• b: 91" for b in blocks)
