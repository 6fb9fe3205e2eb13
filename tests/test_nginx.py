"""The HTTP check endpoint behind a real nginx (Debian's, with auth_request), and as
Envoy's ext_authz would call it."""

from __future__ import annotations

import os
import socket
import sys
from importlib import resources
from pathlib import Path

import httpx
import pytest

from quotaflow.deploy.procs import Proc, wait_until
from quotaflow.deploy.system_packages import ensure_command
from quotaflow.schemas.ids import ID_RULE
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from tests.pipeline import minute_start, stray_keys, unique

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


@pytest.fixture()
def check_endpoint(live_stack, tmp_path):
    """`quotaflow gateway`, the check endpoint, as its own process."""
    proc = Proc("gateway", tmp_path / "run")
    proc.start([sys.executable, "-m", "quotaflow", "gateway"], tmp_path / "gateway.log", marker="quotaflow gateway",
               env={**os.environ, "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000"})
    base = f"http://127.0.0.1:{live_stack.gateway_port}"
    assert wait_until(lambda: serving(base + "/healthz"), 30), (tmp_path / "gateway.log").read_text()
    yield base
    proc.stop()


@pytest.fixture()
def nginx_in_front(check_endpoint, live_stack, tmp_path):
    nginx = ensure_command("nginx", "nginx")
    upstream_port, listen_port = free_port(), free_port()
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from the api\n")
    upstream = Proc("upstream", tmp_path / "run")
    upstream.start([sys.executable, "-m", "http.server", str(upstream_port), "--bind", "127.0.0.1",
                    "--directory", str(site)], tmp_path / "upstream.log", marker="http.server")
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


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_nginx_auth_request_admits_up_to_the_limit_then_answers_429(nginx_in_front, redis_client):
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    minute_start(need_s=20)
    with httpx.Client(headers={"X-Api-Key-Id": key, "X-Org-Id": org}, timeout=10) as client:
        responses = [client.get(nginx_in_front) for _ in range(12)]
    assert [r.status_code for r in responses] == [200] * 10 + [429] * 2
    assert responses[0].text == "hello from the api\n"
    assert [r.headers["X-RateLimit-Remaining"] for r in responses[:10]] == [str(9 - i) for i in range(10)]
    refused = responses[-1]
    assert refused.json() == {"error": "rate limit exceeded"}
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Policy"] == ('"key-60s";q=10;w=60, "key-3600s";q=100;w=3600, '
                                                   '"key-86400s";q=1000;w=86400, "org-60s";q=10;w=60, '
                                                   '"org-3600s";q=100;w=3600, "org-86400s";q=1000;w=86400')
    assert refused.headers["RateLimit"].startswith('"key-60s";r=0;t=')
    assert refused.headers["X-RateLimit-Limit"] == "10" and refused.headers["X-RateLimit-Remaining"] == "0"


def test_check_endpoint_answers_as_envoy_ext_authz_expects(check_endpoint, redis_client):
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    minute_start(need_s=20)
    with httpx.Client(base_url=check_endpoint, timeout=10) as client:
        assert client.get("/check").status_code == 401  # no identity
        assert client.get("/check", params={"deny_status": "500"},
                          headers={"X-Api-Key-Id": key, "X-Org-Id": org}).status_code == 400
        answers = [client.post("/check", headers={"X-Api-Key-Id": key, "X-Org-Id": org}) for _ in range(11)]
    assert [a.status_code for a in answers] == [200] * 10 + [429]
    assert answers[0].headers["X-Quotaflow-Event-Id"] and int(answers[0].headers["X-Quotaflow-Event-Ts"]) > 0
    assert answers[-1].json()["window"] == "key:60s"
    assert "Retry-After" in answers[-1].headers and "Retry-After" not in answers[0].headers


# Ids the rule refuses, as headers can carry them; the first ones would alias Redis keys.
BAD_IDS = ["web}:usage:org", "{acme}", "a/b", "a b", ".hidden", "x" * 65, "x" * 2000, "ключ".encode()]


def test_check_endpoint_refuses_ids_that_break_the_rule_with_400_and_the_reason(check_endpoint, redis_client):
    org = unique("org")
    sent = []
    with httpx.Client(base_url=check_endpoint, timeout=10) as client:
        for bad in BAD_IDS:
            for headers, name in (({"X-Api-Key-Id": bad, "X-Org-Id": org}, "X-Api-Key-Id"),
                                  ({"X-Api-Key-Id": "web", "X-Org-Id": bad}, "X-Org-Id")):
                r = client.get("/check", headers=headers)
                sent.append(tuple(v.decode("latin-1") if isinstance(v, bytes) else v for v in headers.values()))
                assert r.status_code == 400, (bad, name)
                reason = r.json()["reason"]
                assert r.json()["error"] == "invalid identity" and r.headers["X-Quotaflow-Error"] == reason
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
    """A 100 kB key id, a 1 MB header: a 431 the client reads (no TCP reset), no Redis key."""
    org = unique("org")
    with httpx.Client(base_url=check_endpoint, timeout=10) as client:
        big_key = client.get("/check", headers={"X-Api-Key-Id": "k" * size, "X-Org-Id": org})
        big_other = client.get("/check", headers={"X-Api-Key-Id": "web", "X-Org-Id": org, "X-Padding": "p" * size})
        after = client.get("/check", headers={"X-Api-Key-Id": "web", "X-Org-Id": org})  # the server is fine
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


def test_nginx_answers_a_bad_identity_with_400_and_the_reason(nginx_in_front, redis_client, tmp_path):
    """auth_request would turn a 400 of the check into a 500: the check answers nginx 401 with
    the reason in a header, and nginx turns that into a 400 with the reason."""
    org = unique("org")
    upstream_log = tmp_path / "upstream.log"
    served_before = upstream_log.read_text().count("GET /index.html")
    with httpx.Client(timeout=10) as client:
        bad_key = client.get(nginx_in_front, headers={"X-Api-Key-Id": "web}:usage:org", "X-Org-Id": org})
        bad_org = client.get(nginx_in_front, headers={"X-Api-Key-Id": "web", "X-Org-Id": "o" * 200})
        missing = client.get(nginx_in_front, headers={"X-Org-Id": org})
        huge = client.get(nginx_in_front, headers={"X-Api-Key-Id": "k" * 100_000, "X-Org-Id": org})
        good = client.get(nginx_in_front, headers={"X-Api-Key-Id": "web", "X-Org-Id": org})
    assert bad_key.status_code == 400 and bad_key.json() == {
        "error": "invalid identity",
        "reason": f"X-Api-Key-Id: must be {ID_RULE} (got 14 characters; the value is not repeated here)"}
    assert bad_org.status_code == 400 and bad_org.json()["reason"].startswith(f"X-Org-Id: must be {ID_RULE}")
    assert missing.status_code == 401 and "required" in missing.json()["error"]
    assert huge.status_code == 400  # nginx's own answer: the header is larger than its buffers
    assert good.status_code == 200 and good.text == "hello from the api\n"
    assert upstream_log.read_text().count("GET /index.html") == served_before + 1  # only the good one went through
    assert stray_keys(redis_client, [("web}:usage:org", org), ("web", "o" * 200), ("k" * 100_000, org)]) == []
