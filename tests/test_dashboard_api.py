"""The dashboard's own endpoints without a browser: hostile callers of /v1/limits and
/v1/whoami, the live state read from the real Redis of the stack (what the processor
would write, written here in its format by the processor's own encoding), Redis gone,
and the build step's checksum check.

The app runs in this process on an engine of the test's own (the `engine` fixture);
the browser tests (tests/test_dashboard.py) run the whole pipeline."""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
import time

import httpx
import pytest

from quotaflow.analytics.app import create_app
from quotaflow.analytics.dashboard import vendor
from quotaflow.analytics.dashboard.limits import LiveLimits
from quotaflow.core.settings import get_settings
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import (
    ENFORCEMENT_KEY,
    ENFORCEMENT_OFF,
    ORG_TIER_FIELD,
    encode_buckets,
    org_key,
    overrides_key,
    reservations_key,
    usage_key,
    window_field,
)
from tests.pipeline import unique

pytestmark = pytest.mark.stack
HOUR = 3_600_000


@pytest.fixture()
def orgs(redis_client):
    """Two orgs' usage as processors and gateways leave it in Redis: org A's key over its
    hour limit (counts and a reservation), org B's well under."""
    a, b = unique("lim-a"), unique("lim-b")
    now = int(time.time() * 1000)
    hour = now - now % HOUR
    redis_client.hset(org_key(a), ORG_TIER_FIELD, "STARTER")  # 30 / 500 / 5000
    redis_client.hset(overrides_key(a, "a-key"), "3600s", 40)
    redis_client.hset(usage_key(a, "a-key"), mapping={window_field("3600s"): encode_buckets([(hour - HOUR, 99), (hour, 39)]),
                                                      "org_id": a, "api_key_id": "a-key"})
    redis_client.zadd(reservations_key(a, "a-key"), {"ev-1": now - 5})
    redis_client.hset(usage_key(a), mapping={window_field("3600s"): encode_buckets([(hour, 39)]), "org_id": a})
    redis_client.hset(usage_key(b, "b-key"), mapping={window_field("3600s"): encode_buckets([(hour, 3)]),
                                                      "org_id": b, "api_key_id": "b-key"})
    yield a, b
    for key in redis_client.scan_iter(match="qf:v1:{lim-*"):
        redis_client.delete(key)


@pytest.fixture()
def call(engine, live_stack, orgs):
    a, b = orgs
    tokens = {"tok-a": a, "tok-b": b, "tok-ops": "*"}

    def request(path: str, token: str | None = "tok-a", live: bool = True, redis_url: str | None = None) -> httpx.Response:
        async def go() -> httpx.Response:
            reader = LiveLimits(redis_url or live_stack.redis_url, policy_from_settings(get_settings()), timeout_s=1) \
                if live else None
            app = create_app(tokens, retention.wanted_days(live_stack), engine, lambda: engine, live=reader)
            headers = {"authorization": f"Bearer {token}"} if token else {}
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
                    return await client.get(path, headers=headers)
            finally:
                if reader is not None:
                    await reader.close()

        return asyncio.run(go())

    return request


def test_live_state_of_an_org(call, orgs):
    a, _ = orgs
    body = call("/v1/limits").json()
    assert body["enforcement"] == "on" and body["complete"] is True and body["source"] == "redis"
    assert {r["org_id"] for r in body["rows"]} == {a}
    key_hour = [r for r in body["rows"] if r["api_key_id"] == "a-key" and r["window"] == "3600s"]
    # 39 counted this hour (last hour's 99 not) + 1 reservation = 40 = its override: limited.
    assert [(r["limit"], r["used"], r["remaining"], r["limited"], r["tier"]) for r in key_hour] == \
        [(40, 40, 0, True, "STARTER")]
    assert body["rows"][0] == key_hour[0]  # the limited first
    org_hour = [r for r in body["rows"] if r["api_key_id"] is None and r["window"] == "3600s"]
    assert [(r["limit"], r["used"], r["limited"]) for r in org_hour] == [(500, 39, False)]
    assert body["limited_now"] == 1
    one_key = call("/v1/limits?api_key=a-key").json()
    assert {r["api_key_id"] for r in one_key["rows"]} == {"a-key", None}


