"""The HTTP check endpoint behind a real nginx (Debian's, with auth_request), and as
Envoy's ext_authz would call it."""

from __future__ import annotations

import os
import re
import socket
import sys
from importlib import resources
from pathlib import Path

import httpx
import pytest

from quotaflow.deploy.procs import Proc, wait_until
from quotaflow.deploy.system_packages import ensure_command
from quotaflow.schemas.ids import ID_RULE
from quotaflow.schemas.api_keys import REVOKED, SCAN_PATTERN, generate
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key, reservations_key
from tests.key_records import SECRETS_ENV, new_key
from tests.pipeline import minute_start, stray_keys, unique, wait_for

pytestmark = pytest.mark.stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def _gateway(live_stack, tmp_path, env: dict):
    """`quotaflow gateway`, the check endpoint, as its own process."""
    proc = Proc("gateway", tmp_path / "run")
    proc.start([sys.executable, "-m", "quotaflow", "gateway"], tmp_path / "gateway.log", marker="quotaflow gateway",
               env={**os.environ, "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000", **env})
    base = f"http://127.0.0.1:{live_stack.gateway_port}"
    assert wait_until(lambda: serving(base + "/healthz"), 30), (tmp_path / "gateway.log").read_text()
    return proc, base


@pytest.fixture()
def check_endpoint(live_stack, tmp_path):
    """Verifying API keys (the default), with the tests' hash secrets."""
    proc, base = _gateway(live_stack, tmp_path, SECRETS_ENV)
    yield base
    proc.stop()


@pytest.fixture()
def trusted_check_endpoint(live_stack, tmp_path):
    """In the trusted mode: identity from X-Api-Key-Id / X-Org-Id, for an auth layer in front."""
    proc, base = _gateway(live_stack, tmp_path, {"QUOTAFLOW_GATEWAY_TRUST_IDENTITY_HEADERS": "true"})
    yield base
    proc.stop()


