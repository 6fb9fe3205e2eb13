"""API key benchmark: what verifying a key costs a gateway's check, and how fast fakes are
refused. Run: .venv/bin/python bench/keys.py

Brings up a Redis of its own (no Kafka: nothing here publishes), writes key records as the
registry's materializer writes them (KeyRecord.to_redis at redis_keys.api_key_record),
then runs GATEWAYS processes that each, per key and tick, make one id-based check
(RateLimiter.check, the reference: trusted mode) and one verified check (RateLimiter.verify:
the key's HMAC, its record, state, expiry, scope, then the same limits), in alternating
order, on the same keys and orgs, under the same load. Prints `name: value unit` lines:
  check_p50_ms, check_p99_ms                 RateLimiter.check(key_id, org_id)
  verify_check_p50_ms, verify_check_p99_ms   RateLimiter.verify(key, scope): one round trip too
  verify_vs_check_p50_ratio, _p99_ratio      goal: at most 1.10
  bad_checksum_refusals_per_s                verify() of keys with a wrong checksum, one process
  bad_checksum_redis_commands                commands Redis received meanwhile (INFO commandstats; goal 0)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import harness

SECRET_ID, SECRET = "b1", "bench-hash-secret-0123456789abcdef-0123"
os.environ.update({
    "QUOTAFLOW_KEY_HASH_SECRETS": json.dumps({SECRET_ID: SECRET}),
    "QUOTAFLOW_WINDOWS": "60,3600",
    # limits no request reaches: both checks do all their work (nothing refused early)
    "QUOTAFLOW_TIER_LIMITS": json.dumps({"FREE": [10_000_000, 100_000_000]}),
    "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000",
})

GATEWAYS = 4
KEYS = 20
TICKS_PER_S = 12.5  # per gateway: 4 x 20 keys x 12.5 = 1,000 checks/s of each kind
LOAD_SECONDS = 20
SCOPE = "bench:read"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def write_keys(settings, run: str) -> list[tuple[str, str, str]]:
    """(org, key_id, key) for KEYS new keys, one org each, their records in Redis."""
    import redis

    from quotaflow.schemas.api_keys import KeyRecord, display_prefix, generate, key_hash, new_key_id, parse
    from quotaflow.schemas.redis_keys import api_key_record

    client = redis.Redis.from_url(settings.redis_url)
    out = []
    now = int(time.time() * 1000)
    for k in range(KEYS):
        org = f"{run}-org{k}"
        key = generate(org)
        rec = KeyRecord(key_id=new_key_id(), org_id=org, name="bench", env="live", display_prefix=display_prefix(key),
                        slot_hint=parse(key).slot_hint, key_hash=key_hash(key, SECRET.encode()), secret_id=SECRET_ID,
                        scopes=(SCOPE, "bench:write"), created_ms=now, updated_ms=now)
        client.hset(api_key_record(rec.slot_hint, rec.key_hash), mapping=rec.to_redis())
        out.append((org, rec.key_id, key))
    client.close()
    return out


async def gateway_worker(keys: list[list[str]], seconds: float) -> None:
    """One gateway process. The keys come on stdin (never in process arguments)."""
    from quotaflow.gateway.limiter import ALLOWED, RateLimiter

    limiter = RateLimiter.from_settings(harness.get_settings())
    plain, verified = [], []
    for org, key_id, key in keys:  # connect and load the script before measuring
        await limiter.check(key_id, org)
        await limiter.verify(key, SCOPE)
    start = time.monotonic()
    ticks = 0
    while (elapsed := time.monotonic() - start) < seconds:
        while ticks < int(elapsed * TICKS_PER_S):
            for org, key_id, key in keys:
                for kind in (("check", "verify") if ticks % 2 else ("verify", "check")):
                    t0 = time.perf_counter()
                    if kind == "check":
                        ok = (await limiter.check(key_id, org)).allowed
                        plain.append((time.perf_counter() - t0) * 1000)
                    else:
                        ok = (await limiter.verify(key, SCOPE)).outcome == ALLOWED
                        verified.append((time.perf_counter() - t0) * 1000)
                    if not ok:
                        raise SystemExit(f"a {kind} was refused: the benchmark's setup is wrong")
            ticks += 1
        await asyncio.sleep(0.001)
    await limiter.aclose()
    print(json.dumps({"check": plain, "verify": verified}))


def run_gateways(keys: list[tuple[str, str, str]]) -> tuple[list[float], list[float]]:
    procs = [subprocess.Popen([sys.executable, __file__, "--gateway", str(LOAD_SECONDS)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(GATEWAYS)]
    plain, verified = [], []
    outs = [p.communicate(json.dumps(keys), timeout=LOAD_SECONDS * 10)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a gateway process failed (exit {p.returncode})")
        got = json.loads(out)
        plain += got["check"]
        verified += got["verify"]
    return plain, verified


async def bad_checksums(settings, good: str, seconds: float = 3.0) -> tuple[float, int]:
    """verify() of keys one character off in their checksum: refusals per second, and the
    commands Redis received meanwhile."""
    import redis.asyncio as aioredis

    from quotaflow.gateway.limiter import MALFORMED_KEY, RateLimiter

    fakes = []
    for n in range(1000):
        fake = good[:-6] + f"{n:06d}"
        if fake != good:
            fakes.append(fake)
    limiter = RateLimiter.from_settings(settings)
    await limiter.check("warm", "warm")  # the connection is open: a call would be cheap, and counted
    stats = aioredis.Redis.from_url(settings.redis_url)

    async def commands() -> int:
        info = await stats.info("commandstats")
        return sum(v["calls"] for k, v in info.items() if k != "cmdstat_info")

    before = await commands()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for fake in fakes:
            if (await limiter.verify(fake, SCOPE)).outcome != MALFORMED_KEY:
                raise SystemExit("a fake key was not refused as malformed")
        done += len(fakes)
    rate = done / (time.perf_counter() - start)
    sent = await commands() - before
    await limiter.aclose()
    await stats.aclose()
    return rate, sent


def main() -> None:
    import uuid

    from quotaflow.deploy import redis as redis_server

    settings = harness.get_settings()
    print("bringing up the benchmark's Redis...", file=sys.stderr, flush=True)
    redis_server.stop(settings)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    redis_server.start(settings)
    try:
        run = uuid.uuid4().hex[:6]
        keys = write_keys(settings, run)
        print(f"checks: {GATEWAYS} gateways x {KEYS} keys, {LOAD_SECONDS} s...", file=sys.stderr, flush=True)
        plain, verified = run_gateways(keys)
        harness.report("check_p50_ms", pct(plain, 50), "ms")
        harness.report("check_p99_ms", pct(plain, 99), "ms")
        harness.report("verify_check_p50_ms", pct(verified, 50), "ms")
        harness.report("verify_check_p99_ms", pct(verified, 99), "ms")
        harness.report("verify_vs_check_p50_ratio", pct(verified, 50) / pct(plain, 50), "ratio")
        harness.report("verify_vs_check_p99_ratio", pct(verified, 99) / pct(plain, 99), "ratio")
        harness.report("checks_measured", len(plain) + len(verified), "checks")
        print("bad checksums...", file=sys.stderr, flush=True)
        rate, sent = asyncio.run(bad_checksums(settings, keys[0][2]))
        harness.report("bad_checksum_refusals_per_s", rate, "refusals/s")
        harness.report("bad_checksum_redis_commands", sent, "commands")
    finally:
        redis_server.stop(settings)  # the benchmark's own Redis: nothing left running


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gateway"]:
        asyncio.run(gateway_worker(json.loads(sys.stdin.read()), float(sys.argv[2])))
    else:
        main()
