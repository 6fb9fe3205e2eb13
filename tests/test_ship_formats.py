"""The shipper's parsers and event building (collector/ship/): each format's lines as
nginx and Envoy write them, route templates, identity, and hostile lines (Hypothesis):
whatever a line holds, it becomes an event the schema takes or a refusal with a reason,
never another exception, and an id that breaks the rule is never fitted."""

from __future__ import annotations

import uuid

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.collector.ship import formats
from quotaflow.collector.ship.events import NAMESPACE, EventBuilder, LineIds
from quotaflow.collector.ship.formats import LineError
from quotaflow.collector.ship.routes import RouteMap
from quotaflow.schemas.event_fields import FIELDS
from quotaflow.schemas.events import validate
from quotaflow.schemas.ids import is_valid_id

ROUTES = RouteMap(["/v1/users/{id}/orders", "/v1/users/{id}", "/healthz"])
IDS = LineIds("0123456789abcdef0123456789abcdef")
T_MS = 1_796_000_000_123


def builder(fmt: str, **kw) -> EventBuilder:
    return EventBuilder(ROUTES, service="edge", latency_ms_per_unit=formats.LATENCY_MS[fmt], **kw)


def ship(fmt: str, line: bytes, fields: dict | None = None, **kw) -> dict:
    event = builder(fmt, **kw).build(formats.parser(fmt, fields or {})(line), IDS, 42)
    validate(event)  # whatever the shipper publishes, the schema takes
    return event


def nginx_json(**over) -> bytes:
    doc = {"time": f"{T_MS / 1000:.3f}", "method": "GET", "path": "/v1/users/42/orders", "status": "200",
           "request_bytes": "", "response_bytes": "512", "latency": "0.012", "client_ip": "203.0.113.9",
           "user_agent": "wrk/4", "org_id": "acme", "api_key_id": "acme-web", "event_id": "", "event_ts": ""}
    doc.update(over)
    return orjson.dumps(doc)


def test_nginx_json_line_becomes_its_event():
    event = ship("nginx_json", nginx_json(path="/v1/users/42/orders?token=s3cret"))
    assert event == {"schema_version": 1, "event_id": IDS(42), "ts_ms": T_MS, "org_id": "acme",
                     "api_key_id": "acme-web", "service": "edge", "endpoint": "/v1/users/{id}/orders",
                     "method": "GET", "status": 200, "latency_ms": 12.0, "request_bytes": 0, "response_bytes": 512,
                     "client_ip": "203.0.113.9", "user_agent": "wrk/4"}
    # the gateway's reservation: its id (any case) and time are the event's
    reserved = str(uuid.uuid4())
    event = ship("nginx_json", nginx_json(event_id=reserved.upper(), event_ts=str(T_MS + 5)))
    assert (event["event_id"], event["ts_ms"]) == (reserved, T_MS + 5)
    # renamed fields, typed numbers, ISO 8601 time
    line = orjson.dumps({"t": "2026-11-30T03:42:16+00:00", "m": "POST", "p": "/x", "status": 201, "latency": 0.5,
                         "o": "globex", "k": "g1"})
    event = ship("nginx_json", line, {"time": "t", "method": "m", "path": "p", "org_id": "o", "api_key_id": "k"})
    assert (event["ts_ms"], event["method"], event["status"], event["latency_ms"], event["org_id"]) == (
        1_796_010_136_000, "POST", 201, 500.0, "globex")


def test_line_ids_are_uuid5_of_the_fingerprint_and_offset():
    assert IDS(42) == str(uuid.uuid5(NAMESPACE, "0123456789abcdef0123456789abcdef:42"))
    assert IDS(42) == LineIds("0123456789abcdef0123456789abcdef")(42) != IDS(43)


