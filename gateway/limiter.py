"""One Redis round trip per request (check.lua): verify the caller's API key and check the
rate limits of that key and its org.

- ``verify(presented_key, required_scope) -> Verdict``: what gateways use. A key whose
  shape or checksum is wrong is refused offline (schemas/api_keys.parse), with no Redis
  call. Otherwise one script call looks its record up by HMAC (one candidate name per
  configured hash secret, QUOTAFLOW_KEY_HASH_SECRETS; cached for keys presented again,
  gateway/key_names.py, while the record itself is read on every call), checks its state,
  its expiry (by Redis's clock) and the scope, then does the rate-limit check of the key
  id and org the record names. The key itself is never sent, logged or put in a name: only its HMAC is.
- ``check(api_key_id, org_id) -> Decision``: the rate-limit check alone, for callers whose
  auth layer already verified who is calling (the trusted mode).

The round trip is a pipeline of two commands: GET of the emergency switch and the
script. The switch is one key for every org, so it lives in no org's hash slot; read
inside the script it would make every call cross-slot (refused by Redis Cluster, and
then the check falls open). Read beside it, it is still exact and read per check, and the
script touches only keys of one slot. The switch turns rate limiting off, not
authentication: an unknown, revoked or expired key is refused whatever it says.

On a Redis Cluster (QUOTAFLOW_REDIS_CLUSTER) the switch's slot is on one master and the
org's on another (or the same, for a third of the orgs). The asyncio limiter sends the two
commands as two requests at once, each to its node, and waits for both: one round trip of
time, and each fails alone, so a dead master holding the switch's slot costs no org its
check (the switch then reads as "not off", as any failed read of it does); only the orgs of
a dead master's slots go unchecked (open or closed, as configured) until its replica takes
over. The blocking limiter sends them as redis-py's cluster pipeline (written to both
nodes, then read: one round trip) and, if that fails as a whole (a node refusing the
connection), the script alone. Kept as one key rather than a copy in every slot: a copy
per slot is 16,384 writes per switch and a failover can lose some of them (replication is
asynchronous), leaving some orgs enforced after `enforcement off` succeeded. A script a
node lacks (a replica just promoted holds none) is sent whole (EVAL, which also caches
it there) rather than loaded on every master. The cluster client fails fast
(core/redis_clients.py): the check's budget is the only retry.

Ids are checked with the one rule (schemas/ids.py) before anything is sent: an id
holding ``}`` (which ends the hash tag) could otherwise alias another tenant's keys.

When Redis is slower than the budget or down, the limiter fails open (admits,
``enforced=False``; a presented key is then not verified, and no identity is known) or
closed (refuses) as configured; it never blocks a request longer than the budget.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import re
import time
from importlib import resources
from typing import Mapping, NamedTuple, Sequence

import redis
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from quotaflow.core.redis_clients import async_client, is_cluster, sync_client
from quotaflow.core.settings import ConfigError, Settings, env_var
from quotaflow.gateway.key_names import RecordNames
from quotaflow.schemas.api_keys import (
    EXPIRED_KEY,
    INSUFFICIENT_SCOPE,
    KEY_REASONS,
    MALFORMED_KEY,
    REVOKED_KEY,
    SCOPE_PATTERN,
    UNKNOWN_KEY,
    InvalidKey,
)
from quotaflow.schemas.ids import InvalidId, check_id
from quotaflow.schemas.limits import Policy, policy_from_settings
from quotaflow.schemas.redis_keys import (
    ENFORCEMENT_KEY,
    ENFORCEMENT_OFF,
    Decision,
    WindowUsage,
    org_key,
    overrides_key,
    reservations_key,
    usage_key,
)

log = logging.getLogger(__name__)

CHECKS = Counter("quotaflow_gateway_checks_total", "Checks by result", ["result"])
_ALLOWED_COUNT, _DENIED_COUNT = CHECKS.labels("allowed"), CHECKS.labels("denied")  # per check: looked up once

# What a check can answer (Verdict.outcome), each a status a gateway answers with. The
# outcomes that refuse a key are also results of quotaflow_gateway_checks_total.
ALLOWED = "allowed"
RATE_LIMITED = "rate_limited"
MISSING_KEY = "missing_key"  # no key presented
# and the outcomes that refuse a presented key (schemas/api_keys.py): MALFORMED_KEY, UNKNOWN_KEY,
# REVOKED_KEY, EXPIRED_KEY, INSUFFICIENT_SCOPE
UNAVAILABLE = "unavailable"  # Redis could not answer and the limiter fails closed (also a Decision's denied_by)
STATUS = {ALLOWED: 200, RATE_LIMITED: 429, MISSING_KEY: 401, MALFORMED_KEY: 401, UNKNOWN_KEY: 401,
          REVOKED_KEY: 401, EXPIRED_KEY: 401, INSUFFICIENT_SCOPE: 403, UNAVAILABLE: 429}
REASONS = {  # for the client: never the key
    MISSING_KEY: "no API key: send it as Authorization: Bearer <key>",
    **KEY_REASONS,
    UNAVAILABLE: "the rate limiter is unavailable; try again shortly",
}
_BAD_RECORD = "bad_record"  # the script's answer for a record naming an id that breaks the rule
_SCOPE = re.compile(SCOPE_PATTERN)
# Redis Cluster's errors for a script reaching a key outside its call's slot (or node)
_SLOT_ERROR = re.compile(r"do not hash to the same slot|non local key", re.IGNORECASE)

SCRIPT = resources.files("quotaflow.gateway").joinpath("check.lua").read_text()
_OFF = (ENFORCEMENT_OFF, ENFORCEMENT_OFF.encode())  # as a client with or without decode_responses reads it


class InvalidScope(ValueError):
    """A required scope that is not one (a gateway's configuration error): the message
    names the rule, not the value."""


class Verdict(NamedTuple):
    """What ``verify`` answers: the outcome (one of the constants above), the identity the
    key's record names when it was found, and the rate-limit decision when the key got
    that far (or Redis failed). ``reason`` is for the client and logs: never the key."""

    outcome: str
    now_ms: int
    org_id: str = ""
    api_key_id: str = ""
    reason: str = ""
    decision: Decision | None = None
    scope: str = ""  # the scope required, when the key lacked it

    @property
    def allowed(self) -> bool:
        return self.outcome == ALLOWED

    @property
    def status(self) -> int:
        return STATUS[self.outcome]

    @property
    def enforced(self) -> bool:
        """False when admitted without enforcement (switch off, or Redis down and failing open)."""
        return self.decision.enforced if self.decision is not None else True

    @property
    def event_id(self) -> str:
        return self.decision.event_id if self.decision is not None else ""

    @classmethod
    def of_decision(cls, d: Decision, org_id: str, api_key_id: str) -> "Verdict":
        """The verdict of an id-based (trusted) check, so gateways answer both alike."""
        outcome = ALLOWED if d.allowed else UNAVAILABLE if d.denied_by == UNAVAILABLE else RATE_LIMITED
        return cls(outcome, d.now_ms, org_id, api_key_id, _limit_reason(d), d)


def _limit_reason(d: Decision) -> str:
    if d.allowed:
        return ""
    return REASONS[UNAVAILABLE] if d.denied_by == UNAVAILABLE else f"rate limit exceeded ({d.denied_by})"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_NAMES: dict[object, str] = {}


def _name(value: object) -> str:
    """A name the script answers with from its policy (outcome, tier, subject, window label):
    few, so each is decoded once (never a key's or org's id: those are not bounded)."""
    text = _NAMES.get(value)
    if text is None:
        text = _text(value)
        if len(_NAMES) < 1024:
            _NAMES[value] = text
    return text


def _event_id() -> str:
    """A random (version 4) UUID as str(uuid.uuid4()) writes it, in half its time."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _layout() -> list[tuple[str, str, bool]]:
    """The names of an org's six keys as check.lua builds them from a record's org and key
    ids: (head, middle, whether the key id ends it) each, taken from schemas/redis_keys.py
    so that the layout is defined there only."""
    org, key = "\x00org\x00", "\x00key\x00"
    out = []
    for name, keyed in ((usage_key(org, key), True), (usage_key(org), False), (reservations_key(org, key), True),
                        (reservations_key(org), False), (org_key(org), False), (overrides_key(org, key), True)):
        head, rest = name.split(org)
        middle = rest.removesuffix(key) if keyed else rest
        assert key not in middle and (not keyed or rest.endswith(key)), name
        out.append((head, middle, keyed))
    return out


_LUA_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:/-{} ")


def _lua(value: object) -> str:
    """A Lua literal of a value of the policy, tables of lists and dicts. A string's bytes
    outside a plain set are decimal escapes, so a tier name or label (configuration) can
    hold nothing that breaks out of its literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(chr(b) if chr(b) in _LUA_PLAIN else f"\\{b:03d}" for b in value.encode()) + '"'
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def policy_script(policy: Policy) -> str:
    """check.lua behind a prelude that defines the policy and ORG_KEYS (see the script's header)."""
    prelude = {
        "ttl": policy.reservation_ttl_ms,
        "default_tier": policy.default_tier,
        "windows": [{"label": w.label, "len": w.length_ms, "bucket": w.bucket_ms, "sliding": w.sliding}
                    for w in policy.windows],
        "fields": [f"w:{w.label}" for w in policy.windows],
        "tiers": {name: [-1 if limit is None else limit for limit in limits] for name, limits in policy.tiers.items()},
    }
    # Written out as code, one concatenation per name: a key check names the org's keys on
    # every call, and a loop over a layout table cost it about twice as much.
    names = ", ".join(f"{_lua(head)} .. o .. {_lua(middle)}" + (" .. k" if keyed else "")
                      for head, middle, keyed in _layout())
    # The shebang (no flags) has Redis Cluster hold the whole call to the slot of its
    # declared keys, even for keys it names itself on the same node (a script without one
    # may reach any slot of its node): a record naming an org of another slot fails there.
    return (f"#!lua\nlocal POLICY = {_lua(prelude)}\n"
            f"local function ORG_KEYS(o, k) return {{{names}}} end\n{SCRIPT}")


@functools.lru_cache(maxsize=4096)
def _org_keys(api_key_id: str, org_id: str) -> tuple[str, ...]:
    return _Check._keys(api_key_id, org_id)


class _Check:
    """Arguments and answers of check.lua, shared by the async and the sync limiter."""

    def __init__(self, policy: Policy, fail_open: bool, key_secrets: Mapping[str, str] | None = None):
        self.policy = policy
        self.fail_open = fail_open
        self.secrets = tuple(secret.encode() for secret in (key_secrets or {}).values())
        self._record_names = RecordNames(self.secrets)
        self.script = policy_script(policy)
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()

    @staticmethod
    def keys(api_key_id: str, org_id: str) -> tuple[str, ...]:
        """The script's keys: all of one org, so all in the org's hash slot. Refuses ids
        that break the rule (InvalidId naming the field) before any of them is built.
        Those of keys checked again are remembered (a bounded cache: ids are the caller's
        input; one that is refused is never in it)."""
        if type(api_key_id) is str and type(org_id) is str:  # noqa: E721 (exactly str: hashable, no subclass)
            return _org_keys(api_key_id, org_id)
        return _Check._keys(api_key_id, org_id)

    @staticmethod
    def _keys(api_key_id: str, org_id: str) -> tuple[str, ...]:
        try:
            check_id("api_key_id", api_key_id)
            check_id("org_id", org_id)
        except InvalidId:
            CHECKS.labels("invalid_id").inc()
            raise
        return (usage_key(org_id, api_key_id), usage_key(org_id), reservations_key(org_id, api_key_id),
                reservations_key(org_id), org_key(org_id), overrides_key(org_id, api_key_id))

    def commands(self, keys: Sequence[str], args: list) -> tuple:
        """The round trip's two commands: the switch's GET and the script's EVALSHA."""
        return (("GET", ENFORCEMENT_KEY), ("EVALSHA", self.sha, len(keys), *keys, *args))

    @staticmethod
    def args(event_id: str) -> list:
        return [event_id, "ids"]

    @staticmethod
    def scope(required: str | None) -> str:
        if required is None or required == "":
            return ""
        if not (isinstance(required, str) and _SCOPE.fullmatch(required)):
            raise InvalidScope(f"required scope: must match {SCOPE_PATTERN}")
        return required

    def candidates(self, presented: str) -> tuple[str, ...]:
        """The names the key's record may have, one per configured secret, all in the slot
        of the key's hint (so of its org); cached for keys presented again (gateway/key_names.py).
        InvalidKey, offline, for what is not a key."""
        if not self.secrets:
            raise ConfigError(f"{env_var('key_hash_secrets')} is empty: API keys cannot be verified")
        return self._record_names(presented)

    @staticmethod
    def key_args(event_id: str, scope: str) -> list:
        return [event_id, "key", scope]

    @staticmethod
    def replies(switch: object, reply: object) -> tuple[object, list]:
        """The pipeline's two answers; the script's error is raised (the check is then
        unavailable), the switch's is read as 'not off'."""
        if isinstance(reply, BaseException):
            raise reply
        return (None if isinstance(switch, BaseException) else switch), reply  # type: ignore[return-value]

    @staticmethod
    def parse(switch: object, reply: list, event_id: str) -> Decision:
        """The decision from the switch's value and the script's answer (outcome, now, tier,
        key, org, windows). With the switch off every request is admitted: one the script
        admitted keeps its reservation (its event releases it, so counting goes on exactly),
        one it refused has none."""
        allowed, now_ms, tier = _name(reply[0]) == ALLOWED, int(reply[1]), _name(reply[2])
        if switch in _OFF:  # anything else, a read error included, leaves enforcement on
            CHECKS.labels("not_enforced").inc()
            return Decision(allowed=True, tier=tier, limit=0, remaining=0, reset_ms=now_ms, window="", denied_by="",
                            now_ms=now_ms, event_id=event_id if allowed else "", enforced=False)
        windows = []
        for i in range(5, len(reply), 6):
            windows.append(WindowUsage(_name(reply[i]), _name(reply[i + 1]), int(reply[i + 2]), int(reply[i + 3]),
                                       int(reply[i + 4]), int(reply[i + 5])))
        (_ALLOWED_COUNT if allowed else _DENIED_COUNT).inc()
        return Decision.from_windows(tuple(windows), allowed=allowed, tier=tier, now_ms=now_ms, event_id=event_id)

    def verdict(self, switch: object, reply: list, event_id: str, scope: str) -> Verdict:
        outcome, now_ms = _text(reply[0]), int(reply[1])
        key_id, org_id = _text(reply[3]), _text(reply[4])
        if outcome == _BAD_RECORD:
            return self.bad_record(now_ms)
        if outcome not in (ALLOWED, RATE_LIMITED):
            CHECKS.labels(outcome).inc()
            if outcome == INSUFFICIENT_SCOPE:
                return Verdict(outcome, now_ms, org_id, key_id, f"this API key lacks the scope {scope}", scope=scope)
            return Verdict(outcome, now_ms, org_id, key_id, REASONS[outcome])
        d = self.parse(switch, reply, event_id)
        return Verdict(ALLOWED if d.allowed else RATE_LIMITED, now_ms, org_id, key_id, _limit_reason(d), d)

    @staticmethod
    def bad_record(now_ms: int | None = None) -> Verdict:
        """The registry wrote a record no gateway may use: say so (without the record, which
        names the key's hash), and refuse the key as unknown."""
        CHECKS.labels(_BAD_RECORD).inc()
        log.error("an API key record names an org or key id that breaks the id rule, or an org outside the "
                  "record's hash slot; the key is refused as unknown")
        return Verdict(UNKNOWN_KEY, int(time.time() * 1000) if now_ms is None else now_ms, reason=REASONS[UNKNOWN_KEY])

    @staticmethod
    def malformed(reason: InvalidKey | str) -> Verdict:
        CHECKS.labels(MALFORMED_KEY).inc()
        return Verdict(MALFORMED_KEY, int(time.time() * 1000), reason=str(reason))

    @staticmethod
    def missing() -> Verdict:
        CHECKS.labels(MISSING_KEY).inc()
        return Verdict(MISSING_KEY, int(time.time() * 1000), reason=REASONS[MISSING_KEY])

    def unavailable(self, exc: BaseException) -> Decision:
        CHECKS.labels("redis_unavailable").inc()
        log.warning("rate-limit check failed", extra={"error": repr(exc), "fail_open": self.fail_open})
        now = int(time.time() * 1000)
        if self.fail_open:
            return Decision(allowed=True, tier="", limit=0, remaining=0, reset_ms=now, window="", denied_by="",
                            now_ms=now, enforced=False)
        return Decision(allowed=False, tier="", limit=0, remaining=0, reset_ms=now + 1000, window="",
                        denied_by=UNAVAILABLE, now_ms=now, enforced=False)

    def unavailable_verdict(self, exc: BaseException) -> Verdict:
        """Failing open admits the key unverified (no identity); failing closed refuses it.
        But a Redis Cluster refusing the org's keys means the record names an org outside
        its slot: a record no gateway may use, refused like one that breaks the id rule,
        never admitted by failing open (the script wrote nothing before that access)."""
        if isinstance(exc, ResponseError) and _SLOT_ERROR.search(str(exc)):
            return self.bad_record()
        d = self.unavailable(exc)
        return Verdict(ALLOWED if d.allowed else UNAVAILABLE, d.now_ms, reason=_limit_reason(d), decision=d)


def valid_scope(required: str | None) -> str:
    """A required scope as checks take it ("" for none); InvalidScope when it is not one."""
    return _Check.scope(required)


def malformed_key(reason: str) -> Verdict:
    """The verdict for a request whose key is refused before any check (two keys presented)."""
    return _Check.malformed(reason)


class RateLimiter:
    """For asyncio services and gateways."""

    def __init__(self, client: aioredis.Redis | AsyncRedisCluster, policy: Policy, *, timeout_ms: int = 50,
                 fail_open: bool = True, key_secrets: Mapping[str, str] | None = None):
        self._client = client
        self._check = _Check(policy, fail_open, key_secrets)
        self.timeout_s = timeout_ms / 1000
        self.policy = policy
        if is_cluster(client):
            self._round_trip = self._cluster_round_trip  # type: ignore[method-assign]

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimiter":
        timeout_s = settings.gateway_timeout_ms / 1000
        # Every call is bounded by the check's budget (asyncio.timeout around it). On a single
        # Redis no socket timeout on top: it bounds nothing more, and redis-py spends a task
        # per command on it (wait_for around each write) and a timeout scope per reply read.
        socket_timeout = timeout_s if settings.redis_cluster else None
        client = async_client(settings, fail_fast=True, socket_timeout=socket_timeout,
                              socket_connect_timeout=timeout_s)
        return cls(client, policy_from_settings(settings), timeout_ms=settings.gateway_timeout_ms,
                   fail_open=settings.gateway_fail_open, key_secrets=settings.key_hash_secrets)

    @property
    def verifies_keys(self) -> bool:
        """Whether ``verify`` can work: at least one hash secret is configured."""
        return bool(self._check.secrets)

    async def verify(self, presented_key: str | None, required_scope: str | None = None) -> Verdict:
        """The verdict for one request presenting ``presented_key``: refused offline when it
        is missing or not a key, else verified and rate-limited in one round trip.
        InvalidScope for a required scope that is not one, before anything else."""
        scope = _Check.scope(required_scope)
        if not presented_key:
            return self._check.missing()
        try:
            keys = self._check.candidates(presented_key)
        except InvalidKey as exc:
            return self._check.malformed(exc)
        event_id = _event_id()
        try:
            async with asyncio.timeout(self.timeout_s):  # no task of its own, unlike wait_for
                switch, reply = await self._round_trip(keys, self._check.key_args(event_id, scope))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            return self._check.unavailable_verdict(exc)
        return self._check.verdict(switch, reply, event_id, scope)

    async def check(self, api_key_id: str, org_id: str) -> Decision:
        """The rate-limit decision for one request of a caller already verified (trusted
        mode); InvalidId (naming the field) for an id that breaks the rule, before anything
        is sent to Redis."""
        keys = _Check.keys(api_key_id, org_id)
        event_id = _event_id()
        try:
            async with asyncio.timeout(self.timeout_s):
                switch, reply = await self._round_trip(keys, self._check.args(event_id))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            return self._check.unavailable(exc)
        return _Check.parse(switch, reply, event_id)

    async def _round_trip(self, keys: Sequence[str], args: list) -> tuple[object, list]:
        """GET switch + EVALSHA, one pipeline (on a Redis Cluster, one request per node, sent
        together); a Redis that lost the script (restarted, flushed) gets it loaded (on
        every primary of a cluster) and the pair sent again."""
        switch, reply = await self._pipeline(keys, args)
        if isinstance(reply, NoScriptError):
            await self._client.script_load(self._check.script)
            switch, reply = await self._pipeline(keys, args)
        return _Check.replies(switch, reply)

    async def _cluster_round_trip(self, keys: Sequence[str], args: list) -> tuple[object, list]:
        """On a Redis Cluster: GET switch and EVALSHA as two requests at once, each to its
        node, each failing alone (see the module's docstring); a node lacking the script
        gets it whole (EVAL)."""
        switch, reply = await asyncio.gather(self._client.get(ENFORCEMENT_KEY),
                                             self._client.execute_command("EVALSHA", self._check.sha, len(keys),
                                                                          *keys, *args),
                                             return_exceptions=True)
        if isinstance(reply, NoScriptError):
            reply = await self._client.execute_command("EVAL", self._check.script, len(keys), *keys, *args)
        return _Check.replies(switch, reply)

    async def _pipeline(self, keys: Sequence[str], args: list) -> list:
        """The two commands written at once on one of the pool's connections and read back
        in order, as redis-py's pipeline does without its per-call machinery (which cost
        the gateway more time per check than Redis spends on the script: bench/ratelimit.py).
        Its retry policy (none for a gateway: fail fast) and error handling are the
        connection's: a reply that is an error is returned as the exception, as
        ``execute(raise_on_error=False)`` does; a read that fails or is cancelled (the
        budget) closes the connection, so no answer is left on it for its next user."""
        pool = self._client.connection_pool
        conn = await pool.get_connection()
        try:
            packed = conn.pack_commands(self._check.commands(keys, args))
            return await conn.retry.call_with_retry(lambda: _send_read(conn, packed), lambda _: conn.disconnect())
        finally:
            await pool.release(conn)

    async def aclose(self) -> None:
        await self._client.aclose()


class SyncRateLimiter:
    """For threaded (WSGI) services: the same checks, blocking for at most the budget."""

    def __init__(self, client: redis.Redis | RedisCluster, policy: Policy, *, fail_open: bool = True,
                 key_secrets: Mapping[str, str] | None = None):
        self._client = client
        self._check = _Check(policy, fail_open, key_secrets)
        self.policy = policy
        self._cluster = is_cluster(client)
        if self._cluster:
            self._round_trip = self._cluster_round_trip  # type: ignore[method-assign]

    @classmethod
    def from_settings(cls, settings: Settings) -> "SyncRateLimiter":
        timeout_s = settings.gateway_timeout_ms / 1000
        client = sync_client(settings, fail_fast=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, policy_from_settings(settings), fail_open=settings.gateway_fail_open,
                   key_secrets=settings.key_hash_secrets)

    @property
    def verifies_keys(self) -> bool:
        return bool(self._check.secrets)

    def verify(self, presented_key: str | None, required_scope: str | None = None) -> Verdict:
        scope = _Check.scope(required_scope)
        if not presented_key:
            return self._check.missing()
        try:
            keys = self._check.candidates(presented_key)
        except InvalidKey as exc:
            return self._check.malformed(exc)
        event_id = _event_id()
        try:
            switch, reply = self._round_trip(keys, self._check.key_args(event_id, scope))
        except (RedisError, OSError) as exc:
            return self._check.unavailable_verdict(exc)
        return self._check.verdict(switch, reply, event_id, scope)

    def check(self, api_key_id: str, org_id: str) -> Decision:
        keys = _Check.keys(api_key_id, org_id)
        event_id = _event_id()
        try:
            switch, reply = self._round_trip(keys, self._check.args(event_id))
        except (RedisError, OSError) as exc:
            return self._check.unavailable(exc)
        return _Check.parse(switch, reply, event_id)

    def _round_trip(self, keys: Sequence[str], args: list) -> tuple[object, list]:
        switch, reply = self._pipeline(keys, args)
        if isinstance(reply, NoScriptError):
            self._client.script_load(self._check.script)
            switch, reply = self._pipeline(keys, args)
        return _Check.replies(switch, reply)

    def _cluster_round_trip(self, keys: Sequence[str], args: list) -> tuple[object, list]:
        """The cluster pipeline; failing as a whole (a node refusing the connection), the
        script alone, the switch then read as not off (see the module's docstring)."""
        try:
            switch, reply = self._pipeline(keys, args)
        except (RedisError, OSError) as exc:
            switch, reply = exc, self._script(keys, args, "EVALSHA")
        if isinstance(reply, NoScriptError):
            reply = self._script(keys, args, "EVAL")
        return _Check.replies(switch, reply)

    def _script(self, keys: Sequence[str], args: list, command: str) -> object:
        try:
            script = self._check.sha if command == "EVALSHA" else self._check.script
            return self._client.execute_command(command, script, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            return exc

    def _pipeline(self, keys: Sequence[str], args: list) -> list:
        if self._cluster:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.get(ENFORCEMENT_KEY)
                # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses the latter
                # (a script's keys might span nodes); ours are in one slot, routed by its keys
                pipe.execute_command("EVALSHA", self._check.sha, len(keys), *keys, *args)
                return pipe.execute(raise_on_error=False)
        pool = self._client.connection_pool  # as RateLimiter._pipeline does
        conn = pool.get_connection()
        try:
            packed = conn.pack_commands(self._check.commands(keys, args))
            return conn.retry.call_with_retry(lambda: _send_read_sync(conn, packed), lambda _: conn.disconnect())
        finally:
            pool.release(conn)


async def _send_read(conn, packed: list) -> list:
    await conn.send_packed_command(packed)
    return [await _reply(conn), await _reply(conn)]


async def _reply(conn) -> object:
    try:
        return await conn.read_response()
    except ResponseError as exc:  # an error reply: the connection stays in step
        return exc


def _send_read_sync(conn, packed: list) -> list:
    conn.send_packed_command(packed)
    return [_reply_sync(conn), _reply_sync(conn)]


def _reply_sync(conn) -> object:
    try:
        return conn.read_response()
    except ResponseError as exc:
        return exc
