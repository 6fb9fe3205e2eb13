"""The gateway's cache of presented keys' record names (gateway/key_names.py): pure logic,
no server. It must answer exactly what schemas/api_keys.record_names answers, refuse what
is not a key without keeping anything, stay bounded, and keep no plaintext key."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.gateway.key_names import RecordNames
from quotaflow.schemas.api_keys import InvalidKey, generate, record_names

SECRETS = (b"secret-one-0123456789abcdef", b"secret-two-0123456789abcdef")


def test_names_are_record_names_the_first_time_and_every_time_after():
    names = RecordNames(SECRETS)
    keys = [generate(f"org{n}") for n in range(5)]
    first = [names(k) for k in keys]
    again = [names(k) for k in keys]
    assert first == again == [tuple(record_names(k, SECRETS)) for k in keys]
    assert len(names) == 5


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.builds(lambda k, i, c: k[:i] + c + k[i + 1:], st.just(generate("acme")),
                                         st.integers(0, 44), st.sampled_from("0aZ_ é")))
def test_what_is_not_a_key_is_refused_as_record_names_refuses_it_and_never_kept(text):
    names = RecordNames(SECRETS)
    try:
        expected = tuple(record_names(text, SECRETS))
    except InvalidKey as exc:
        with pytest.raises(InvalidKey, match=re.escape(str(exc))):
            names(text)
        with pytest.raises(InvalidKey):  # asked again: refused again, not answered from the cache
            names(text)
        assert len(names) == 0
    else:
        assert names(text) == names(text) == expected


def test_the_cache_is_bounded_and_keeps_no_plaintext_key():
    names = RecordNames(SECRETS, max_entries=8)
    keys = [generate("acme") for _ in range(20)]
    for k in keys:
        names(k)
    assert len(names) == 8
    kept = repr(names._names)
    assert not any(k in kept or k.encode() in b"".join(names._names) for k in keys)
    # an entry that left is computed again, the same
    assert names(keys[0]) == tuple(record_names(keys[0], SECRETS)) and len(names) == 8


def test_another_secret_gives_other_names():
    key = generate("acme")
    assert RecordNames(SECRETS)(key) != RecordNames(SECRETS[1:])(key)
    assert RecordNames(SECRETS[1:])(key) == tuple(record_names(key, SECRETS[1:]))
