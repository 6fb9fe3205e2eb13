"""Test helpers: API keys and their records written straight into Redis, as the key
registry's materializer writes them (KeyRecord.to_redis at redis_keys.api_key_record),
so the gateway's tests do not depend on the registry."""

from __future__ import annotations

import time

import msgspec
import orjson

from quotaflow.schemas.api_keys import ACTIVE, KeyRecord, display_prefix, generate, key_hash, new_key_id, parse
from quotaflow.schemas.redis_keys import api_key_record

# Hash secrets of the tests' gateways: keys are hashed with either (the first for new keys);
# a gateway tries both, as during a rotation of the secret.
SECRETS = {"t2": "tests-hash-secret-two-0123456789abcdef", "t1": "tests-hash-secret-one-0123456789abcdef"}
SECRETS_ENV = {"QUOTAFLOW_KEY_HASH_SECRETS": orjson.dumps(SECRETS).decode()}


def record_name(rec: KeyRecord) -> str:
    return api_key_record(rec.slot_hint, rec.key_hash)


def put(client, rec: KeyRecord) -> KeyRecord:
    """Write (or overwrite) a record where gateways read it; a sync client, plain or cluster."""
    name = record_name(rec)
    client.delete(name)
    client.hset(name, mapping=rec.to_redis())
    return rec


def new_key(client, org_id: str, *, scopes: tuple[str, ...] = (), limits: dict[str, int] | None = None,
            expires_ms: int | None = None, state: str = ACTIVE, secret: bytes | None = None,
            secret_id: str | None = None) -> tuple[str, KeyRecord]:
    """A new key of the org, its record in Redis: (the key as a client presents it, its record)."""
    key = generate(org_id)
    secret_id = secret_id or next(iter(SECRETS))
    secret = secret if secret is not None else SECRETS[secret_id].encode()
    now = int(time.time() * 1000)
    rec = KeyRecord(key_id=new_key_id(), org_id=org_id, name="test key", env="live", display_prefix=display_prefix(key),
                    slot_hint=parse(key).slot_hint, key_hash=key_hash(key, secret), secret_id=secret_id, scopes=scopes,
                    limits=limits or {}, expires_ms=expires_ms, state=state, created_ms=now, updated_ms=now)
    return key, put(client, rec)


def change(client, rec: KeyRecord, **fields) -> KeyRecord:
    """The record changed as the registry would (revoke, expiry for a rotation), rewritten."""
    return put(client, msgspec.structs.replace(rec, version=rec.version + 1, updated_ms=int(time.time() * 1000),
                                               **fields))
