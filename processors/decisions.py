"""The durable view of a key's decision: what its counts alone allow (pure logic).

Gateways decide from these counts plus their outstanding reservations
(gateway/check.lua); this summary is what an operator or dashboard reads."""

from __future__ import annotations

from quotaflow.processors.window_counts import SubjectState
from quotaflow.schemas.limits import window_count, window_reset
from quotaflow.schemas.limits import SUBJECT_KEY, SUBJECT_ORG, Policy
from quotaflow.schemas.redis_keys import Decision, WindowUsage


def subject_windows(subject: str, state: SubjectState | None, limits: tuple[int | None, ...], policy: Policy,
                    now_ms: int) -> tuple[WindowUsage, ...]:
    """The limited windows of one subject (SUBJECT_KEY or SUBJECT_ORG) as its state counts them at now_ms."""
    out = []
    counted = state["b"] if state is not None else None
    for i, window in enumerate(policy.windows):
        limit = limits[i]
        if limit is None:
            continue
        buckets = counted[i] if counted is not None else []
        out.append(WindowUsage(subject, window.label, window.length_s, limit, window_count(buckets, window, now_ms),
                               window_reset(buckets, window, now_ms)))
    return tuple(out)


def _decision(windows: tuple[WindowUsage, ...], policy: Policy, tier: str, now_ms: int) -> Decision:
    allowed = all(w.used < w.limit for w in windows)
    return Decision.from_windows(windows, allowed=allowed, tier=policy.tier_of(tier), now_ms=now_ms)


def org_windows(org_state: SubjectState | None, policy: Policy, tier: str, now_ms: int) -> tuple[WindowUsage, ...]:
    """An org's limited windows: computed once per batch, shared by the decisions of its keys."""
    return subject_windows(SUBJECT_ORG, org_state, policy.limits(SUBJECT_ORG, tier), policy, now_ms)


def decide(key_state: SubjectState | None, org: tuple[WindowUsage, ...], policy: Policy, tier: str,
           overrides: dict[str, int], now_ms: int) -> Decision:
    """A key's decision: its own windows and its org's (from org_windows)."""
    windows = subject_windows(SUBJECT_KEY, key_state, policy.limits(SUBJECT_KEY, tier, overrides), policy, now_ms) + org
    return _decision(windows, policy, tier, now_ms)


def decide_org(org: tuple[WindowUsage, ...], policy: Policy, tier: str, now_ms: int) -> Decision:
    """An org's decision: its windows (from org_windows) alone."""
    return _decision(org, policy, tier, now_ms)
