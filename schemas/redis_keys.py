"""Redis key layout and the decision record gateways read.

    qf:v1:org:{org_id}           HASH  tier                 set by operators (quotaflow org set-tier)
    qf:v1:decision:{api_key_id}  HASH  Decision fields      set by processors, read by gateways;
                                                            expires after the window resets

A gateway answers "may this key make a request now?" with one HGETALL.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "qf:v1:"
ORG_PREFIX = PREFIX + "org:"
DECISION_PREFIX = PREFIX + "decision:"

ORG_TIER_FIELD = "tier"


def org_key(org_id: str) -> str:
    return ORG_PREFIX + org_id


def decision_key(api_key_id: str) -> str:
    return DECISION_PREFIX + api_key_id


DECISION_PATTERN = DECISION_PREFIX + "*"


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether the next request of a key is allowed, and until when that holds."""

    api_key_id: str
    org_id: str
    tier: str
    allowed: bool
    limit: int
    remaining: int
    count: int  # requests seen in the current window
    window_s: int
    reset_ms: int  # end of the current window, epoch ms
    updated_ms: int

    def to_redis(self) -> dict[str, str]:
        return {
            "api_key_id": self.api_key_id,
            "org_id": self.org_id,
            "tier": self.tier,
            "allowed": "1" if self.allowed else "0",
            "limit": str(self.limit),
            "remaining": str(self.remaining),
            "count": str(self.count),
            "window_s": str(self.window_s),
            "reset_ms": str(self.reset_ms),
            "updated_ms": str(self.updated_ms),
        }

    @classmethod
    def from_redis(cls, raw: dict[bytes | str, bytes | str]) -> "Decision":
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        return cls(
            api_key_id=d["api_key_id"],
            org_id=d["org_id"],
            tier=d["tier"],
            allowed=d["allowed"] == "1",
            limit=int(d["limit"]),
            remaining=int(d["remaining"]),
            count=int(d["count"]),
            window_s=int(d["window_s"]),
            reset_ms=int(d["reset_ms"]),
            updated_ms=int(d["updated_ms"]),
        )

    def denies_at(self, now_ms: int) -> bool:
        """A deny only holds until its window resets."""
        return not self.allowed and now_ms < self.reset_ms
