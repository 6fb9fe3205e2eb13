"""Several processors in one consumer group (issue 17 item 5): throughput of one process and of
two on the same backlog, and what gateways admit while the group rebalances.

1. `processor_events_per_s`: one `quotaflow processor` process, alone in its group, working
   through a backlog of BENCH_PROCESSOR_EVENTS events (500 to a record, as the emitter
   publishes) on an events topic of BENCH_EVENTS_PARTITIONS partitions (8).
2. `processor_events_per_s_2_processes`: two processes of the group (each with its own
   metrics port and Faust directory), the same backlog. The reference is (1), in this run.
   Both are timed alike: the processes are started and settled first (the group Stable with
   all of them, backlogs read 0), Redis writes are paused (CLIENT PAUSE WRITE) while the
   backlog is published, so each holds at its first batch; the clock runs from the unpause
   until the processes' counters say every event of the backlog was counted.
3. `over_admission_ratio_during_rebalance`: gateways (4 tasks of one process, each checking
   every key) check 16 keys of 8 orgs, each org's two keys sharing its limit, at 2.5x the
   org's limit, for BENCH_REBALANCE_SECONDS (45): one processor at first, a second joining
   after a third of the time (partitions move from a live process), the first SIGKILLed
   after two thirds (its partitions wait for its session to end, 15 s, then move). The worst
   window of any key or org, admitted / limit (1.000: a limit filled exactly, never passed).
   Beside it: the checks, the admitted requests and how far the counts in Redis are from
   them (0: every admitted request counted once), the writes fenced (counts older than
   those in Redis: processors/write.lua).

Run: `.venv/bin/python bench/processors.py` (QUOTAFLOW_BENCH_PORT_BASE as every benchmark).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import harness

sys.path.insert(0, str(harness.ROOT))  # the drill shared with tests/test_processors_group.py

# The gateways' and processors' policy: a 10 s window (several pass in a run); the day's
# keeps every count for the reckoning; 60 s for Pipeline.wait_processor_applied's markers.
LIMIT = 20
POLICY_ENV = {"QUOTAFLOW_WINDOWS": "10,60,86400", "QUOTAFLOW_TIER_LIMITS": json.dumps({"FREE": [LIMIT, None, None]}),
              "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000",
              "QUOTAFLOW_EVENTS_PARTITIONS": os.environ.get("BENCH_EVENTS_PARTITIONS", "8")}
os.environ.update(POLICY_ENV)

import redis  # noqa: E402

from quotaflow.deploy import stack  # noqa: E402
from quotaflow.schemas.limits import policy_from_settings  # noqa: E402
from tests.broker_drill import spread_orgs  # noqa: E402
from tests.pipeline import Pipeline, counted, wait_for  # noqa: E402
from tests.rebalance_drill import (  # noqa: E402
    FENCED,
    GatewayLoad,
    Processor,
    admitted_per_day,
    group_state,
    scrape,
    worst_ratio,
)

EVENTS = int(os.environ.get("BENCH_PROCESSOR_EVENTS", "400000"))
REBALANCE_SECONDS = float(os.environ.get("BENCH_REBALANCE_SECONDS", "45"))


def settle(settings, procs: list[Processor], timeout_s: float = 180) -> None:
    """Every process in the group, the group Stable, every backlog read 0."""
    def settled() -> bool:
        state, members = asyncio.run(group_state(settings.kafka_bootstrap))
        return (state == "Stable" and members == len(procs) and all(p.ready() for p in procs)
                and all(scrape(p.port).get("quotaflow_processor_backlog_records") == 0 for p in procs))

    wait_for(settled, timeout_s, f"{len(procs)} processor(s) settled in the group",
             lambda: "\n".join(p.tail() for p in procs))


def throughput(settings, procs: list[Processor], run: str) -> float:
    """Events/s of ``procs`` together through a backlog of EVENTS events (see the module's doc)."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for p in procs:
            p.start()
        settle(settings, procs)
        client.client_pause(600_000, all=False)  # writes (scripts included) wait; reads go on
        try:
            asyncio.run(harness.publish_backlog(settings.kafka_bootstrap, run, EVENTS))
            before = sum(p.counted() for p in procs)
        finally:
            client.client_unpause()
        started = time.perf_counter()
        deadline = time.monotonic() + 600
        while sum(p.counted() for p in procs) < before + EVENTS:
            if time.monotonic() > deadline or any(p.proc.poll() is not None for p in procs):
                raise RuntimeError("the processors did not count the backlog:\n" + "\n".join(p.tail() for p in procs))
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        if len(procs) > 1:  # how the group split the backlog (by partitions: by orgs)
            print(f"# {len(procs)} processes counted {' + '.join(f'{p.counted():.0f}' for p in procs)} events "
                  f"(before the backlog: {before:.0f})", flush=True)
        return EVENTS / elapsed
    finally:
        for p in procs:
            p.stop()
        client.close()


def rebalance(settings, procs: list[Processor]) -> None:
    """Gateways checking while a processor joins, then one is SIGKILLed (see the module's doc)."""
    policy = policy_from_settings(settings)
    client = redis.Redis.from_url(settings.redis_url)
    first, second = procs
    try:
        first.start()
        settle(settings, [first])
        orgs = spread_orgs(settings.events_partitions, 1)
        keys = [(org, f"key-{k}") for org in orgs for k in range(2)]
        # each key at 1.25x the org's limit: the org, two keys, at 2.5x
        gateways = GatewayLoad(settings, keys, rate_per_key=1.25 * LIMIT / 10).start()
        started = time.monotonic()
        time.sleep(REBALANCE_SECONDS / 3)  # the load's own length: nothing to wait on but time
        second.start()
        joined = time.monotonic() - started
        time.sleep(max(0.0, started + 2 * REBALANCE_SECONDS / 3 - time.monotonic()))
        fenced = scrape(first.port).get(FENCED, 0.0)
        first.kill()
        killed = time.monotonic() - started
        time.sleep(max(0.0, started + REBALANCE_SECONDS - time.monotonic()))
        gateways.stop()
        Pipeline(settings).wait_processor_applied(client, timeout_s=180)
        fenced += scrape(second.port).get(FENCED, 0.0)
        want = admitted_per_day(gateways.decisions)
        off = sum(abs((counted(client, org, key, day, label="86400s") or 0) - n) for (org, key, day), n in want.items())
        print(f"# gateways: 4 tasks x {len(keys)} keys of {len(orgs)} orgs, org limit {LIMIT} per 10 s at 2.5x; "
              f"second processor joined at {joined:.1f} s, first SIGKILLed at {killed:.1f} s of "
              f"{REBALANCE_SECONDS:g} s", flush=True)
        harness.report("over_admission_ratio_during_rebalance", worst_ratio(gateways.decisions, policy, "FREE"),
                       "admitted/limit")
        harness.report("rebalance_checks", len(gateways.decisions), "checks")
        harness.report("rebalance_checks_failed_open", gateways.unenforced, "checks")
        harness.report("rebalance_admitted", gateways.admitted(), "requests")
        harness.report("rebalance_counts_off_by", off, "events")
        harness.report("rebalance_writes_fenced", fenced, "writes")
    finally:
        for p in procs:
            p.stop()
        client.close()


def main() -> None:
    print("bringing up the benchmark stack...", file=sys.stderr, flush=True)
    settings = harness.up()
    logs = Path(tempfile.mkdtemp(prefix="bench-processors-"))
    print(f"# machine: {os.cpu_count()} cores ({platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}), shared with other work: compare figures within this run", flush=True)
    print(f"# backlog: {EVENTS} events, 500 to a record, {settings.events_partitions} partitions; "
          f"processor logs in {logs}", flush=True)

    def procs(n: int, tag: str) -> list[Processor]:
        return [Processor(settings.processor_metrics_port + 2 * i, logs / f"{tag}-{i + 1}.log", {})
                for i in range(n)]

    try:
        run = uuid.uuid4().hex[:6]
        print("one processor...", file=sys.stderr, flush=True)
        one = throughput(settings, procs(1, "one"), run + "a")
        print("two processors...", file=sys.stderr, flush=True)
        two = throughput(settings, procs(2, "two"), run + "b")
        harness.report("processor_events_per_s", one, "events/s")
        harness.report("processor_events_per_s_2_processes", two, "events/s")
        harness.report("processor_scaling_2_processes", two / one, "x")
        print("over-admission while the group rebalances...", file=sys.stderr, flush=True)
        rebalance(settings, procs(2, "rebalance"))
    finally:
        stack.down(settings)


if __name__ == "__main__":
    main()