def test_an_operator_sees_every_org_or_picks_one(call, orgs, redis_client):
    a, b = orgs
    every = call("/v1/limits", token="tok-ops").json()
    assert {a, b} <= {r["org_id"] for r in every["rows"]}
    assert {r["org_id"] for r in call(f"/v1/limits?org={b}", token="tok-ops").json()["rows"]} == {b}
    redis_client.set(ENFORCEMENT_KEY, ENFORCEMENT_OFF)
    try:
        assert call("/v1/limits", token="tok-ops").json()["enforcement"] == "off"
        csv = call("/v1/limits.csv", token="tok-ops")
        assert csv.headers["x-quotaflow-enforcement"] == "off"
    finally:
        redis_client.delete(ENFORCEMENT_KEY)
    lines = call(f"/v1/limits.csv?org={a}", token="tok-ops").text.splitlines()
    assert lines[0] == "org_id,api_key_id,subject,tier,window,limit,used,remaining,reset,limited"
    assert any(line.startswith(f"{a},a-key,key,STARTER,3600s,40,40,0,") and line.endswith(",True") for line in lines)


@pytest.mark.parametrize(("path", "token", "status", "reason"), [
    ("/v1/limits", None, 401, "missing Authorization"),
    ("/v1/limits", "nope", 401, "unknown bearer token"),
    ("/v1/whoami", "nope", 401, "unknown bearer token"),
    ("/v1/limits?org=ORG_B", "tok-a", 403, "only read its own org"),
    ("/v1/limits.csv?org=ORG_B", "tok-a", 403, "only read its own org"),
    ("/v1/limits?org=a%7Bb%7D", "tok-ops", 400, "org: must be"),
    ("/v1/limits?api_key=*", "tok-a", 400, "api_key: must be"),
    ("/v1/limits?api_key=%00", "tok-a", 400, "api_key: must be"),
    ("/v1/limits?timeframe=1h", "tok-a", 400, "unknown parameter"),
    ("/v1/limits?api_key=x&api_key=y", "tok-a", 400, "more than once"),
])
def test_hostile_callers_are_refused_with_the_reason(call, orgs, path, token, status, reason):
    response = call(path.replace("ORG_B", orgs[1]), token=token)
    assert response.status_code == status
    assert reason in response.json()["error"]
    if token:
        assert token not in response.text


def test_whoami_names_the_scope(call, orgs):
    assert call("/v1/whoami").json() == {"org": orgs[0], "live_limits": True}
    assert call("/v1/whoami", token="tok-ops").json() == {"org": None, "live_limits": True}


def test_no_redis_is_a_503_naming_it_not_a_500(call, port_base):
    gone = call("/v1/limits", redis_url=f"redis://127.0.0.1:{port_base + 97}/0")  # nothing listens there
    assert gone.status_code == 503 and "Redis did not answer" in gone.json()["error"]
    none = call("/v1/limits", live=False)
    assert none.status_code == 503 and "not available" in none.json()["error"]
    assert call("/", token=None).status_code == 200  # the page itself needs neither


def test_the_build_step_refuses_a_file_that_does_not_match_its_pin(tmp_path, monkeypatch):
    """vendor.fetch checks the tarball and the file it unpacks; a tarball whose file was
    changed is refused and nothing is written."""
    spec, tarball, digests = vendor.pins()
    assert spec.startswith("chart.js@") and tarball.endswith(".tgz")
    member = next(m for m in digests if m != tarball)
    shipped = vendor.target(member)
    assert shipped.is_file() and hashlib.sha256(shipped.read_bytes()).hexdigest() == digests[member]
    assert vendor.is_current()

    # A tarball like npm's with a changed file, pinned by its own digest: the file's pin must still refuse it.
    fake = tmp_path / "pack" / tarball
    fake.parent.mkdir()
    body = tmp_path / "chart.umd.min.js"
    body.write_text("alert('not chart.js')")
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(body, arcname=member)
    lock = tmp_path / "vendor.sha256"
    lock.write_text(f"{hashlib.sha256(fake.read_bytes()).hexdigest()}  {tarball}\n{digests[member]}  {member}\n")
    npm = tmp_path / "npm"
    npm.write_text(f"#!/bin/sh\ncp {fake} \"$4\"/\n")  # npm pack --silent --pack-destination DIR SPEC
    npm.chmod(0o755)
    monkeypatch.setattr(vendor, "LOCK", lock)
    monkeypatch.setattr(vendor, "TARGET_DIR", tmp_path / "out")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(vendor.VendorError, match=f"checksum mismatch for {member}"):
        vendor.fetch()
    assert not (tmp_path / "out" / "chart.umd.min.js").exists()
    # And a tarball that is not the pinned one is refused before anything is unpacked.
    lock.write_text(f"{'0' * 64}  {tarball}\n{digests[member]}  {member}\n")
    with pytest.raises(vendor.VendorError, match=f"checksum mismatch for {tarball}"):
        vendor.fetch()


