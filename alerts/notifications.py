"""From a transition of alerts/state.py to the notification its channels receive
(schemas/alert_notifications.py)."""

from __future__ import annotations

import secrets

from quotaflow.alerts.state import Subject, Transition
from quotaflow.schemas.alert_notifications import Notification
from quotaflow.schemas.alert_rules import Rule


def for_transition(rule: Rule, subject: Subject, transition: Transition, started_ms: int | None = None) -> Notification:
    """The notification of a transition that notifies (firing, repeat, resolved)."""
    if not transition.notify or transition.notification_id is None:
        raise ValueError(f"a {transition.kind} transition that notifies nothing")
    return Notification(id=transition.notification_id, kind=transition.kind, fingerprint=transition.fingerprint,
                        org_id=subject.org_id, api_key_id=subject.api_key_id, rule_org_id=rule.org_id,
                        rule_id=rule.rule_id, rule_type=rule.type, severity=rule.severity,
                        threshold=transition.threshold, value=transition.value, at_ms=transition.at_ms,
                        episode=transition.episode, started_ms=started_ms, description=rule.description)


def trial(rule: Rule, now_ms: int) -> Notification:
    """What `quotaflow alerts rules test` sends: the rule's own fields, kind "test", an id of
    its own each time (a receiver must not drop it as a repeat)."""
    org_id = rule.org_id if not rule.is_global else "*"
    return Notification(id=f"msg_test_{secrets.token_hex(12)}", kind="test", fingerprint="test", org_id=org_id,
                        api_key_id=getattr(rule, "api_key_id", None), rule_org_id=rule.org_id, rule_id=rule.rule_id,
                        rule_type=rule.type, severity=rule.severity, threshold=rule.condition().threshold,
                        at_ms=now_ms, description=rule.description)
