"""Alert rules kept on their compacted topic (schemas/topics.py ALERT_RULES_TOPIC): one
record per change, keyed by "<org>/<rule id>", a tombstone when a rule is removed. The
topic is the source of truth: whoever needs the rules (the CLI, the evaluator) reads it
from the start to its end, the last record of each key winning.

Before a rule is written it is checked against the configuration too: its channels must
be configured (QUOTAFLOW_ALERT_CHANNELS) and usable by its org (an org's own channels or
the operators'; a global rule only the operators', so one org's alerts never reach
another's channel), and its window must be one of QUOTAFLOW_WINDOWS.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from quotaflow.alerts.compacted import CompactedTopic
from quotaflow.core.channels import OPERATORS
from quotaflow.core.errors import OperatorError
from quotaflow.core.settings import Settings
from quotaflow.schemas.alert_rules import GLOBAL, InvalidRule, Rule, RuleRecord, rule_key
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.topics import ALERT_RULES_TOPIC

log = logging.getLogger(__name__)


class RuleConflict(OperatorError):
    """A rule to remove that is not there, or one to add that is there already (without replace)."""


def problems(rule: Rule, settings: Settings) -> list[str]:
    """What stops ``rule`` from working with this configuration, each naming the field."""
    out = []
    for name in rule.channels:
        channel = settings.alert_channels.get(name)
        if channel is None:
            configured = ", ".join(sorted(settings.alert_channels)) or "none"
            out.append(f"channels: {name} is not a configured channel (QUOTAFLOW_ALERT_CHANNELS has {configured})")
        elif rule.is_global and channel.org != OPERATORS:
            out.append(f"channels: {name} belongs to org {channel.org}; a global rule may use only the operators' "
                       "channels (org \"*\")")
        elif not rule.is_global and channel.org not in (OPERATORS, rule.org_id):
            out.append(f"channels: {name} belongs to another org")
    window = getattr(rule, "window", None)
    if window is not None:
        labels = policy_from_settings(settings).labels
        if window not in labels:
            out.append(f"window: {window} is not a configured window (QUOTAFLOW_WINDOWS: {', '.join(labels)})")
    return out


@dataclass
class Rules:
    """The rules as the topic has them, and what could not be read (a record nobody
    should have written: skipped, never fatal)."""

    records: dict[tuple[str, str], RuleRecord] = field(default_factory=dict)  # (org, rule id) -> record
    skipped: list[str] = field(default_factory=list)  # "offset N: why"

    def of(self, org_id: str | None = None) -> list[RuleRecord]:
        """Every rule (None), an org's own, or the global ones (GLOBAL), in key order."""
        return [r for (org, _), r in sorted(self.records.items()) if org_id is None or org == org_id]

    def applying_to(self, org_id: str) -> list[RuleRecord]:
        """The rules evaluated for an org: its own and the global ones."""
        return [r for (org, _), r in sorted(self.records.items()) if org in (org_id, GLOBAL)]


class RuleStore(CompactedTopic):
    """Reads and writes the rules topic (one partition: see deploy/topics.py)."""

    def __init__(self, bootstrap: str, topic: str = ALERT_RULES_TOPIC):
        super().__init__(bootstrap, topic)

    async def read(self) -> Rules:
        rules = Rules()
        await self._read_all(lambda record: self._apply(rules, record))
        return rules

    @staticmethod
    def _apply(rules: Rules, record) -> None:
        try:
            org_id, _, rule_id = (record.key or b"").decode().partition("/")
        except UnicodeDecodeError:
            org_id = rule_id = ""
        if not org_id or not rule_id:
            rules.skipped.append(f"offset {record.offset}: a key that is not <org>/<rule id>")
            return
        if record.value is None:  # a tombstone: the rule was removed
            rules.records.pop((org_id, rule_id), None)
            return
        try:
            parsed = RuleRecord.decode(record.value)
        except InvalidRule as exc:
            rules.skipped.append(f"offset {record.offset}: {exc}"[:500])
            return
        if (parsed.rule.org_id, parsed.rule.rule_id) != (org_id, rule_id):
            rules.skipped.append(f"offset {record.offset}: the key does not name the rule it holds")
            return
        rules.records[(org_id, rule_id)] = parsed

    async def put(self, rule: Rule, *, replace: bool = False, actor: str = "", now_ms: int | None = None
                  ) -> RuleRecord:
        """Store ``rule``: a new one, or (``replace``) the next version of one that exists.
        OperatorError when that is not the case (one writer at a time is assumed: the CLI)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        existing = (await self.read()).records.get((rule.org_id, rule.rule_id))
        where = "global rule" if rule.is_global else f"rule of org {rule.org_id}"
        if existing is not None and not replace:
            raise RuleConflict(f"{where} {rule.rule_id} exists (version {existing.version}); "
                                "--replace to change it")
        record = RuleRecord(rule=rule, version=existing.version + 1 if existing else 1,
                            created_ms=existing.created_ms if existing else now_ms, updated_ms=now_ms, actor=actor)
        await self._send(rule_key(rule.org_id, rule.rule_id), record.encode())
        return record

    async def remove(self, org_id: str, rule_id: str) -> RuleRecord:
        existing = (await self.read()).records.get((org_id, rule_id))
        if existing is None:
            where = "global rule" if org_id == GLOBAL else f"rule of org {org_id}"
            raise RuleConflict(f"no {where} {rule_id}")
        await self._send(rule_key(org_id, rule_id), None)
        return existing
