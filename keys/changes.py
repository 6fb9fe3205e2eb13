"""What each registry change makes of a key: the KeyRecord a create, update, revoke or
rotate publishes, every input checked first (pure logic, no I/O: keys/registry.py does
the reading and publishing).

Every check raises InvalidChange naming the field and the rule, never a key (a key is
never an input here but the one just generated, which no message names) and never a
value longer than ids.show prints.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import msgspec

from quotaflow.core.settings import LIMIT_MAX
from quotaflow.schemas import api_keys
from quotaflow.schemas.api_keys import (
    ACTIVE,
    CREATE,
    NAME_MAX,
    REVOKE,
    REVOKED,
    ROTATE,
    SCOPE_PATTERN,
    SCOPES_MAX,
    UPDATE,
    KeyRecord,
)
from quotaflow.schemas.ids import id_error, show
from quotaflow.schemas.key_records import MAX_TIME_MS
from quotaflow.schemas.limits import Policy

_SCOPE = re.compile(SCOPE_PATTERN)
ACTOR_MAX = 128
LATEST_MS = MAX_TIME_MS  # 2299-12-31T23:59:59.999Z: what a record may carry (the audit's DateTime64)
OVERLAP_MAX_MS = 366 * 86_400_000  # a rotation keeps the old key for a year at most


class InvalidChange(ValueError):
    """A change the registry refuses; the message names the field and the rule."""


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()  # update(): leave this attribute as it is


def check_id(field: str, value: object) -> str:
    problem = id_error(field, value)
    if problem:
        raise InvalidChange(problem)
    return value  # type: ignore[return-value]


def check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX or not name.isprintable() \
            or name != name.strip():
        raise InvalidChange(f"name: must be 1-{NAME_MAX} printable characters without leading or trailing "
                            f"spaces, got {show(name)}")
    return name


def check_env(env: object) -> str:
    if env not in api_keys.ENVIRONMENTS:
        raise InvalidChange(f"env: must be one of {', '.join(api_keys.ENVIRONMENTS)}, got {show(env)}")
    return env  # type: ignore[return-value]


def check_scopes(scopes: Iterable[object]) -> tuple[str, ...]:
    """The scopes as a key carries them: distinct, sorted."""
    if isinstance(scopes, (str, bytes)):  # a lone string is a caller's mistake, not 1-character scopes
        raise InvalidChange("scopes: must be a list of scopes")
    out = set()
    for scope in scopes:
        if not isinstance(scope, str) or len(scope) > 64 or not _SCOPE.fullmatch(scope):
            raise InvalidChange(f"scope: must be 1-64 characters of lower-case letters, digits and _.:- starting "
                                f"with a letter (e.g. orders:read), got {show(scope)}")
        out.add(scope)
    if len(out) > SCOPES_MAX:
        raise InvalidChange(f"scopes: at most {SCOPES_MAX}, got {len(out)}")
    return tuple(sorted(out))


def check_limits(limits: Mapping[str, object], policy: Policy, tier: str) -> dict[str, int]:
    """Per-key limits by window label: windows of the policy, each at most the org's tier
    (a key's limit lowers its org's, as `quotaflow key set-limit` overrides do)."""
    tier = policy.tier_of(tier)
    out = {}
    for label, limit in limits.items():
        if label not in policy.labels:
            raise InvalidChange(f"limit: unknown window {show(label)}; configured: {', '.join(policy.labels)}")
        if type(limit) is not int or not 0 <= limit <= LIMIT_MAX:
            raise InvalidChange(f"limit {label}: must be a whole number from 0 to {LIMIT_MAX}, got {show(limit)}")
        ceiling = policy.tiers[tier][policy.labels.index(label)]
        if ceiling is not None and limit > ceiling:
            raise InvalidChange(f"limit {label}={limit} is above the org's tier ({tier}: {ceiling} per {label}); "
                                "a key's limit can only lower its org's")
        out[label] = limit
    return dict(sorted(out.items()))


def check_expiry(expires_ms: object, now_ms: int) -> int | None:
    if expires_ms is None:
        return None
    if type(expires_ms) is not int or expires_ms > LATEST_MS:
        raise InvalidChange(f"expires: must be a time in epoch milliseconds up to 2299-12-31, got {show(expires_ms)}")
    if expires_ms <= now_ms:
        raise InvalidChange("expires: must be in the future")
    return expires_ms


def check_actor(actor: object) -> str:
    if not isinstance(actor, str) or not 1 <= len(actor) <= ACTOR_MAX or not actor.isprintable():
        raise InvalidChange(f"actor: must be 1-{ACTOR_MAX} printable characters, got {show(actor)}")
    return actor


def check_overlap(overlap_ms: object) -> int:
    if type(overlap_ms) is not int or not 0 <= overlap_ms <= OVERLAP_MAX_MS:
        raise InvalidChange(f"overlap: must be from 0 to {OVERLAP_MAX_MS // 86_400_000} days, got {show(overlap_ms)}")
    return overlap_ms


def _usable(current: KeyRecord, what: str) -> None:
    if current.state == REVOKED:
        raise InvalidChange(f"key {current.key_id} is revoked: it cannot be {what} (revocation is final)")


def created(*, key: str, key_id: str, org_id: str, name: str, secret_id: str, secret: bytes,
            scopes: Iterable[str] = (), limits: Mapping[str, int] | None = None, expires_ms: int | None = None,
            actor: str, now_ms: int, policy: Policy, tier: str, change: str = CREATE,
            rotated_from: str | None = None) -> KeyRecord:
    """The first record of a new key (``key`` just generated: only its hash is kept)."""
    parsed = api_keys.parse(key)
    check_id("org_id", org_id)
    if parsed.slot_hint != api_keys.slot_hint(org_id):
        raise InvalidChange("key: not generated for this org")  # a bug of the caller, never an input
    return KeyRecord(
        key_id=check_id("key_id", key_id), org_id=org_id, name=check_name(name), env=parsed.env,
        display_prefix=api_keys.display_prefix(key), slot_hint=parsed.slot_hint,
        key_hash=api_keys.key_hash(key, secret), secret_id=secret_id, scopes=check_scopes(scopes),
        limits=check_limits(limits or {}, policy, tier), expires_ms=check_expiry(expires_ms, now_ms),
        state=ACTIVE, created_ms=now_ms, updated_ms=now_ms, version=1, change=change, actor=check_actor(actor),
        rotated_from=rotated_from)


def _next(current: KeyRecord, change: str, actor: str, now_ms: int, **fields) -> KeyRecord:
    return msgspec.structs.replace(current, version=current.version + 1, change=change, actor=check_actor(actor),
                                   updated_ms=now_ms, **fields)


def updated(current: KeyRecord, *, name: str | _Keep = KEEP, scopes: Iterable[str] | _Keep = KEEP,
            limits: Mapping[str, int | None] | _Keep = KEEP, expires_ms: int | None | _Keep = KEEP,
            actor: str, now_ms: int, policy: Policy, tier: str) -> KeyRecord | None:
    """The key with the attributes given changed (``limits`` patches: a window given None
    loses its limit; ``expires_ms`` None: never expires), or None when nothing changes."""
    _usable(current, "updated")
    fields: dict = {}
    if not isinstance(name, _Keep):
        fields["name"] = check_name(name)
    if not isinstance(scopes, _Keep):
        fields["scopes"] = check_scopes(scopes)
    if not isinstance(limits, _Keep):
        patched = {**current.limits, **limits}
        fields["limits"] = check_limits({k: v for k, v in patched.items() if v is not None}, policy, tier)
    if not isinstance(expires_ms, _Keep):
        fields["expires_ms"] = check_expiry(expires_ms, now_ms)
    fields = {k: v for k, v in fields.items() if getattr(current, k) != v}
    if not fields:
        return None
    return _next(current, UPDATE, actor, now_ms, **fields)


def revoked(current: KeyRecord, *, actor: str, now_ms: int) -> KeyRecord | None:
    """The key revoked, or None when it already is."""
    if current.state == REVOKED:
        return None
    return _next(current, REVOKE, actor, now_ms, state=REVOKED)


def rotated(current: KeyRecord, *, key: str, key_id: str, secret_id: str, secret: bytes, overlap_ms: int,
            actor: str, now_ms: int, policy: Policy, tier: str) -> tuple[KeyRecord, KeyRecord]:
    """(the new key's first record, the old key's next): the new key has the old one's org,
    name, env, scopes, limits and expiry; the old one stays valid ``overlap_ms`` more (0:
    from now on it is expired), never past its own expiry."""
    _usable(current, "rotated")
    if current.rotated_to is not None:
        raise InvalidChange(f"key {current.key_id} was already rotated (to {current.rotated_to}): rotate that one")
    if current.expires_ms is not None and current.expires_ms <= now_ms:
        raise InvalidChange(f"key {current.key_id} has expired: create a new key, or extend this one "
                            "with update --expires first")
    if api_keys.parse(key).env != current.env:
        raise InvalidChange("key: not generated for this key's env")  # a bug of the caller, never an input
    end = now_ms + check_overlap(overlap_ms)
    new = created(key=key, key_id=key_id, org_id=current.org_id, name=current.name, secret_id=secret_id,
                  secret=secret, scopes=current.scopes, limits=current.limits, expires_ms=current.expires_ms,
                  actor=actor, now_ms=now_ms, policy=policy, tier=tier, change=ROTATE, rotated_from=current.key_id)
    old = _next(current, ROTATE, actor, now_ms, rotated_to=key_id,
                expires_ms=end if current.expires_ms is None else min(end, current.expires_ms))
    return new, old