@pytest.fixture()
def nginx_in_front(check_endpoint, live_stack, tmp_path):
    nginx = ensure_command("nginx", "nginx")
    upstream_port, listen_port = free_port(), free_port()
    upstream = Proc("upstream", tmp_path / "run")
    upstream.start([sys.executable, "-m", "tests.echo_upstream", str(upstream_port)], tmp_path / "upstream.log",
                   marker="tests.echo_upstream")
    prefix = tmp_path / "nginx"
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / d).mkdir(parents=True)
    conf = resources.files("quotaflow.deploy").joinpath("nginx", "quotaflow.conf").read_text()
    for placeholder, value in {"@USER@": "user root;" if os.geteuid() == 0 else "", "@PREFIX@": str(prefix),
                               "@UPSTREAM@": f"127.0.0.1:{upstream_port}", "@LISTEN@": f"127.0.0.1:{listen_port}",
                               "@GATEWAY@": check_endpoint.removeprefix("http://")}.items():
        conf = conf.replace(placeholder, value)
    (prefix / "nginx.conf").write_text(conf)
    server = Proc("nginx", tmp_path / "run")
    server.start([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                 tmp_path / "nginx.out", marker=str(prefix / "nginx.conf"))
    url = f"http://127.0.0.1:{listen_port}/index.html"
    ok = wait_until(lambda: serving(f"http://127.0.0.1:{upstream_port}/") and server.pid() is not None
                    and _listening(listen_port), 30)
    assert ok, (tmp_path / "nginx.out").read_text() + Path(prefix / "error.log").read_text()
    yield url
    server.stop()
    upstream.stop()
    for log in ("access.log", "access.json", "error.log"):  # whatever a test sent, no key reached nginx's logs
        text = (prefix / log).read_text() if (prefix / log).exists() else ""
        assert not re.search(SCAN_PATTERN, text), log


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_nginx_auth_request_admits_up_to_the_limit_then_answers_429(nginx_in_front, redis_client, tmp_path):
    org = unique("org")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    key, rec = new_key(redis_client, org)
    minute_start(need_s=20)
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        responses = [client.get(nginx_in_front) for _ in range(12)]
    assert [r.status_code for r in responses] == [200] * 10 + [429] * 2
    assert responses[0].text == "hello from the api\n"
    assert [r.headers["X-RateLimit-Remaining"] for r in responses[:10]] == [str(9 - i) for i in range(10)]
    refused = responses[-1]
    assert refused.json() == {"error": "rate_limited", "reason": "rate limit exceeded (key:60s)"}
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Policy"] == ('"key-60s";q=10;w=60, "key-3600s";q=100;w=3600, '
                                                   '"key-86400s";q=1000;w=86400, "org-60s";q=10;w=60, '
                                                   '"org-3600s";q=100;w=3600, "org-86400s";q=1000;w=86400')
    assert refused.headers["RateLimit"].startswith('"key-60s";r=0;t=')
    assert refused.headers["X-RateLimit-Limit"] == "10" and refused.headers["X-RateLimit-Remaining"] == "0"
    # nginx's JSON log as `quotaflow ship` reads it: the admitted requests' events carry the
    # identity the check verified and the ids of their reservations, which counting them
    # releases; the refused ones the identity too, with their 429 (never counted)
    from quotaflow.collector.ship.events import EventBuilder, LineIds
    from quotaflow.collector.ship.formats import LineError, parser
    from quotaflow.collector.ship.routes import RouteMap

    log = tmp_path / "nginx" / "access.json"
    wait_for(lambda: log.exists() and log.read_bytes().count(b"\n") == 12, 10, "nginx to log the 12 requests")
    build, parse = EventBuilder(RouteMap(), service="nginx", latency_ms_per_unit=1000).build, parser("nginx_json", {})
    shipped, refused_lines = [], []
    for at, line in enumerate(log.read_bytes().splitlines()):
        try:
            shipped.append(build(parse(line), LineIds("0" * 32), at))
        except LineError as exc:
            refused_lines.append(exc.reason)
    reserved = {m.decode() for m in redis_client.zrange(reservations_key(org, rec.key_id), 0, -1)}
    assert {e["event_id"] for e in shipped if e["status"] == 200} == reserved and len(reserved) == 10
    assert [(e["org_id"], e["api_key_id"], e["status"], e["endpoint"]) for e in shipped] == [
        (org, rec.key_id, 200, "/index.html")] * 10 + [(org, rec.key_id, 429, "/index.html")] * 2
    assert refused_lines == [] and len({e["event_id"] for e in shipped}) == 12


def test_check_endpoint_answers_as_envoy_ext_authz_expects(check_endpoint, redis_client):
    org = unique("org")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    key, rec = new_key(redis_client, org)
    bearer = {"Authorization": f"Bearer {key}"}
    minute_start(need_s=20)
    with httpx.Client(base_url=check_endpoint, timeout=10) as client:
        assert client.get("/check").status_code == 401  # no key
        assert client.get("/check", headers={"X-Api-Key-Id": "web", "X-Org-Id": org}).status_code == 401  # ids: no
        assert client.get("/check", params={"deny_status": "500"}, headers=bearer).status_code == 400
        answers = [client.post("/check", headers=bearer) for _ in range(11)]
    assert [a.status_code for a in answers] == [200] * 10 + [429]
    assert answers[0].headers["X-Quotaflow-Event-Id"] and int(answers[0].headers["X-Quotaflow-Event-Ts"]) > 0
    assert (answers[0].headers["X-Quotaflow-Org-Id"], answers[0].headers["X-Quotaflow-Api-Key-Id"]) == (
        org, rec.key_id)
    assert answers[-1].json()["window"] == "key:60s"
    # a rate-limited key's identity is in its 429 (for the proxy's log); another refusal's is not
    assert (answers[-1].headers["X-Quotaflow-Org-Id"], answers[-1].headers["X-Quotaflow-Api-Key-Id"]) == (
        org, rec.key_id)
    revoked, _ = new_key(redis_client, org, state="revoked")
    with httpx.Client(base_url=check_endpoint, timeout=10) as client:
        refused = client.get("/check", headers={"Authorization": f"Bearer {revoked}"})
    assert refused.status_code == 401 and "X-Quotaflow-Org-Id" not in refused.headers
    assert "Retry-After" in answers[-1].headers and "Retry-After" not in answers[0].headers


