"""Limits of each subscription tier: the limiter's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.tiers import DEFAULT_TIER, Tier

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class TierLimits:
    per_minute: int
    per_hour: int
    per_day: int


DEFAULT_LIMITS: dict[Tier, TierLimits] = {
    Tier.FREE: TierLimits(10, 100, 1_000),
    Tier.STARTER: TierLimits(30, 500, 5_000),
    Tier.PROFESSIONAL: TierLimits(100, 2_000, 20_000),
    Tier.SCALE: TierLimits(200, 5_000, 50_000),
    Tier.ENTERPRISE: TierLimits(500, 10_000, 100_000),
}


def parse_tier(name: str | bytes | None) -> Tier:
    """The tier an org is on; unknown or unset means the default (most restrictive) tier."""
    if isinstance(name, bytes):
        name = name.decode()
    try:
        return Tier(name)
    except ValueError:
        return DEFAULT_TIER
