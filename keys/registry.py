"""The key registry's operations: reading the materialized state from Redis (KeyStore)
and publishing changes to the keys topic (Registry).

A change is one record (two for a rotation: the new key's and the old key's, appended to
the topic in one batch, so both or neither), published with an idempotent producer and
acknowledged by every in-sync replica (acks=all) before the operation returns. Then it
waits, up to ``wait_s``, until the processor's materializer has written it to Redis, where
gateways see it, and says how long that took (``Published.visible_ms``); None means not
yet (is the processor running?): the change is recorded all the same and applied when
the materializer catches up.

A change that reads the key first (update, revoke, rotate) holds the registry's lock in
Redis and waits until Redis holds the whole topic, so it starts from the key's latest
version and no two changes give a key the same version. New keys are generated here
(schemas.api_keys.generate: 154 random bits) and hashed with the first of
QUOTAFLOW_KEY_HASH_SECRETS; the key itself is handed back once (``Issued.key``) and kept
nowhere: not in a record, a log line or an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import LockError

from quotaflow.core.errors import OperatorError
from quotaflow.core.redis_clients import AsyncClient, async_client
from quotaflow.core.settings import ConfigError, Settings, env_var
from quotaflow.keys import changes
from quotaflow.keys.changes import KEEP, InvalidChange, check_env, check_id
from quotaflow.schemas import api_keys
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.limits import Policy, policy_from_settings
from quotaflow.schemas.redis_keys import (
    API_KEYS_LOCK,
    API_KEYS_OFFSET_FIELD,
    API_KEYS_REBUILDING,
    API_KEYS_STATE,
    API_KEYS_STATUS_FIELD,
    API_KEYS_STATUS_OK,
    ORG_TIER_FIELD,
    api_key_index,
    org_key,
    usage_key,
)
from quotaflow.schemas.topics import KEYS_PARTITIONS, KEYS_TOPIC

log = logging.getLogger(__name__)

TP = TopicPartition(KEYS_TOPIC, 0)
WAIT_S = 5.0  # for the materializer, by default
LOCK_TTL_S = 60.0  # a registry change holding the lock longer has died; the lock frees itself
POLL_S = 0.001


def now_ms() -> int:
    return int(time.time() * 1000)


class KeyNotFound(InvalidChange):
    """No such key in that org."""


@dataclass(frozen=True)
class Published:
    records: tuple[KeyRecord, ...]
    offset: int  # of the first record in the keys topic
    visible_ms: float | None  # from the broker's acknowledgement to Redis holding the change; None: not yet


@dataclass(frozen=True)
class Issued:
    """A new key: the plaintext, to show its creator once, and its first record."""

    record: KeyRecord
    published: Published
    key: str = field(repr=False)  # never in a repr, a log line or a traceback's locals dump


@dataclass(frozen=True)
class Changed:
    record: KeyRecord  # the key as it is now
    published: Published | None  # None: nothing to change (already so)


@dataclass(frozen=True)
class Rotated:
    new: Issued
    old: KeyRecord  # the rotated key's new record: expires at the end of the overlap


def public(rec: KeyRecord, at_ms: int) -> dict:
    """What lists and shows print of a key: no hash, nothing to verify or use the key with
    (display_prefix tells keys apart). ``state`` as of ``at_ms`` (active, revoked, expired)."""
    return {"key_id": rec.key_id, "org_id": rec.org_id, "name": rec.name, "env": rec.env,
            "display_prefix": rec.display_prefix, "state": rec.state_at(at_ms), "scopes": list(rec.scopes),
            "limits": dict(rec.limits), "expires_ms": rec.expires_ms, "created_ms": rec.created_ms,
            "updated_ms": rec.updated_ms, "version": rec.version, "change": rec.change, "actor": rec.actor,
            "rotated_from": rec.rotated_from, "rotated_to": rec.rotated_to, "secret_id": rec.secret_id}


class KeyStore:
    """The registry as the materializer wrote it to Redis (the org's index of records)."""

    def __init__(self, redis: AsyncClient):
        self.redis = redis

    async def list(self, org_id: str) -> list[KeyRecord]:
        check_id("org_id", org_id)
        raw = await self.redis.hgetall(api_key_index(org_id))
        return sorted((KeyRecord.decode(v) for v in raw.values()), key=lambda r: (r.created_ms, r.key_id))

    async def get(self, org_id: str, key_id: str) -> KeyRecord | None:
        check_id("org_id", org_id)
        check_id("key_id", key_id)
        raw = await self.redis.hget(api_key_index(org_id), key_id)
        return None if raw is None else KeyRecord.decode(raw)

    async def show(self, org_id: str, key_id: str) -> KeyRecord:
        rec = await self.get(org_id, key_id)
        if rec is None:
            raise KeyNotFound(f"org {org_id} has no key {key_id}")
        return rec

    async def last_used_ms(self, org_id: str, key_id: str) -> int | None:
        """When the processor last counted a request of the key (its decision's time, in its
        usage hash), or None: none counted within the longest window (the hash expires)."""
        raw = await self.redis.hget(usage_key(org_id, key_id), "updated_ms")
        return int(raw) if raw else None

    async def tier(self, org_id: str, policy: Policy) -> str:
        return policy.tier_of(await self.redis.hget(org_key(org_id), ORG_TIER_FIELD))

    async def progress(self) -> tuple[str | None, int]:
        """(the materializer's status, the next offset of the keys topic it will apply)."""
        status, offset = await self.redis.hmget(API_KEYS_STATE, [API_KEYS_STATUS_FIELD, API_KEYS_OFFSET_FIELD])
        return (status.decode() if status is not None else None), int(offset) if offset is not None else 0


def hash_secret(settings: Settings) -> tuple[str, bytes]:
    """(id, secret) new keys are hashed with: the first of QUOTAFLOW_KEY_HASH_SECRETS."""
    if not settings.key_hash_secrets:
        raise ConfigError(f"{env_var('key_hash_secrets')} is not set: new keys are stored as an HMAC under a "
                          'server secret; set it to {"<id>": "<at least 32 characters>"}')
    secret_id, secret = next(iter(settings.key_hash_secrets.items()))
    return secret_id, secret.encode()


class Registry:
    """Registry changes; ``async with Registry(settings) as registry: ...``."""

    def __init__(self, settings: Settings, *, wait_s: float = WAIT_S):
        self.settings = settings
        self.wait_s = wait_s
        self.policy = policy_from_settings(settings)
        self.redis = async_client(settings, socket_timeout=10.0, socket_connect_timeout=5.0)
        self.store = KeyStore(self.redis)
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True,
                                          acks="all", request_timeout_ms=10_000)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                          request_timeout_ms=10_000)

    async def __aenter__(self) -> "Registry":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        bootstrap = self.settings.kafka_bootstrap
        try:
            await self._producer.start()
            await self._consumer.start()
            topics = await self._consumer.topics()
            partitions = await self._producer.partitions_for(KEYS_TOPIC) if KEYS_TOPIC in topics else set()
        except KafkaError as exc:
            await self.stop()
            raise OperatorError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
        if KEYS_TOPIC not in topics:
            await self.stop()
            raise OperatorError(f"the keys topic {KEYS_TOPIC} does not exist on {bootstrap}: "
                                "'quotaflow stack up' creates it")
        if len(partitions) != KEYS_PARTITIONS:
            await self.stop()
            raise OperatorError(f"the keys topic {KEYS_TOPIC} has {len(partitions)} partitions; the registry "
                                f"needs exactly {KEYS_PARTITIONS} (one order of every change)")

    async def stop(self) -> None:
        for client in (self._consumer, self._producer):
            try:
                await client.stop()
            except Exception:  # never started, or half: nothing to release
                pass
        await self.redis.aclose()

    # --- the changes -------------------------------------------------------------------

    async def create(self, org_id: str, name: str, *, env: str = "live", scopes: Iterable[str] = (),
                     limits: Mapping[str, int] | None = None, expires_ms: int | None = None,
                     actor: str) -> Issued:
        check_id("org_id", org_id)
        check_env(env)
        secret_id, secret = self._secret()
        tier = await self.store.tier(org_id, self.policy)
        key_id = await self._new_key_id(org_id)
        key = api_keys.generate(org_id, env)
        rec = changes.created(key=key, key_id=key_id, org_id=org_id, name=name, secret_id=secret_id, secret=secret,
                              scopes=scopes, limits=limits, expires_ms=expires_ms, actor=actor, now_ms=now_ms(),
                              policy=self.policy, tier=tier)
        return Issued(rec, await self._publish([rec]), key)

    async def update(self, org_id: str, key_id: str, *, name: str | object = KEEP, scopes: Iterable[str] | object = KEEP,
                     limits: Mapping[str, int | None] | object = KEEP, expires_ms: int | None | object = KEEP,
                     actor: str) -> Changed:
        """``limits`` patches the key's (a window given None loses its limit); ``expires_ms``
        None: never expires."""
        async with self._change(org_id, key_id) as current:
            rec = changes.updated(current, name=name, scopes=scopes, limits=limits, expires_ms=expires_ms,
                                  actor=actor, now_ms=now_ms(), policy=self.policy,
                                  tier=await self.store.tier(org_id, self.policy))
            if rec is None:
                return Changed(current, None)
            return Changed(rec, await self._publish([rec]))

    async def revoke(self, org_id: str, key_id: str, *, actor: str) -> Changed:
        async with self._change(org_id, key_id) as current:
            rec = changes.revoked(current, actor=actor, now_ms=now_ms())
            if rec is None:
                return Changed(current, None)
            return Changed(rec, await self._publish([rec]))

    async def rotate(self, org_id: str, key_id: str, *, overlap_ms: int, actor: str) -> Rotated:
        """A new key with the old one's identity, scopes, limits and expiry; the old one stays
        valid ``overlap_ms`` more (0: expired from now on), never past its own expiry."""
        changes.check_overlap(overlap_ms)
        secret_id, secret = self._secret()
        async with self._change(org_id, key_id) as current:
            key = api_keys.generate(org_id, current.env)
            new, old = changes.rotated(current, key=key, key_id=await self._new_key_id(org_id), secret_id=secret_id,
                                       secret=secret, overlap_ms=overlap_ms, actor=actor, now_ms=now_ms(),
                                       policy=self.policy, tier=await self.store.tier(org_id, self.policy))
            published = await self._publish([new, old])
            return Rotated(Issued(new, published, key), old)

    # --- how --------------------------------------------------------------------------

    def _secret(self) -> tuple[str, bytes]:
        return hash_secret(self.settings)

    async def _new_key_id(self, org_id: str) -> str:
        while True:  # 95 random bits: a clash is all but impossible, and cheap to rule out
            key_id = api_keys.new_key_id()
            if not await self.redis.hexists(api_key_index(org_id), key_id):
                return key_id

    def _change(self, org_id: str, key_id: str) -> "_Change":
        check_id("org_id", org_id)
        check_id("key_id", key_id)
        return _Change(self, org_id, key_id)

    async def _caught_up(self, end: int, deadline: float) -> bool:
        """Wait until Redis holds every record below ``end`` (or the deadline passes)."""
        while True:
            status, offset = await self.store.progress()
            if status == API_KEYS_STATUS_OK and offset >= end:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)

    async def catch_up(self) -> None:
        """Return once Redis holds the whole topic as it is now; OperatorError after wait_s."""
        try:
            end = (await self._consumer.end_offsets([TP]))[TP]
        except KafkaError as exc:
            raise OperatorError(f"cannot read the end of the keys topic {KEYS_TOPIC}: {exc}") from None
        if await self._caught_up(end, time.monotonic() + self.wait_s):
            return
        status, offset = await self.store.progress()
        where = ("it is being rebuilt from the topic" if status and status.startswith(API_KEYS_REBUILDING)
                 else "Redis lost it (no progress recorded)" if status is None
                 else f"applied up to offset {offset} of {end}")
        raise OperatorError(f"the key registry in Redis is behind the keys topic ({where}) after {self.wait_s:g} s: "
                            "is the processor running? Nothing was changed. ('quotaflow keys rebuild' rebuilds "
                            "Redis from the topic)")

    async def _publish(self, records: list[KeyRecord]) -> Published:
        batch = self._producer.create_batch()
        for rec in records:
            if batch.append(key=rec.key_id.encode(), value=rec.encode(), timestamp=None) is None:
                raise OperatorError("a key record does not fit in one Kafka batch")  # bounded fields: never
        batch.close()
        try:
            meta = await (await self._producer.send_batch(batch, KEYS_TOPIC, partition=TP.partition))
        except KafkaError as exc:
            raise OperatorError(f"could not publish the change to {KEYS_TOPIC}: {exc}; it may or may not have been "
                                "recorded ('quotaflow keys show' tells)") from None
        acked = time.monotonic()
        visible = await self._caught_up(meta.offset + len(records), acked + self.wait_s)
        published = Published(tuple(records), meta.offset, (time.monotonic() - acked) * 1000 if visible else None)
        log.info("key registry change published",
                 extra={"changes": [f"{r.change} {r.key_id} v{r.version}" for r in records], "offset": meta.offset,
                        "visible_ms": None if published.visible_ms is None else round(published.visible_ms, 2)})
        return published


class _Change:
    """The lock held, Redis caught up with the topic, the key's current record read."""

    def __init__(self, registry: Registry, org_id: str, key_id: str):
        self.registry, self.org_id, self.key_id = registry, org_id, key_id
        self.lock = registry.redis.lock(API_KEYS_LOCK, timeout=LOCK_TTL_S, blocking_timeout=registry.wait_s)

    async def __aenter__(self) -> KeyRecord:
        if not await self.lock.acquire():
            raise OperatorError(f"another key change holds the registry's lock ({API_KEYS_LOCK}) after "
                                f"{self.registry.wait_s:g} s; try again")
        try:
            await self.registry.catch_up()
            return await self.registry.store.show(self.org_id, self.key_id)
        except BaseException:
            await self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self._release()

    async def _release(self) -> None:
        try:
            await self.lock.release()
        except LockError:  # held past its TTL: it had freed itself already
            log.warning("the key registry's lock expired before the change ended")
