"""The key registry's pure logic: what each change makes of a key (quotaflow/keys/changes.py)
and how the stages read records of the keys topic (schemas/key_records.py), every
refusal with its reason. No server."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core.settings import Settings
from quotaflow.keys import changes
from quotaflow.keys.changes import KEEP, InvalidChange
from quotaflow.schemas import api_keys, key_records
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.key_records import InvalidRecord
from quotaflow.schemas.limits import policy_from_settings

POLICY = policy_from_settings(Settings())  # 60s/3600s/86400s; FREE 10/100/1000, STARTER 30/500/5000
SECRET = b"s" * 32
NOW = 1_800_000_000_000
ORG = "acme"


def create(**over) -> tuple[str, KeyRecord]:
    key = over.pop("key", None) or api_keys.generate(over.get("org_id", ORG), over.pop("env", "live"))
    args = dict(key=key, key_id="key_0000000000000001", org_id=ORG, name="ci job", secret_id="s1", secret=SECRET,
                scopes=("orders:read",), limits={"60s": 5}, expires_ms=None, actor="cli:alice", now_ms=NOW,
                policy=POLICY, tier="STARTER")
    args.update(over)
    return key, changes.created(**args)


# --- create ---------------------------------------------------------------------------


def test_a_created_key_keeps_its_hash_and_display_prefix_never_the_key():
    key, rec = create(scopes=("orders:write", "orders:read", "orders:read"))
    assert rec.key_hash == api_keys.key_hash(key, SECRET) and rec.display_prefix == api_keys.display_prefix(key)
    assert (rec.version, rec.change, rec.state, rec.created_ms, rec.updated_ms) == (1, "create", "active", NOW, NOW)
    assert rec.scopes == ("orders:read", "orders:write")  # distinct, sorted
    assert key not in rec.encode().decode() and key[len(rec.display_prefix):] not in rec.encode().decode()
    assert key_records.decode(rec.key_id.encode(), rec.encode()) == rec  # what the stages accept


@pytest.mark.parametrize(("over", "reason"), [
    ({"org_id": "bad org"}, "org_id: must be"),
    ({"key_id": "../x"}, "key_id: must be"),
    ({"name": ""}, "name: must be 1-128"),
    ({"name": " padded"}, "leading or trailing spaces"),
    ({"name": "x" * 129}, "name: must be 1-128"),
    ({"name": "tab\there"}, "printable"),
    ({"name": 42}, "name: must be"),
    ({"scopes": "orders:read"}, "scopes: must be a list"),
    ({"scopes": ["Orders"]}, "scope: must be"),
    ({"scopes": ["x" * 65]}, "scope: must be"),
    ({"scopes": [f"s{n}" for n in range(33)]}, "scopes: at most 32"),
    ({"scopes": [None]}, "scope: must be"),
    ({"limits": {"90s": 1}}, "unknown window '90s'"),
    ({"limits": {"60s": -1}}, "whole number"),
    ({"limits": {"60s": True}}, "whole number"),
    ({"limits": {"60s": 1.5}}, "whole number"),
    ({"limits": {"60s": 31}}, "above the org's tier (STARTER: 30 per 60s)"),
    ({"limits": {"60s": 11}, "tier": "NOSUCH"}, "above the org's tier (FREE: 10 per 60s)"),  # unknown: default
    ({"expires_ms": NOW}, "must be in the future"),
    ({"expires_ms": NOW - 1}, "must be in the future"),
    ({"expires_ms": "tomorrow"}, "expires: must be a time"),
    ({"expires_ms": changes.LATEST_MS + 1}, "up to 2299-12-31"),
    ({"actor": ""}, "actor: must be"),
    ({"actor": "a\nb"}, "actor: must be"),
    ({"key": api_keys.generate("someone-else")}, "not generated for this org"),
])
def test_create_refuses_bad_input_naming_the_field(over, reason):
    with pytest.raises(InvalidChange) as exc:
        create(**over)
    assert reason in str(exc.value)


def test_a_mistyped_key_is_never_recorded():
    key = api_keys.generate(ORG)
    with pytest.raises(api_keys.InvalidKey):
        create(key=key[:-1] + ("A" if key[-1] != "A" else "B"))


def test_an_unlimited_tier_takes_any_key_limit():
    import dataclasses

    policy = dataclasses.replace(POLICY, tiers={**POLICY.tiers, "UNLIMITED": (None, None, None)})
    _, rec = create(policy=policy, tier="UNLIMITED", limits={"60s": changes.LIMIT_MAX, "3600s": 0})
    assert rec.limits == {"3600s": 0, "60s": changes.LIMIT_MAX}


# --- update, revoke -------------------------------------------------------------------


def test_update_changes_what_is_given_and_bumps_the_version():
    _, rec = create()
    up = changes.updated(rec, name="renamed", limits={"60s": None, "3600s": 50}, expires_ms=NOW + 10,
                         actor="cli:bob", now_ms=NOW + 5, policy=POLICY, tier="STARTER")
    assert (up.name, up.limits, up.expires_ms, up.version, up.change, up.actor, up.updated_ms) == \
           ("renamed", {"3600s": 50}, NOW + 10, 2, "update", "cli:bob", NOW + 5)
    assert (up.scopes, up.key_hash, up.created_ms) == (rec.scopes, rec.key_hash, rec.created_ms)
    assert changes.updated(up, expires_ms=None, actor="x", now_ms=NOW + 6, policy=POLICY, tier="STARTER").expires_ms \
        is None
    assert changes.updated(up, name="renamed", scopes=list(up.scopes), actor="x", now_ms=NOW + 6, policy=POLICY,
                           tier="STARTER") is None  # nothing changes: no record
    assert changes.updated(up, actor="x", now_ms=NOW + 6, policy=POLICY, tier="STARTER") is None


def test_update_checks_like_create_and_revocation_is_final():
    _, rec = create()
    with pytest.raises(InvalidChange, match="above the org's tier"):
        changes.updated(rec, limits={"60s": 11}, actor="x", now_ms=NOW, policy=POLICY, tier="FREE")
    with pytest.raises(InvalidChange, match="actor"):
        changes.updated(rec, name="y", actor="", now_ms=NOW, policy=POLICY, tier="FREE")
    gone = changes.revoked(rec, actor="cli:carol", now_ms=NOW + 1)
    assert (gone.state, gone.version, gone.change, gone.actor) == ("revoked", 2, "revoke", "cli:carol")
    assert gone.state_at(NOW) == "revoked" and changes.revoked(gone, actor="x", now_ms=NOW + 2) is None
    with pytest.raises(InvalidChange, match="is revoked"):
        changes.updated(gone, name="back", actor="x", now_ms=NOW + 2, policy=POLICY, tier="STARTER")
    with pytest.raises(InvalidChange, match="is revoked"):
        changes.rotated(gone, key=api_keys.generate(ORG), key_id="key_2", secret_id="s1", secret=SECRET,
                        overlap_ms=0, actor="x", now_ms=NOW + 2, policy=POLICY, tier="STARTER")
    assert KEEP is changes.KEEP and repr(KEEP) == "KEEP"


# --- rotate ---------------------------------------------------------------------------


def rotate(rec: KeyRecord, overlap_ms: int, now_ms: int = NOW + 1000, **over):
    args = dict(key=api_keys.generate(rec.org_id, rec.env), key_id="key_0000000000000002", secret_id="s2",
                secret=b"t" * 32, overlap_ms=overlap_ms, actor="cli:dave", now_ms=now_ms, policy=POLICY,
                tier="STARTER")
    args.update(over)
    return changes.rotated(rec, **args)


@settings(max_examples=100, deadline=None)
@given(overlap_ms=st.integers(0, changes.OVERLAP_MAX_MS),
       expires_in=st.one_of(st.none(), st.integers(1, 2 * changes.OVERLAP_MAX_MS)),
       at=st.integers(0, 3 * changes.OVERLAP_MAX_MS))
def test_rotation_keeps_both_keys_valid_until_the_overlap_ends(overlap_ms, expires_in, at):
    now = NOW + 1000
    _, rec = create(expires_ms=None if expires_in is None else now + expires_in, env="test")
    new, old = rotate(rec, overlap_ms, now)
    end = now + overlap_ms if rec.expires_ms is None else min(now + overlap_ms, rec.expires_ms)
    assert old.expires_ms == end and old.rotated_to == new.key_id and old.version == rec.version + 1
    assert (new.rotated_from, new.org_id, new.name, new.env, new.scopes, new.limits, new.expires_ms) == \
           (rec.key_id, rec.org_id, rec.name, "test", rec.scopes, rec.limits, rec.expires_ms)
    assert new.change == old.change == "rotate" and new.secret_id == "s2" and new.key_hash != rec.key_hash
    t = now + at
    assert old.state_at(t) == ("active" if t < end else "expired")  # valid to the millisecond, then not
    assert new.state_at(t) == ("active" if rec.expires_ms is None or t < rec.expires_ms else "expired")
    for r in (new, old):
        assert key_records.decode(r.key_id.encode(), r.encode()) == r


@pytest.mark.parametrize(("setup", "over", "reason"), [
    ("plain", {"overlap_ms": -1}, "overlap: must be"),
    ("plain", {"overlap_ms": changes.OVERLAP_MAX_MS + 1}, "overlap: must be"),
    ("plain", {"overlap_ms": 1.5}, "overlap: must be"),
    ("plain", {"key": api_keys.generate(ORG, "test")}, "not generated for this key's env"),
    ("plain", {"key": api_keys.generate("other-org")}, "not generated for this org"),
    ("rotated", {}, "already rotated"),
    ("expired", {}, "has expired"),
])
def test_rotation_refusals(setup, over, reason):
    _, rec = create(expires_ms=NOW + 10)
    if setup == "rotated":
        rec = rotate(rec, 0, NOW + 1)[1]
    now = NOW + 20 if setup == "expired" else NOW + 1
    with pytest.raises(InvalidChange) as exc:
        rotate(rec, over.pop("overlap_ms", 0), now, **over)
    assert reason in str(exc.value)


# --- records of the keys topic, as the stages read them ---------------------------------

_, GOOD = create()


def record(**over) -> bytes:
    return msgspec.structs.replace(GOOD, **over).encode()


@pytest.mark.parametrize(("key", "value", "reason"), [
    (GOOD.key_id.encode(), None, "tombstone"),
    (GOOD.key_id.encode(), b"x" * (key_records.MAX_RECORD_BYTES + 1), "more than"),
    (GOOD.key_id.encode(), b"not json", "not a key record"),
    (GOOD.key_id.encode(), b"[]", "not a key record"),
    (GOOD.key_id.encode(), GOOD.encode()[:-1] + b',"key":"qf_live_x"}', "not a key record"),  # unknown field
    (GOOD.key_id.encode(), b'{"key_id":"k"}', "not a key record"),  # fields missing
    (GOOD.key_id.encode(), record(version="2"), "not a key record"),  # wrong type
    (None, GOOD.encode(), "Kafka key is not its key_id"),
    (b"key_other", GOOD.encode(), "Kafka key is not its key_id"),
    (GOOD.key_id.encode(), record(org_id="a b"), "org_id: must be"),
    (b"../x", record(key_id="../x"), "key_id: must be"),
    (GOOD.key_id.encode(), record(rotated_from=""), "rotated_from: must be"),
    (GOOD.key_id.encode(), record(rotated_to="x" * 65), "rotated_to: must be"),
    (GOOD.key_id.encode(), record(env="prod"), "env: must be one of"),
    (GOOD.key_id.encode(), record(org_id="not-acme"), "slot_hint: not the org's"),
    (GOOD.key_id.encode(), record(key_hash="A" * 64), "key_hash"),
    (GOOD.key_id.encode(), record(key_hash="a" * 63), "key_hash"),
    (GOOD.key_id.encode(), record(secret_id=""), "secret_id"),
    (GOOD.key_id.encode(), record(secret_id="a-b"), "secret_id"),
    (GOOD.key_id.encode(), record(display_prefix="qf_live_"), "display_prefix"),
    (GOOD.key_id.encode(), record(env="test"), "display_prefix"),  # a live prefix on a test key
    (GOOD.key_id.encode(), record(name=""), "name: must be"),
    (GOOD.key_id.encode(), record(name="\x1b[31m"), "name: must be"),
    (GOOD.key_id.encode(), record(actor="x" * 129), "actor: must be"),
    (GOOD.key_id.encode(), record(scopes=("UPPER",)), "scopes: at most"),
    (GOOD.key_id.encode(), record(scopes=tuple(f"s{n}" for n in range(33))), "scopes: at most"),
    (GOOD.key_id.encode(), record(limits={"60": 1}), "limits: window labels"),
    (GOOD.key_id.encode(), record(limits={"60s": -1}), "limits: window labels"),
    (GOOD.key_id.encode(), record(limits={"60s": 2**53}), "limits: window labels"),
    (GOOD.key_id.encode(), record(state="expired"), "state: must be one of"),  # expiry is read off expires_ms
    (GOOD.key_id.encode(), record(change="delete"), "change: must be one of"),
    (GOOD.key_id.encode(), record(version=0), "version: must be"),
    (GOOD.key_id.encode(), record(version=2**53), "version: must be"),
    (GOOD.key_id.encode(), record(created_ms=-1), "created_ms: must be epoch"),
    (GOOD.key_id.encode(), record(updated_ms=2**53), "updated_ms: must be epoch"),
    (GOOD.key_id.encode(), record(expires_ms=-5), "expires_ms: must be epoch"),
    (GOOD.key_id.encode(), record(expires_ms=key_records.MAX_TIME_MS + 1), "from 1970 to 2299"),
])
def test_every_hostile_record_is_refused_with_its_reason(key, value, reason):
    with pytest.raises(InvalidRecord) as exc:
        key_records.decode(key, value)
    assert reason in str(exc.value)
    assert len(str(exc.value)) < 400  # a reason, never the whole record


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_refused_or_a_checked_record(value):
    try:
        rec = key_records.decode(GOOD.key_id.encode(), value)
    except InvalidRecord as exc:
        assert len(str(exc)) < 400
    else:
        assert key_records.problem_of(rec) is None


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(("created_ms", "updated_ms", "expires_ms", "version")), st.integers(-(2**64), 2**64))
def test_every_record_accepted_is_one_the_audit_can_store(field, value):
    """What the stages accept converts to an audit row (a time past ClickHouse's DateTime64
    once stopped the sink's audit, over and over)."""
    from quotaflow.sinks.clickhouse.key_audit import row

    try:
        rec = key_records.decode(GOOD.key_id.encode(), record(**{field: value}))
    except InvalidRecord:
        return
    assert row(rec, 0, 0)[2] == rec.version


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KeyRecord.__struct_fields__), json_values)
def test_a_good_record_with_any_field_replaced_is_refused_or_still_checked(field, value):
    doc = msgspec.json.decode(GOOD.encode())
    doc[field] = value
    try:
        rec = key_records.decode(GOOD.key_id.encode(), msgspec.json.encode(doc))
    except InvalidRecord as exc:
        assert len(str(exc)) < 400
    else:
        assert key_records.problem_of(rec) is None and rec.key_id == GOOD.key_id


