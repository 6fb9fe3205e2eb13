"""A Redis Cluster of three masters and three replicas (quotaflow stack up --redis-cluster):
gateways verify keys and check limits on it, processors count into it, and exactness holds
(over-admission 1.000); a master SIGKILLed mid-run is failed over to its replica and checks
resume, its orgs checked open or closed meanwhile as configured and every other org's
checked on, and the processor's counts are whole again once it writes them.

A stack of its own (one broker, the cluster's six nodes): marked `cluster`, run by
`make test-cluster`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from redis.cluster import RedisCluster

from quotaflow.core.redis_clients import sync_client
from quotaflow.core.settings import Settings
from quotaflow.deploy import redis_cluster, stack
from quotaflow.gateway.limiter import ALLOWED, RATE_LIMITED, UNAVAILABLE, RateLimiter, SyncRateLimiter
from quotaflow.schemas.redis_keys import ENFORCEMENT_KEY, ENFORCEMENT_OFF, ORG_TIER_FIELD, org_key, reservations_key
from tests.key_records import SECRETS_ENV, new_key
from tests.pipeline import (Pipeline, counted, decision, event, minute_start, publish, stack_of_its_own, this_minute,
                            unique, wait_for)

pytestmark = [pytest.mark.cluster, pytest.mark.stack]
NODE_TIMEOUT_MS = 1500


@pytest.fixture(scope="module")
def cluster_env(port_base, settings, tmp_path_factory) -> dict[str, str]:
    """A stack of its own with a Redis Cluster (ports of the spare stack's base: no other
    module's stack runs beside it in this worker), a master failed over after 1.5 s."""
    env = stack.isolated_env(port_base + 500, tmp_path_factory.mktemp("redis-cluster") / "state", settings.cache_dir,
                             redis_cluster=True)
    return {**env, **SECRETS_ENV, "QUOTAFLOW_REDIS_CLUSTER_NODE_TIMEOUT_MS": str(NODE_TIMEOUT_MS)}


@pytest.fixture(scope="module")
def cluster(cluster_env) -> Settings:
    with stack_of_its_own(cluster_env) as settings:
        yield settings


@pytest.fixture()
def client(cluster) -> RedisCluster:
    c = sync_client(cluster)
    assert isinstance(c, RedisCluster)
    yield c
    c.close()


def master_of(client: RedisCluster, key: str) -> int:
    return client.get_node_from_key(key).port


def org_on(client: RedisCluster, port: int, prefix: str = "org") -> str:
    """A new org whose keys (hash tag: the org) live on the master at ``port``."""
    while True:
        org = unique(prefix)
        if master_of(client, org_key(org)) == port:
            return org


def masters(cluster: Settings) -> list[redis_cluster.Node]:
    role = redis_cluster.roles(redis_cluster.nodes(cluster))
    return [node for node in redis_cluster.nodes(cluster) if role.get(node.n, ("",))[0] == "master"]


def test_the_stack_runs_three_masters_each_with_a_replica(cluster, client):
    everyone = redis_cluster.nodes(cluster)
    assert [n.port for n in everyone] == [cluster.redis_port + i for i in range(6)]
    assert [n.bus_port for n in everyone] == [cluster.redis_port + 10 + i for i in range(6)]
    assert cluster.redis_url == f"redis://127.0.0.1:{cluster.redis_port}"
    assert redis_cluster.ready(everyone)
    role = redis_cluster.roles(everyone)
    primaries = [n for n in everyone if role[n.n][0] == "master"]
    assert len(primaries) == 3 and all(len(role[n.n][1]) == 1 for n in primaries)
    with everyone[0].client() as c:
        info = redis_cluster.info(c)
        assert (info["cluster_state"], info["cluster_slots_assigned"], info["cluster_size"]) == ("ok", "16384", "3")
        assert c.config_get("cluster-node-timeout")["cluster-node-timeout"] == str(NODE_TIMEOUT_MS)
        assert c.config_get("cluster-require-full-coverage")["cluster-require-full-coverage"] == "no"
    status = {name: (running, where) for name, running, where in stack.status(cluster)}
    assert [name for name in status if name.startswith("redis")] == [f"redis-{n}" for n in range(1, 7)]
    assert all(status[f"redis-{n.n}"][0] and f"on 127.0.0.1:{n.port}" in status[f"redis-{n.n}"][1] for n in everyone)
    assert sum("master" in where for name, (_, where) in status.items() if name.startswith("redis")) == 3
    assert not stack.up(cluster)  # all running: nothing started


def test_keys_are_verified_and_limits_checked_on_every_master(cluster, client):
    """One org on each master; each check one script call in the org's slot (no CROSSSLOT),
    the switch read beside it from its own master: off, it reaches the orgs of all three."""
    orgs = [org_on(client, node.port) for node in masters(cluster)]
    keys = {org: new_key(client, org) for org in orgs}

    async def scenario():
        # a budget the loaded test machine never exceeds (as the gateway tests give theirs)
        limiter = RateLimiter.from_settings(cluster.model_copy(update={"gateway_timeout_ms": 5000}))
        try:
            verdicts = {org: [await limiter.verify(keys[org][0]) for _ in range(11)] for org in orgs}
            client.set(ENFORCEMENT_KEY, ENFORCEMENT_OFF)
            off = {org: await limiter.verify(keys[org][0]) for org in orgs}
            client.delete(ENFORCEMENT_KEY)
            again = {org: await limiter.verify(keys[org][0]) for org in orgs}
            return verdicts, off, again
        finally:
            client.delete(ENFORCEMENT_KEY)
            await limiter.aclose()

    minute_start(need_s=20)
    verdicts, off, again = asyncio.run(scenario())
    for org in orgs:  # FREE: 10 a minute
        rec = keys[org][1]
        assert [v.outcome for v in verdicts[org]] == [ALLOWED] * 10 + [RATE_LIMITED], org
        assert all((v.org_id, v.api_key_id) == (org, rec.key_id) for v in verdicts[org])
        assert all(v.enforced for v in verdicts[org])
        assert (off[org].outcome, off[org].enforced) == (ALLOWED, False)
        assert (again[org].outcome, again[org].enforced) == (RATE_LIMITED, True)
        assert client.zcard(reservations_key(org, rec.key_id)) == 10
    sync = SyncRateLimiter.from_settings(cluster)
    fresh = [org_on(client, node.port, "sync") for node in masters(cluster)]
    fresh_keys = [new_key(client, org)[0] for org in fresh]
    assert [sync.verify(k).outcome for k in fresh_keys] == [ALLOWED] * 3
    assert [sync.verify(keys[org][0]).outcome for org in orgs] == [RATE_LIMITED] * 3


def test_gateways_admit_exactly_the_limit_and_the_processor_counts_on_the_cluster(cluster, cluster_env, client):
    """Two orgs on two masters, two gateway processes each at 2x a STARTER key's 30/min:
    exactly 30 admitted per org (over-admission 1.000); the processor counts them into the
    cluster, releases the reservations and writes the decision that denies."""
    pipeline = Pipeline(cluster)
    try:
        pipeline.start("processor", **cluster_env)
        ports = [node.port for node in masters(cluster)][:2]
        orgs = [org_on(client, port) for port in ports]
        key = unique("key")
        for org in orgs:
            client.hset(org_key(org), ORG_TIER_FIELD, "STARTER")
        window_ms = minute_start(need_s=25)
        env = {**os.environ, **cluster_env, "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "5000"}
        workers = [subprocess.Popen([sys.executable, "-m", "tests.gateway_worker", org, key, "30"], env=env,
                                    stdout=subprocess.PIPE, text=True) for org in orgs for _ in range(2)]
        outputs = [w.communicate(timeout=120)[0].strip() for w in workers]
        assert all(w.returncode == 0 for w in workers), outputs
        assert all(o.endswith("enforced=True") for o in outputs), outputs
        admitted = [int(o.split()[0].split("=")[1]) for o in outputs]
        assert [admitted[0] + admitted[1], admitted[2] + admitted[3]] == [30, 30]  # over-admission 1.000
        for org in orgs:
            wait_for(lambda: counted(client, org, key, window_ms) == 30, 60, "the processor to count the 30",
                     pipeline.logs)
            wait_for(lambda: client.zcard(reservations_key(org, key)) == 0, 30, "reservations to be released")
            assert counted(client, org, None, window_ms) == 30  # the refusals are not counted
            d = decision(client, org, key)
            assert (d.allowed, d.denied_by, d.limit) == (False, "key:60s", 30)
        assert pipeline.state("processor").restarts == 0
        # each batch was acknowledged by a replica before Kafka (WAIT on the masters written to)
        assert sum(node.client().info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
                   for node in masters(cluster)) > 0
        assert pipeline.metric("processor", 'quotaflow_redis_unreplicated_calls_total{what="processor_counts"}') == 0
    finally:
        pipeline.stop_all()


def test_a_master_killed_mid_run_fails_over_and_checks_resume_with_counts_whole(cluster, cluster_env, client):
    """SIGKILL the master holding the enforcement switch's slot while the processor counts
    a stream of one of its orgs. Until its replica takes over, that org's checks fail open
    (admitted, enforced=False) or closed (429, unavailable) as each limiter is configured;
    an org of another master is checked and enforced throughout (the switch's master being
    dead costs it nothing). After the failover its checks are enforced again, the processor
    (never restarted) goes on, and once it has written the org's counts again every event
    published is counted: the counts are the processor's, rewritten whole by each batch."""
    switch_port = master_of(client, ENFORCEMENT_KEY)
    victim = next(node for node in masters(cluster) if node.port == switch_port)
    replica = redis_cluster.replica_of(cluster, victim)
    other_port = next(node.port for node in masters(cluster) if node.port != switch_port)
    org, other = org_on(client, switch_port, "victim"), org_on(client, other_port, "other")
    quiet = org_on(client, switch_port, "quiet")  # counted before the kill, no event after it
    key = unique("key")
    ts = this_minute()
    pipeline = Pipeline(cluster)
    try:
        pipeline.start("processor", **cluster_env)
        asyncio.run(publish(cluster, [event(quiet, key, ts) for _ in range(300)]))
        wait_for(lambda: counted(client, quiet, key, ts, "86400s") == 300, 60, "the quiet org's 300", pipeline.logs)
        client.hset(org_key(other), ORG_TIER_FIELD, "ENTERPRISE")  # checked every 20 ms: 500 a minute
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISH, org, key, str(ts), str(STREAMED)],
                                     env={**os.environ, **cluster_env})
        wait_for(lambda: (counted(client, org, key, ts, "86400s") or 0) > 0, 60, "the processor to count",
                 pipeline.logs)

        async def checks() -> dict:
            # A budget of 1 s, not 50 ms: during the outage each check after one that found the
            # dead node reads the cluster's shape again first (redis-py), which a loaded test
            # machine can make slower than 50 ms; what is tested here is which org is checked.
            gateway = cluster.model_copy(update={"gateway_timeout_ms": 1000})
            open_ = RateLimiter.from_settings(gateway)
            closed = RateLimiter.from_settings(gateway.model_copy(update={"gateway_fail_open": False}))
            sync = SyncRateLimiter.from_settings(gateway)
            out: dict = {"victim_open": [], "victim_closed": [], "other": [], "sync_victim": [], "sync_other": [],
                         "other_ms": []}
            try:
                # running gateways: their clients know the cluster (one that first connects
                # while the master of slot 0 is down cannot start until the failover: README)
                assert all([(await open_.check(unique("k"), other)).enforced,
                            (await closed.check(unique("k"), other)).enforced])
                os.kill(victim.proc.pid(), signal.SIGKILL)
                killed_at = time.monotonic()
                while time.monotonic() - killed_at < 30:
                    at = time.monotonic() - killed_at
                    v_open = await open_.check(key, org)
                    out["victim_open"].append((at, v_open))
                    out["victim_closed"].append((at, await closed.check(key, org)))
                    started = time.monotonic()
                    out["other"].append((at, await open_.check(unique("k"), other)))
                    out["other_ms"].append((time.monotonic() - started) * 1000)
                    if v_open.enforced and at > NODE_TIMEOUT_MS / 1000:
                        break  # the replica answers for the org again
                    await asyncio.sleep(0.02)
                out["sync_victim"].append(sync.check(unique("k"), org))
                out["sync_other"].append(sync.check(unique("k"), other))
                return out
            finally:
                await open_.aclose()
                await closed.aclose()

        seen = asyncio.run(checks())
        assert victim.proc.pid() is None
        redis_cluster.wait_promoted(cluster, victim, replica, 30)
        # what the processor had acknowledged before the kill is on the promoted replica,
        # without being written again (each batch waits for a replica: processors/backend.py)
        assert counted(client, quiet, key, ts, "86400s") == 300
        down = [(at, d) for at, d in seen["victim_open"] if not d.enforced]
        assert down, "the killed master's org was never unavailable: the kill did not land"
        outage_s = down[-1][0]
        assert outage_s < 15, outage_s
        # meanwhile: its org fails open in one limiter, closed in the other ...
        assert all(d.allowed and d.denied_by == "" for _, d in down)
        closed_down = [d for at, d in seen["victim_closed"] if at <= outage_s and not d.enforced]
        assert closed_down and all((d.allowed, d.denied_by) == (False, UNAVAILABLE) for d in closed_down)
        # ... and the other master's org is checked and enforced all along
        assert all(d.allowed and d.enforced for _, d in seen["other"]), [d for _, d in seen["other"] if not d.enforced]
        print(f"redis_failover_s: {outage_s:.2f} s; checks of another master's org during it: "
              f"{len(seen['other'])}, slowest {max(seen['other_ms']):.1f} ms")
        # after the failover: enforced again, the sync limiter too (a fresh client)
        assert seen["victim_open"][-1][1].enforced
        sync_victim, sync_other = seen["sync_victim"][0], seen["sync_other"][0]
        assert (sync_victim.allowed, sync_victim.enforced) == (False, True)  # the stream is over its limits
        assert sync_victim.denied_by.startswith("org:")
        assert (sync_other.allowed, sync_other.enforced) == (True, True)

        assert publisher.wait(120) == 0
        more = [event(org, key, ts) for _ in range(100)]
        asyncio.run(publish(cluster, more))  # a batch after the failover: the org's counts written again
        total = STREAMED + len(more)
        wait_for(lambda: counted(client, org, key, ts, "86400s") == total, 90,
                 f"the processor to count all {total} events after the failover", pipeline.logs)
        assert counted(client, org, None, ts, "86400s") == total
        assert pipeline.state("processor").restarts == 0
    finally:
        if publisher.poll() is None:
            publisher.kill()
        pipeline.stop_all()
    # the killed node comes back as a replica of its old replica
    assert stack.up(cluster) == ["redis"]
    role = redis_cluster.roles(redis_cluster.nodes(cluster))
    assert role[victim.n][0] == "slave" and role[victim.n][1] == replica.port
    assert redis_cluster.ready(redis_cluster.nodes(cluster))


STREAMED = 2000
# A stream of events of one key, records of 20, about 15 records a second (the master is
# killed while it runs): python -c PUBLISH ORG KEY TS_MS N
PUBLISH = """
import asyncio, sys
from quotaflow.collector.emitter import Emitter
from quotaflow.core.settings import get_settings
from tests.pipeline import event
org, key, ts, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main():
    async with Emitter(get_settings().kafka_bootstrap, batch_events=20) as emitter:
        for i in range(n):
            await emitter.emit(event(org, key, ts))
            if i % 20 == 19:
                await emitter.flush()
                await asyncio.sleep(0.05)
        assert emitter.failed == 0

asyncio.run(main())
"""
