"""Redis key layout, the encoding of window counts, and the Decision record.

Every key of an org carries the org as a hash tag ({org_id}) so that one Lua
call touches a single slot:

    qf:v1:{org}:org                  HASH  tier                     operators (quotaflow org set-tier)
    qf:v1:{org}:overrides:{key}      HASH  <window label> -> limit  operators (quotaflow key set-limit)
    qf:v1:{org}:usage:key:{key}      HASH  w:<label> counts + decision: the key's Decision summary
                                           (Decision.redis_fields, one JSON field) + applied
    qf:v1:{org}:usage:org            HASH  w:<label> counts + decision: the org's + applied
                                           (processors write them, gateways check the counts;
                                           expire after the longest window; applied: the place,
                                           partition:position, of the last event the counts
                                           include, so a processor behind it never writes older
                                           counts over them: processors/write.lua)
    qf:v1:{org}:resv:key:{key}       ZSET  event_id -> reservation time (ms)
    qf:v1:{org}:resv:org             ZSET  event_id -> reservation time (ms)
                                           (gateways add one per admitted request; processors remove
                                           it when they count the event; stale ones expire)
    qf:v1:{org}:seen:{minute}        HASH  event_id -> partition:position of the record that first
                                           carried the event, per minute of event time (processors:
                                           duplicates published twice are counted once; expires
                                           the dedup window after its last write; schemas/dedup.py)
    qf:v1:{org}:stored:{minute}      HASH  the same for the ClickHouse sink: an event published twice
                                           is stored once (a key space of its own, so each stage
                                           decides whatever the other's timing)
    qf:v1:{hint}:apikey:{hash}       HASH  an API key's record as gateways verify it (KeyRecord.to_redis):
                                           key_id, org_id, state, expires_ms, scopes, limits, version.
                                           {hint} is the key's slot hint, whose hash slot is its org's
                                           (schemas/api_keys.py), so one script verifies a key and
                                           checks its org's limits; written by the key registry's
                                           materializer from the keys topic
    qf:v1:{org}:apikeys              HASH  key_id -> the key's whole KeyRecord (JSON): what `quotaflow keys
                                           list|show` and the registry read (its hash included, never the key);
                                           written with the record above, in the same script and slot
    qf:v1:apikeys:state              HASH  the materializer's progress: status ("ok" once every record of the
                                           keys topic below offset is applied; "rebuilding:<nonce>" while the
                                           registry is rebuilt from the topic; missing after a FLUSHALL, which
                                           makes it rebuild), offset (next offset of the keys topic to apply)
                                           and beat_ms (a rebuild's last sign of life, epoch ms: one silent for
                                           long has died, and another takes over)
    qf:v1:apikeys:lock               STRING held by the one registry change under way (redis-py's Lock)
    qf:v1:enforcement                STRING "off": every gateway admits everything (emergency switch);
                                           the one key of no org, so never touched inside a Lua call
                                           (gateways GET it in the same pipeline as their check)

Org and key ids keep the rule of schemas/ids.py (no braces, no slash), so the hash tag is
the org and nothing else, and no (org, key) pair names another pair's key.

A window's counts are buckets "start:count,start:count" (start in epoch ms).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import orjson

PREFIX = "qf:v1:"
ENFORCEMENT_KEY = PREFIX + "enforcement"
ENFORCEMENT_OFF = "off"

ORG_TIER_FIELD = "tier"
WINDOW_FIELD_PREFIX = "w:"
APPLIED_FIELD = "applied"  # of a usage hash: "partition:position" (zero-padded) of the counts' last event
DECISION_FIELD = "decision"  # of a usage hash: Decision.redis_fields
USAGE_KEY_PATTERN = PREFIX + "{*}:usage:key:*"
_USAGE = re.compile(re.escape(PREFIX) + r"\{([^}]+)\}:usage:(?:org|key:(.+))")


def _org(org_id: str) -> str:
    return f"{PREFIX}{{{org_id}}}:"


def api_key_record(slot_hint: str, key_hash: str) -> str:
    """Where gateways find an API key's record: in its org's hash slot (see schemas/api_keys.py)."""
    return f"{PREFIX}{{{slot_hint}}}:apikey:{key_hash}"


def api_key_index(org_id: str) -> str:
    """An org's keys by key id, each as its whole KeyRecord (JSON): what lists and shows read."""
    return _org(org_id) + "apikeys"


# The key registry's materializer (processors/key_registry.py): how far it has applied the
# keys topic, and whether Redis holds all of it (see the layout above).
API_KEYS_STATE = PREFIX + "apikeys:state"
API_KEYS_STATUS_FIELD = "status"
API_KEYS_OFFSET_FIELD = "offset"
API_KEYS_BEAT_FIELD = "beat_ms"
API_KEYS_STATUS_OK = "ok"
API_KEYS_REBUILDING = "rebuilding:"
API_KEYS_LOCK = PREFIX + "apikeys:lock"


def org_key(org_id: str) -> str:
    return _org(org_id) + "org"


def overrides_key(org_id: str, api_key_id: str) -> str:
    return _org(org_id) + "overrides:" + api_key_id


def usage_key(org_id: str, api_key_id: str | None = None) -> str:
    """The key's usage hash, or the org's when api_key_id is None."""
    return _org(org_id) + ("usage:org" if api_key_id is None else "usage:key:" + api_key_id)


