"""The admin HTTP API (`quotaflow admin`) on the real stack: served by the command as an
operator runs it, every change through the registry to the keys topic and, by the
processor, to Redis where gateways read it; only operator tokens; every refusal a 4xx
naming its reason; no key or token in an answer that should not carry it or in the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from quotaflow.schemas import api_keys
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from tests.keys_helpers import KEY_ENV, record_fields
from tests.pipeline import unique, wait_for

pytestmark = pytest.mark.stack

OPERATOR_TOKEN = "operator-token-for-the-admin-api-test-0123456789"
ORG_TOKEN = "org-token-for-the-admin-api-test-0123456789"


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture()
def admin(live_stack, tmp_path):
    """`quotaflow admin` running on the stack's admin port; yields (client, its log file)."""
    log = tmp_path / "admin.log"
    env = {**os.environ, **KEY_ENV, "QUOTAFLOW_API_TOKENS": json.dumps({OPERATOR_TOKEN: "*", ORG_TOKEN: "acme"})}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quotaflow", "admin"], stdout=out, stderr=out, env=env)
    base = f"http://127.0.0.1:{live_stack.admin_port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(base + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 60, "the admin API to serve", lambda: log.read_text())
        with httpx.Client(base_url=base, timeout=30, headers={"authorization": f"Bearer {OPERATOR_TOKEN}"}) as client:
            yield client, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openapi_schema_lists_every_operation_and_no_422(admin):
    client, _ = admin
    schema = httpx.get(f"{client.base_url}/openapi.json", timeout=10).json()  # no token needed
    ops = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert ops == {("/v1/orgs/{org_id}/keys", "get"), ("/v1/orgs/{org_id}/keys", "post"),
                   ("/v1/orgs/{org_id}/keys/{key_id}", "get"), ("/v1/orgs/{org_id}/keys/{key_id}", "patch"),
                   ("/v1/orgs/{org_id}/keys/{key_id}/revoke", "post"), ("/v1/orgs/{org_id}/keys/{key_id}/rotate", "post")}
    for item in schema["paths"].values():
        for op in item.values():
            assert "422" not in op["responses"] and {"400", "401", "403"} <= set(op["responses"])
    assert "key" in schema["components"]["schemas"]["IssuedKey"]["properties"]
    assert "key" not in schema["components"]["schemas"]["Key"]["properties"]
    assert "key_hash" not in json.dumps(schema)
    assert httpx.get(f"{client.base_url}/docs", timeout=10).status_code == 404  # its page would load remote scripts


def test_only_operator_tokens_and_no_token_echoed(admin):
    client, log = admin
    path = f"/v1/orgs/{unique('org')}/keys"
    cases = [({}, 401, "missing Authorization header"),
             ({"authorization": "Basic abc"}, 401, "Authorization must be 'Bearer <token>'"),
             ({"authorization": "Bearer not-one-of-ours-0123456789"}, 401, "unknown bearer token"),
             ({"authorization": f"Bearer {ORG_TOKEN}"}, 403, "only operator tokens")]
    for headers, status, reason in cases:
        for method in ("GET", "POST"):
            r = httpx.request(method, f"{client.base_url}{path}", headers=headers,
                              json={"name": "x"}, timeout=10)
            assert r.status_code == status and reason in r.json()["error"], (headers, r.text)
            assert "not-one-of-ours" not in r.text and ORG_TOKEN not in r.text
            if status == 401:
                assert r.headers["www-authenticate"].startswith("Bearer")
    text = log.read_text()
    assert OPERATOR_TOKEN not in text and ORG_TOKEN not in text and "not-one-of-ours" not in text


