"""Records of the keys topic as the stages read them: decoded and checked, since anyone
who can write to the topic could put anything there. The materializer
(processors/key_registry.py) dead-letters what this refuses; the audit (the ClickHouse
sink) skips it, so each bad record is dead-lettered once."""

from __future__ import annotations

import re

import msgspec

from quotaflow.schemas import api_keys
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.ids import id_error, show

_HASH = re.compile(r"^[0-9a-f]{64}$")
_SECRET_ID = re.compile(r"^[A-Za-z0-9]{1,16}$")
_SCOPE = re.compile(api_keys.SCOPE_PATTERN)
_LABEL = re.compile(r"^[0-9]{1,9}s$")
_DISPLAY = re.compile(rf"^{api_keys.PREFIX}_(?:{'|'.join(api_keys.ENVIRONMENTS)})_[0-9A-Za-z]{{{api_keys.DISPLAY_CHARS}}}$")
STATES = (api_keys.ACTIVE, api_keys.REVOKED)
CHANGES = (api_keys.CREATE, api_keys.UPDATE, api_keys.REVOKE, api_keys.ROTATE)
MAX_RECORD_BYTES = 64 * 1024
MAX_MS = 2**53 - 1  # what the gateways' Lua numbers hold exactly
# The latest time a record may carry: 2299-12-31T23:59:59.999Z, where ClickHouse's DateTime64
# (the audit table) ends. A later one could not be stored and would stop the audit.
MAX_TIME_MS = 10_413_791_999_999


class InvalidRecord(ValueError):
    """A record of the keys topic that is not a key's record: the message says why."""


def decode(key: bytes | None, value: bytes | None) -> KeyRecord:
    """The record, or InvalidRecord naming the first problem (never a whole value)."""
    if value is None:
        raise InvalidRecord("no value (a tombstone: keys are revoked, never deleted)")
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"record of {len(value)} bytes, more than {MAX_RECORD_BYTES}")
    try:
        rec = KeyRecord.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidRecord(f"not a key record: {str(exc)[:300]}") from None
    problem = problem_of(rec)
    if problem is None and key != rec.key_id.encode():
        problem = "its Kafka key is not its key_id (compaction keeps the last record of each key)"
    if problem:
        raise InvalidRecord(problem)
    return rec


def problem_of(rec: KeyRecord) -> str | None:
    """What makes a record unusable, or None."""
    for field in ("key_id", "org_id"):
        problem = id_error(field, getattr(rec, field))
        if problem:
            return problem
    for field in ("rotated_from", "rotated_to"):
        value = getattr(rec, field)
        if value is not None and (problem := id_error(field, value)):
            return problem
    if rec.env not in api_keys.ENVIRONMENTS:
        return f"env: must be one of {', '.join(api_keys.ENVIRONMENTS)}, got {show(rec.env)}"
    if rec.slot_hint != api_keys.slot_hint(rec.org_id):
        return "slot_hint: not the org's (the key's record would not share a hash slot with its org)"
    if not _HASH.fullmatch(rec.key_hash):
        return "key_hash: must be 64 lower-case hex digits"
    if not _SECRET_ID.fullmatch(rec.secret_id):
        return "secret_id: must be 1-16 ASCII letters or digits"
    if not _DISPLAY.fullmatch(rec.display_prefix) or rec.display_prefix[len(api_keys.PREFIX) + 1:].split("_")[0] \
            != rec.env:
        return "display_prefix: must be qf_<env>_ and 8 letters or digits"
    if not 1 <= len(rec.name) <= api_keys.NAME_MAX or not rec.name.isprintable():
        return f"name: must be 1-{api_keys.NAME_MAX} printable characters"
    if len(rec.actor) > 128 or not rec.actor.isprintable():
        return "actor: must be at most 128 printable characters"
    if len(rec.scopes) > api_keys.SCOPES_MAX or not all(len(s) <= 64 and _SCOPE.fullmatch(s) for s in rec.scopes):
        return f"scopes: at most {api_keys.SCOPES_MAX}, each matching {api_keys.SCOPE_PATTERN}"
    if not all(_LABEL.fullmatch(label) and type(v) is int and 0 <= v <= MAX_MS for label, v in rec.limits.items()):
        return "limits: window labels (e.g. 60s) to whole numbers from 0 to 2**53-1"
    if rec.state not in STATES:
        return f"state: must be one of {', '.join(STATES)}, got {show(rec.state)}"
    if rec.change not in CHANGES:
        return f"change: must be one of {', '.join(CHANGES)}, got {show(rec.change)}"
    if not 1 <= rec.version <= MAX_MS:
        return "version: must be a whole number from 1"
    for field in ("created_ms", "updated_ms", "expires_ms"):
        value = getattr(rec, field)
        if value is not None and not 0 <= value <= MAX_TIME_MS:
            return f"{field}: must be epoch milliseconds from 1970 to 2299"
    return None
