"""A Redis Cluster for the local stack (QUOTAFLOW_REDIS_CLUSTER, `stack up --redis-cluster`):
three masters and three replicas, six of Debian's redis-server, each run as the single Redis
is (deploy/redis.py launch: AOF in its own folder) with cluster mode on.

Node n (1..6) listens on QUOTAFLOW_REDIS_PORT + n-1, its cluster bus on + 10 + n-1
(core/settings.py), files in state_dir/redis-cluster/node-n (nodes.conf: the node's view
of the cluster, which a restarted node rejoins with). The first start forms the cluster
with redis-py, as `redis-cli --cluster create --cluster-replicas 1` would: node 1..3 take a
third of the 16384 slots each (CLUSTER ADDSLOTSRANGE), every node meets node 1
(CLUSTER MEET), node 3+k replicates node k (CLUSTER REPLICATE). A master silent for
QUOTAFLOW_REDIS_CLUSTER_NODE_TIMEOUT_MS is failed over to its replica; a killed node that
`stack up` starts again rejoins as a replica of whoever took its slots.

``cluster-require-full-coverage no``: while a master is down, only its slots (its orgs)
go unanswered; the other masters' orgs are checked and counted on.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import redis

from quotaflow.core.errors import OperatorError
from quotaflow.core.settings import REDIS_CLUSTER_MASTERS, REDIS_CLUSTER_NODES, Settings
from quotaflow.deploy import redis as single
from quotaflow.deploy.procs import Proc, ensure_port_free, tail, wait_until

SLOTS = 16384
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Node:
    n: int
    port: int
    bus_port: int
    proc: Proc
    data: Path

    @property
    def log_file(self) -> Path:
        return self.data / "redis.log"

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        """A plain client of this node alone (cluster administration, tests)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s)


def nodes(settings: Settings) -> list[Node]:
    run = settings.state_dir / "run"
    return [Node(n, port, bus, Proc(f"redis-{n}", run), settings.state_dir / "redis-cluster" / f"node-{n}")
            for n, (port, bus) in enumerate(settings.redis_cluster_ports, start=1)]


def running_nodes(settings: Settings) -> list[Node]:
    return [node for node in nodes(settings) if node.proc.pid() is not None]


def start(settings: Settings) -> bool:
    """Start the nodes that do not run, form the cluster on its first start, and wait until
    it serves every slot with a replica behind each master. True if a node started."""
    missing = [node for node in nodes(settings) if node.proc.pid() is None]
    for node in missing:
        ensure_port_free(node.port, f"Redis Cluster node {node.n}", "QUOTAFLOW_REDIS_PORT")
        ensure_port_free(node.bus_port, f"the cluster bus of Redis node {node.n}", "QUOTAFLOW_REDIS_PORT")
    try:
        for node in missing:
            single.launch(node.proc, node.port, node.data, f"Redis Cluster node {node.n}",
                          "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-port", str(node.bus_port),
                          "--cluster-node-timeout", str(settings.redis_cluster_node_timeout_ms),
                          "--cluster-require-full-coverage", "no")
        everyone = nodes(settings)
        if not _formed(everyone[0]):
            _form(everyone)
        if not wait_until(lambda: ready(everyone), READY_TIMEOUT_S, 0.2):
            raise OperatorError(f"the Redis Cluster did not reach cluster_state:ok with {REDIS_CLUSTER_MASTERS} "
                                f"masters and a replica each within {READY_TIMEOUT_S:g} s; {describe(everyone)}; "
                                f"log of node 1:\n{tail(everyone[0].log_file)}")
    except BaseException:
        for node in missing:
            node.proc.stop()
        raise
    return bool(missing)


def _formed(node: Node) -> bool:
    with node.client() as c:
        return info(c).get("cluster_slots_assigned") == str(SLOTS)


