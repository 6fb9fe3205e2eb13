"""Each field's rule is declared once (schemas/event_fields.py); the checker, the fast
paths' wire types and the exported JSON Schema are derived from it. These tests hold the
derivations to one verdict: at every field's bounds, at bounds moved elsewhere, and on
arbitrary values (Hypothesis)."""

from __future__ import annotations

import math
from pathlib import Path

import jsonschema
import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.schemas.event_decoding import decode_batch_fast
from quotaflow.schemas.event_fields import (
    FIELDS,
    Const,
    Field,
    Id,
    IpAddress,
    LowercaseUuid,
    Number,
    OneOf,
    RouteTemplate,
    Text,
)
from quotaflow.schemas.event_validation import SchemaError, validate, validate_fast
from quotaflow.schemas.ids import ID_MAX
from tests.event_docs import good

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "request_event.v1.schema.json"
PUBLISHED = jsonschema.Draft202012Validator(orjson.loads(SCHEMA_FILE.read_bytes()), format_checker=jsonschema.FormatChecker())


def edges(rule) -> list:
    """Values on and just past a rule's bounds, read from the rule itself."""
    if isinstance(rule, Const):
        return [rule.const, rule.const + 1, rule.const - 1]
    if isinstance(rule, Number):
        lo, hi = rule.minimum, rule.maximum
        if rule.integer:
            return [lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, lo + 0.5]
        return [lo - 0.001, lo, float(lo), (lo + hi) / 2, hi, hi + 0.5, int(hi) + 1]
    if isinstance(rule, OneOf):
        return [*rule.choices, *(c.lower() for c in rule.choices), ""]
    if isinstance(rule, Id):
        return ["a" * ID_MAX, "a" * (ID_MAX + 1), "a", "", "-a", "a b", "a/b"]
    if isinstance(rule, RouteTemplate):
        n = rule.max_length
        return ["/" + "a" * (n - 1), "/" + "a" * n, "/", "/v1/users/{id}", "/v1/users/42", "v1", "/v1?q"]
    if isinstance(rule, IpAddress):
        return ["10.0.0.1", "::1", "2001:db8::1", "300.1.1.1", "1" * rule.max_length, "1" * (rule.max_length + 1), ""]
    if isinstance(rule, Text):
        return ["x" * rule.max_length, "x" * (rule.max_length + 1), ""]
    if isinstance(rule, LowercaseUuid):
        u = "123e4567-e89b-42d3-a456-426614174000"
        return [u, u.upper(), u.replace("-", ""), u[:-1], u + "0", ""]
    raise AssertionError(f"no edges for {rule!r}: add them here")


def verdicts(field: Field, value) -> dict[str, bool]:
    """Each path's verdict on a valid event with this field's value replaced."""
    doc = {**good(), field.name: value}
    try:
        validate(doc)
        validated = True
    except SchemaError:
        validated = False
    return {
        "checker": field.error(value) is None,
        "validate": validated,
        "validate's fast path": validate_fast(doc) is not None,
        "a batch's fast path": decode_batch_fast(orjson.dumps([doc])) is not None,
        "a single event's fast path": decode_batch_fast(orjson.dumps(doc)) is not None,
        "published JSON Schema": PUBLISHED.is_valid(doc),
    }


CASES = [(f, v) for f in FIELDS for v in edges(f.rule)]


@pytest.mark.parametrize("field, value", CASES, ids=[f"{f.name}={v!r:.30}" for f, v in CASES])
def test_every_path_gives_one_verdict_at_each_fields_bounds(field, value):
    got = verdicts(field, value)
    assert len(set(got.values())) == 1, got


def _rule_verdicts(rule, value) -> dict[str, bool]:
    """A rule's own derivations, outside any event: its checker, its wire type (and the
    rest, when the wire type is not the whole rule), its JSON Schema keywords."""
    try:
        msgspec.convert(value, rule.wire_type())
        wire = True
    except msgspec.ValidationError:
        wire = False
    if wire and not rule.complete_on_wire:
        wire = rule.error("f", value) is None if rule.repeats else rule.matches(value)
    schema = jsonschema.Draft202012Validator({"type": rule.json_type, **rule.json_schema()},
                                             format_checker=jsonschema.FormatChecker())
    return {"checker": rule.error("f", value) is None, "wire": wire, "JSON Schema": schema.is_valid(value)}


MOVED = [
    Number(-5, 7, integer=True), Number(10**12, 10**12 + 3, integer=True, unit="ms"), Number(0.5, 2.5),
    Const(3), OneOf(("a", "B")), Text(3), RouteTemplate(max_length=5), IpAddress(max_length=9),
]


@pytest.mark.parametrize("rule", MOVED, ids=repr)
def test_a_bound_changed_in_the_declaration_changes_every_path(rule):
    for value in edges(rule):
        got = _rule_verdicts(rule, value)
        assert len(set(got.values())) == 1, (value, got)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@st.composite
def field_values(draw):
    """A field, and a value for it: any JSON value, one of its edges, or an edge with a
    character added that a pattern may refuse."""
    field = draw(st.sampled_from(FIELDS))
    value = draw(st.one_of(json_values, st.sampled_from(edges(field.rule))))
    if isinstance(value, str) and draw(st.booleans()):
        value += draw(st.sampled_from(["\n", "/", "%", "{", " ", "é", "0", "?"]))
    return field, value


@settings(max_examples=3000, deadline=None)
@given(field_values())
def test_the_fast_paths_take_exactly_what_the_checker_takes(case):
    """Never more (a fast path is only a shortcut), and never less for values in their
    canonical JSON type (an integer written 12.0 takes the slow path)."""
    field, value = case
    doc = {**good(), field.name: value}
    canonical = not (field.rule.json_type == "integer" and isinstance(value, float))
    expected = field.error(value) is None and canonical
    fast = validate_fast(doc)
    assert (fast is not None) == expected, (value, fast)
    if fast is not None:  # and what it takes, it keeps as the checker reads it
        want, got = field.rule.value(value), getattr(fast, field.name)
        assert got == want and type(got) is type(want)
    if isinstance(value, float) and not math.isfinite(value):
        return  # JSON has no such number (orjson writes null)
    for record in (orjson.dumps([doc]), orjson.dumps(doc)):  # a batch of one, and the event alone
        batch = decode_batch_fast(record)
        assert (batch is not None) == expected, (value, batch)
        if batch is not None:
            assert tuple(batch[0][0]) == tuple(fast)


def test_a_decimal_is_refused_by_name_as_it_always_was():
    """msgspec reads a Decimal as a float; the rules take JSON's numbers only, and the
    fast path must not take what the checker refuses."""
    from decimal import Decimal

    for field in ("latency_ms", "status"):
        with pytest.raises(SchemaError, match=f"{field}: must be (a number|an integer), got Decimal"):
            validate({**good(), field: Decimal("5")})