def test_combined_and_envoy_text_lines():
    line = (b'203.0.113.9 - alice [30/Nov/2026:03:42:16 +0000] "DELETE /v1/users/7f3c9a2be1d04c55a0e1f2a3b4c5d6e7 '
            b'HTTP/1.1" 204 0 "-" "curl/8 \\x22quoted\\x22 caf\\xC3\\xA9" org_id=acme api_key_id=web latency=0.250')
    event = ship("nginx_combined", line)
    assert (event["method"], event["endpoint"], event["status"], event["ts_ms"], event["latency_ms"]) == (
        "DELETE", "/v1/users/{id}", 204, 1_796_010_136_000, 250.0)
    assert event["user_agent"] == 'curl/8 "quoted" café'
    envoy = (b'[2026-11-30T03:42:16.310Z] "GET /v1/users/42?x=1 HTTP/2" 0 DC 15 0 3 - "198.51.100.4, 10.0.0.1" '
             b'"agent "with" quotes" "a0c1" "api.example" "10.0.2.1:80" org_id=acme api_key_id=web')
    event = ship("envoy_text", envoy)
    assert (event["endpoint"], event["status"], event["request_bytes"], event["latency_ms"], event["client_ip"]) == (
        "/v1/users/{id}", 500, 15, 3, "198.51.100.4")  # status 0 (no response): fitted to 500
    assert event["user_agent"] == 'agent "with" quotes' and event["ts_ms"] == 1_796_010_136_310
    # a pair inside the user agent is not a pair of the line
    spoof = envoy.replace(b'"agent "with" quotes"', b'"x" "y" "z" org_id=victim"').replace(b" org_id=acme", b"")
    with pytest.raises(LineError, match="org_id: missing"):
        builder("envoy_text").build(formats.parser("envoy_text", {})(spoof), IDS, 0)


def test_envoy_json_defaults_and_typed_values():
    line = orjson.dumps({"start_time": "2026-11-30T03:42:16.310Z", "method": "PUT", "path": "/healthz",
                         "response_code": 200, "bytes_received": 10, "bytes_sent": 20, "duration": 7,
                         "downstream_remote_address": "[2001:db8::1]:443", "user_agent": None,
                         "org_id": "acme", "api_key_id": "web"})
    event = ship("envoy_json", line)
    assert (event["endpoint"], event["client_ip"], event["latency_ms"], event["user_agent"]) == (
        "/healthz", "2001:db8::1", 7, "")


def test_identity_from_the_configured_fields_or_defaults_and_hostile_ids_refused():
    assert ship("nginx_json", nginx_json(org_id="-", api_key_id=""), default_org_id="solo",
                default_api_key_id="site")["org_id"] == "solo"
    for bad in ["web}:usage:org", "{acme}", "a b", ".hidden", "x" * 65, "qf_live_" + "A" * 30 + "_ABCDEF!"]:
        for field in ("org_id", "api_key_id"):
            with pytest.raises(LineError) as refused:
                ship("nginx_json", nginx_json(**{field: bad}))
            assert refused.value.reason.startswith(f"{field}: must be 1-64 characters")
            assert bad not in refused.value.reason
    with pytest.raises(LineError, match="org_id: missing"):
        ship("nginx_json", nginx_json(org_id=""))
    with pytest.raises(ValueError):
        builder("nginx_json", default_org_id="no spaces")


def test_unknown_or_fixed_fields_and_bad_routes_are_refused_at_start():
    with pytest.raises(ValueError, match="fixed by the nginx_combined format"):
        formats.parser("nginx_combined", {"status": "s"})
    with pytest.raises(ValueError, match="#2: segment '42' looks like a raw id"):
        RouteMap(["/ok/{id}", "/v1/users/42"])
    assert ROUTES.endpoint("/v1/users/42") == ("/v1/users/{id}", False)
    assert ROUTES.endpoint("/v2/things/0f8fad5b-d9cb-469f-a165-70867728950e/x") == ("/v2/things/{id}/x", True)


