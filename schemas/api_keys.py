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
from typing import NamedTuple

from redis.crc import key_slot

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


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, digit = divmod(n, 62)
        out.append(BASE62[digit])
    if n:
        raise ValueError("does not fit")
    return "".join(reversed(out))


def _check(head: str) -> str:
    return _base62(zlib.crc32(head.encode()), CHECK_CHARS)


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