def _form(everyone: list[Node]) -> None:
    """Slots to the masters, every node introduced, each replica behind its master."""
    masters, replicas = everyone[:REDIS_CLUSTER_MASTERS], everyone[REDIS_CLUSTER_MASTERS:]
    first = 0
    for i, node in enumerate(masters):
        last = SLOTS * (i + 1) // len(masters) - 1
        with node.client() as c:
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        first = last + 1
    with everyone[0].client() as c:
        for node in everyone[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
    if not wait_until(lambda: all(int(_info(n).get("cluster_known_nodes", 0)) == len(everyone) for n in everyone),
                      READY_TIMEOUT_S, 0.1):
        raise OperatorError(f"the Redis Cluster's nodes did not all meet within {READY_TIMEOUT_S:g} s; "
                            f"{describe(everyone)}")
    for master, replica in zip(masters, replicas):
        master_id = _myid(master)
        with replica.client() as c:
            # a node learns of the others' roles through gossip: until it has heard that the
            # master is one, REPLICATE is refused ("only replicate a master")
            if not wait_until(lambda: _try_replicate(c, master_id), READY_TIMEOUT_S, 0.1):
                raise OperatorError(f"Redis node {replica.n} could not replicate node {master.n}")


def _try_replicate(c: redis.Redis, master_id: str) -> bool:
    try:
        c.execute_command("CLUSTER", "REPLICATE", master_id)
        return True
    except redis.ResponseError:
        return False


def _myid(node: Node) -> str:
    with node.client() as c:
        value = c.execute_command("CLUSTER", "MYID")
    return value.decode() if isinstance(value, bytes) else value


def info(c: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO as a dict of strings."""
    raw = c.execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else raw
    return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)


def _info(node: Node) -> dict[str, str]:
    try:
        with node.client(0.5) as c:
            return info(c)
    except (redis.RedisError, OSError):
        return {}


def roles(everyone: list[Node]) -> dict[int, tuple]:
    """ROLE of each node that answers: ('master', [replica ports]) or ('slave', master port,
    link state)."""
    out = {}
    for node in everyone:
        try:
            with node.client(0.5) as c:
                role = c.execute_command("ROLE")
        except (redis.RedisError, OSError):
            continue
        kind = role[0].decode() if isinstance(role[0], bytes) else role[0]
        if kind == "master":
            out[node.n] = ("master", sorted(int(r[1]) for r in role[2]))
        else:
            state = role[3].decode() if isinstance(role[3], bytes) else role[3]
            out[node.n] = ("slave", int(role[2]), state)
    return out


def ready(everyone: list[Node]) -> bool:
    """Every node answers and says cluster_state:ok, all slots assigned; the masters that
    hold slots are REDIS_CLUSTER_MASTERS, each with a replica whose link is up."""
    if not all(_info(node).get("cluster_state") == "ok" for node in everyone):
        return False
    with everyone[0].client() as c:
        slots = c.execute_command("CLUSTER", "SLOTS")
    owners = {int(entry[2][1]) for entry in slots}
    role = roles(everyone)
    linked = {r[1] for r in role.values() if r[0] == "slave" and r[2] == "connected"}
    return (len(role) == len(everyone) and len(owners) == REDIS_CLUSTER_MASTERS and owners <= linked
            and all(role.get(_n(everyone, port), ("",))[0] == "master" for port in owners))


def _n(everyone: list[Node], port: int) -> int:
    return next((node.n for node in everyone if node.port == port), 0)


def describe(everyone: list[Node]) -> str:
    """Each node's state and role, for errors and `stack status`."""
    role = roles(everyone)
    parts = []
    for node in everyone:
        r = role.get(node.n)
        if r is None:
            parts.append(f"node {node.n}: not answering")
        elif r[0] == "master":
            parts.append(f"node {node.n}: master, replicas {[_n(everyone, p) for p in r[1]]}")
        else:
            parts.append(f"node {node.n}: replica of node {_n(everyone, r[1])} ({r[2]})")
    return "; ".join(parts)


def stop(settings: Settings) -> bool:
    """Stop every node that runs (together: one by one, the replicas of the first stopped
    would fail over to themselves meanwhile). True if any did."""
    running = running_nodes(settings)
    if not running:
        return False
    with ThreadPoolExecutor(len(running)) as pool:
        return any(list(pool.map(lambda node: node.proc.stop(timeout_s=30), running)))


def replica_of(settings: Settings, master: Node) -> Node:
    """The node replicating ``master`` now."""
    everyone = nodes(settings)
    role = roles([master])[master.n]
    if role[0] != "master" or not role[1]:
        raise OperatorError(f"Redis node {master.n} is not a master with a replica: {describe(everyone)}")
    return next(node for node in everyone if node.port == role[1][0])


def wait_promoted(settings: Settings, dead: Node, replica: Node, timeout_s: float) -> float:
    """After master ``dead`` stopped: wait until ``replica`` has taken its slots and every
    other node says cluster_state:ok; return how long it took (tests, benchmarks)."""
    others = [node for node in nodes(settings) if node.n != dead.n]
    started = time.monotonic()

    def promoted() -> bool:
        if roles([replica]).get(replica.n, ("",))[0] != "master":
            return False
        try:
            with replica.client(0.5) as c:
                owners = {int(entry[2][1]) for entry in c.execute_command("CLUSTER", "SLOTS")}
        except (redis.RedisError, OSError):
            return False
        return dead.port not in owners and replica.port in owners and all(
            _info(node).get("cluster_state") == "ok" for node in others)

    if not wait_until(promoted, timeout_s, 0.05):
        raise OperatorError(f"node {dead.n}'s slots did not fail over to node {replica.n} within {timeout_s:g} s; "
                            f"{describe(others)}")
    return time.monotonic() - started
