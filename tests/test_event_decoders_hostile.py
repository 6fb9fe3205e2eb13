"""The decoders of the events topic under hostile input: property-based (Hypothesis).

Whatever bytes a publisher puts in a record, decoding answers; every item of it is
either an event or a refusal with a reason (and what to dead-letter); nothing it keeps
grows with the input; and times are judged against the record's arrival only.
"""

from __future__ import annotations

import sys

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.schemas import event_validation, events
from quotaflow.schemas.events import (
    FIELD_NAMES,
    MAX_DEPTH,
    RequestEvent,
    SchemaError,
    TimeBounds,
    decode_columns,
    decode_one,
    decode_record,
    validate,
)
from tests.event_docs import good

RECEIVED = 1_795_000_000_000
BOUNDS = TimeBounds(ahead_ms=300_000, behind_ms=30 * 86_400_000)

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


def deep(depth: int, inner: str = "[]") -> str:
    return "[" * depth + inner + "]" * depth


def mutated_event(draw) -> dict:
    """A valid event with some fields replaced, removed or added."""
    doc = good()
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=3, unique=True)):
        action = draw(st.sampled_from(["replace", "drop"]))
        if action == "drop":
            doc.pop(name)
        else:
            doc[name] = draw(json_values)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=10))] = draw(json_values)
    return doc


@st.composite
def records(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "event", "batch", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return orjson.dumps(draw(json_values))
    if kind == "event":
        return orjson.dumps(mutated_event(draw))
    if kind == "batch":
        items = draw(st.lists(st.one_of(st.just(good()), st.builds(dict), json_values,
                                        st.composite(lambda d: mutated_event(d))()), min_size=0, max_size=6))
        return orjson.dumps(items)
    depth = draw(st.integers(MAX_DEPTH - 2, 1100))
    where = draw(st.sampled_from(['[{"x":%s}]', "[%s]", '[{"org_id":%s}]', "%s", '{"a":%s}']))
    return (where % deep(depth)).encode()


def check_answer(data: bytes | None, received: int = RECEIVED, bounds: TimeBounds | None = BOUNDS) -> None:
    items = decode_record(data, received, bounds)
    columns, indexes, refused = decode_columns(data, received, bounds)
    assert items, "every record has an answer"
    valid = [ev for ev in items if isinstance(ev, RequestEvent)]
    assert len(indexes) == len(valid) and len(refused) == len(items) - len(valid)
    assert columns == (tuple(zip(*valid, strict=True)) if valid else ())
    for index, exc in refused:
        assert isinstance(exc, SchemaError) and str(exc), "a refusal names its reason"
        assert exc.kind in ("invalid", TimeBounds.AHEAD, TimeBounds.EXPIRED)
        if index is None:  # the record as a whole
            assert exc.payload is None and len(items) == 1
        elif exc.payload is not None:  # the item alone, as published, for its dead letter
            orjson.loads(exc.payload)
    for ev in valid:  # what is accepted is valid, in time, and reads back the same
        assert validate(ev._asdict()) == ev
        assert bounds is None or bounds.error(ev.ts_ms, received) is None
    # The processor's path for one-event records takes a record only as the general path
    # would, with the same values; the event's time it leaves to its caller.
    one = decode_one(data)
    if one is not None:
        assert data[:1] == b"{" and len(items) == 1
        if bounds is None or bounds.error(one[FIELD_NAMES.index("ts_ms")], received) is None:
            assert not refused and tuple(valid[0]) == one
        else:
            assert not valid and refused[0][1].kind in (TimeBounds.AHEAD, TimeBounds.EXPIRED)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records())
def test_every_record_gets_an_answer_for_each_of_its_items(data):
    check_answer(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["event_id", "org_id", "api_key_id", "service", "endpoint", "method", "client_ip",
                        "user_agent"]), st.one_of(st.text(max_size=70), st.from_regex(r"[A-Za-z0-9/{}_.:-]{1,12}")))
def test_a_one_event_record_is_read_the_quick_way_only_when_valid(field, value):
    """Strings of the wire type that the field's own rule may still refuse: the processor's
    quick path for one-event records (decode_one) takes exactly what the general path does."""
    doc = good()
    doc[field] = value
    check_answer(orjson.dumps(doc))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1100), st.sampled_from(['[{"x":%s}]', "[%s]", '[{"org_id":%s}]', "%s", '{"a":%s}',
                                               '[{"a":1}, %s]']))