def usage_subject(name: str) -> tuple[str, str | None] | None:
    """(org_id, api_key_id or None for the org's) of a usage_key name; None for any other name."""
    m = _USAGE.fullmatch(name)
    return (m.group(1), m.group(2)) if m else None


def reservations_key(org_id: str, api_key_id: str | None = None) -> str:
    return _org(org_id) + ("resv:org" if api_key_id is None else "resv:key:" + api_key_id)


SEEN_BUCKET_MS = 60_000  # event time per seen hash: a copy of an event has the same time


def seen_key(org_id: str, ts_ms: int) -> str:
    return _org(org_id) + "seen:" + str(ts_ms // SEEN_BUCKET_MS)


def stored_key(org_id: str, ts_ms: int) -> str:
    return _org(org_id) + "stored:" + str(ts_ms // SEEN_BUCKET_MS)


def applied_place(partition: int, position: int) -> str:
    """A usage hash's APPLIED_FIELD: fixed width, so places of one partition compare as strings
    (positions can exceed what a Lua number holds exactly)."""
    return f"{partition}:{position:020d}"


def window_field(label: str) -> str:
    return WINDOW_FIELD_PREFIX + label


def encode_buckets(buckets: list[list[int]] | list[tuple[int, int]]) -> str:
    if len(buckets) == 1:  # the usual case, written for every subject of every batch
        start, count = buckets[0]
        return f"{start}:{count}"
    return ",".join([f"{start}:{count}" for start, count in buckets])


def decode_buckets(text: str | bytes | None) -> list[tuple[int, int]]:
    if not text:
        return []
    if isinstance(text, bytes):
        text = text.decode()
    return [(int(s), int(c)) for s, c in (item.split(":") for item in text.split(","))]


class WindowUsage(NamedTuple):
    """One limited window of one subject (limits.SUBJECT_KEY "key" or SUBJECT_ORG "org") as a
    decision saw it."""

    subject: str
    label: str
    length_s: int
    limit: int
    used: int
    reset_ms: int

    @property
    def name(self) -> str:
        return f"{self.subject}:{self.label}"

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)


class Decision(NamedTuple):
    """Whether a request is allowed, against which window, and until when.

    Gateways get one from ``gateway.RateLimiter.check`` (with the reservation's
    ``event_id``/``ts_ms``, to publish the request's event with); processors
    store the durable view of each key in its usage hash (``redis_fields``)."""

    allowed: bool
    tier: str
    limit: int  # of the binding window: the one that denies, or the one closest to its limit
    remaining: int
    reset_ms: int
    window: str  # name of the binding window, e.g. "key:60s"; "" when nothing is limited
    denied_by: str  # "" when allowed
    now_ms: int
    windows: tuple[WindowUsage, ...] = ()
    event_id: str = ""
    enforced: bool = True  # False: admitted without enforcement (switch off, or Redis down and failing open)

    @classmethod
    def from_windows(cls, windows: tuple[WindowUsage, ...], *, allowed: bool, tier: str, now_ms: int,
                     event_id: str = "", enforced: bool = True) -> "Decision":
        # The binding window: of those denying, the one that frees last; else the one with least
        # remaining, then soonest reset (the first such). Loops, not min/max with keys: this
        # runs for every key of every batch of the processors.
        binding, denying = None, False
        if not allowed:
            for w in windows:
                if w.used >= w.limit and (binding is None or w.reset_ms > binding.reset_ms):
                    binding = w
            denying = binding is not None
        if binding is None:
            best = None
            for w in windows:
                rank = (w.remaining, w.reset_ms)
                if best is None or rank < best:
                    binding, best = w, rank
        return cls(
            allowed=allowed, tier=tier, now_ms=now_ms, windows=windows, event_id=event_id, enforced=enforced,
            limit=binding.limit if binding else 0,
            remaining=0 if not allowed else binding.remaining if binding else 0,
            reset_ms=binding.reset_ms if binding else now_ms,
            window=binding.name if binding else "",
            denied_by=binding.name if denying else "",
        )

    @property
    def retry_after_s(self) -> int:
        """Whole seconds until the denying window frees a unit (0 when allowed)."""
        if self.allowed:
            return 0
        return max(1, -(-(self.reset_ms - self.now_ms) // 1000))

    def redis_fields(self) -> list[str]:
        """The usage hash's field and value for it: one field, a JSON array (from_redis reads it).
        One field, not one per attribute: the processors write it for every subject of every
        batch, and each field costs the write script as much as a window's counts."""
        return [DECISION_FIELD, orjson.dumps([self.allowed, self.tier, self.limit, self.remaining, self.reset_ms,
                                              self.window, self.denied_by, self.now_ms]).decode()]

    @classmethod
    def from_redis(cls, raw: dict[bytes | str, bytes | str]) -> "Decision | None":
        """The decision a usage hash (HGETALL) holds; None when it holds none yet."""
        value = raw.get(DECISION_FIELD.encode(), raw.get(DECISION_FIELD))
        if value is None:
            return None
        allowed, tier, limit, remaining, reset_ms, window, denied_by, now_ms = orjson.loads(value)
        return cls(allowed=allowed, tier=tier, limit=limit, remaining=remaining, reset_ms=reset_ms, window=window,
                   denied_by=denied_by, now_ms=now_ms)

    def denies_at(self, now_ms: int) -> bool:
        """A stored deny only holds until its window frees a unit."""
        return not self.allowed and now_ms < self.reset_ms