# Ids the rule refuses, as headers can carry them; the first ones would alias Redis keys.
BAD_IDS = ["web}:usage:org", "{acme}", "a/b", "a b", ".hidden", "x" * 65, "x" * 2000, "ключ".encode()]


def test_check_endpoint_refuses_ids_that_break_the_rule_with_400_and_the_reason(trusted_check_endpoint,
                                                                                   redis_client):
    """In the trusted mode, the identity headers are judged by the id rule."""
    org = unique("org")
    sent = []
    with httpx.Client(base_url=trusted_check_endpoint, timeout=10) as client:
        for bad in BAD_IDS:
            for headers, name in (({"X-Api-Key-Id": bad, "X-Org-Id": org}, "X-Api-Key-Id"),
                                  ({"X-Api-Key-Id": "web", "X-Org-Id": bad}, "X-Org-Id")):
                r = client.get("/check", headers=headers)
                sent.append(tuple(v.decode("latin-1") if isinstance(v, bytes) else v for v in headers.values()))
                assert r.status_code == 400, (bad, name)
                reason = r.json()["reason"]
                assert r.json()["error"] == "invalid_identity" and r.headers["X-Quotaflow-Error"] == reason
                assert reason.startswith(f"{name}: must be {ID_RULE}")
                shown = bad.decode() if isinstance(bad, bytes) else bad
                assert shown not in reason  # the value is never echoed: it may be a secret
        # as nginx asks: a status auth_request understands, the reason in the header
        r = client.get("/check", params={"deny_status": "403", "invalid_status": "401"},
                       headers={"X-Api-Key-Id": "web}:x", "X-Org-Id": org})
        assert r.status_code == 401 and r.headers["X-Quotaflow-Error"].startswith("X-Api-Key-Id: must be")
        assert client.get("/check", params={"invalid_status": "500"},
                          headers={"X-Api-Key-Id": "web", "X-Org-Id": org}).status_code == 400
        assert client.get("/check", headers={"X-Api-Key-Id": "", "X-Org-Id": org}).status_code == 401  # missing
        assert client.get("/check", headers={"X-Api-Key-Id": "web", "X-Org-Id": org}).status_code == 200
    assert stray_keys(redis_client, sent) == []


@pytest.mark.parametrize("size", [100_000, 1_000_000])
def test_check_endpoint_answers_an_oversized_request_head_with_431_not_a_reset(check_endpoint, redis_client, size):
    """A 100 kB key, a 1 MB header: a 431 the client reads (no TCP reset), no Redis key."""
    org = unique("org")
    key, _ = new_key(redis_client, org)
    with httpx.Client(base_url=check_endpoint, timeout=10) as client:
        big_key = client.get("/check", headers={"Authorization": "Bearer " + "k" * size, "X-Org-Id": org})
        big_other = client.get("/check", headers={"Authorization": f"Bearer {key}", "X-Padding": "p" * size})
        after = client.get("/check", headers={"Authorization": f"Bearer {key}"})  # the server is fine
    for r in (big_key, big_other):
        assert r.status_code == 431 and "request head too large" in r.text
    assert after.status_code == 200
    # the same as a raw client that sends everything before reading anything
    host, port = check_endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /check HTTP/1.1\r\nHost: x\r\nX-Org-Id: " + org.encode() + b"\r\nX-Api-Key-Id: "
                  + b"k" * size + b"\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n") and b"connection: close" in answer
    assert stray_keys(redis_client, [("k" * size, org)]) == []


