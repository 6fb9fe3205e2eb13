"""Hostile input at the gateway's entrances (issue 11, findings 4, 5 and the gateway part of 8).

- Ids: one rule (schemas/ids.py) at every entrance; no two identities share a Redis key;
  every key of a check is in the org's hash slot (tested on a real Redis Cluster node too).
- Events: whatever a request holds, the middleware's event fits the schema, so an admitted
  request is always counted (end to end: real Kafka, real processor).
- Secrets: identity values and request values never reach the logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import threading

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from redis.crc import key_slot
from starlette.routing import Route

from quotaflow.collector.emitter import Emitter
from quotaflow.deploy.procs import wait_until
from quotaflow.gateway import request_event
from quotaflow.gateway.asgi import RateLimitMiddleware, header_identity
from quotaflow.gateway.limiter import SCRIPT, RateLimiter, SyncRateLimiter, _Check
from quotaflow.schemas.events import BYTES_MAX, ENDPOINT_MAX, METHODS, USER_AGENT_MAX, decode_record, validate
from quotaflow.schemas.ids import ID_PATTERN, ID_RULE, InvalidId, is_valid_id
from quotaflow.schemas.limits import Policy, Window
from quotaflow.schemas.redis_keys import (
    ENFORCEMENT_KEY,
    ENFORCEMENT_OFF,
    ORG_TIER_FIELD,
    Decision,
    org_key,
    overrides_key,
    reservations_key,
    seen_key,
    usage_key,
)
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.pipeline import counted, minute_start, read_all, stray_keys, unique, wait_for

ids = st.one_of(st.from_regex(ID_PATTERN, fullmatch=True),
                st.text(alphabet="ab0:._-", min_size=1, max_size=6)).filter(is_valid_id)  # short: collision-prone

# Ids the rule refuses; the first ones would alias keys ('}' ends the hash tag early).
HOSTILE_IDS = ["acme}:usage:key:web", "{acme}", "acme}", "a/b", "a b", "", "web\n", ".hidden", "ключ",
               "x" * 65, "x" * 100_000]
SENTINEL = "s3cr3t-Sentinel-7Q"  # stands for a secret: must never reach a log line


# --- ids and Redis keys -------------------------------------------------------------------------

ORG_KINDS = {"usage:org": lambda o, k: usage_key(o), "resv:org": lambda o, k: reservations_key(o),
             "org": lambda o, k: org_key(o), "seen": lambda o, k: seen_key(o, 1_795_000_000_000)}
KEY_KINDS = {"usage:key": usage_key, "resv:key": reservations_key, "overrides": overrides_key}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(ids, ids), min_size=2, max_size=6, unique=True))
def test_distinct_identities_never_share_a_redis_key(pairs):
    """Each Redis key name belongs to exactly one (kind, org) or (kind, org, key): distinct
    (org, key) pairs never share a key, and keys of different kinds never collide."""
    owner: dict[str, tuple] = {}
    for org, key in pairs:
        for kind, name_of in ORG_KINDS.items():
            assert owner.setdefault(name_of(org, key), (kind, org)) == (kind, org)
        for kind, name_of in KEY_KINDS.items():
            assert owner.setdefault(name_of(org, key), (kind, org, key)) == (kind, org, key)
    assert ENFORCEMENT_KEY not in owner


@settings(max_examples=400, deadline=None)
@given(ids, ids)
def test_every_key_one_check_touches_is_in_the_org_hash_slot(org, key):
    keys = _Check.keys(key, org)
    assert len(set(keys)) == 6 and ENFORCEMENT_KEY not in keys
    assert {key_slot(k.encode()) for k in keys} == {key_slot(org.encode())}


def test_the_check_script_touches_only_the_keys_it_is_given():
    """No key name inside check.lua (the emergency switch used to be KEYS[7], in no org's slot):
    the six keys of an org by id (trusted mode), or, verifying a key, the candidate records
    and the org's keys named from the layout the gateway passes (schemas/redis_keys.py)."""
    assert {int(i) for i in re.findall(r"KEYS\[(\d+)\]", SCRIPT)} <= {1, 2, 3, 4, 5, 6}
    assert "qf:" not in SCRIPT and "enforcement" not in SCRIPT.split("\n\n", 1)[1]


def _listener() -> tuple[socket.socket, list]:
    """A TCP port that records every connection made to it (and never answers)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted: list = []

    def accept() -> None:
        try:
            while True:
                accepted.append(srv.accept())
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    return srv, accepted


@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=lambda v: repr(v)[:24])
def test_the_limiters_refuse_an_id_that_breaks_the_rule_before_any_redis_call(bad):
    srv, accepted = _listener()
    port = srv.getsockname()[1]
    policy = Policy((Window(60),), {"FREE": (10,)})

    async def check(key: str, org: str):
        limiter = RateLimiter(aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.2), policy,
                              timeout_ms=200)
        try:
            return await limiter.check(key, org)
        finally:
            await limiter.aclose()

    sync = SyncRateLimiter(redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.2), policy)
    try:
        for key, org, field in ((bad, "acme", "api_key_id"), ("web", bad, "org_id")):
            with pytest.raises(InvalidId, match=rf"^{field}: must be {re.escape(ID_RULE)}"):
                asyncio.run(check(key, org))
            with pytest.raises(InvalidId, match=rf"^{field}: "):
                sync.check(key, org)
        # a valid id does reach Redis (here a silent one: the check answers 'unavailable')
        assert asyncio.run(check("web", "acme")).enforced is False
        assert wait_until(lambda: len(accepted) >= 1, 5)
    finally:
        srv.close()
    assert len(accepted) == 1  # only the valid check connected


@pytest.fixture()
def cluster_node(tmp_path, port_base):
    """A real Redis Cluster of one node holding every slot: it enforces what a cluster
    enforces (a Lua call's keys in one slot), so CROSSSLOT shows up here as in production."""
    # of this session's range (an ephemeral port may be too high: the cluster bus listens 10000 above)
    port = port_base + 395
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                             "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path),
                             "--save", "", "--appendonly", "no"], stdout=(tmp_path / "redis.log").open("wb"),
                            stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        assert wait_until(lambda: proc.poll() is not None or _pings(client), 20), (tmp_path / "redis.log").read_text()
        assert proc.poll() is None, (tmp_path / "redis.log").read_text()
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        assert wait_until(lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"), 20)
        yield port
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_checks_and_the_emergency_switch_work_on_a_redis_cluster(cluster_node):
    from redis.asyncio.cluster import RedisCluster
    from redis.cluster import RedisCluster as SyncRedisCluster

    policy = Policy((Window(60),), {"FREE": (2,)})
    org, key = unique("org"), unique("key")

    async def scenario():
        client = RedisCluster(host="127.0.0.1", port=cluster_node)
        limiter = RateLimiter(client, policy, timeout_ms=5000)
        # the switch used to be read inside the script: on a cluster that call is refused
        with pytest.raises(redis.ResponseError, match="CROSSSLOT|same slot"):
            await client.eval("return redis.call('GET', KEYS[2])", 2, org_key(org), ENFORCEMENT_KEY)
        on = [await limiter.check(key, org) for _ in range(3)]
        await client.set(ENFORCEMENT_KEY, ENFORCEMENT_OFF)
        off = [await limiter.check(key, org) for _ in range(2)]
        await client.delete(ENFORCEMENT_KEY)
        again = await limiter.check(key, org)
        reserved = await client.zcard(reservations_key(org, key))
        await client.aclose()
        return on, off, again, reserved

    minute_start(need_s=15)
    on, off, again, reserved = asyncio.run(scenario())
    assert [(d.allowed, d.enforced) for d in on] == [(True, True), (True, True), (False, True)]
    assert [(d.allowed, d.enforced, d.event_id) for d in off] == [(True, False, "")] * 2  # refused by the script
    assert (again.allowed, again.enforced, again.denied_by) == (False, True, "key:60s")
    assert reserved == 2
    sync = SyncRateLimiter(SyncRedisCluster(host="127.0.0.1", port=cluster_node), policy)
    assert [sync.check(unique("key"), unique("org")).allowed for _ in range(2)] == [True, True]


def test_keys_are_verified_on_a_redis_cluster_and_a_record_outside_its_slot_is_refused(cluster_node):
    """Verifying a key is one single-slot call on a real cluster: the record (in the slot of
    the key's hint) and the org's keys (named in the script from the record) share a slot.
    A record naming an org of another slot is refused as unknown, never admitted (not
    even failing open), and writes nothing."""
    from redis.asyncio.cluster import RedisCluster
    from redis.cluster import RedisCluster as SyncRedisCluster

    from quotaflow.gateway.limiter import ALLOWED, RATE_LIMITED, UNKNOWN_KEY
    from tests.key_records import SECRETS, new_key, record_name

    policy = Policy((Window(60),), {"FREE": (2,)})
    org, other = unique("org"), unique("other")
    while key_slot(other.encode()) == key_slot(org.encode()):
        other = unique("other")
    sync_client = SyncRedisCluster(host="127.0.0.1", port=cluster_node)
    key, rec = new_key(sync_client, org)
    misplaced, bad = new_key(sync_client, org)
    sync_client.hset(record_name(bad), "org_id", other)

    async def scenario():
        client = RedisCluster(host="127.0.0.1", port=cluster_node)
        limiter = RateLimiter(client, policy, timeout_ms=5000, fail_open=True, key_secrets=SECRETS)
        out = [await limiter.verify(key) for _ in range(3)] + [await limiter.verify(misplaced)]
        reserved = await client.zcard(reservations_key(org, rec.key_id))
        await client.aclose()
        return out, reserved

    minute_start(need_s=15)
    verdicts, reserved = asyncio.run(scenario())
    assert [(v.outcome, v.api_key_id) for v in verdicts[:3]] == [(ALLOWED, rec.key_id)] * 2 + [
        (RATE_LIMITED, rec.key_id)]
    assert (verdicts[3].outcome, verdicts[3].org_id, verdicts[3].enforced) == (UNKNOWN_KEY, "", True)
    assert reserved == 2
    assert sync_client.exists(reservations_key(other, bad.key_id), reservations_key(other)) == 0
    sync = SyncRateLimiter(sync_client, policy, key_secrets=SECRETS)
    assert [sync.verify(key).outcome, sync.verify(misplaced).outcome] == [RATE_LIMITED, UNKNOWN_KEY]
    sync_client.close()


def test_with_the_switch_off_a_reservation_made_is_kept_for_its_event(live_stack, redis_client):
    """Switch off: every request admitted; one the script would have admitted keeps its
    reservation (its event_id is published, and the processor releases it); one it
    would have refused reserves nothing."""
    org, key = unique("org"), unique("key")
    policy = Policy((Window(60),), {"FREE": (1,)})

    async def scenario():
        limiter = RateLimiter(aioredis.Redis.from_url(live_stack.redis_url), policy, timeout_ms=5000)
        await limiter._client.set(ENFORCEMENT_KEY, ENFORCEMENT_OFF)
        try:
            return [await limiter.check(key, org) for _ in range(2)]
        finally:
            await limiter._client.delete(ENFORCEMENT_KEY)
            await limiter.aclose()

    minute_start(need_s=10)
    first, second = asyncio.run(scenario())
    assert (first.allowed, first.enforced) == (second.allowed, second.enforced) == (True, False)
    assert first.event_id and not second.event_id
    members = {m.decode() for m in redis_client.zrange(reservations_key(org, key), 0, -1)}
    assert members == {first.event_id}


def test_a_lost_script_is_loaded_again(live_stack, redis_client):
    redis_client.script_flush()
    d = SyncRateLimiter(redis.Redis.from_url(live_stack.redis_url), Policy((Window(60),), {"FREE": (5,)})).check(
        unique("key"), unique("org"))
    assert (d.allowed, d.enforced, d.limit) == (True, True, 5)


@pytest.mark.parametrize("argv", [["org", "set-tier", "acme}:x", "FREE"], ["org", "get", "x" * 1000],
                                  ["key", "set-limit", "acme", "web}:usage:org", "60s", "5"],
                                  ["key", "show", "{acme}", "web"]])
def test_the_cli_refuses_ids_that_break_the_rule(live_stack, redis_client, argv):
    before = set(redis_client.scan_iter("qf:v1:*"))
    out = subprocess.run([sys.executable, "-m", "quotaflow", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("quotaflow: ") and ID_RULE in out.stderr
    assert set(redis_client.scan_iter("qf:v1:*")) - before == set()


# --- the events the middleware builds -----------------------------------------------------------

DECISION = Decision(allowed=True, tier="FREE", limit=10, remaining=9, reset_ms=1_795_000_060_000, window="key:60s",
                    denied_by="", now_ms=1_795_000_000_000, event_id="123e4567-e89b-42d3-a456-426614174000")

header_names = st.sampled_from([b"content-length", b"Content-Length", b"user-agent", b"x-other"])
header_values = st.one_of(st.binary(max_size=700), st.from_regex(rb"\A[0-9]{1,40}\Z"),
                          st.text(max_size=600).map(lambda t: t.encode("utf-8", "surrogatepass")))
scopes = st.fixed_dictionaries({
    "type": st.just("http"),
    "path": st.one_of(st.text(max_size=400), st.from_regex(r"\A(/[a-z0-9%{}:]{0,40}){0,12}\Z"),
                      st.lists(st.sampled_from(["42", "v1", "ä", "a b", "{id}", "DEADBEEFCAFEBABE00", "", "%"]),
                               max_size=80).map(lambda s: "/" + "/".join(s))),
    "method": st.one_of(st.sampled_from([*METHODS, "get", "PROPFIND", "", "G E T"]), st.text(max_size=20),
                        st.none(), st.integers()),
    "headers": st.lists(st.tuples(header_names, header_values), max_size=5),
    "client": st.one_of(st.none(), st.tuples(st.one_of(st.text(max_size=80), st.ip_addresses().map(str),
                                                       st.just("fe80::1%eth0")), st.integers(0, 65535))),
})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scope=scopes, status=st.one_of(st.integers(), st.none(), st.text(max_size=3), st.booleans(), st.floats()),
       response_bytes=st.integers(min_value=0, max_value=2**70), latency_ms=st.floats(0, 1e12))
def test_the_event_of_any_served_request_fits_the_schema(scope, status, response_bytes, latency_ms):
    event, normalised = request_event.build(scope, DECISION, api_key_id="web", org_id="acme", service="shop",
                                            status_code=status, response_bytes=response_bytes, latency_ms=latency_ms)
    ev = validate(event)  # raises SchemaError if the schema would refuse it
    assert validate(orjson.loads(ev.encode())) == ev
    assert len(normalised) == len(set(normalised))
    # what was not normalised is exactly what the request and the server said
    if "status" not in normalised:
        assert event["status"] == status
    if "method" not in normalised:
        assert event["method"] == scope["method"]
    if "endpoint" not in normalised:
        assert event["endpoint"] == scope["path"]
    if "response_bytes" not in normalised:
        assert event["response_bytes"] == response_bytes
    if "client_ip" not in normalised:
        assert event["client_ip"] == scope["client"][0]


template_segments = st.one_of(
    st.sampled_from(["{id}", "{item_id:int}", "{rest:path}", "café", "42", "a b", "v1", "x" * 50, "%", "", "2024"]),
    st.text(alphabet="abc é?#%:@-~!", max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.lists(template_segments, min_size=1, max_size=30))
def test_route_templates_the_schema_would_refuse_are_fitted_too(segments):
    """A framework's template is used as it is when the schema takes it, and fitted when not."""
    template = "/" + "/".join(segments)
    try:
        route = Route(template, lambda request: None)
    except (AssertionError, ValueError):  # a template Starlette itself refuses (a param named twice)
        assume(False)
    endpoint, normalised = request_event.endpoint({"type": "http", "path": "/x", "route": route})
    validate({**_good_event(), "endpoint": endpoint})
    assert normalised == (endpoint != template)
    assert len(endpoint) <= ENDPOINT_MAX


def _good_event() -> dict:
    return request_event.build({"type": "http", "path": "/", "method": "GET", "client": ("192.0.2.1", 1)}, DECISION,
                               api_key_id="web", org_id="acme", service="shop", status_code=200, response_bytes=0,
                               latency_ms=1.0)[0]


@pytest.mark.parametrize("raw, expected", [
    (b"512", (512, False)), (b"0", (0, False)), (b"0" * 5000 + b"7", (7, False)),
    (str(BYTES_MAX).encode(), (BYTES_MAX, False)),
    (b"9007199254740992", (BYTES_MAX, True)), (b"9" * 5000, (BYTES_MAX, True)),  # int() would refuse 5000 digits
    ("²".encode(), (0, True)), ("１２".encode(), (0, True)), ("٣".encode(), (0, True)),  # isdigit() takes these
    (b"-1", (0, True)), (b"+1", (0, True)), (b" 12", (0, True)), (b"1e3", (0, True)), (b"", (0, True)),
])
def test_content_length_is_read_as_ascii_digits_and_clamped(raw, expected):
    assert request_event.request_bytes({b"content-length": raw}) == expected


@pytest.mark.parametrize("path, endpoint", [
    ("/v1/users/42/orders", "/v1/users/{id}/orders"),
    ("/files/a b", "/files/a%20b"),
    ("/café/menü", "/caf%C3%A9/men%C3%BC"),
    ("/a%2Fb?x#y", "/a%252Fb%3Fx%23y"),  # a decoded path's '%' is not an escape; '?' and '#' are not a query
    ("", "/"), ("*", "/*"),
    ("/v1/" + "/".join(["segment"] * 60), "/v1/" + "/".join(["segment"] * 30) + "/{truncated}"),
    ("/" + "x" * 300, "/{truncated}"),
])
def test_paths_become_endpoints_the_schema_takes(path, endpoint):
    assert request_event.fit_endpoint(path) == endpoint
    validate({**_good_event(), "endpoint": endpoint})


# --- end to end: the real middleware, Kafka and processor ----------------------------------------

async def _asgi(app, scope: dict) -> tuple[int | None, bytes, BaseException | None]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    error = None
    try:
        await app(scope, receive, send)
    except Exception as exc:  # an application that crashed: its server answers 500
        error = exc
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    return (start["status"] if start else None), b"".join(m.get("body", b"") for m in sent[1:]), error


async def _service(scope, receive, send) -> None:
    """A service answering with the status its caller asks for (x-status), or crashing."""
    headers = dict(scope["headers"])
    if b"x-crash" in headers:
        raise RuntimeError("the service crashed")
    await send({"type": "http.response.start", "status": int(headers.get(b"x-status", b"200")), "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


# api_key_id -> (what the request has, the event's fields expected, the fields said to be normalised)
CASES = {
    "plain": ({}, {"endpoint": "/files/report", "request_bytes": 12, "method": "GET", "status": 200}, []),
    "cl-huge": ({"headers": [(b"content-length", b"9007199254740992")]}, {"request_bytes": BYTES_MAX},
                ["request_bytes"]),
    "cl-superscript": ({"headers": [(b"content-length", "²".encode())]}, {"request_bytes": 0}, ["request_bytes"]),
    "cl-negative": ({"headers": [(b"content-length", b"-5")]}, {"request_bytes": 0}, ["request_bytes"]),
    "path-space": ({"path": f"/files/{SENTINEL} copy"}, {"endpoint": f"/files/{SENTINEL}%20copy"}, ["endpoint"]),
    "path-non-ascii": ({"path": "/café/menü"}, {"endpoint": "/caf%C3%A9/men%C3%BC"}, ["endpoint"]),
    "path-raw-ids": ({"path": "/orders/12345/lines/123e4567-e89b-42d3-a456-426614174000"},
                     {"endpoint": "/orders/{id}/lines/{id}"}, ["endpoint"]),
    "path-long": ({"path": "/" + "/".join(["segment"] * 60)},
                  {"endpoint": "/" + "/".join(["segment"] * 30) + "/{truncated}"}, ["endpoint"]),
    "ua-not-utf8": ({"headers": [(b"user-agent", b"bot \xff\xfe")]}, {"user_agent": "bot \ufffd\ufffd"},
                    ["user_agent"]),
    "ua-long": ({"headers": [(b"user-agent", SENTINEL.encode() * 100)]},
                {"user_agent": (SENTINEL * 100)[:USER_AGENT_MAX]}, ["user_agent"]),
    "status-600": ({"headers": [(b"x-status", b"600")]}, {"status": 500}, ["status"]),
    "app-crash": ({"headers": [(b"x-crash", b"1")]}, {"status": 500}, []),
    "method-webdav": ({"method": "PROPFIND"}, {"method": "OTHER"}, ["method"]),
    "method-lower": ({"method": "get"}, {"method": "GET"}, ["method"]),
    "client-unix": ({"client": None}, {"client_ip": "0.0.0.0"}, ["client_ip"]),
    "client-name": ({"client": ("testclient", 50000)}, {"client_ip": "0.0.0.0"}, ["client_ip"]),
    "client-zone": ({"client": ("fe80::1%eth0", 50000)}, {"client_ip": "fe80::1"}, ["client_ip"]),
}


def _scope(org: str, key: str, case: dict) -> dict:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/files/report", "raw_path": b"/files/report", "query_string": f"token={SENTINEL}".encode(),
             "root_path": "", "client": ("203.0.113.7", 5000), "server": ("shop", 80),
             "headers": [(b"x-api-key-id", key.encode()), (b"x-org-id", org.encode()), (b"content-length", b"12"),
                         (b"authorization", f"Bearer {SENTINEL}".encode())]}
    scope.update({k: v for k, v in case.items() if k != "headers"})
    scope["headers"] = scope["headers"] + case.get("headers", [])
    return scope


def _normalised(field: str) -> float:
    return REGISTRY.get_sample_value("quotaflow_gateway_normalised_total", {"field": field}) or 0.0


def test_every_admitted_request_is_counted_whatever_it_holds(live_stack, redis_client, pipeline, caplog):
    """Each case is one key of one org: the request is admitted, its event is published
    valid (nothing dead-lettered), says which fields were normalised, and the processor
    counts it and releases its reservation. Requests with ids that break the rule get a
    400 naming the header and the rule and leave nothing behind. No value reaches a log.
    (The trusted mode, identity from X-Api-Key-Id / X-Org-Id: what is tested here is the
    event, whoever the identity was verified by.)"""
    org = unique("org")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "ENTERPRISE")
    fields = ("endpoint", "method", "status", "request_bytes", "user_agent", "client_ip", "latency_ms",
              "response_bytes")
    before = {f: _normalised(f) for f in fields}
    bad = [(f"web}}:{SENTINEL}", org), ("web", f"{org}}}:x"), (SENTINEL * 10, org), ("web", "ключ")]

    async def scenario():
        # a budget no loaded machine reaches: a check that failed open would admit without a reservation
        limiter = RateLimiter.from_settings(live_stack.model_copy(update={"gateway_timeout_ms": 5000}))
        async with Emitter(live_stack.kafka_bootstrap) as emitter:
            app = RateLimitMiddleware(_service, limiter, emitter, service="shop", identify=header_identity)
            answers = {key: await _asgi(app, _scope(org, key, case)) for key, (case, _, _) in CASES.items()}
            refusals = [await _asgi(app, _scope(o, k, {})) for k, o in bad]
            await emitter.flush()
            stats = (emitter.delivered, emitter.dead_lettered, emitter.failed)
        await limiter.aclose()
        return answers, refusals, stats

    caplog.set_level(logging.DEBUG)
    minute_start(need_s=40)
    answers, refusals, (delivered, dead_lettered, failed) = asyncio.run(scenario())
    assert {k: a[0] for k, a in answers.items()} == {k: (None if k == "app-crash" else 600 if k == "status-600"
                                                         else 200) for k in CASES}
    assert isinstance(answers["app-crash"][2], RuntimeError)
    for (status, body, _), (key, key_org) in zip(refusals, bad):
        reason = orjson.loads(body)["reason"]
        assert status == 400 and reason.startswith("X-Api-Key-Id: " if key != "web" else "X-Org-Id: ")
        assert ID_RULE in reason and SENTINEL not in reason and key not in reason and key_org not in reason
    assert (delivered, dead_lettered, failed) == (len(CASES), 0, 0)

    records = [r for r in asyncio.run(read_all(live_stack, EVENTS_TOPIC)) if r.key == org.encode()]
    events = [ev for r in records for ev in decode_record(r.value)]
    assert all(not isinstance(ev, Exception) for ev in events), [str(ev) for ev in events if isinstance(ev, Exception)]
    by_key = {ev.api_key_id: ev for ev in events}
    assert sorted(by_key) == sorted(CASES) and len(events) == len(CASES)
    for key, (_, expected, _) in CASES.items():
        assert {f: getattr(by_key[key], f) for f in expected} == expected, key
    reserved = {m.decode() for key in CASES for m in redis_client.zrange(reservations_key(org, key), 0, -1)}
    assert {ev.event_id for ev in events} == reserved  # every event releases its request's reservation

    # which fields were normalised: counted per field, and named (names only) in the log
    expected_counts = {f: sum(f in said for _, _, said in CASES.values()) for f in fields}
    assert {f: _normalised(f) - before[f] for f in fields} == expected_counts
    said = [r for r in caplog.records if r.name == "quotaflow.gateway.request_event"]
    assert {tuple(r.fields) for r in said} == {tuple(s) for _, _, s in CASES.values() if s}
    assert all(r.service == "shop" for r in said)
    # aiokafka's own debug lines print whole records (the events, as Kafka carries them): left out
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if not r.name.startswith("aiokafka"))
    assert SENTINEL not in logged and "café" not in logged and "ключ" not in logged
    assert stray_keys(redis_client, bad) == []

    window = min(ev.ts_ms for ev in events) // 60_000 * 60_000
    pipeline.start("processor")
    wait_for(lambda: all(redis_client.zcard(reservations_key(org, key)) == 0 for key in CASES), 90,
             "every reservation released", pipeline.logs)
    assert {key: counted(redis_client, org, key, window) for key in CASES} == {key: 1 for key in CASES}
    assert counted(redis_client, org, None, window) == len(CASES)


def test_a_custom_identity_that_breaks_the_rule_is_refused_naming_the_field():
    srv, accepted = _listener()
    limiter = RateLimiter(aioredis.Redis(host="127.0.0.1", port=srv.getsockname()[1]),
                          Policy((Window(60),), {"FREE": (10,)}), timeout_ms=200)
    app = RateLimitMiddleware(_service, limiter, None, service="shop", identify=lambda scope: ("web", "{acme}"))
    try:
        status, body, _ = asyncio.run(_asgi(app, _scope("acme", "web", {})))
    finally:
        srv.close()
    assert status == 400 and orjson.loads(body)["reason"].startswith("org_id: must be ")
    assert accepted == []
    with pytest.raises(InvalidId, match="^service: "):
        RateLimitMiddleware(_service, limiter, None, service="shop floor")


def test_the_gateway_server_logs_no_identity_or_header_value(tmp_path, live_stack):
    """`quotaflow gateway` at debug level in the trusted mode, fed hostile identities and
    headers: none of their values appears in its log."""
    import httpx

    from quotaflow.deploy.procs import Proc

    log_path = tmp_path / "gateway.log"
    proc = Proc("gateway-secrets", tmp_path / "run")
    port = live_stack.gateway_port + 1
    env = {**os.environ, "QUOTAFLOW_GATEWAY_PORT": str(port), "QUOTAFLOW_LOG_LEVEL": "DEBUG",
           "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000", "QUOTAFLOW_GATEWAY_TRUST_IDENTITY_HEADERS": "true"}
    proc.start([sys.executable, "-m", "quotaflow", "gateway"], log_path, marker="quotaflow gateway", env=env)
    base = f"http://127.0.0.1:{port}"
    org = unique("org")
    try:
        assert wait_until(lambda: _serving(base + "/healthz"), 30), log_path.read_text()
        with httpx.Client(base_url=base, timeout=10) as client:
            answers = [
                client.get("/check", headers={"X-Api-Key-Id": f"{SENTINEL}}}:x", "X-Org-Id": "acme"}),
                client.get("/check", headers={"X-Api-Key-Id": "web", "X-Org-Id": SENTINEL * 50}),
                client.get("/check", headers={"X-Api-Key-Id": SENTINEL * 3000, "X-Org-Id": "acme"}),
                client.get(f"/check?token={SENTINEL}", headers={"X-Api-Key-Id": SENTINEL, "X-Org-Id": org,
                                                                "Authorization": f"Bearer {SENTINEL}"}),
                client.get(f"/nothing/{SENTINEL}", headers={"Cookie": f"session={SENTINEL}"}),
            ]
            with socket.create_connection(("127.0.0.1", port)) as s:  # not HTTP at all
                s.sendall(f"{SENTINEL} {SENTINEL}\r\n\r\n".encode())
                assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    finally:
        proc.stop()
    assert [a.status_code for a in answers] == [400, 400, 431, 200, 404]
    text = log_path.read_text()
    assert "Invalid HTTP request" in text  # the log did record the refusals, without values
    assert SENTINEL not in text


def _serving(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_gateway_server_logs_no_api_key(tmp_path, live_stack, redis_client):
    """`quotaflow gateway` at debug level verifying keys, fed good, revoked, mistyped,
    unknown and doubled keys in both headers, and a Redis that fails: no key (nor any part
    of one beyond the display prefix) appears in its log, and no answer repeats one."""
    import httpx

    from quotaflow.deploy.procs import Proc
    from quotaflow.schemas.api_keys import REVOKED, display_prefix, generate
    from tests.key_records import SECRETS_ENV, new_key

    org = unique("org")
    good, _ = new_key(redis_client, org, scopes=("a",))
    revoked, _ = new_key(redis_client, org, state=REVOKED)
    unknown = generate(org)
    mistyped = good[:-1] + ("x" if good[-1] != "x" else "y")
    keys = [good, revoked, unknown, mistyped]
    log_path = tmp_path / "gateway.log"
    proc = Proc("gateway-keys", tmp_path / "run")
    port = live_stack.gateway_port + 2
    env = {**os.environ, **SECRETS_ENV, "QUOTAFLOW_GATEWAY_PORT": str(port), "QUOTAFLOW_LOG_LEVEL": "DEBUG",
           "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000"}
    proc.start([sys.executable, "-m", "quotaflow", "gateway"], log_path, marker="quotaflow gateway", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _serving(base + "/healthz"), 30), log_path.read_text()
        with httpx.Client(base_url=base, timeout=10) as client:
            answers = [client.get("/check", headers={"Authorization": f"Bearer {k}"}) for k in keys]
            answers += [client.get("/check", headers={"X-Api-Key": k}, params={"scope": "b"}) for k in keys]
            answers.append(client.get(f"/check?key={good}", headers={"Authorization": f"Bearer {good}",
                                                                     "X-Api-Key": revoked}))
            answers.append(client.get("/check", headers={"Authorization": f"Bearer {good}" + "x" * 200}))
            with socket.create_connection(("127.0.0.1", port)) as s:  # a key where the request line goes
                s.sendall(f"{good} {good}\r\n\r\n".encode())
                assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    finally:
        proc.stop()
    assert [a.status_code for a in answers] == [200, 401, 401, 401, 403, 401, 401, 401, 401, 401]
    text = log_path.read_text()
    assert "Invalid HTTP request" in text  # the log did record the refusal, without the key
    for k in keys:
        assert k not in text and k[len(display_prefix(k)):] not in text
        assert all(k not in a.text and k not in str(a.headers) for a in answers)
