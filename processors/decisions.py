"""A key's limit decision, computed from its window state: pure logic."""

from __future__ import annotations

from processors.limits import MINUTE_MS, TierLimits
from processors.window_counts import KeyState
from schemas.redis_keys import Decision


def decide(api_key_id: str, org_id: str, tier: str, limits: TierLimits, state: KeyState, now_ms: int) -> Decision:
    limit = limits.per_minute
    count = state["c"]
    return Decision(
        api_key_id=api_key_id,
        org_id=org_id,
        tier=tier,
        allowed=count < limit,
        limit=limit,
        remaining=max(limit - count, 0),
        count=count,
        window_s=MINUTE_MS // 1000,
        reset_ms=state["w"] + MINUTE_MS,
        updated_ms=now_ms,
    )
