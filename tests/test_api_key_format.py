"""API key format (schemas/api_keys.py): pure logic, no server."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from quotaflow.schemas import api_keys
from quotaflow.schemas.api_keys import InvalidKey, display_prefix, generate, key_hash, parse, slot_hint
from quotaflow.schemas.redis_keys import org_key

org_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")


@settings(max_examples=50, deadline=None)
@given(org_ids, st.sampled_from(api_keys.ENVIRONMENTS))
def test_generated_keys_parse_match_the_scan_pattern_and_land_in_their_orgs_slot(org, env):
    key = generate(org, env)
    parsed = parse(key)
    assert parsed.env == env
    assert re.fullmatch(api_keys.SCAN_PATTERN, key) and re.search(api_keys.SCAN_PATTERN, f"token={key};")
    assert key_slot(f"qf:v1:{{{parsed.slot_tag}}}:apikey:x".encode()) == key_slot(org_key(org).encode())
    assert len(key) == len(f"qf_{env}_") + api_keys.BODY_CHARS + 1 + api_keys.CHECK_CHARS


def test_keys_are_random_and_their_hint_is_the_orgs():
    keys = {generate("acme") for _ in range(200)}
    assert len(keys) == 200
    assert {parse(k).slot_hint for k in keys} == {slot_hint("acme")}
    bodies = [k.split("_")[2][api_keys.SLOT_HINT_CHARS:] for k in keys]
    assert len(set(bodies)) == 200 and all(len(b) == api_keys.RANDOM_CHARS for b in bodies)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mistyped_key_is_refused_offline(data):
    """Any one character changed, dropped or added: refused by the checksum or the shape."""
    key = generate("acme")
    i = data.draw(st.integers(0, len(key) - 1))
    edit = data.draw(st.sampled_from(["replace", "drop", "insert"]))
    c = data.draw(st.sampled_from(api_keys.BASE62 + "_-"))
    typo = {"replace": key[:i] + c + key[i + 1:], "drop": key[:i] + key[i + 1:], "insert": key[:i] + c + key[i:]}[edit]
    if typo == key:
        return
    with pytest.raises(InvalidKey):
        parse(typo)


@given(st.text(max_size=300))
def test_anything_else_is_refused_with_a_reason_that_never_repeats_it(text):
    try:
        parse(text)
    except InvalidKey as exc:
        assert "not an API key" in str(exc) and (len(text) < 8 or text not in str(exc))


def test_the_display_prefix_tells_keys_apart_and_the_hash_needs_the_secret():
    key = generate("acme", "test")
    assert display_prefix(key) == key[:len("qf_test_") + api_keys.DISPLAY_CHARS]
    assert key_hash(key, b"one") != key_hash(key, b"two")
    assert key_hash(key, b"one") == key_hash(key, b"one") and len(key_hash(key, b"one")) == 64
    assert key not in key_hash(key, b"one")


@given(st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([0, 61, 62, 3843, 3844, 2 ** 32 - 1])))
def test_the_checksum_digits_are_the_numbers_base62_form(n):
    """The checksum's six digits (three table lookups) are the CRC32 in base62, most
    significant first, as keys made before have them."""
    digits = api_keys._base62_6(n)
    assert len(digits) == api_keys.CHECK_CHARS
    value = 0
    for c in digits:
        value = value * 62 + api_keys.BASE62.index(c)
    assert value == n