def test_create_show_update_rotate_revoke_through_http(admin, redis_client, pipeline):
    client, log = admin
    org = unique("acme")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "STARTER")
    pipeline.start("processor")

    # create: 201, the key in this answer only, not to be cached; gateways see it (Redis)
    r = client.post(f"/v1/orgs/{org}/keys", json={"name": "billing job", "scopes": ["orders:read"],
                                                  "limits": {"60s": 7}})
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    key, key_id = created["key"], created["key_id"]
    api_keys.parse(key)
    assert created["visible_ms"] is not None and created["actor"] == "api:token#1"
    assert record_fields(redis_client, org, key)["state"] == "active"
    assert record_fields(redis_client, org, key)["limits"] == "60s=7"

    # list and show: never the key or its hash
    listed = client.get(f"/v1/orgs/{org}/keys").json()
    assert [k["key_id"] for k in listed] == [key_id] and key not in json.dumps(listed)
    shown = client.get(f"/v1/orgs/{org}/keys/{key_id}").json()
    assert shown["state"] == "active" and shown["display_prefix"] == api_keys.display_prefix(key)
    assert "key" not in shown and "key_hash" not in shown and key not in json.dumps(shown)

    # update: what is given changes, the rest stays; nothing given is refused
    r = client.patch(f"/v1/orgs/{org}/keys/{key_id}", json={"scopes": ["orders:read", "invoices:read"],
                                                            "limits": {"60s": None}})
    assert r.status_code == 200, r.text
    changed = r.json()
    assert changed["changed"] and changed["key"]["version"] == 2 and changed["key"]["name"] == "billing job"
    assert changed["key"]["limits"] == {}
    assert record_fields(redis_client, org, key)["scopes"] == "invoices:read orders:read"
    r = client.patch(f"/v1/orgs/{org}/keys/{key_id}", json={"scopes": ["invoices:read", "orders:read"]})
    assert r.status_code == 200 and r.json()["changed"] is False  # already so: nothing recorded
    r = client.patch(f"/v1/orgs/{org}/keys/{key_id}", json={})
    assert r.status_code == 400 and "nothing to update" in r.json()["error"]

    # rotate: a new key; the old one valid for the overlap, to the second
    before = now_ms()
    r = client.post(f"/v1/orgs/{org}/keys/{key_id}/rotate", json={"overlap_s": 60})
    assert r.status_code == 200, r.text
    rotated = r.json()
    new_key, new_id = rotated["new"]["key"], rotated["new"]["key_id"]
    assert new_key != key and rotated["new"]["rotated_from"] == key_id and rotated["old"]["rotated_to"] == new_id
    assert before + 60_000 <= rotated["old"]["expires_ms"] <= now_ms() + 60_000
    assert record_fields(redis_client, org, new_key)["state"] == "active"
    assert record_fields(redis_client, org, key)["expires_ms"] == str(rotated["old"]["expires_ms"])

    # revoke: final, every gateway's record says so
    r = client.post(f"/v1/orgs/{org}/keys/{new_id}/revoke")
    assert r.status_code == 200 and r.json()["key"]["state"] == "revoked", r.text
    assert record_fields(redis_client, org, new_key)["state"] == "revoked"
    r = client.post(f"/v1/orgs/{org}/keys/{new_id}/revoke")
    assert r.status_code == 200 and r.json()["changed"] is False

    text = log.read_text()
    assert key not in text and new_key not in text


def test_bad_requests_are_refused_naming_the_reason(admin, redis_client, pipeline):
    client, _ = admin
    org = unique("acme")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    pipeline.start("processor")
    cases = [
        ("post", f"/v1/orgs/{org}/keys", {"name": "x", "colour": "red"}, 400, "colour"),
        ("post", f"/v1/orgs/{org}/keys", {"name": "x", "env": "prod"}, 400, "env"),
        ("post", f"/v1/orgs/{org}/keys", {"name": "x", "limits": {"60s": "5"}}, 400, "limits"),
        ("post", f"/v1/orgs/{org}/keys", {"name": "x", "limits": {"60s": 11}}, 400, "FREE"),  # above the tier's 10
        ("post", f"/v1/orgs/{org}/keys", {"name": "x", "scopes": ["Orders Read"]}, 400, "scope"),
        ("post", f"/v1/orgs/{org}/keys", {"name": ""}, 400, "name"),
        ("post", "/v1/orgs/bad%7D:org/keys", {"name": "x"}, 400, "org_id"),
        ("get", f"/v1/orgs/{org}/keys/key_doesnotexist00", None, 404, "has no key"),
        ("post", f"/v1/orgs/{org}/keys/key_doesnotexist00/rotate", {"overlap_s": -1}, 400, "overlap_s"),
        ("post", f"/v1/orgs/{org}/keys/key_doesnotexist00/revoke", None, 404, "has no key"),
    ]
    for method, path, body, status, reason in cases:
        r = client.request(method.upper(), path, json=body)
        assert r.status_code == status and reason in r.json()["error"], (path, body, r.status_code, r.text)
    r = client.post(f"/v1/orgs/{org}/keys", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert client.get(f"/v1/orgs/{org}/keys").json() == []  # nothing was created by any of them
