"""RequestEvent v1: strict validation with precise messages, encoding, the exported JSON Schema."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import orjson
import pytest

from quotaflow.schemas.events import (
    FIELD_NAMES,
    RequestEvent,
    SchemaError,
    decode,
    json_schema,
    render_json_schema,
    validate,
)
from tests.event_docs import good

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "request_event.v1.schema.json"


def test_valid_event_round_trips_through_the_wire_format():
    ev = validate(good())
    assert isinstance(ev, RequestEvent)
    assert decode(ev.encode()) == ev
    assert orjson.loads(ev.encode()) == good()
    assert ev.partition_key == b"acme"


def test_new_fills_id_time_and_version():
    ev = RequestEvent.new(**{k: v for k, v in good().items() if k not in ("event_id", "ts_ms", "schema_version")})
    assert ev.schema_version == 1
    assert len(ev.event_id) == 36 and ev.event_id != good()["event_id"]
    assert ev.ts_ms > 1_700_000_000_000


def test_numbers_are_normalised_as_json_schema_reads_them():
    ev = validate({**good(), "latency_ms": 7, "status": 200.0})
    assert ev.latency_ms == 7.0 and isinstance(ev.latency_ms, float)
    assert ev.status == 200 and isinstance(ev.status, int)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("event_id", "not-a-uuid", "event_id: must be a lowercase UUID"),
        ("event_id", "123E4567-E89B-42D3-A456-426614174000", "event_id: must be a lowercase UUID"),
        ("ts_ms", 1_795_000_000, "ts_ms: must be between 946684800000 and 4102444800000 (milliseconds since the epoch), got 1795000000"),
        ("ts_ms", 1795000000000.5, "ts_ms: must be an integer, got 1795000000000.5"),
        ("ts_ms", "1795000000123", "ts_ms: must be an integer, got str '1795000000123'"),
        ("org_id", "", "org_id: must be 1-64 characters"),
        ("org_id", "a" * 65, "org_id: must be 1-64 characters"),
        ("api_key_id", "key with spaces", "api_key_id: must be 1-64 characters"),
        ("endpoint", "/v1/users/42", "endpoint: segment '42' looks like a raw id; publish the route template"),
        ("endpoint", "/v1/users/123e4567-e89b-42d3-a456-426614174000/orders", "endpoint: segment '123e4567-e89b-42d3-a456-426614174000' looks like a raw id"),
        ("endpoint", "/v1/blobs/deadbeefcafebabe0011", "endpoint: segment 'deadbeefcafebabe0011' looks like a raw id"),
        ("endpoint", "/v1/search?q=shoes", "endpoint: must not carry a query string or fragment"),
        ("endpoint", "v1/search", "endpoint: must start with '/'"),
        ("endpoint", "/" + "a" * 300, "endpoint: at most 256 characters, got 301"),
        ("method", "get", "method: must be one of GET, HEAD, POST"),
        ("status", 700, "status: must be between 100 and 599, got 700"),
        ("status", True, "status: must be an integer, got bool True"),
        ("status", "200", "status: must be an integer, got str '200'"),
        ("latency_ms", -1, "latency_ms: must be between 0 and 86400000, got -1"),
        ("latency_ms", float("nan"), "latency_ms: must be a finite number"),
        ("request_bytes", -5, "request_bytes: must be between 0 and"),
        ("client_ip", "300.1.1.1", "client_ip: must be an IPv4 or IPv6 address, got '300.1.1.1'"),
        ("user_agent", "x" * 513, "user_agent: at most 512 characters, got 513"),
        ("user_agent", None, "user_agent: must be a string, got NoneType None"),
    ],
)
def test_bad_field_is_rejected_with_a_precise_message(field, value, message):
    with pytest.raises(SchemaError) as err:
        validate({**good(), field: value})
    assert len(err.value.errors) == 1, err.value.errors
    assert err.value.errors[0].startswith(message), err.value.errors[0]


def test_every_problem_is_reported_not_only_the_first():
    doc = {**good(), "status": 99, "method": "FETCH"}
    del doc["org_id"]
    with pytest.raises(SchemaError) as err:
        validate(doc)
    assert err.value.errors == [
        "org_id: required field is missing",
        "method: must be one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, CONNECT, TRACE, OTHER, got 'FETCH'",
        "status: must be between 100 and 599, got 99",
    ]


def test_unknown_fields_are_rejected():
    with pytest.raises(SchemaError, match=r"unknown field\(s\): path, tenant"):
        validate({**good(), "tenant": "x", "path": "/v1/users/42"})


def test_newer_schema_version_is_refused_by_name():
    with pytest.raises(SchemaError, match="schema_version: 2 is not supported by this consumer"):
        validate({**good(), "schema_version": 2})


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"GET /v1/orders 200", "event: not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "event: not valid UTF-8 JSON"),
        (b"[1, 2]", "event: must be a JSON object, got list"),
        (None, "event: record has no value (tombstone)"),
    ],
)
def test_undecodable_records_are_rejected(raw, message):
    with pytest.raises(SchemaError) as err:
        decode(raw)
    assert str(err.value).startswith(message)


def test_exported_schema_file_is_current():
    assert SCHEMA_FILE.read_bytes() == render_json_schema(), "run: quotaflow schema export --output " + str(SCHEMA_FILE)
    assert json_schema()["$defs"]["RequestEvent"]["required"] == list(FIELD_NAMES)


def _agree(doc: dict) -> bool:
    """Do the Python validator and the published JSON Schema give the same verdict?"""
    checker = jsonschema.Draft202012Validator(orjson.loads(SCHEMA_FILE.read_bytes()),
                                              format_checker=jsonschema.FormatChecker())
    try:
        validate(doc)
        python_ok = True
    except SchemaError:
        python_ok = False
    return python_ok == checker.is_valid(doc)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"endpoint": "/v1/users/42"},
        {"endpoint": "/v1/users/{id}/orders/123e4567-e89b-42d3-a456-426614174000"},
        {"endpoint": "/v1/items/abc123"},
        {"endpoint": "/v1/search?q=1"},
        {"ts_ms": 12},
        {"status": 600},
        {"method": "BREW"},
        {"client_ip": "10.0.0.1"},
        {"client_ip": "not-an-ip"},
        {"org_id": "-leading-dash"},
        {"event_id": "123e4567e89b42d3a456426614174000"},
        {"latency_ms": 0},
        {"status": 200.0},
        {"status": 200.5},
        {"extra": 1},
    ],
)
def test_published_json_schema_agrees_with_the_validator(change):
    assert _agree({**good(), **change})


@pytest.mark.parametrize("field", ["org_id", "api_key_id", "service", "event_id", "endpoint"])
def test_a_trailing_newline_is_not_part_of_a_valid_id(field):
    # Python's $ also matches before a final newline; the published schema's (ECMA-262) does not.
    with pytest.raises(SchemaError, match=field):
        validate({**good(), field: good()[field] + "\n"})


def test_a_batch_record_yields_each_event_and_refuses_items_alone():
    from quotaflow.schemas.events import decode_record, encode_batch

    a, b = validate(good()), validate({**good(), "event_id": "123e4567-e89b-42d3-a456-426614174001"})
    assert decode_record(encode_batch([a, b])) == [a, b]
    assert decode_record(a.encode()) == [a]
    bad = {**good(), "status": 700}
    other_org = {**good(), "org_id": "globex"}
    items = decode_record(orjson.dumps([good(), bad, other_org]))
    assert items[0] == a
    assert str(items[1]) == "status: must be between 100 and 599, got 700" and orjson.loads(items[1].payload) == bad
    assert str(items[2]) == "org_id: a batch carries one org's events; expected 'acme', got 'globex'"
    assert [str(e) for e in decode_record(b"[]")] == ["record: a batch holds 1 to 10000 events, got 0"]
    assert decode_record(b"nope")[0].payload is None  # unreadable: the whole record is refused


def test_the_published_schema_accepts_batches_too():
    checker = jsonschema.Draft202012Validator(orjson.loads(SCHEMA_FILE.read_bytes()),
                                              format_checker=jsonschema.FormatChecker())
    assert checker.is_valid([good(), good()])
    assert not checker.is_valid([])
    assert not checker.is_valid([good(), {**good(), "status": 700}])


BATCH_CHANGES = [
    {}, {"latency_ms": 7}, {"status": 200.0}, {"ts_ms": 1_795_000_000_000.0}, {"schema_version": True},
    {"status": True}, {"latency_ms": True}, {"latency_ms": -0.5}, {"latency_ms": 86_400_001}, {"status": 99},
    {"request_bytes": 2**53}, {"response_bytes": -1}, {"ts_ms": 12}, {"event_id": "123E4567-E89B-42D3-A456-426614174000"},
    {"event_id": 7}, {"event_id": "123e4567-e89b-42d3-a456-426614174000\n"},
    {"event_id": "123e4567-e89b-42d3-a456-426614174009\n123e4567-e89b-42d3-a456-426614174008"}, {"org_id": "globex"}, {"org_id": ""},
    {"api_key_id": ["a"]}, {"service": None}, {"endpoint": "/v1/users/42"}, {"method": "get"}, {"method": ["GET"]},
    {"client_ip": "300.1.1.1"}, {"user_agent": "x" * 513}, {"extra": 1}, {"schema_version": 2},
    {"ts_ms": -1}, {"latency_ms": 1e308}, {"status": "200"}, {"method": None},
    {"user_agent": "nul \x00 and \u2603"}, {"endpoint": "/v1/" + "a" * 300}, {"org_id": "acme\n"},
    {"api_key_id": "acme-web\n"},
]


def _one_by_one(items: list) -> list:
    """What decode_record must say about a batch, from validate alone, item by item."""
    out, org = [], None
    for item in items:
        try:
            ev = validate(item)
        except SchemaError as exc:
            out.append(str(exc))
            continue
        org = org or ev.org_id
        out.append(ev if ev.org_id == org else "other org")
    return out


@pytest.mark.parametrize("change", BATCH_CHANGES)
@pytest.mark.parametrize("where", [0, 2])
def test_a_batch_is_judged_as_its_events_are_one_by_one(change, where):
    # A whole batch is checked column by column; any doubt sends it item by item.
    # Both must give the same verdicts, and the same values, as validate.
    from quotaflow.schemas.events import decode_columns, decode_record

    items = [{**good(), "event_id": f"123e4567-e89b-42d3-a456-42661417400{i}"} for i in range(3)]
    items[where] = {**items[where], **change}
    if "extra" not in change:
        items[where].pop("extra", None)
    data = orjson.dumps(items)
    got = [ev if isinstance(ev, RequestEvent) else ("other org" if "one org's" in str(ev) else str(ev))
           for ev in decode_record(data)]
    expected = _one_by_one(items)
    assert got == expected
    assert all(type(a) is type(b) for ev, exp in zip(got, expected, strict=True) if isinstance(ev, RequestEvent)
               for a, b in zip(ev, exp, strict=True))
    # The same answer as columns: the valid events, where each stands, and the refusals.
    columns, indexes, refused = decode_columns(data)
    valid = [(i, ev) for i, ev in enumerate(expected) if isinstance(ev, RequestEvent)]
    assert columns == tuple(zip(*(ev for _, ev in valid), strict=True))
    assert list(indexes) == [i for i, _ in valid]
    assert [i for i, _ in refused] == [i for i, ev in enumerate(expected) if not isinstance(ev, RequestEvent)]
    assert all(isinstance(exc, SchemaError) for _, exc in refused)


def test_a_batch_in_odd_json_is_judged_as_its_events_are_one_by_one():
    # JSON that parsers may read differently: the record's answer must be what validate
    # says of the document as orjson reads it.
    from quotaflow.schemas.events import decode_columns, decode_record

    one = orjson.dumps(good())
    ev = validate(good())
    duplicate_key = one[:-1] + b',"status":404}'  # the last value counts, as orjson reads it
    cases = {
        b"[" + duplicate_key + b"," + one + b"]": [ev._replace(status=404), ev],
        b"[" + one + b"," + one.replace(b'"okhttp/4.12.0"', rb'"\ud800"') + b"]": None,  # a lone surrogate
        b"[" + one + b"," + one.replace(b'"okhttp/4.12.0"', b'"\xff"') + b"]": None,  # not UTF-8
        b"[" + one + b"]  ": [ev],
        b"[" + one + b"," + one.replace(b'"request_bytes":300', b'"request_bytes":' + b"9" * 30) + b"]": [ev, "big"],
        b"[" + one + b"] x": None,
    }
    for data, expected in cases.items():
        items = decode_record(data)
        if expected is None:  # unreadable: the whole record is refused, by orjson's words
            assert len(items) == 1 and isinstance(items[0], SchemaError) and "JSON" in str(items[0]), data
        else:
            assert [e if isinstance(e, RequestEvent) else "big" for e in items] == expected, data
        columns, indexes, refused = decode_columns(data)
        valid = [e for e in items if isinstance(e, RequestEvent)]
        assert columns == tuple(zip(*valid, strict=True)) and len(indexes) == len(valid) and len(refused) == len(items) - len(valid)


def test_batch_items_that_are_not_events_are_refused_one_by_one():
    from quotaflow.schemas.events import decode_columns, decode_record

    missing = {k: v for k, v in good().items() if k != "user_agent"}
    for odd in (missing, [1] * 14, "x" * 14, 14, None):
        items = decode_record(orjson.dumps([good(), odd]))
        assert items[0] == validate(good()) and isinstance(items[1], SchemaError), odd
        columns, indexes, refused = decode_columns(orjson.dumps([good(), odd]))
        assert columns == tuple((v,) for v in validate(good())) and list(indexes) == [0]
        assert [(i, str(exc)) for i, exc in refused] == [(1, str(items[1]))]
    columns, indexes, refused = decode_columns(orjson.dumps(good()))  # a record of a single event
    assert (columns, list(indexes), refused) == (tuple((v,) for v in validate(good())), [0], [])
    for unreadable in (b"nope", None, b"[]"):
        columns, indexes, refused = decode_columns(unreadable)
        assert columns == () and not indexes
        assert [(i, str(exc)) for i, exc in refused] == [(None, str(decode_record(unreadable)[0]))]  # the whole record


def test_the_asgi_middleware_turns_every_raw_id_the_schema_refuses_into_a_template():
    from quotaflow.gateway.asgi import endpoint_template

    raw = ("42", "123e4567-e89b-42d3-a456-426614174000", "DEADBEEFCAFEBABE0011", "0123-4567-89ab-cdef-0123")
    for segment in raw:
        path = f"/v1/users/{segment}/orders"
        assert endpoint_template({"path": path}) == "/v1/users/{id}/orders", segment
        validate({**good(), "endpoint": endpoint_template({"path": path})})
    # segments that are not ids stay
    assert endpoint_template({"path": "/v1/abc123/search"}) == "/v1/abc123/search"
    with pytest.raises(SchemaError):
        validate({**good(), "endpoint": "/v1/users/42/orders"})
