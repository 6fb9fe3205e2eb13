"""API keys as callers present them: the format, its checksum, and the hash stored in
their place. The key itself is shown once, at creation, and kept nowhere.

    qf_<env>_<body>_<check>        e.g. qf_live_3F5wQ8rZk2...(30 chars)_h7Kd2A
      env    live | test
      body   30 base62 characters: a 4-character slot hint, then 26 random ones
             (154 bits from the operating system's CSPRNG)
      check  CRC32 of "qf_<env>_<body>", 6 base62 characters

- A fixed prefix and a fixed shape, so secret scanners can match keys (SCAN_PATTERN) and
  a double click selects a whole key (letters, digits and underscores only).
- The checksum lets any gateway refuse a mistyped or invented key without asking Redis
  (GitHub's tokens carry one for the same reason). It is not a secret and proves nothing:
  only the stored hash does.
- Stored: HMAC-SHA-256 of the key under a server secret (QUOTAFLOW_KEY_HASH_SECRETS), never
  the key, an unkeyed hash or anything reversible. Several secrets may be configured: new
  keys are hashed with the first, lookups try each, so the secret can be rotated with an
  overlap.
- The slot hint puts a key's record in the Redis Cluster hash slot of its org, so a
  gateway verifies a key and checks its org's limits in one single-slot script call
  without knowing the org beforehand: its 4 characters are chosen so that their slot is
  the org's ({org_id}, schemas/redis_keys.py).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import string
import zlib
from itertools import product
from typing import Iterable, NamedTuple

import msgspec
from redis.crc import key_slot

from quotaflow.schemas.ids import is_valid_id
from quotaflow.schemas.redis_keys import api_key_record

PREFIX = "qf"
ENVIRONMENTS = ("live", "test")
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
SLOT_HINT_CHARS = 4
RANDOM_CHARS = 26  # 26 * log2(62) = 154.8 bits
BODY_CHARS = SLOT_HINT_CHARS + RANDOM_CHARS
CHECK_CHARS = 6  # 62**6 > 2**32: a CRC32 always fits
DISPLAY_CHARS = 8  # of the body, shown after "qf_<env>_" to tell keys apart: the hint and 4 random

# What secret scanners (and log scrubbers) match.
SCAN_PATTERN = rf"\b{PREFIX}_(?:{'|'.join(ENVIRONMENTS)})_[0-9A-Za-z]{{{BODY_CHARS}}}_[0-9A-Za-z]{{{CHECK_CHARS}}}\b"
_KEY = re.compile(rf"{PREFIX}_({'|'.join(ENVIRONMENTS)})_([0-9A-Za-z]{{{BODY_CHARS}}})_([0-9A-Za-z]{{{CHECK_CHARS}}})")
MAX_PRESENTED_CHARS = 128  # anything longer is not a key; refused before any other work


class InvalidKey(ValueError):
    """A presented key that cannot be one of ours: the message says which rule (never the key)."""


class ParsedKey(NamedTuple):
    env: str
    slot_hint: str

    @property
    def slot_tag(self) -> str:
        """The Redis hash tag of the key's record: the slot of its org's keys."""
        return self.slot_hint


# Two base62 digits per entry: a checksum in three lookups, not six divisions (every
# presented key is checked; this was most of its offline cost)
_PAIRS = tuple(a + b for a in BASE62 for b in BASE62)
_PAIR = len(_PAIRS)  # 62 ** 2; the CRC32 needs three pairs, since 62 ** 6 > 2 ** 32


def _base62_6(n: int) -> str:
    """A number below 2**32 as 6 base62 digits, most significant first."""
    rest, low = divmod(n, _PAIR)
    high, mid = divmod(rest, _PAIR)
    return _PAIRS[high] + _PAIRS[mid] + _PAIRS[low]


def _check(head: str) -> str:
    return _base62_6(zlib.crc32(head.encode()))


@functools.lru_cache(maxsize=4096)
def slot_hint(org_id: str) -> str:
    """The first 4-character base62 string (in a fixed order) whose Redis Cluster slot is
    the org's: the same for every key of an org. About 16,384 tries, a few ms."""
    target = key_slot(org_id.encode())
    for chars in product(BASE62, repeat=SLOT_HINT_CHARS):
        hint = "".join(chars)
        if key_slot(hint.encode()) == target:
            return hint
    raise AssertionError("every slot is reached by some 4-character string")  # 62**4 > 16384


def generate(org_id: str, env: str = "live") -> str:
    """A new key for an org: shown once to whoever created it, then only its hash is kept."""
    if env not in ENVIRONMENTS:
        raise ValueError(f"env must be one of {', '.join(ENVIRONMENTS)}")
    body = slot_hint(org_id) + "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARS))
    head = f"{PREFIX}_{env}_{body}"
    return f"{head}_{_check(head)}"


def parse(presented: str) -> ParsedKey:
    """Check a presented key's shape and checksum, offline. InvalidKey says which failed."""
    if not isinstance(presented, str) or len(presented) > MAX_PRESENTED_CHARS:
        raise InvalidKey("not an API key: too long")
    m = _KEY.fullmatch(presented)
    if m is None:
        raise InvalidKey(f"not an API key: expected {PREFIX}_<env>_<30 letters or digits>_<6 letters or digits>")
    env, body, check = m.groups()
    if not hmac.compare_digest(check, _check(f"{PREFIX}_{env}_{body}")):
        raise InvalidKey("not an API key: its checksum does not match (mistyped or invented)")
    return ParsedKey(env, body[:SLOT_HINT_CHARS])


