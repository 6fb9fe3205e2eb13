"""`quotaflow ship` behind Debian's nginx under wrk's load, end to end: the access log
rotated twice (rename + nginx -s reopen, then copytruncate), the shipper SIGKILLed once
and started again, and every line in ClickHouse exactly once (the sink storing)."""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import asyncio

import orjson
import pytest
import redis

from quotaflow.collector.ship.events import LineIds
from quotaflow.core import metrics
from quotaflow.deploy.procs import Proc
from quotaflow.deploy.system_packages import ensure_command
from quotaflow.gateway.limiter import SyncRateLimiter
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import reservations_key
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.pipeline import counted, read_all, unique, wait_for

pytestmark = pytest.mark.stack

# nginx's JSON access log, as README recommends it; the identity comes from the gateway's
# check in production ($qf_org_id ...), from headers wrk sends here.
NGINX_CONF = r"""
@USER@
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections 256; }
http {
    log_format quotaflow_json escape=json '{"time":"$msec","method":"$request_method","path":"$uri",'
        '"status":"$status","request_bytes":"$content_length","response_bytes":"$body_bytes_sent",'
        '"latency":"$request_time","client_ip":"$remote_addr","user_agent":"$http_user_agent",'
        '"org_id":"$http_x_org","api_key_id":"$http_x_key","event_id":"","event_ts":""}';
    access_log @PREFIX@/access.log quotaflow_json;
    client_body_temp_path @PREFIX@/tmp/body;
    proxy_temp_path @PREFIX@/tmp/proxy;
    fastcgi_temp_path @PREFIX@/tmp/fastcgi;
    uwsgi_temp_path @PREFIX@/tmp/uwsgi;
    scgi_temp_path @PREFIX@/tmp/scgi;
    server {
        listen @LISTEN@;
        location / { return 200 "ok\n"; }
    }
}
"""
# Raw ids in the paths, a pause per request (about 1,000 requests a second per connection).
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/users/" .. counter .. "/orders?page=" .. counter)
end
delay = function() return 1 end
"""
LOAD_S = 14


def fingerprint_of(data: bytes) -> str:
    return hashlib.sha256(data[:data.index(b"\n") + 1]).hexdigest()[:32]


def line_ids(data: bytes) -> list[str]:
    ids, offset, line_id = [], 0, LineIds(fingerprint_of(data))
    for line in data.splitlines(keepends=True):
        ids.append(line_id(offset))
        offset += len(line)
    return ids


def reserve(settings, org: str, key: str, n: int) -> list:
    """n requests admitted by the gateway's check: each holds a reservation until the
    processor counts its event."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        decisions = [SyncRateLimiter(client, policy_from_settings(settings), fail_open=False).check(key, org)
                     for _ in range(n)]
    finally:
        client.close()
    assert all(d.allowed and d.event_id for d in decisions), decisions
    return decisions