@pytest.mark.parametrize("line, reason", [
    (b"", "not JSON"),
    (b"[1, 2]", "not a JSON object (Expected `object`, got `array`)"),
    (nginx_json(path=None), "path: missing"),
    (nginx_json(time="yesterday"), "time: neither"),
    (nginx_json(time="1"), "time: seconds since the epoch out of range"),
    (nginx_json(status="2xx"), "status: must be an HTTP status code"),
    (nginx_json(response_bytes="-5"), "response_bytes: must be a number of bytes"),
    (nginx_json(latency="fast"), "latency: must be a number"),
    (nginx_json(latency="nan"), "latency: must be a non-negative number"),
    (nginx_json(event_id="not-a-uuid"), "event_id: must be a UUID"),
    (nginx_json(event_ts="soon"), "event_ts: must be milliseconds"),
    (nginx_json(time="4102444801"), "time: not between 2000 and 2100"),
])
def test_malformed_lines_are_refused_with_the_reason(line, reason):
    with pytest.raises(LineError) as refused:
        ship("nginx_json", line)
    assert refused.value.reason.startswith(reason)


def test_values_out_of_bounds_are_fitted_and_counted():
    b = builder("nginx_json")
    event = b.build(formats.parser("nginx_json", {})(nginx_json(
        method="PROPFIND", status="999", response_bytes="9" * 30, latency="1e12", client_ip="not-an-ip",
        user_agent="u" * 600, path="/files/a b/123")), IDS, 0)
    validate(event)
    assert (event["method"], event["status"], event["client_ip"], len(event["user_agent"]),
            event["endpoint"]) == ("OTHER", 500, "0.0.0.0", 512, "/files/a%20b/{id}")
    assert b.normalised == {"method": 1, "status": 1, "response_bytes": 1, "latency_ms": 1, "client_ip": 1,
                            "user_agent": 1, "endpoint": 1}


# --- hostile lines (Hypothesis) -----------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=80)
                | st.sampled_from(["-", "", "200", "0.001", "1796000000.5", "acme", "/v1/users/42", "GET"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)


@st.composite
def hostile_lines(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["nginx_json", "envoy_json", "nginx_combined", "envoy_text"]))
    kind = draw(st.sampled_from(["bytes", "mutated"]))
    if kind == "bytes":
        return fmt, draw(st.binary(max_size=400))
    if fmt in ("nginx_json", "envoy_json"):
        doc = orjson.loads(nginx_json())
        for key in draw(st.lists(st.sampled_from(sorted(doc) + ["start_time", "response_code", "duration"]),
                                 max_size=4)):
            doc[key] = draw(json_values)
        return fmt, orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS) if draw(st.booleans()) else \
            orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)[:draw(st.integers(0, 300))]
    base = (b'203.0.113.9 - - [30/Nov/2026:03:42:16 +0000] "GET /a/1 HTTP/1.1" 200 5 "-" "ua" org_id=acme api_key_id=k'
            if fmt == "nginx_combined" else
            b'[2026-11-30T03:42:16.310Z] "GET /a HTTP/1.1" 200 - 1 2 3 - "-" "ua" "r" "h" "u" org_id=acme api_key_id=k')
    cut = draw(st.integers(0, len(base)))
    return fmt, base[:cut] + draw(st.binary(max_size=40)) + base[cut + draw(st.integers(0, 10)):]


@settings(max_examples=400, deadline=None)
@given(case=hostile_lines())
def test_any_line_is_an_event_the_schema_takes_or_refused_with_a_reason(case):
    fmt, line = case
    b = builder(fmt)
    try:
        event = b.build(formats.parser(fmt, {})(line), IDS, 7)
    except LineError as refused:
        assert refused.reason and len(refused.reason) < 300
        return
    assert validate(event) and is_valid_id(event["org_id"]) and is_valid_id(event["api_key_id"])
    raw = formats.parser(fmt, {})(line)
    org = raw[formats.I["org_id"]]
    assert org == event["org_id"]  # an id is taken as logged, never fitted into another tenant's


@settings(max_examples=300, deadline=None)
@given(path=st.text(st.sampled_from(list("/0123456789abcdefABCDEF-_.~{}%:@?# xé")), max_size=300))
def test_any_path_becomes_a_route_template_the_schema_takes(path):
    endpoint, _ = RouteMap(["/v1/users/{id}"]).endpoint(path)
    assert next(f for f in FIELDS if f.name == "endpoint").error(endpoint) is None, endpoint