def display_prefix(key: str) -> str:
    """What lists and logs may show of a key: enough to tell keys apart, nothing to use."""
    env_end = key.index("_", len(PREFIX) + 1) + 1
    return key[:env_end + DISPLAY_CHARS]


def key_hash(key: str, secret: bytes) -> str:
    """The stored form of a key: HMAC-SHA-256 under the server secret, hex."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def record_names(presented: str, secrets: Iterable[bytes]) -> list[str]:
    """Where a presented key's record may be in Redis, one name per hash secret, all in the
    slot of the key's hint (so of its org). InvalidKey, offline, for what is not a key: its
    shape and checksum come first, so a fake costs no HMAC and no Redis call."""
    hint = parse(presented).slot_hint
    return [api_key_record(hint, key_hash(presented, secret)) for secret in secrets]


# --- what the registry keeps of a key (the keys topic, Redis, the audit table) ---------

ACTIVE, REVOKED = "active", "revoked"  # stored states; "expired" is read off expires_ms
EXPIRED = "expired"
CREATE, UPDATE, REVOKE, ROTATE = "create", "update", "revoke", "rotate"  # changes, one record each
SCOPE_PATTERN = r"^[a-z][a-z0-9_.:-]{0,63}$"  # e.g. orders:read
KEY_ID_PREFIX = "key_"
NAME_MAX = 128
SCOPES_MAX = 32


def new_key_id() -> str:
    """A key's public id (what events, counts and analytics use): never the secret."""
    return KEY_ID_PREFIX + "".join(secrets.choice(BASE62) for _ in range(16))


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One API key as the registry keeps it: a record of the keys topic (keyed by key_id),
    materialized into Redis for gateways, and an audit row per change. Never the key
    itself: its HMAC (key_hash, under the secret named secret_id) and a display prefix."""

    key_id: str
    org_id: str
    name: str
    env: str
    display_prefix: str
    slot_hint: str
    key_hash: str
    secret_id: str
    scopes: tuple[str, ...] = ()
    limits: dict[str, int] = {}  # window label -> limit, at most the org's tier (as overrides)
    expires_ms: int | None = None  # also the end of a rotated key's overlap
    state: str = ACTIVE
    created_ms: int = 0
    updated_ms: int = 0
    version: int = 1  # +1 per change: the materializer keeps the highest
    change: str = CREATE
    actor: str = ""  # who made the change (CLI user, API token's name): never a secret
    rotated_from: str | None = None  # key_id this one replaced
    rotated_to: str | None = None

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> "KeyRecord":
        return msgspec.json.decode(data, type=cls)

    def state_at(self, now_ms: int) -> str:
        if self.state == REVOKED:
            return REVOKED
        return EXPIRED if self.expires_ms is not None and now_ms >= self.expires_ms else ACTIVE

    def to_redis(self) -> dict[str, str]:
        """The record's fields as the gateway's check script reads them."""
        return {
            "key_id": self.key_id,
            "org_id": self.org_id,
            "state": self.state,
            "expires_ms": "" if self.expires_ms is None else str(self.expires_ms),
            "scopes": " ".join(self.scopes),
            "limits": ",".join(f"{label}={limit}" for label, limit in sorted(self.limits.items())),
            "version": str(self.version),
        }


# --- verifying a presented key against its record ----------------------------------
# The gateway's check (gateway/check.lua) does this inside its one Redis call, beside the
# rate limit; services that only need to know whose a key is (the HTTP ingest) use
# record_outcome on the record's Redis fields. Both answer with these outcomes, which are
# what a refused caller reads as its error code.

MALFORMED_KEY = "malformed_key"  # not a key's shape or checksum: refused offline
UNKNOWN_KEY = "unknown_key"
REVOKED_KEY = "revoked_key"
EXPIRED_KEY = "expired_key"
INSUFFICIENT_SCOPE = "insufficient_scope"
KEY_REASONS = {  # for the caller: never the key
    UNKNOWN_KEY: "unknown API key",
    REVOKED_KEY: "this API key has been revoked",
    EXPIRED_KEY: "this API key has expired",
}


class KeyIdentity(NamedTuple):
    outcome: str  # ACTIVE, or why the key is refused (one of the outcomes above)
    key_id: str = ""
    org_id: str = ""


def record_outcome(fields: dict[str, str] | None, now_ms: int, scope: str = "") -> KeyIdentity:
    """Whose a key is, from its record's Redis fields (KeyRecord.to_redis; None or empty:
    no record), as the gateway's check judges it: refused unless active, not expired at
    ``now_ms`` and holding ``scope`` (when one is required). A record whose ids break the
    id rule is refused as unknown."""
    if not fields:
        return KeyIdentity(UNKNOWN_KEY)
    key_id, org_id = fields.get("key_id", ""), fields.get("org_id", "")
    if not (is_valid_id(key_id) and is_valid_id(org_id)):
        return KeyIdentity(UNKNOWN_KEY)
    expires = fields.get("expires_ms") or ""
    if fields.get("state") != ACTIVE:
        return KeyIdentity(EXPIRED_KEY if fields.get("state") == EXPIRED else REVOKED_KEY, key_id, org_id)
    if expires and (not expires.isdigit() or now_ms >= int(expires)):
        return KeyIdentity(EXPIRED_KEY, key_id, org_id)
    if scope and scope not in fields.get("scopes", "").split():
        return KeyIdentity(INSUFFICIENT_SCOPE, key_id, org_id)
    return KeyIdentity(ACTIVE, key_id, org_id)