def test_nesting_at_any_depth_is_refused_without_a_crash(depth, where):
    """The issue's record: an item nested ~300 levels deep parsed, then re-encoding it for
    its dead letter raised 'Recursion limit reached', which stopped both stages."""
    data = (where % deep(depth)).encode()
    check_answer(data)
    (answer,) = [x for x in decode_record(data, RECEIVED, BOUNDS) if isinstance(x, SchemaError)][-1:]
    if depth > MAX_DEPTH and answer.index is not None:
        assert answer.payload is None  # too deep to re-encode: the record as published is dead-lettered


def test_the_issue_record_gets_its_dead_letter_at_any_stack_depth():
    """Same answer however deep the caller's own stack is (stages call from different depths)."""
    data = ('[{"x":' + deep(300) + "}]").encode()

    def at_depth(n: int):
        if n:
            return at_depth(n - 1)
        return [(i, str(e), e.payload) for i, e in decode_columns(data, RECEIVED, BOUNDS).refused]

    assert at_depth(0) == at_depth(sys.getrecursionlimit() - 100)


@settings(max_examples=500, deadline=None)
@given(st.integers(-(10**13), 10**13))
def test_event_times_are_judged_against_the_records_arrival(offset_ms):
    ts = RECEIVED + offset_ms
    doc = {**good(), "ts_ms": ts}
    in_schema = events.TS_MIN_MS <= ts <= events.TS_MAX_MS
    for data in (orjson.dumps(doc), orjson.dumps([doc, doc])):
        items = decode_record(data, RECEIVED, BOUNDS)
        if not in_schema:
            assert all(isinstance(x, SchemaError) and x.kind == "invalid" for x in items)
        elif offset_ms > BOUNDS.ahead_ms:
            assert all(isinstance(x, SchemaError) and x.kind == TimeBounds.AHEAD for x in items)
            assert "s after the broker received the record" in str(items[0])
        elif offset_ms < -BOUNDS.behind_ms:
            assert all(isinstance(x, SchemaError) and x.kind == TimeBounds.EXPIRED for x in items)
            assert "older than the raw retention (30 days)" in str(items[0])
        else:
            assert all(isinstance(x, RequestEvent) for x in items)
        unbounded = [str(x) if isinstance(x, SchemaError) else x for x in decode_record(data)]
        assert unbounded == [str(x) if isinstance(x, SchemaError) else x for x in decode_record(data, RECEIVED, None)]
        check_answer(data)


def test_a_batch_with_one_event_out_of_time_refuses_that_event_only():
    docs = [good(), {**good(), "ts_ms": RECEIVED + 3_600_000}, good()]
    columns, indexes, refused = decode_columns(orjson.dumps(docs), RECEIVED, BOUNDS)
    assert list(indexes) == [0, 2] and [(i, e.kind) for i, e in refused] == [(1, TimeBounds.AHEAD)]
    assert orjson.loads(refused[0][1].payload) == docs[1]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["org_id", "api_key_id", "service", "endpoint", "client_ip", "user_agent"]),
       st.integers(1, 5000))
def test_strings_over_their_bound_are_refused(field, size):
    value = "z" * size  # not hex: a long hex segment would be refused as a raw id
    doc = {**good(), field: value if field != "endpoint" else "/" + value}
    limit = {"endpoint": events.ENDPOINT_MAX, "user_agent": events.USER_AGENT_MAX,
             "client_ip": events.CLIENT_IP_MAX}.get(field, 64)
    for data in (orjson.dumps(doc), orjson.dumps([doc])):
        (answer,) = decode_record(data, RECEIVED, BOUNDS)
        assert isinstance(answer, SchemaError) == (len(doc[field]) > limit or field == "client_ip")


def test_what_the_validation_caches_keep_is_bounded_whatever_is_published():
    """Measured in the issue: ~100 KB retained per record, the caches keeping whole
    invalid strings. Strings over their field's bound never reach a cache now."""
    import tracemalloc

    event_validation._valid_string.cache_clear()
    event_validation._valid_strings.cache_clear()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(300):
        big = f"{i:05d}" + "x" * 100_000
        for field in ("org_id", "user_agent", "client_ip", "endpoint"):
            decode_record(orjson.dumps([{**good(), field: big}]), RECEIVED, BOUNDS)
            decode_record(orjson.dumps({**good(), field: big}), RECEIVED, BOUNDS)
    retained = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert retained < 2_000_000, f"{retained} bytes retained after 2,400 records of 100 KB strings"
    assert event_validation._valid_string.cache_info().maxsize <= 16_384
