"""Grouping of notifications per org and rule, as pure logic over the alert-state table's
records (alerts/app.py), after Alertmanager's group_wait and group_interval, kept simple:

- A rule with a group wait (schemas/alert_rules.py ``group_wait``: by default a rule about
  each key of an org) puts each notification of its alerts about one org in that org's
  *group*, ``group|<rule org>|<rule id>|<org>``, instead of sending it on its own.
- A group is flushed ``group_wait_s`` after the oldest notification waiting in it, and
  never sooner than ``group_interval_s`` after its previous flush. A flush makes one
  notification per kind (firing, repeat, resolved) listing the alerts
  (schemas/alert_notifications.py ``alerts``), into the group's own outbox.
- Each alert's order holds: a flush takes at most one notification per alert (the first of
  its outbox), so a firing and its resolved are never in one notification, and never
  delivered out of order (one outbox per group, delivered in order).

Records (JSON, in the alert-state table, all on the org's partition):

    alert  {"s": state, "org", "key", "rule": [org, id], "out": [{"n": notification, "ch": [channels], "g": group}]}
    group  {"grp": group, "org", "rule": [org, id], "last_ms": last flush, "m": [ids it claimed],
            "out": [{"n": notification, "ch": [channels]}]}

Exactly once across a crash: a flush writes the group record (its notifications, with ids
derived from their members, and ``m``, the ids it took) before it strikes those
notifications from the alerts' outboxes, and nothing of the group is sent before both are
on the broker. A stage restarted in between finds the ids in ``m`` still in the alerts'
outboxes and strikes them (``unclaimed`` skips them), so no alert is notified twice.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, NamedTuple

import msgspec

from quotaflow.schemas.alert_notifications import GroupedAlert, Notification

PREFIX = "group|"
KIND_ORDER = ("firing", "repeat", "resolved")


def group_key(rule_org_id: str, rule_id: str, org_id: str) -> str:
    """The group of a rule's alerts about one org (ids cannot hold "|": schemas/ids.py)."""
    return f"{PREFIX}{rule_org_id}|{rule_id}|{org_id}"


def is_group(key: str) -> bool:
    return key.startswith(PREFIX)


def group_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def group_id(member_ids: Iterable[str]) -> str:
    """The id of a notification of these members: the alert's own for one, else derived
    from all of them (the same after a crash, for the same members)."""
    ids = sorted(member_ids)
    if len(ids) == 1:
        return ids[0]
    return "msg_grp_" + hashlib.sha256("\x1f".join(ids).encode()).hexdigest()[:32]


def due_ms(oldest_ms: int, last_ms: int | None, wait_s: int, interval_s: int) -> int:
    """When a group holding notifications since ``oldest_ms`` is flushed."""
    due = oldest_ms + wait_s * 1000
    return due if last_ms is None else max(due, last_ms + interval_s * 1000)


class Head(NamedTuple):
    """An alert's first notification waiting in a group."""

    fingerprint: str
    item: dict  # the outbox item: {"n", "ch", "g"}

    @property
    def notification(self) -> Notification:
        return msgspec.convert(self.item["n"], Notification)


def heads(records: Iterable[tuple[str, dict | None]], key: str, group: dict | None = None) -> list[Head]:
    """The first notification of each alert record waiting in group ``key``, claimed by no
    flush yet (``group``'s ``m``), ordered by subject."""
    claimed = set(group.get("m", ())) if group else set()
    out = []
    for fp, rec in records:
        for item in (rec or {}).get("out", ()) if rec and "s" in rec else ():
            if item["n"]["id"] in claimed:
                continue  # taken by the last flush (a crash before it was struck): skip to the next
            if item.get("g") == key:
                out.append(Head(fp, item))
            break
    return sorted(out, key=lambda h: (h.item["n"].get("api_key_id") or "", h.fingerprint))


def grouped(members: list[Notification], key: str) -> Notification:
    """One notification listing ``members`` (one org, rule and kind)."""
    first = members[0]
    alerts = tuple(GroupedAlert(m.id, m.fingerprint, m.at_ms, m.api_key_id, m.value, m.threshold, m.episode,
                                m.started_ms) for m in members)
    if len(members) == 1:
        return msgspec.structs.replace(first, alerts=alerts)
    return msgspec.structs.replace(first, id=group_id(m.id for m in members), fingerprint=group_fingerprint(key),
                                   api_key_id=None, value=None, episode=0, started_ms=None,
                                   at_ms=max(m.at_ms for m in members), alerts=alerts)


class Flush(NamedTuple):
    group: dict  # the group record after the flush
    claimed: set[str]  # the notification ids it took from the alerts' outboxes
    items: list[dict]  # the notifications it added to the group's outbox


def flush(group: dict | None, key: str, org_id: str, rule: list[str], found: list[Head], now_ms: int) -> Flush:
    """The group record with ``found`` notified: one notification per kind, in KIND_ORDER."""
    by_kind: dict[str, list[Head]] = {}
    for head in found:
        by_kind.setdefault(head.item["n"]["kind"], []).append(head)
    items = []
    for kind in sorted(by_kind, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER)):
        heads_of_kind = by_kind[kind]
        n = grouped([h.notification for h in heads_of_kind], key)
        items.append({"n": msgspec.to_builtins(n), "ch": list(heads_of_kind[0].item["ch"])})
    claimed = {h.item["n"]["id"] for h in found}
    before = group or {"grp": key, "org": org_id, "rule": list(rule), "out": []}
    return Flush({**before, "last_ms": now_ms, "m": sorted(claimed), "out": list(before.get("out", ())) + items},
                 claimed, items)


def strike(record: dict, claimed: set[str]) -> dict | None:
    """The alert record without the notifications a flush took; None if it held none."""
    out = [item for item in record.get("out", ()) if item["n"]["id"] not in claimed]
    if len(out) == len(record.get("out", ())):
        return None
    return {**record, "out": out}
