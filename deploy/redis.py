"""Redis for the local stack: Debian's redis-server on its own port, AOF persistence
in the state dir. ``launch`` runs one redis-server; the Redis Cluster's nodes
(deploy/redis_cluster.py) are run by it too."""

from __future__ import annotations

from pathlib import Path

import redis

from quotaflow.core.errors import OperatorError
from quotaflow.core.settings import Settings
from quotaflow.deploy.procs import Proc, ensure_port_free, tail, wait_until
from quotaflow.deploy.system_packages import ensure_command


def proc(settings: Settings) -> Proc:
    return Proc("redis", settings.state_dir / "run")


def start(settings: Settings) -> bool:
    p = proc(settings)
    if p.pid() is not None:
        return False
    ensure_port_free(settings.redis_port, "Redis", "QUOTAFLOW_REDIS_PORT")
    launch(p, settings.redis_port, settings.state_dir / "redis", "redis-server")
    return True


def launch(p: Proc, port: int, data: Path, what: str, *options: str) -> None:
    """Run redis-server under ``p`` on 127.0.0.1:``port`` with its files in ``data`` and
    the ``options`` given, and wait until it answers PING (OperatorError with its log if
    it does not)."""
    server = ensure_command("redis-server", "redis-server")
    data.mkdir(parents=True, exist_ok=True)
    log = data / "redis.log"
    argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
            "--logfile", str(log), *options]
    p.start(argv, data / "stdout.log", marker="redis-server")  # redis rewrites its title; the name stays
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        if not wait_until(lambda: p.pid() is None or ready(), 30):
            p.stop()
            raise OperatorError(f"{what} did not answer PING within 30 s; log:\n{tail(log)}")
        if p.pid() is None:
            raise OperatorError(f"{what} exited at start; log:\n{tail(log)}")
    finally:
        client.close()


def stop(settings: Settings) -> bool:
    return proc(settings).stop(timeout_s=30)