def test_nginx_log_under_load_rotated_twice_and_a_kill_every_line_stored_once(live_stack, pipeline, redis_client,
                                                                               tmp_path, port_base):
    """Also: lines logging the gateway's event id and time (nginx's $qf_event_id and
    $qf_event_ts behind the check) release the reservations when the processor counts them."""
    nginx, wrk = ensure_command("nginx", "nginx"), ensure_command("wrk", "wrk")
    org, gateway_org = unique("ship"), unique("gw")
    prefix = tmp_path / "nginx"
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / d).mkdir(parents=True)
    listen = f"127.0.0.1:{port_base + 113}"
    conf = NGINX_CONF
    for placeholder, value in {"@USER@": "user root;" if os.geteuid() == 0 else "", "@PREFIX@": str(prefix),
                               "@LISTEN@": listen}.items():
        conf = conf.replace(placeholder, value)
    (prefix / "nginx.conf").write_text(conf)
    (tmp_path / "load.lua").write_text(WRK_SCRIPT)
    log, first_rotated, second_rotated = prefix / "access.log", prefix / "access.log.1", prefix / "access.log.2"
    reserved_log = tmp_path / "behind-the-check.log"
    decisions = reserve(live_stack, gateway_org, "gw-key", 3)
    reserved_log.write_bytes(b"".join(orjson.dumps({
        "time": f"{d.now_ms / 1000:.3f}", "method": "GET", "path": "/v1/users/7/orders", "status": "200",
        "org_id": gateway_org, "api_key_id": "gw-key", "event_id": d.event_id, "event_ts": str(d.now_ms)}) + b"\n"
        for d in decisions))
    metrics_port = port_base + 112
    env = {**os.environ, "QUOTAFLOW_SHIP_PATHS": f"{log},{first_rotated},{reserved_log}",
           "QUOTAFLOW_SHIP_ROUTES": '["/v1/users/{id}/orders"]', "QUOTAFLOW_SHIP_SERVICE": "edge",
           "QUOTAFLOW_SHIP_STATE_DIR": str(tmp_path / "ship"), "QUOTAFLOW_SHIP_METRICS_PORT": str(metrics_port),
           "QUOTAFLOW_SHIP_CHECKPOINT_INTERVAL_S": "3",  # a kill then leaves lines shipped and not checkpointed
           "QUOTAFLOW_SHIP_ROTATE_WAIT_S": "30"}
    shipper_log = tmp_path / "ship.log"

    def start_shipper() -> subprocess.Popen:
        with open(shipper_log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "quotaflow", "ship"], stdout=out, stderr=out, env=env)

    def shipped() -> float:
        try:
            return metrics.scrape(metrics_port).get('quotaflow_ship_lines_total{outcome="shipped"}', 0.0)
        except OSError:
            return 0.0

    def logs() -> str:
        return shipper_log.read_text()[-3000:] + pipeline.logs("sink")

    server = Proc("nginx", tmp_path / "run")
    server.start([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                 tmp_path / "nginx.out", marker=str(prefix / "nginx.conf"))
    pipeline.start("sink")
    pipeline.start("processor")
    shipper = start_shipper()
    load = None
    try:
        wait_for(lambda: (prefix / "nginx.pid").exists(), 20, "nginx to start", lambda: (tmp_path / "nginx.out").read_text())
        load = subprocess.Popen([wrk, "-t1", "-c2", f"-d{LOAD_S}s", "-s", str(tmp_path / "load.lua"),
                                 "-H", f"X-Org: {org}", "-H", "X-Key: load-key", f"http://{listen}/"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: shipped() >= 500, 60, "the first lines shipped", logs)

        # 1: rename, and nginx reopens its log (a new file at the old name)
        os.rename(log, first_rotated)
        subprocess.run([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-s", "reopen"], check=True)
        wait_for(lambda: log.exists() and log.stat().st_size > 0, 20, "nginx to reopen its log")
        before = shipped()
        wait_for(lambda: shipped() >= before + 300, 60, "lines of the new log shipped", logs)

        # the shipper killed outright, and started again
        shipped_bytes = metrics.scrape(metrics_port).get("quotaflow_ship_bytes_total", 0.0)
        shipper.send_signal(signal.SIGKILL)
        shipper.wait()
        checkpointed = sum(e["offset"] for e in orjson.loads(
            (tmp_path / "ship" / "checkpoints.json").read_bytes())["files"].values())
        shipper = start_shipper()
        wait_for(lambda: shipped() >= 300, 60, "the restarted shipper to ship", logs)

        # 2: copytruncate, as logrotate does it (the older rotated file shifted away first)
        os.rename(first_rotated, second_rotated)
        shutil.copyfile(log, first_rotated)
        copied = first_rotated.stat().st_size
        with open(log, "rb") as original:
            original.seek(copied)
            at_truncation = original.read()  # what the copy lacks so far (nginx goes on writing)
        os.truncate(log, 0)
        output, _ = load.communicate(timeout=LOAD_S + 30)
        assert load.returncode == 0, output

        # nginx has stopped writing: every line the files hold is safe once the checkpoint
        # (written every 3 s) reaches each file's end
        def checkpointed_to_the_ends() -> bool:
            try:
                entries = orjson.loads((tmp_path / "ship" / "checkpoints.json").read_bytes())["files"]
            except (OSError, ValueError):
                return False
            for path in (second_rotated, first_rotated, log, reserved_log):
                data = path.read_bytes()
                if data and entries.get(fingerprint_of(data), {}).get("offset", -1) < len(data):
                    return False
            return True
        wait_for(checkpointed_to_the_ends, 60, "the shipper to checkpoint the ends of the files", logs)
        shipper.send_signal(signal.SIGTERM)
        assert shipper.wait(timeout=30) == 0, logs()
        pipeline.wait_sink_caught_up()
        wait_for(lambda: redis_client.zcard(reservations_key(gateway_org, "gw-key")) == 0, 60,
                 "the reservations of the lines behind the check to be released", pipeline.logs)
        assert counted(redis_client, gateway_org, "gw-key", decisions[0].now_ms, "86400s") == 3
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        if shipper.poll() is None:
            shipper.kill()
        server.stop()
    pipeline.stop("sink")

    # the kill left lines shipped after the last checkpoint: shipped again, the same events
    in_kafka = collections.Counter(e["event_id"] for r in asyncio.run(read_all(live_stack, EVENTS_TOPIC))
                                   if r.key == org.encode() for e in orjson.loads(r.value))
    twice = sum(1 for n in in_kafka.values() if n > 1)
    if shipped_bytes > checkpointed:
        assert twice > 0
    contents = {path.name: path.read_bytes() for path in (second_rotated, first_rotated, log)}
    expected = [i for data in contents.values() for i in line_ids(data)]
    assert len(expected) == len(set(expected)) > 5000
    # Lines nginx wrote between the copy and the truncation are in no file (copytruncate
    # loses them); the shipper may have read them from the original before it was truncated.
    second = LineIds(fingerprint_of(contents[first_rotated.name]))
    window = {second(offset) for offset in range(copied, copied + len(at_truncation) + 64 * 1024)}
    rows = pipeline.query_clickhouse(
        "SELECT toString(event_id), count(), any(endpoint), any(service) FROM requests WHERE org_id = {o:String} "
        "GROUP BY event_id", {"o": org})
    counts = collections.Counter({r[0]: r[1] for r in rows})
    assert [i for i, n in counts.items() if n > 1] == []  # none twice
    missing = set(expected) - set(counts)
    assert not missing, f"{len(missing)} of {len(expected)} lines not stored\n{logs()}"
    extra = set(counts) - set(expected)
    assert extra <= window, f"{len(extra - window)} stored events are no line of the files"
    assert {(r[2], r[3]) for r in rows} == {("/v1/users/{id}/orders", "edge")}  # raw ids never became endpoints
    print(f"lines in the files {len(expected)}, stored {len(counts)} (of which {len(extra)} from the copytruncate "
          f"window), shipped twice {twice} (deduplicated), files {[(n, len(d)) for n, d in contents.items()]}\n{output}")
