"""Rate-limiting benchmark: exactness under concurrency, check latency, decision lag,
processor throughput. Run: .venv/bin/python bench/ratelimit.py [--phases admission,lag,throughput]

Prints `name: value unit` lines:
  over_admission_ratio           admitted / limit, worst window of any key, for quotaflow (goal 1.000)
  baseline_over_admission_ratio  the same for a synchronous Redis sliding-window limiter of the usual kind
  check_p50_ms, check_p99_ms     latency of RateLimiter.check under that load
  baseline_check_p50_ms/_p99_ms  latency of the baseline's check under the same load (both publish each
                                 request's event from the same event loop, as a metering gateway does)
  decision_lag_p50_ms/_p99_ms    event time to the processor's count visible in Redis, at 10k events/s
  processor_events_per_s         one processor process working through a backlog
  baseline_consume_events_per_s  a bare aiokafka consumer decoding the same backlog (the ceiling)
  processor_single_event_records_per_s  the same with one event per Kafka record
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import harness

# One policy for the gateways and the processor of this run: a 10 s and a 30 s window,
# so several windows pass within a short run.
WINDOWS, LIMITS = "10,30", {"FREE": [100, 250]}
POLICY_ENV = {"QUOTAFLOW_WINDOWS": WINDOWS, "QUOTAFLOW_TIER_LIMITS": json.dumps(LIMITS),
              "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000"}
os.environ.update(POLICY_ENV)

from quotaflow.core import metrics  # noqa: E402
from quotaflow.collector.emitter import Emitter  # noqa: E402
from quotaflow.deploy import stack  # noqa: E402
from quotaflow.deploy.observe import PROCESSOR_BACKLOG_METRIC  # noqa: E402
from quotaflow.schemas.events import RequestEvent  # noqa: E402
from quotaflow.schemas.topics import EVENTS_TOPIC  # noqa: E402

GATEWAYS = 4
# The decision-lag phase publishes through Emitter.from_settings: its batching is
# QUOTAFLOW_COLLECTOR_BATCH_MS / _BATCH_EVENTS / _LINGER_MS (the run prints what it used).
KEYS = 20
LOAD_SECONDS = 30


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def event(org: str, key: str, ts_ms: int, event_id: str | None = None, status: int = 200) -> RequestEvent:
    return RequestEvent.new(event_id=event_id or str(uuid.uuid4()), ts_ms=ts_ms, org_id=org, api_key_id=key,
                            service="bench", endpoint="/v1/bench", method="GET", status=status, latency_ms=1.0,
                            request_bytes=0, response_bytes=100, client_ip="192.0.2.9", user_agent="bench")


# --- gateway workers (subprocesses) -------------------------------------------------------

async def baseline_check(client, key: str, limit: int, window_ms: int) -> bool:
    """The usual sliding-window log: trim, count, then add if under the limit. Each step is
    atomic; the three together are not, so concurrent gateways can all pass the count."""
    now = time.time() * 1000
    pipe = client.pipeline(transaction=True)
    pipe.zremrangebyscore(key, 0, now - window_ms)
    pipe.zcard(key)
    _, count = await pipe.execute()
    if count >= limit:
        return False
    await client.zadd(key, {uuid.uuid4().hex: now})
    await client.pexpire(key, window_ms)
    return True


async def gateway_worker(run: str, rate_per_key: float, seconds: float) -> None:
    """One gateway process checking every key with both limiters, in turns (which goes first
    alternates), so that both are measured under the same load at the same moments."""
    import redis.asyncio as aioredis

    from quotaflow.gateway.limiter import RateLimiter

    settings = harness.get_settings()
    limiter = RateLimiter.from_settings(settings)
    client = aioredis.Redis.from_url(settings.redis_url)
    # Both publish each request's event, as a gateway that meters usage does whatever limits
    # it: the same work beside the checks in the same event loop.
    emitter = Emitter(settings.kafka_bootstrap, batch_events=100)
    await emitter.start()

    async def ours(k: int) -> tuple[bool, int, str | None]:
        d = await limiter.check(f"{run}-key{k}", f"{run}-org{k}")
        return d.allowed, d.now_ms, d.event_id

    async def baseline(k: int) -> tuple[bool, int, str | None]:
        allowed = True
        for i, w in enumerate(WINDOWS.split(",")):
            allowed = allowed and await baseline_check(client, f"bl:{run}-key{k}:{w}", LIMITS["FREE"][i],
                                                       int(w) * 1000)
        return allowed, int(time.time() * 1000), None

    out: dict[str, dict[str, list]] = {m: {"decisions": [], "latencies": []} for m in ("quotaflow", "baseline")}
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate_per_key)
        while sent < due:
            for k in range(KEYS):
                turns = (("quotaflow", ours), ("baseline", baseline))
                for mode, check in (turns if (sent + k) % 2 else turns[::-1]):
                    t0 = time.perf_counter()
                    allowed, at_ms, event_id = await check(k)
                    out[mode]["latencies"].append((time.perf_counter() - t0) * 1000)  # the check alone
                    org = f"{run}-org{k}" if mode == "quotaflow" else f"{run}b-org{k}"  # counted apart
                    out[mode]["decisions"].append((f"{mode}:{k}", at_ms, allowed))
                    await emitter.emit(event(org, f"{run}-key{k}", at_ms, event_id, 200 if allowed else 429))
            sent += 1
        await asyncio.sleep(0.001)
    await emitter.stop()
    await limiter.aclose()
    await client.aclose()
    print(json.dumps(out))


def run_gateways(run: str) -> dict[str, tuple[list, list]]:
    """Decisions and latencies per limiter, from GATEWAYS processes."""
    # 5x the 10 s window's limit, shared by the gateways
    rate_per_key = 5 * LIMITS["FREE"][0] / 10 / GATEWAYS
    procs = [subprocess.Popen([sys.executable, __file__, "--gateway", run, str(rate_per_key), str(LOAD_SECONDS)],
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(GATEWAYS)]
    results: dict[str, tuple[list, list]] = {"quotaflow": ([], []), "baseline": ([], [])}
    for p in procs:
        out = json.loads(p.communicate(timeout=LOAD_SECONDS * 10)[0])
        for mode, (decisions, latencies) in results.items():
            decisions += out[mode]["decisions"]
            latencies += out[mode]["latencies"]
    return results


def worst_ratio(decisions: list, sliding: bool) -> float:
    """Admitted / limit in the worst window instance of any key and window length."""
    worst = 0.0
    by_key: dict[str, list[int]] = {}
    for key, at_ms, allowed in decisions:
        if allowed:
            by_key.setdefault(key, []).append(at_ms)
    for times in by_key.values():
        times.sort()
        for length_s, limit in zip((int(w) for w in WINDOWS.split(",")), LIMITS["FREE"], strict=True):
            length = length_s * 1000
            if sliding:  # most admissions inside any interval of the window's length
                best, lo = 0, 0
                for hi, t in enumerate(times):
                    while t - times[lo] >= length:
                        lo += 1
                    best = max(best, hi - lo + 1)
            else:
                counts: dict[int, int] = {}
                for t in times:
                    counts[t // length] = counts.get(t // length, 0) + 1
                best = max(counts.values())
            worst = max(worst, best / limit)
    return worst


# --- decision lag -----------------------------------------------------------------------------

async def producer_worker(run: str, rate: int, seconds: float, probes_per_s: int) -> None:
    """Background traffic at `rate` events/s over 1000 keys, plus probe events on keys of their own.
    Also what publishing cost: the records the emitter produced, and this process's CPU time
    (events are made from templates with ids made beforehand, so that it is mostly the emitter's)."""
    settings = harness.get_settings()
    probes = []
    templates = [event(f"{run}-bg{k % 100}", f"{run}-bgkey{k}", int(time.time() * 1000)) for k in range(1000)]
    ids = [str(uuid.uuid4()) for _ in range(int(rate * seconds) + rate)]
    records = 0
    async with Emitter.from_settings(settings) as emitter:
        submit = emitter.core.submit

        def counted(record, *args, **kwargs):
            nonlocal records
            records += 1
            return submit(record, *args, **kwargs)

        emitter.core.submit = counted
        cpu0 = time.process_time()
        start = time.monotonic()
        sent = probe_n = 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            now = int(time.time() * 1000)
            while sent < due:
                await emitter.emit(templates[sent % 1000]._replace(event_id=ids[sent], ts_ms=now))
                sent += 1
            if probe_n < int(elapsed * probes_per_s):
                org, key = f"{run}-probe{probe_n}", f"{run}-probekey{probe_n}"
                ts = int(time.time() * 1000)
                await emitter.emit(event(org, key, ts))
                probes.append((org, key, ts))
                probe_n += 1
            await asyncio.sleep(0.001)
        await emitter.flush()
        cpu_s = time.process_time() - cpu0
    print(json.dumps({"probes": probes, "sent": sent, "records": records, "cpu_s": cpu_s, "seconds": seconds}))


async def measure_lag(run: str, rate: int, seconds: float) -> list[float]:
    import redis.asyncio as aioredis

    from quotaflow.schemas.redis_keys import usage_key

    settings = harness.get_settings()
    client = aioredis.Redis.from_url(settings.redis_url)
    await client.config_set("notify-keyspace-events", "Kh")  # hash writes announce themselves
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"__keyspace@0__:qf:v1:{{{run}-probe*}}:usage:key:*")
    seen: dict[str, float] = {}

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "pmessage":
                channel = msg["channel"].decode().removeprefix("__keyspace@0__:")
                seen.setdefault(channel, time.time() * 1000)

    listener = asyncio.create_task(listen())
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--produce", run, str(rate), str(seconds), "10",
                                                stdout=asyncio.subprocess.PIPE, env=os.environ.copy())
    out, _ = await proc.communicate()
    report = json.loads(out)
    await asyncio.sleep(3)
    listener.cancel()
    await pubsub.aclose()
    await client.aclose()
    lags = [seen[usage_key(org, key)] - ts for org, key, ts in report["probes"] if usage_key(org, key) in seen]
    harness.report("decision_lag_sent_events_per_s", report["sent"] / seconds, "events/s")
    # What the publisher paid: records produced (the processor's unit of work) and its CPU
    harness.report("decision_lag_publish_records_per_s", report["records"] / seconds, "records/s")
    harness.report("decision_lag_publish_cpu_us_per_event", 1e6 * report["cpu_s"] / max(report["sent"], 1), "us")
    harness.report("decision_lag_publish_cpu_share", report["cpu_s"] / seconds, "cores")
    if len(lags) < len(report["probes"]):
        harness.report("decision_lag_probes_missing", len(report["probes"]) - len(lags), "probes")
    # Where the time goes: event time -> the broker's append time of its record (the
    # publisher: the emitter's batch timer, linger, the produce round trip), then append
    # -> its count visible in Redis (the processor: fetch, batch timer, work, write).
    appended = await append_times({org for org, _, _ in report["probes"]})
    publish = [appended[org] - ts for org, key, ts in report["probes"] if org in appended]
    process = [seen[usage_key(org, key)] - appended[org] for org, key, _ in report["probes"]
               if org in appended and usage_key(org, key) in seen]
    if publish and process:
        harness.report("decision_lag_publish_p50_ms", statistics.median(publish), "ms")
        harness.report("decision_lag_publish_p99_ms", pct(publish, 99), "ms")
        harness.report("decision_lag_process_p50_ms", statistics.median(process), "ms")
        harness.report("decision_lag_process_p99_ms", pct(process, 99), "ms")
    return lags


