"""Where a presented API key's record may be in Redis (schemas/api_keys.record_names), with
the computation cached for keys presented again.

A gateway sees the same keys over and over; each verification would otherwise parse the
key (shape, checksum) and compute one HMAC-SHA-256 per configured hash secret, several
microseconds per call in a check that is otherwise one Redis round trip. A key presented
again costs one keyed BLAKE2b digest and a dict lookup instead.

Why this is safe:
- Only the hash computation is cached, never a verdict: the record the names point to
  (state, expiry, scopes, limits) is read from Redis on every call, so a revocation or an
  expiry takes effect exactly as without the cache.
- No plaintext key is kept. The cache is keyed by a BLAKE2b digest of the key under a
  random key made per process (never stored, logged or sent), so neither the cache nor a
  dump of it can be turned back into keys or compared with digests made elsewhere; its
  values are the record names, i.e. the HMACs Redis holds anyway. 256-bit digests: that
  two keys share one is out of reach, even for a caller choosing keys.
- Only keys whose shape and checksum passed get in (a malformed key is refused before
  anything is stored), and the cache is bounded: the oldest entry leaves first, so callers
  presenting many different keys cost at most MAX_ENTRIES entries, and a miss.
- The secrets are fixed for the cache's life (one per limiter, made from the settings).
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Iterable

from quotaflow.schemas.api_keys import MAX_PRESENTED_CHARS, record_names

MAX_ENTRIES = 4096


class RecordNames:
    """record_names(presented, secrets) for fixed secrets, cached by a keyed digest of the key."""

    def __init__(self, secrets: Iterable[bytes], max_entries: int = MAX_ENTRIES):
        self.secrets = tuple(secrets)
        self.max_entries = max_entries
        self._digest_key = os.urandom(32)  # this process's only: see the module's docstring
        self._names: dict[bytes, tuple[str, ...]] = {}
        self._lock = threading.Lock()  # for the sync limiter's threads: only misses take it

    def __call__(self, presented: str) -> tuple[str, ...]:
        """The names, one per secret; InvalidKey (offline, nothing cached) for what is not a key."""
        # A key is short ASCII; anything else is refused by the parse below before any digest.
        if isinstance(presented, str) and len(presented) <= MAX_PRESENTED_CHARS and presented.isascii():
            digest = hashlib.blake2b(presented.encode(), key=self._digest_key).digest()
            names = self._names.get(digest)
            if names is not None:
                return names
        else:
            digest = None
        names = tuple(record_names(presented, self.secrets))  # InvalidKey for what is not a key
        if digest is not None:
            with self._lock:
                if len(self._names) >= self.max_entries:
                    del self._names[next(iter(self._names))]  # the oldest (dicts keep insertion order)
                self._names[digest] = names
        return names

    def __len__(self) -> int:
        return len(self._names)
