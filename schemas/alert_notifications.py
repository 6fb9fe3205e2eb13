"""An alert notification as receivers get it: the body of a signed webhook (the Standard
Webhooks layout: ``type``, ``timestamp``, ``data``), the content of an email and of a
Slack message, and the value of a dead letter when delivery was given up.

``id`` is the webhook-id: one per notification, the same on every retry and after a
restart (alerts/state.py derives it from the alert's fingerprint, its firing and the
kind), so a receiver that has seen it can drop a repeat.

A rule with a group wait (schemas/alert_rules.py group_wait_s) notifies its alerts about
one org together: ``alerts`` lists them, each with its own transition's id (the alert
history's notification_id), and the notification's ``id`` is the group's (the one alert's
own id when the group holds one). ``fingerprint`` is then the group's stable name, and
``api_key_id`` and ``value`` are those of the alert when there is one, else null.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

import msgspec

Kind = Literal["firing", "repeat", "resolved", "test"]
EVENT_TYPES = {"firing": "alert.firing", "repeat": "alert.firing", "resolved": "alert.resolved", "test": "alert.test"}


class GroupedAlert(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One alert of a grouped notification: what its own notification would have said."""

    id: str  # the notification id of its transition (alerts/state.py notification_id)
    fingerprint: str
    at_ms: int
    api_key_id: str | None = None
    value: float | None = None
    threshold: float = 0.0
    episode: int = 0
    started_ms: int | None = None

    @property
    def subject(self) -> str:
        return self.api_key_id or "(the org)"


class Notification(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    kind: Kind
    fingerprint: str
    org_id: str  # the org the alert is about
    rule_org_id: str  # the rule's org, "*" for a global rule
    rule_id: str
    rule_type: str
    severity: str
    threshold: float
    at_ms: int  # when the transition happened
    api_key_id: str | None = None
    value: float | None = None
    episode: int = 0
    started_ms: int | None = None  # when the firing began (resolved: how long it lasted)
    description: str = ""
    alerts: tuple[GroupedAlert, ...] = ()  # a rule with a group wait: the alerts notified together

    @property
    def members(self) -> tuple[GroupedAlert, ...]:
        """The alerts this notification is about, one or more."""
        return self.alerts or (GroupedAlert(self.id, self.fingerprint, self.at_ms, self.api_key_id, self.value,
                                            self.threshold, self.episode, self.started_ms),)

    @property
    def event_type(self) -> str:
        return EVENT_TYPES[self.kind]

    @property
    def subject(self) -> str:
        return self.org_id + (f"/{self.api_key_id}" if self.api_key_id else "")

    def summary(self) -> str:
        """One line for a subject line, a Slack text, a log: never a secret (ids and numbers)."""
        state = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED", "test": "TEST"}[self.kind]
        if len(self.alerts) > 1:
            keys = ", ".join(a.subject for a in self.alerts[:5]) + (", ..." if len(self.alerts) > 5 else "")
            return (f"[{self.severity.upper()}] {state}: {self.rule_type} rule {self.rule_id} for {self.org_id}: "
                    f"{len(self.alerts)} alerts ({keys}), threshold {self.threshold:g}")
        value = "no value" if self.value is None else f"value {self.value:g}"
        return (f"[{self.severity.upper()}] {state}: {self.rule_type} rule {self.rule_id} for {self.subject}: "
                f"{value}, threshold {self.threshold:g}")

    def body(self) -> bytes:
        """The webhook body (JSON): what is signed and what a dead letter keeps."""
        when = dt.datetime.fromtimestamp(self.at_ms / 1000, tz=dt.timezone.utc)
        return msgspec.json.encode({"type": self.event_type,
                                    "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                                    "data": self})

    @classmethod
    def from_body(cls, body: bytes) -> "Notification":
        return msgspec.convert(msgspec.json.decode(body)["data"], cls)