async def append_times(orgs: set[str]) -> dict[str, float]:
    """The broker's append time (LogAppendTime) of each org's first record on the events topic."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    settings = harness.get_settings()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    out: dict[str, float] = {}
    try:
        partitions = [TopicPartition(EVENTS_TOPIC, p) for p in range(settings.events_partitions)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        while True:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                for r in records:
                    org = r.key.decode() if r.key else ""
                    if org in orgs:
                        out.setdefault(org, r.timestamp)
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                return out
    finally:
        await consumer.stop()


# --- processor throughput -------------------------------------------------------------------

async def baseline_consume(n: int) -> float:
    """Events/s of a bare consumer that only reads and decodes: what Python gets out of Kafka."""
    from aiokafka import AIOKafkaConsumer

    from quotaflow.schemas.events import decode_record

    settings = harness.get_settings()
    consumer = AIOKafkaConsumer(EVENTS_TOPIC, bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    seen, start = 0, None
    while seen < n:
        batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
        if start is None and batch:
            start, cpu = time.perf_counter(), time.process_time()
        for records in batch.values():
            for r in records:
                seen += len(decode_record(r.value))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await consumer.stop()
    harness.report("baseline_consume_cpu_us_per_event", cpu * 1e6 / seen, "us")
    return seen / elapsed


def processor_throughput(settings, run: str, n: int, batch_events: int = 500) -> tuple[float, float]:
    """(events/s, CPU µs per event) of one processor process working through a backlog of n
    events published ``batch_events`` to a record (1: one event per record, as kcat or Kafka
    Connect publish). The CPU time is the process's own: what other work on a shared machine
    does to it is mostly waiting, which the rate shows and the CPU time does not."""
    name = "processor"
    stack.pipeline_proc(settings, name).stop()
    asyncio.run(harness.publish_backlog(settings.kafka_bootstrap, run, n, batch_events))
    port = settings.processor_metrics_port
    stack.start_pipeline_process(settings, name)

    def processed() -> tuple[float, float, float]:
        """(events handled, the processor's own backlog: records skipped included, its CPU seconds)."""
        m = metrics.scrape(port)
        return (sum(v for k, v in m.items() if k.startswith("quotaflow_processor_events_total{")
                    and 'outcome="refetch"' not in k),  # records dropped to be read again, not events
                m.get(PROCESSOR_BACKLOG_METRIC, float("nan")), m.get("process_cpu_seconds_total", float("nan")))

    first, deadline = None, time.monotonic() + 600
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the processor did not work through {n} events within 600 s; see its log")
        done, backlog, cpu = processed()
        if first is None and done > 0:
            first = (time.perf_counter(), done, cpu)
        if backlog == 0:  # its own offsets: the group's committed ones can lag behind what it applied
            break
        time.sleep(0.2)
    end, (total, _, cpu) = time.perf_counter(), processed()
    if total == first[1]:
        raise RuntimeError(f"{n} events were handled between two looks: too few to measure")
    return (total - first[1]) / (end - first[0]), (cpu - first[2]) * 1e6 / (total - first[1])


PHASES = ("admission", "lag", "throughput")


def main(phases: tuple[str, ...] = PHASES) -> None:
    print("bringing up the benchmark stack...", file=sys.stderr, flush=True)
    settings = harness.up()
    try:
        for name in stack.PIPELINE:
            stack.pipeline_proc(settings, name).stop()
        stack.start_pipeline_process(settings, "processor")
        run = uuid.uuid4().hex[:6]

        if "admission" in phases:
            print("over-admission: quotaflow and the baseline, in turns...", file=sys.stderr, flush=True)
            results = run_gateways(run)
            (ours, ours_lat), (base, base_lat) = results["quotaflow"], results["baseline"]
            harness.report("over_admission_ratio", worst_ratio(ours, sliding=False), "admitted/limit")
            harness.report("baseline_over_admission_ratio", worst_ratio(base, sliding=True), "admitted/limit")
            harness.report("check_p50_ms", pct(ours_lat, 50), "ms")
            harness.report("check_p99_ms", pct(ours_lat, 99), "ms")
            harness.report("baseline_check_p50_ms", pct(base_lat, 50), "ms")
            harness.report("baseline_check_p99_ms", pct(base_lat, 99), "ms")
            harness.report("checks_measured", len(ours_lat) + len(base_lat), "checks")

        if "lag" in phases:
            print("decision lag at 10k events/s...", file=sys.stderr, flush=True)
            harness.report("decision_lag_emitter_batch_ms", settings.collector_batch_ms, "ms")
            harness.report("decision_lag_emitter_batch_events", settings.collector_batch_events, "events")
            harness.report("decision_lag_emitter_linger_ms", settings.collector_linger_ms, "ms")
            batches_before = metrics.scrape(settings.processor_metrics_port)
            lags = asyncio.run(measure_lag(run, 10_000, 20))
            batches_after = metrics.scrape(settings.processor_metrics_port)
            n_batches = (batches_after.get("quotaflow_processor_batch_seconds_count", 0)
                         - batches_before.get("quotaflow_processor_batch_seconds_count", 0))
            if n_batches:
                harness.report("decision_lag_processor_batch_mean_ms", 1000 * (
                    batches_after["quotaflow_processor_batch_seconds_sum"]
                    - batches_before["quotaflow_processor_batch_seconds_sum"]) / n_batches, "ms")
                harness.report("decision_lag_processor_batches_per_s", n_batches / 20, "batches/s")
            harness.report("decision_lag_p50_ms", statistics.median(lags), "ms")
            harness.report("decision_lag_p99_ms", pct(lags, 99), "ms")

        if "throughput" in phases:
            print("processor throughput...", file=sys.stderr, flush=True)
            # Measure this phase's backlog alone, not what earlier phases left behind.
            deadline = time.monotonic() + 300
            while metrics.scrape(settings.processor_metrics_port).get(PROCESSOR_BACKLOG_METRIC) != 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            n = int(os.environ.get("BENCH_PROCESSOR_EVENTS", 500_000))
            rate, cpu = processor_throughput(settings, run, n)
            harness.report("processor_events_per_s", rate, "events/s")
            harness.report("processor_cpu_us_per_event", cpu, "us")
            harness.report("baseline_consume_events_per_s", asyncio.run(baseline_consume(n)), "events/s")
            # Seconds of work at tens of thousands of records/s: fewer would time mostly the start.
            single = int(os.environ.get("BENCH_SINGLE_EVENT_RECORDS", 100_000))
            rate, cpu = processor_throughput(settings, run + "s", single, batch_events=1)
            harness.report("processor_single_event_records_per_s", rate, "records/s")
            harness.report("processor_single_event_cpu_us_per_record", cpu, "us")
        stack.pipeline_proc(settings, "processor").stop()
    finally:
        stack.down(settings)  # the benchmark's own stack: nothing left running


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gateway"]:
        asyncio.run(gateway_worker(sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
    elif sys.argv[1:2] == ["--produce"]:
        asyncio.run(producer_worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
    else:
        chosen = tuple(sys.argv[sys.argv.index("--phases") + 1].split(",")) if "--phases" in sys.argv else PHASES
        main(chosen)
