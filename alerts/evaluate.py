"""What a rule measures about a subject, from its measures (alerts/measures.py), as pure
logic: the value alerts/state.py compares with the rule's condition, or None when there
is nothing to measure (the state then stays as it was).

Windows and limits are the policy's (schemas/limits.py): a usage threshold in percent
and quota exceeded divide by the subject's limit in the window (its org's tier; a key's
override where one lowers it), as the processor's decisions do. A window with fewer than
``min_requests`` requests measures an error rate and a p95 of 0: too little traffic is no
spike, and an alert about it resolves once the traffic is gone.
"""

from __future__ import annotations

from quotaflow.alerts.baseline import unusual
from quotaflow.alerts.measures import Measures
from quotaflow.alerts.state import Subject
from quotaflow.schemas.alert_rules import Rule
from quotaflow.schemas.api_keys import REVOKED, KeyRecord
from quotaflow.schemas.limits import SUBJECT_KEY, SUBJECT_ORG, Policy



def subjects(rule: Rule, org_id: str, keys: list[str]) -> list[Subject]:
    """What ``rule`` watches in ``org_id``, whose keys are ``keys`` (with measures; for
    key_expiring, in the key registry)."""
    if rule.type == "key_expiring":
        return [Subject(org_id, rule.api_key_id)] if rule.api_key_id else [Subject(org_id, k) for k in keys]
    if getattr(rule, "scope", "org") == "org":
        return [Subject(org_id)]
    if rule.api_key_id is not None:
        return [Subject(org_id, rule.api_key_id)]
    return [Subject(org_id, key) for key in keys]


def window_of(rule: Rule, policy: Policy):
    label = getattr(rule, "window", None)
    for window in policy.windows:
        if window.label == label:
            return window
    return None


def value(rule: Rule, subject: Subject, measures: Measures | None, policy: Policy, now_ms: int,
          limit: int | None = None, seasonal: list[float] | None = None) -> float | None:
    """The value ``rule`` measures about ``subject`` at ``now_ms``; ``limit``: the subject's
    limit in the rule's window (None: unlimited), for the rules in percent of it;
    ``seasonal``: an unusual-activity baseline from elsewhere (the rollups), else the
    stage's own."""
    measures = measures or Measures()
    if rule.type == "key_expiring":
        return None  # not from events: key_expiry() from the key registry
    if rule.type == "unusual_activity":
        return _unusual(rule, measures, now_ms, seasonal)
    window = window_of(rule, policy)
    if window is None:  # a window no longer configured: nothing to measure
        return None
    if rule.type == "usage_threshold":
        count = measures.counted(window, now_ms)
        if rule.count is not None:
            return float(count)
        return None if not limit else 100.0 * count / limit
    if rule.type == "quota_exceeded":
        return None if not limit else 100.0 * measures.counted(window, now_ms) / limit
    if rule.type == "rate_limit_violations":
        return float(measures.denied(window, now_ms))
    if rule.type == "error_rate":
        count = measures.counted(window, now_ms)
        return 0.0 if count < rule.min_requests else 100.0 * measures.errors(window, now_ms) / count
    if rule.type == "latency_p95":
        if measures.counted(window, now_ms) < rule.min_requests:
            return 0.0
        return measures.latency_quantile(window, now_ms, 0.95) or 0.0
    return None


def _unusual(rule: Rule, measures: Measures, now_ms: int, seasonal: list[float] | None) -> float | None:
    """The score of the last 60 minutes' volume against the same hour of past weeks (then
    the hours before): alerts/baseline.py. The longer of the two seasonal histories."""
    volume = float(measures.trailing_hour(now_ms))
    own = measures.seasonal(now_ms, rule.baseline_weeks)
    if seasonal is None or len(own) > len(seasonal):
        seasonal = own
    score = unusual(volume, seasonal, measures.recent(now_ms),
                    min_history=rule.min_history, direction=rule.direction, min_requests=rule.min_requests)
    return None if score is None else score.score


NEVER_S = float(366 * 86400)  # a key without an expiry (or revoked, or gone) is that far from expiring, or more


def key_expiry(record: KeyRecord | None, now_ms: int) -> float:
    """Seconds until the key expires (0 once expired); NEVER_S for a key that will not: no
    expiry, revoked (nothing left to renew), or no longer in the registry."""
    if record is None or record.state == REVOKED or record.expires_ms is None:
        return NEVER_S
    return max(0.0, min((record.expires_ms - now_ms) / 1000, NEVER_S))


def needs_limit(rule: Rule) -> bool:
    return rule.type == "quota_exceeded" or (rule.type == "usage_threshold" and rule.percent is not None)


def limit_of(rule: Rule, subject: Subject, policy: Policy, tier: str | None, overrides: dict[str, int] | None
             ) -> int | None:
    window = window_of(rule, policy)
    if window is None:
        return None
    kind = SUBJECT_ORG if subject.api_key_id is None else SUBJECT_KEY
    limits = policy.limits(kind, policy.tier_of(tier), overrides)
    return limits[policy.labels.index(window.label)]
