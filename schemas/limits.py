"""The limit policy: which windows are counted, and each tier's limit in each.

Gateways and processors must agree on it exactly (a gateway admits against the
counts a processor writes), so both build it from the same settings with
``policy_from_settings``. Windows may have any length; each is fixed (aligned
to the epoch: a 60 s window resets on the minute) or sliding (the last
``length`` seconds, counted in ``SLIDING_BUCKETS`` buckets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The defaults are configuration (quotaflow/core/settings.py), named here too for the policy's users.
from quotaflow.core.settings import DEFAULT_TIER_LIMITS, DEFAULT_WINDOWS_S, LimitSettings, Settings  # noqa: F401
from quotaflow.schemas.tiers import Tier

SLIDING_BUCKETS = 60  # a sliding window over-counts by at most one bucket: 1/60 of its length

# What a limit applies to, a subject: one API key, or an org (all its keys together).
SUBJECT_KEY = "key"
SUBJECT_ORG = "org"


@dataclass(frozen=True, slots=True)
class Window:
    length_s: int
    sliding: bool = False
    # Derived once: read for every subject of every batch.
    length_ms: int = field(init=False, repr=False, compare=False)
    bucket_ms: int = field(init=False, repr=False, compare=False)
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        length_ms = self.length_s * 1000
        object.__setattr__(self, "length_ms", length_ms)
        object.__setattr__(self, "bucket_ms", length_ms // SLIDING_BUCKETS if self.sliding else length_ms)
        object.__setattr__(self, "label", f"{self.length_s}s")


@dataclass(frozen=True)
class Policy:
    windows: tuple[Window, ...]
    tiers: dict[str, tuple[int | None, ...]]  # tier -> limit per window, None: unlimited
    default_tier: str = Tier.FREE.value
    late_grace_ms: int = 60_000
    reservation_ttl_ms: int = 120_000
    labels: tuple[str, ...] = field(init=False)
    # per window: (bucket length, how long a bucket is kept after it ends), both ms
    buckets: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(w.label for w in self.windows))
        # a sliding window needs a bucket for its whole length; any window, the grace after
        object.__setattr__(self, "buckets", tuple(
            (w.bucket_ms, (w.length_ms if w.sliding else 0) + self.late_grace_ms) for w in self.windows))
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"window lengths must differ, got {self.labels}")
        for tier, limits in self.tiers.items():
            if len(limits) != len(self.windows):
                raise ValueError(f"tier {tier} has {len(limits)} limits for {len(self.windows)} windows")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default tier {self.default_tier} has no limits")

    def tier_of(self, name: str | bytes | None) -> str:
        """An org's tier; unknown or unset means the default tier."""
        if isinstance(name, bytes):
            name = name.decode()
        return name if name in self.tiers else self.default_tier

    def limits(self, subject: str, tier: str, overrides: dict[str, int] | None = None) -> tuple[int | None, ...]:
        """Limits of one subject: an org gets its tier's; a key its tier's unless overridden per window."""
        base = self.tiers[self.tier_of(tier)]
        if subject == SUBJECT_ORG or not overrides:
            return base
        return tuple(overrides.get(label, limit) for label, limit in zip(self.labels, base, strict=True))


def parse_overrides(raw: dict[bytes | str, bytes | str]) -> dict[str, int]:
    """A key's overrides as stored in Redis: window label -> limit."""
    out = {}
    for k, v in raw.items():
        out[k.decode() if isinstance(k, bytes) else k] = int(v)
    return out


def policy_from_settings(settings: Settings | LimitSettings) -> Policy:
    """The policy configured by QUOTAFLOW_WINDOWS / QUOTAFLOW_SLIDING_WINDOWS / QUOTAFLOW_TIER_LIMITS,
    from the typed values the settings checked when they loaded (Settings.limits)."""
    limits = settings.limits if isinstance(settings, Settings) else settings
    return Policy(windows=tuple(Window(length, limits.sliding) for length in limits.windows_s),
                  tiers=dict(limits.tier_limits), default_tier=limits.default_tier,
                  late_grace_ms=int(limits.late_grace_s * 1000),
                  reservation_ttl_ms=int(limits.reservation_ttl_s * 1000))


# How a window's count and reset are read from a subject's buckets (redis_keys.decode_buckets):
# by the processors for their decisions, and by whoever reads the counts they wrote.
def window_count(buckets: list[list[int]], window: Window, now_ms: int) -> int:
    """Count of the window as it stands at now_ms. A sliding window includes every
    bucket that overlaps it, so it may over-count by part of one bucket, never under-count."""
    if window.sliding:
        return sum(c for s, c in buckets if s + window.bucket_ms > now_ms - window.length_ms)
    current = now_ms - now_ms % window.length_ms
    if buckets and buckets[-1][0] == current:  # the usual case: buckets ascend, the current one last
        return buckets[-1][1]
    return sum(c for s, c in buckets if s == current)


def window_reset(buckets: list[list[int]], window: Window, now_ms: int) -> int:
    """When the window next frees a unit: a fixed window at its end; a sliding one
    when its oldest counted bucket leaves it."""
    if not window.sliding:
        return now_ms - now_ms % window.length_ms + window.length_ms
    live = [s for s, c in buckets if c and s + window.bucket_ms > now_ms - window.length_ms]
    return (min(live) + window.bucket_ms + window.length_ms) if live else now_ms + window.bucket_ms