# --- the command's refusals that need no server ----------------------------------------


@pytest.mark.parametrize(("args", "env", "reason"), [
    (["create", "acme", "--name", "x"], {}, "QUOTAFLOW_KEY_HASH_SECRETS is not set"),
    (["rotate", "acme", "key_1", "--overlap", "1h"], {}, "QUOTAFLOW_KEY_HASH_SECRETS is not set"),
    (["create", "acme", "--name", "x"], {"QUOTAFLOW_KEY_HASH_SECRETS": '{"k1": "short"}'},
     "QUOTAFLOW_KEY_HASH_SECRETS (key_hash_secrets): secret #1: at least 32 characters"),
    (["create", "acme", "--name", "x", "--expires", "2027-01-31T00:00:00"], {}, "needs its zone"),
    (["update", "acme", "key_1", "--expires", "soon"], {}, "not a time"),
    (["rotate", "acme", "key_1", "--overlap", "1w"], {}, "not a duration"),
    (["create", "acme", "--name", "x", "--limit", "60s"], {}, "expected WINDOW=LIMIT"),
    (["create", "acme", "--name", "x", "--limit", "60s=-3"], {}, "expected a whole number"),
    (["revoke", "acme", "key_1", "--wait", "1e9"], {}, "seconds from 0 to 600"),
    (["update", "acme", "key_1"], {}, "nothing to update"),
    (["update", "acme", "key_1", "--scope", "a", "--no-scopes"], {}, "contradict each other"),
])
def test_the_command_refuses_bad_arguments_before_connecting(tmp_path, args, env, reason):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "QUOTAFLOW_KEY_HASH_SECRETS"}
    if "QUOTAFLOW_KEY_HASH_SECRETS" not in reason:  # a good secret: the refusal is for the reason given
        env = {"QUOTAFLOW_KEY_HASH_SECRETS": '{"k1": "' + "x" * 32 + '"}', **env}
    # ports where nothing listens: a refusal must come before any connection
    done = subprocess.run([sys.executable, "-m", "quotaflow", "keys", *args], capture_output=True, text=True,
                          timeout=60, env={**base, **env, "QUOTAFLOW_STATE_DIR": str(tmp_path),
                                           "QUOTAFLOW_KAFKA_PORT": "1", "QUOTAFLOW_REDIS_PORT": "2"})
    assert done.returncode == 2 and reason in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "cannot reach" not in done.stderr
    assert "x" * 32 not in done.stderr and "short" not in done.stderr  # never a secret's value


def test_update_arguments_become_the_changes_they_name():
    import argparse

    from quotaflow.cli.keys import _update_attrs, limit_item

    def attrs(**over):
        args = dict(name=None, scope=[], no_scopes=False, clear_limits=False, limit=[])
        args.update(over)
        return _update_attrs(argparse.Namespace(**args), Settings(), over.pop("expires", KEEP))

    assert attrs(clear_limits=True, limit=[limit_item("60s=3")]) == \
        {"limits": {"60s": 3, "3600s": None, "86400s": None}}  # the key's own limits dropped, one set again
    assert attrs(limit=[limit_item("3600s=none")]) == {"limits": {"3600s": None}}
    assert attrs(no_scopes=True, name="n") == {"name": "n", "scopes": ()}
    assert attrs(expires=None) == {"expires_ms": None}  # never expires
    _, rec = create(limits={"60s": 5, "3600s": 50})
    up = changes.updated(rec, **attrs(limit=[limit_item("3600s=none")]), actor="x", now_ms=NOW, policy=POLICY,
                         tier="STARTER")
    assert up.limits == {"60s": 5}
