"""The WSGI middleware in a Flask app served by a real WSGI server (werkzeug's, threaded),
with the real Redis, Kafka and processor; and the pure parts it shares with the ASGI one."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotaflow.collector.background import BackgroundEmitter
from quotaflow.collector.emitter import Emitter
from quotaflow.gateway.request_event import client_host, trusted_networks
from quotaflow.gateway.wsgi import flask_route, template_of
from quotaflow.schemas.events import decode_record
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key, reservations_key
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.key_records import SECRETS, new_key
from tests.pipeline import counted, minute_start, read_all, unique, wait_for
from tests.wsgi_apps import behind_middleware, flask_shop, served


def test_route_rules_become_templates():
    assert template_of("/items/<int:item_id>") == "/items/{item_id}"
    assert template_of("/a/<item>/b/<path:rest>") == "/a/{item}/b/{rest}"
    assert template_of("orgs/<slug:org>/") == "/orgs/{org}/"  # Django's route, without its leading /


def test_background_emitter_holds_a_bounded_number_of_events():
    """Events its loop has not taken (here: never started) are held up to MAX_PENDING; the
    next ones are counted as lost, not queued without bound and not raised into a request."""
    from quotaflow.collector import background

    emitter = BackgroundEmitter(Emitter("127.0.0.1:9"))
    for i in range(background.MAX_PENDING + 5):
        emitter.emit({"n": i})
    assert len(emitter._pending) == background.MAX_PENDING and emitter.lost == 5 and emitter.failed == 5
    emitter._pending.clear()
    emitter.close()
    emitter.emit({"n": -1})  # after close: lost, counted
    assert not emitter._pending and emitter.lost == 6


def _scope(peer: str, forwarded: list[str]) -> dict:
    return {"client": (peer, 1), "headers": [(b"x-forwarded-for", v.encode()) for v in forwarded]}


def test_forwarded_for_is_read_only_from_trusted_proxies():
    proxies = trusted_networks(["10.0.0.0/8", "127.0.0.1"])
    # from a trusted proxy: the nearest address that is not a trusted proxy
    assert client_host(_scope("127.0.0.1", ["198.51.100.1, 203.0.113.9, 10.1.2.3"]), proxies) == "203.0.113.9"
    assert client_host(_scope("10.0.0.1", ["198.51.100.1", "203.0.113.9"]), proxies) == "203.0.113.9"  # two headers
    # a client that is not a proxy: its header is ignored, whatever it claims
    assert client_host(_scope("203.0.113.50", ["10.0.0.1"]), proxies) == "203.0.113.50"
    assert client_host(_scope("127.0.0.1", ["1.2.3.4"]), ()) == "127.0.0.1"  # no trusted proxies: never read
    # garbage in the chain stops at the hop that wrote it
    assert client_host(_scope("127.0.0.1", ["198.51.100.1, not-an-ip"]), proxies) == "127.0.0.1"


@given(st.lists(st.ip_addresses(v=4).map(str), max_size=6), st.ip_addresses(v=4).map(str))
def test_forwarded_client_is_never_a_trusted_proxy_unless_all_hops_are(chain, peer):
    proxies = trusted_networks(["10.0.0.0/8"])
    got = client_host(_scope(peer, [", ".join(chain)] if chain else []), proxies)
    hops = [peer, *reversed(chain)]
    assert got in hops
    first_untrusted = next((h for h in hops if ipaddress.ip_address(h) not in proxies[0]), None)
    assert got == (first_untrusted if first_untrusted is not None else hops[-1])


@pytest.mark.stack
def test_flask_app_is_limited_and_each_request_published_and_counted(live_stack, redis_client, pipeline, port_base):
    org = unique("org")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    presented, record = new_key(redis_client, org)
    key = record.key_id

    app = flask_shop()
    # a 5 s Redis budget: under a full run's load 50 ms ran out and the check failed open
    settings = live_stack.model_copy(update={"key_hash_secrets": SECRETS, "gateway_timeout_ms": 5000,
                                             "gateway_trusted_proxies": ("127.0.0.1/32",)})
    app.wsgi_app, emitter = behind_middleware(app.wsgi_app, settings, flask_route(app),
                                              settings.state_dir / f"spool-{org}")
    try:
        with served(app, port_base + 151) as url:
            minute_start(need_s=25)
            with httpx.Client(base_url=url, timeout=10) as client:
                anonymous = client.get("/items/1")
                assert anonymous.status_code == 401 and anonymous.json()["error"] == "missing_key"
                assert anonymous.headers["WWW-Authenticate"] == "Bearer"
                responses = [client.get(f"/items/{i}", headers={
                    "Authorization": f"Bearer {presented}", "X-Forwarded-For": "198.51.100.1, 203.0.113.9",
                    "User-Agent": "pytest"}) for i in range(12)]
        emitter.flush(30)
        reserved = {m.decode() for m in redis_client.zrange(reservations_key(org, key), 0, -1)}
    finally:
        emitter.close()
    assert [r.status_code for r in responses] == [200] * 10 + [429] * 2
    assert responses[3].json() == {"id": 3, "org": org, "key": key}
    assert responses[3].headers["X-RateLimit-Remaining"] == "6" and "RateLimit-Policy" in responses[3].headers
    assert responses[-1].json()["window"] == "key:60s" and int(responses[-1].headers["Retry-After"]) >= 1
    ids = [r.headers["X-Quotaflow-Event-Id"] for r in responses]
    assert emitter.failed == 0 and emitter.delivered >= 12

    records = asyncio.run(read_all(live_stack, EVENTS_TOPIC))
    assert not [r for r in records if presented.encode() in r.value]
    events = [ev._asdict() for r in records if r.key == org.encode() for ev in decode_record(r.value)]
    assert sorted(e["event_id"] for e in events) == sorted(ids)  # each request once, with the id it was answered
    assert sorted(e["status"] for e in events) == [200] * 10 + [429] * 2
    assert {e["endpoint"] for e in events} == {"/items/{item_id}"}  # Flask's rule as a template, never /items/7
    assert {e["client_ip"] for e in events} == {"203.0.113.9"}  # behind the trusted proxy (the test's client)
    assert {e["event_id"] for e in events if e["status"] == 200} == reserved
    assert min(e["response_bytes"] for e in events) > 0

    window = min(e["ts_ms"] for e in events) // 60_000 * 60_000
    pipeline.start("processor")
    wait_for(lambda: redis_client.zcard(reservations_key(org, key)) == 0, 60, "reservations released", pipeline.logs)
    assert counted(redis_client, org, key, window) == 10  # the two refusals are not counted