def test_the_served_api_answers_each_request_of_a_connection_at_once(live_stack, port_base, tmp_path):
    """Served for real (analytics/server.py), on a keep-alive connection as the page's
    requests come: the accepted socket has TCP_NODELAY. Without it every answer after the
    connection's first waited for the client's delayed ACK (~40 ms; headers and body are two
    writes). Each answer says where its time went (Server-Timing)."""
    import socket

    from quotaflow.analytics.server import ApiServer
    from quotaflow.schemas.clickhouse.client import connect
    from quotaflow.schemas.clickhouse.migrate import migrate

    settings = live_stack.model_copy(update={"clickhouse_url": f"chdb://{tmp_path / 'clickhouse'}",
                                             "api_port": port_base + 397, "api_tokens": {"tok-ops": "*"}})

    async def go() -> None:
        engine = connect(settings.clickhouse_url)
        migrate(engine)
        server = ApiServer(settings)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}",
                                         headers={"authorization": "Bearer tok-ops"}) as client:
                answers = [await client.get(path) for path in ("/healthz", "/v1/summary?timeframe=1h", "/v1/limits",
                                                               "/v1/dead_letters?timeframe=1h")]
                assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
                connections = server._server.server_state.connections
                assert len(connections) == 1  # one connection, kept alive
                for protocol in connections:
                    sock = protocol.transport.get_extra_info("socket")
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            timing = [r.headers.get("server-timing", "") for r in answers]
            assert timing[0] == ""
            assert timing[1].startswith("slot;dur=") and ", query;dur=" in timing[1], timing
            assert timing[2].startswith("redis;dur=") and timing[3].startswith("kafka;dur="), timing
        finally:
            await server.stop()
            engine.close()

    asyncio.run(go())


def test_dead_letters_read_back_leave_nothing_fetching_between_reads(live_stack):
    """The dead-letter reader's partitions are paused whenever it is not reading: an assigned
    partition is fetched in the background, each fetch waiting at the broker for records
    (fetch_max_wait_ms), and the next read's offset requests, on the same connection, waited
    behind it (200-500 ms a read, measured). Every record is still read, read after read."""
    from aiokafka import AIOKafkaProducer

    from quotaflow.analytics.dashboard.dead_letters import DeadLetters
    from quotaflow.schemas import deadletter
    from quotaflow.schemas.topics import DEAD_LETTER_TOPIC

    reason = unique("status: refused in a test")

    async def go() -> None:
        since = int(time.time() * 1000) - 1000
        producer = AIOKafkaProducer(bootstrap_servers=live_stack.kafka_bootstrap)
        reader = DeadLetters(live_stack.kafka_bootstrap)
        await producer.start()
        try:
            sent = 0
            for n in (3, 5, 0):
                for _ in range(n):
                    await producer.send_and_wait(DEAD_LETTER_TOPIC, b"{}", headers=[
                        (deadletter.HEADER_REASON, reason.encode()), (deadletter.HEADER_STAGE, b"processor")])
                sent += n
                recent = await reader.read(since)
                assert sum(r["reason"] == reason for r in recent.rows) == sent and recent.complete
                consumer = reader._consumer
                assert consumer.assignment() and consumer.paused() == consumer.assignment()
        finally:
            await reader.close()
            await producer.stop()

    asyncio.run(go())


def test_the_pages_files_are_asked_for_by_version_and_kept_by_the_browser(engine, live_stack):
    """The page names each of its files with its content's version; asked for so, a file is
    immutable for the browser (no revalidation on every load); asked for otherwise (no or an
    old version), it is revalidated as before. The page itself is always asked again."""
    import re

    from quotaflow.analytics.dashboard import STATIC

    app = create_app({"tok": "*"}, retention.wanted_days(live_stack), engine, lambda: engine)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            page = await client.get("/")
            assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
            named = dict(re.findall(r'(?:src|href)="/static/([^"?]+)\?v=([0-9a-f]{16})"', page.text))
            assert {"dashboard.js", "dashboard.css"} <= set(named), page.text[:1000]
            for name, version in named.items():
                assert version == hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:16], name
                kept = await client.get(f"/static/{name}?v={version}")
                assert kept.status_code == 200 and kept.content == (STATIC / name).read_bytes()
                assert kept.headers["cache-control"] == "public, max-age=31536000, immutable"
                assert kept.headers["content-security-policy"].startswith("default-src 'none'")
                for other in (f"/static/{name}", f"/static/{name}?v=0000000000000000"):
                    asked = await client.get(other)
                    assert asked.status_code == 200 and asked.headers["cache-control"] == "no-cache", other
            assert (await client.get("/static/nothing.js?v=0")).status_code == 404

    asyncio.run(go())
