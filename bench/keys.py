"""API key benchmark: what verifying a key costs a gateway's check, and how fast fakes are
refused. Run: .venv/bin/python bench/keys.py

Brings up a stack of its own; for the latency figures it writes key records as the
registry's materializer writes them (KeyRecord.to_redis at redis_keys.api_key_record),
then runs GATEWAYS processes that each, per key and tick, make one id-based check
(RateLimiter.check, the reference: trusted mode) and one verified check (RateLimiter.verify:
the key's HMAC, its record, state, expiry, scope, then the same limits), in alternating
order, on the same keys and orgs, under the same load. Each process presents its keys over and
over, as a gateway's clients do: after the warm-up, a key's HMAC comes from the process's cache
(gateway/key_names.py; a key seen for the first time costs its parse and HMAC, a few us more),
while its record is read from Redis on every call. Prints `name: value unit` lines:
  check_p50_ms, check_p99_ms                 RateLimiter.check(key_id, org_id)
  verify_check_p50_ms, verify_check_p99_ms   RateLimiter.verify(key, scope): one round trip too
  verify_vs_check_p50_ratio, _p99_ratio      goal: at most 1.10
  bad_checksum_refusals_per_s                verify() of keys with a wrong checksum, one process
  bad_checksum_redis_commands                commands Redis received meanwhile (INFO commandstats; goal 0)
  revocation_visible_p50_ms, _p99_ms         `revoke` issued (Registry.revoke, as `quotaflow keys revoke`
                                             and the admin API call it) -> every one of GATEWAYS gateway
                                             processes, each verifying the keys in a loop, refuses the key
                                             (goal p99 <= 1000); with its parts: the broker's acknowledgement
                                             (revoke_publish_*) and the processor writing Redis
                                             (revoke_materialize_*), and the gateways' refusals
                                             after the command returned (revocation_after_return_p99_ms: 0
                                             when every gateway refused before it returned)

The revocations run on the whole stack (Kafka, Redis, the processor materializing the keys
topic); the keys are made with the registry (Registry.create).
"""

from __future__ import annotations

import asyncio
import json
import os
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


REVOKED_KEYS = 40
REVOKE_GAP_S = 0.1  # between two revocations: the gateways' loops see one at a time


async def watch_worker(keys: list[list[str]]) -> None:
    """One gateway process verifying every key not refused yet, in a loop, until each is
    refused (or 120 s); prints {key_id: the wall time it first refused the key}."""
    from quotaflow.gateway.limiter import ALLOWED, REVOKED_KEY, RateLimiter

    limiter = RateLimiter.from_settings(harness.get_settings())
    for _, _, key in keys:
        if (await limiter.verify(key, SCOPE)).outcome != ALLOWED:
            raise SystemExit("a key was refused before its revocation: the benchmark's setup is wrong")
    print("ready", flush=True)
    refused: dict[str, float] = {}
    pending = {key_id: key for _, key_id, key in keys}
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for key_id, key in list(pending.items()):
            outcome = (await limiter.verify(key, SCOPE)).outcome
            if outcome != ALLOWED:
                if outcome != REVOKED_KEY:
                    raise SystemExit(f"a key was refused as {outcome}, not revoked")
                refused[key_id] = time.time()
                del pending[key_id]
    await limiter.aclose()
    print(json.dumps(refused), flush=True)


async def revocations(settings) -> dict[str, list[float]]:
    """Create REVOKED_KEYS keys with the registry, start GATEWAYS watching processes, revoke
    the keys one by one; per revocation: issue -> every gateway refuses, its parts."""
    from quotaflow.keys.registry import Registry

    async with Registry(settings, wait_s=30) as registry:
        keys = []
        for n in range(REVOKED_KEYS):
            issued = await registry.create(f"revoke-org{n % 8}", f"bench {n}", scopes=[SCOPE], actor="bench")
            if issued.published.visible_ms is None:
                raise SystemExit("the processor did not apply a created key within 30 s")
            keys.append((issued.record.org_id, issued.record.key_id, issued.key))
        procs = [subprocess.Popen([sys.executable, __file__, "--watch"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(GATEWAYS)]
        for p in procs:
            p.stdin.write(json.dumps(keys))
            p.stdin.close()
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("a watching gateway failed to start")
        issued_at, returned_at, publish, materialize = {}, {}, [], []
        for org, key_id, _ in keys:
            issued_at[key_id] = time.time()
            t0 = time.perf_counter()
            changed = await registry.revoke(org, key_id, actor="bench")
            returned_at[key_id] = time.time()
            if changed.published is None or changed.published.visible_ms is None:
                raise SystemExit("a revocation was not applied within 30 s")
            materialize.append(changed.published.visible_ms)
            publish.append((time.perf_counter() - t0) * 1000 - changed.published.visible_ms)
            await asyncio.sleep(REVOKE_GAP_S)
    seen = []
    for p in procs:
        out = p.stdout.read()
        if p.wait(timeout=150) != 0:
            raise SystemExit(f"a watching gateway failed (exit {p.returncode})")
        seen.append(json.loads(out))
    visible = [(max(s[k] for s in seen) - issued_at[k]) * 1000 for k in issued_at]
    after = [max(0.0, (max(s[k] for s in seen) - returned_at[k]) * 1000) for k in issued_at]
    return {"visible": visible, "after": after, "publish": publish, "materialize": materialize}


def main() -> None:
    import uuid

    from quotaflow.deploy import stack

    print("bringing up the benchmark's stack...", file=sys.stderr, flush=True)
    settings = harness.up()
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
        # Started only now: its own Redis commands (the key registry's watch) would count above.
        stack.start_pipeline_process(settings, "processor")
        print(f"revocations: {REVOKED_KEYS} keys, {GATEWAYS} gateways verifying them...", file=sys.stderr, flush=True)
        got = asyncio.run(revocations(settings))
        harness.report("revocation_visible_p50_ms", pct(got["visible"], 50), "ms")
        harness.report("revocation_visible_p99_ms", pct(got["visible"], 99), "ms")
        harness.report("revoke_publish_p50_ms", pct(got["publish"], 50), "ms")
        harness.report("revoke_materialize_p50_ms", pct(got["materialize"], 50), "ms")
        harness.report("revoke_materialize_p99_ms", pct(got["materialize"], 99), "ms")
        harness.report("revocation_after_return_p99_ms", pct(got["after"], 99), "ms")
    finally:
        stack.down(settings)  # the benchmark's own stack: nothing left running


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gateway"]:
        asyncio.run(gateway_worker(json.loads(sys.stdin.read()), float(sys.argv[2])))
    elif sys.argv[1:2] == ["--watch"]:
        asyncio.run(watch_worker(json.loads(sys.stdin.read())))
    else:
        main()