def test_nginx_passes_the_key_and_forwards_only_the_identity_it_verified(nginx_in_front, redis_client, tmp_path):
    """The issue's attack through nginx: identity headers a client sends reach neither the
    check nor the API, so ten requests claiming a victim org lock nobody out; each refusal
    reaches the client with its status and reason, and the API sees the verified identity."""
    victim = unique("acme")
    redis_client.hset(org_key(victim), ORG_TIER_FIELD, "FREE")
    key, rec = new_key(redis_client, victim, scopes=("orders:read",))
    revoked, _ = new_key(redis_client, victim, state=REVOKED, scopes=("admin",))
    admin, admin_rec = new_key(redis_client, victim, scopes=("admin",))
    base = nginx_in_front.removesuffix("/index.html")
    upstream_log = tmp_path / "upstream.log"
    served_before = upstream_log.read_text().count("GET /")
    spoof = {"X-Org-Id": victim, "X-Quotaflow-Org-Id": victim, "X-Quotaflow-Api-Key-Id": "web",
             "X-Quotaflow-Scope": "admin"}
    minute_start(need_s=20)
    with httpx.Client(timeout=10) as client:
        spoofed = [client.get(f"{base}/orders", headers={**spoof, "X-Api-Key-Id": f"made-up-{i}"}) for i in range(10)]
        refusals = {
            "missing": client.get(f"{base}/orders", headers=spoof),
            "mistyped": client.get(f"{base}/orders", headers={"Authorization": f"Bearer {key[:-1]}Z"}),
            "unknown": client.get(f"{base}/orders", headers={"X-Api-Key": generate(victim)}),
            "revoked": client.get(f"{base}/admin/users", headers={"Authorization": f"Bearer {revoked}"}),
            "scope": client.get(f"{base}/admin/users", headers={"Authorization": f"Bearer {key}", **spoof}),
        }
        own = client.get(f"{base}/orders", headers={"Authorization": f"Bearer {key}", **spoof,
                                                    "X-Api-Key-Id": "web"})
        as_admin = client.get(f"{base}/admin/users", headers={"Authorization": f"Bearer {admin}"})
    assert {(r.status_code, r.json()["error"]) for r in spoofed} == {(401, "missing_key")}
    expected = {"missing": (401, "missing_key"), "mistyped": (401, "malformed_key"), "unknown": (401, "unknown_key"),
                "revoked": (401, "revoked_key"), "scope": (403, "insufficient_scope")}
    got = {name: (r.status_code, r.json().get("error")) for name, r in refusals.items()}
    assert got == expected, {name: r.text for name, r in refusals.items()}
    assert refusals["mistyped"].json()["reason"] == (
        "not an API key: its checksum does not match (mistyped or invented)")
    assert refusals["scope"].json()["reason"] == "this API key lacks the scope admin"
    assert refusals["scope"].headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="admin"'
    assert refusals["revoked"].headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert refusals["missing"].headers["WWW-Authenticate"] == "Bearer"
    # the API saw the identity quotaflow verified, never the client's claims
    assert own.status_code == 200 and own.headers["X-RateLimit-Remaining"] == "9"  # the spoofs reserved nothing
    seen = own.json()
    assert (seen["x-quotaflow-org-id"], seen["x-quotaflow-api-key-id"]) == (victim, rec.key_id)
    assert "x-org-id" not in seen and "x-api-key-id" not in seen and "x-quotaflow-scope" not in seen
    assert as_admin.status_code == 200 and as_admin.json()["x-quotaflow-api-key-id"] == admin_rec.key_id
    assert upstream_log.read_text().count("GET /") == served_before + 2  # only the two admitted went through
    assert redis_client.zcard(reservations_key(victim)) == 2
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert f"api_key_id={rec.key_id}" in access and key not in access
