"""Apache Kafka for the local stack: one KRaft broker (broker + controller in one JVM), or
with QUOTAFLOW_KAFKA_BROKERS=3 a cluster of three such nodes (see SERVER_PROPERTIES).

The official jars of a pinned release come from Maven Central through Maven,
are checked against the SHA-256 sums committed in deploy/kafka/, cached under
the cache dir, and run with the machine's Java. After bumping KAFKA_VERSION,
regenerate the sums with ``python -m deploy.kafka --write-lock`` and review them.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quotaflow.core.errors import OperatorError
from quotaflow.core.retry import retry
from quotaflow.core.settings import KAFKA_BROKER_PORT_STEP, KAFKA_BROKERS_MAX, Settings
from quotaflow.deploy.procs import Proc, ensure_port_free, port_open, tail, wait_until
from quotaflow.deploy.system_packages import ensure_command, which

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
JAVA_MIN = 17
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

# One node: broker and controller in one JVM ("combined"), a voter of the controller quorum.
# Alone (the default), it is the quorum and every topic has one replica. In a local cluster
# (QUOTAFLOW_KAFKA_BROKERS=3) each of three such nodes is a voter: three JVMs, not six,
# since on a small machine dedicated controllers would double the processes for no gain in
# what a test can show, and a quorum of three still survives the loss of one node,
# controller and broker together (what a SIGKILL or a lost machine does). Kafka advises
# dedicated controllers in production.
SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dir}
num.partitions=1
# Topics are created on purpose (deploy/topics.py, Faust); a typo must not create one.
auto.create.topics.enable=false
# Every topic, internal or made by a client that names no factor, has {rf} replica(s), and a
# record is acknowledged to an acks=all producer once {min_isr} of them have it: in a
# cluster, a broker can die without losing an acknowledged record or refusing writes.
default.replication.factor={rf}
min.insync.replicas={min_isr}
unclean.leader.election.enable=false
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=8
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
log.retention.check.interval.ms=60000
{cluster}"""

# Only in a cluster: a dead broker is fenced (its partitions get new leaders) after 6 s
# without a heartbeat, not 9, since writes to its partitions wait that long; and fewer
# threads per broker, three of them sharing a small machine.
CLUSTER_PROPERTIES = """\
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=6000
num.network.threads=2
num.io.threads=4
num.replica.fetchers=1
"""

LOG4J2_PROPERTIES = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def lock_resource():
    return resources.files("quotaflow.deploy").joinpath("kafka", f"jars-{KAFKA_VERSION}.sha256")


def read_lock() -> dict[str, str]:
    """jar file name -> expected sha256."""
    out = {}
    for line in lock_resource().read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            out[name] = digest
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(libs: Path, expected: dict[str, str]) -> None:
    present = {p.name for p in libs.glob("*.jar")}
    if present != set(expected):
        raise OperatorError(f"Kafka {KAFKA_VERSION} jars in {libs} differ from the pinned list: "
                         f"missing {sorted(set(expected) - present)}, unexpected {sorted(present - set(expected))}")
    for name, digest in expected.items():
        actual = sha256(libs / name)
        if actual != digest:
            raise OperatorError(f"checksum mismatch for {name}: expected sha256 {digest}, got {actual}; "
                             f"the download is corrupt or not the official artifact")


def resolve_jars(settings: Settings, dest: Path) -> None:
    """Let Maven fetch the broker's runtime jars into dest."""
    mvn = ensure_command("mvn", "maven")
    with tempfile.TemporaryDirectory() as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_bytes(resources.files("quotaflow.deploy").joinpath("kafka", "pom.xml").read_bytes())
        cmd = [mvn, "-B", "-q", "--strict-checksums", "-f", str(pom), f"-Dkafka.version={KAFKA_VERSION}",
               f"-Dmaven.repo.local={settings.cache_dir / 'm2'}",
               "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={dest}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise OperatorError(f"could not download Kafka {KAFKA_VERSION} from Maven Central (mvn exit {result.returncode}):\n{last}")


def ensure_jars(settings: Settings) -> Path:
    """Directory of verified jars, downloading them on first use. One process at a time
    (a lock file beside them): stacks starting together, such as the test workers' on a
    fresh machine, share the cache, and the second waits for the first's download."""
    libs = settings.cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        return _ensure_jars(settings, libs)


def _ensure_jars(settings: Settings, libs: Path) -> Path:
    expected = read_lock()
    stamp = libs / ".verified"
    lock_digest = hashlib.sha256(lock_resource().read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == lock_digest:
        return libs
    if libs.exists():
        try:
            verify(libs, expected)
            stamp.write_text(lock_digest)
            return libs
        except OperatorError:
            shutil.rmtree(libs)
    print(f"downloading Apache Kafka {KAFKA_VERSION} jars (once, cached in {libs.parent})...", flush=True)
    staging = libs.parent / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    resolve_jars(settings, staging)
    try:
        verify(staging, expected)
    except OperatorError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(libs)
    stamp.write_text(lock_digest)
    return libs


def java_command() -> str:
    """The java binary, checked to be recent enough for Kafka 4."""
    java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if os.environ.get("JAVA_HOME") else which("java")
    if not java or not Path(java).exists():
        raise OperatorError(f"Java {JAVA_MIN} or newer is needed to run Kafka and was not found; install it "
                         f"(Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME")
    out = subprocess.run([java, "-version"], capture_output=True, text=True)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(m.group(1)) if m else 0
    if major == 1 and m and m.group(2):
        major = int(m.group(2))  # "1.8.0" style
    if major < JAVA_MIN:
        raise OperatorError(f"Kafka {KAFKA_VERSION} needs Java {JAVA_MIN} or newer; {java} is Java {major or 'unknown'}")
    return java


@dataclass(frozen=True)
class Node:
    """One broker of the local stack. With one broker (the default) it is the stack's
    "kafka", data in state_dir/kafka, as it always was; with several, broker n is
    "kafka-n", data in state_dir/kafka-cluster/broker-n, each a KRaft controller too."""

    n: int
    port: int
    controller_port: int
    proc: Proc
    data: Path

    @property
    def log_file(self) -> Path:
        return self.data / "server.log"


def nodes(settings: Settings, brokers: int | None = None) -> list[Node]:
    """The brokers of the local stack as configured (QUOTAFLOW_KAFKA_BROKERS), or as ``brokers`` says."""
    brokers = settings.kafka_brokers if brokers is None else brokers
    run = settings.state_dir / "run"
    if brokers == 1:
        return [Node(1, settings.kafka_port, settings.kafka_controller_port, Proc("kafka", run),
                     settings.state_dir / "kafka")]
    step = KAFKA_BROKER_PORT_STEP
    return [Node(n, settings.kafka_port + step * (n - 1), settings.kafka_controller_port + step * (n - 1),
                 Proc(f"kafka-{n}", run), settings.state_dir / "kafka-cluster" / f"broker-{n}")
            for n in range(1, brokers + 1)]


def running_nodes(settings: Settings) -> list[Node]:
    """Every broker of this state dir that runs, whatever QUOTAFLOW_KAFKA_BROKERS says now
    (a stack started with --brokers 3 is stopped by a plain 'stack down')."""
    seen = nodes(settings, 1) + nodes(settings, KAFKA_BROKERS_MAX)
    return [node for node in seen if node.proc.pid() is not None]


def cluster_size(settings: Settings) -> int:
    """Brokers of the cluster last formed in this state dir (its folders), 0 if none."""
    return len(list((settings.state_dir / "kafka-cluster").glob("broker-*")))


def proc(settings: Settings) -> Proc:
    """The single broker's process (QUOTAFLOW_KAFKA_BROKERS=1)."""
    return nodes(settings, 1)[0].proc


def _data_dir(settings: Settings) -> Path:
    return settings.state_dir / "kafka"


def log_file(settings: Settings) -> Path:
    return _data_dir(settings) / "server.log"


def _configure(settings: Settings, java: str, libs: Path) -> Path:
    """Write the broker's config; format its storage on first start."""
    data = _data_dir(settings)
    log_dir = data / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = data / "server.properties"
    config.write_text(SERVER_PROPERTIES.format(
        node_id=1, voters=f"1@127.0.0.1:{settings.kafka_controller_port}", port=settings.kafka_port,
        controller_port=settings.kafka_controller_port, log_dir=log_dir, rf=1, min_isr=1, cluster=""))
    (data / "log4j2.properties").write_text(LOG4J2_PROPERTIES.format(log_file=log_file(settings)))
    if not (log_dir / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        _format(java, libs, data, config, cluster_id)
    return config


def _format(java: str, libs: Path, data: Path, config: Path, cluster_id: str) -> None:
    result = subprocess.run(
        [java, "-cp", f"{libs}/*", f"-Dlog4j2.configurationFile={data / 'log4j2.properties'}",
         STORAGE_TOOL, "format", f"--cluster-id={cluster_id}", "-c", str(config)],  # ids may start with "-"
        capture_output=True, text=True)
    if result.returncode != 0:
        raise OperatorError(f"formatting Kafka storage failed:\n{(result.stdout + result.stderr).strip()[-1500:]}")


def start(settings: Settings) -> bool:
    """Start the broker(s) unless running; wait until they serve metadata. True if any started."""
    if settings.kafka_brokers > 1:
        return _start_cluster(settings)
    p = proc(settings)
    if p.pid() is not None:
        return False
    _refuse_other_size(settings)
    java = java_command()
    ensure_port_free(settings.kafka_port, "Kafka", "QUOTAFLOW_KAFKA_PORT")
    ensure_port_free(settings.kafka_controller_port, "the Kafka controller", "QUOTAFLOW_KAFKA_CONTROLLER_PORT")
    libs = ensure_jars(settings)
    config = _configure(settings, java, libs)
    argv = [java, f"-Xmx{settings.kafka_heap}", "-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={config.parent / 'log4j2.properties'}",
            "-cp", f"{libs}/*", MAIN_CLASS, str(config)]
    pid = p.start(argv, config.parent / "stdout.log", marker=str(config))
    if not wait_until(lambda: p.pid() is None or port_open(settings.kafka_port), 90):
        p.stop()
        raise OperatorError(f"Kafka did not open port {settings.kafka_port} within 90 s; log:\n{tail(log_file(settings))}")
    if p.pid() is None:
        raise OperatorError(f"Kafka (pid {pid}) exited at start; log:\n{tail(log_file(settings))}\n"
                         f"{tail(config.parent / 'stdout.log', 5)}")
    if not asyncio.run(_wait_ready(settings.kafka_bootstrap, 60)):
        p.stop()
        raise OperatorError(f"Kafka opened its port but serves no metadata; log:\n{tail(log_file(settings))}")
    return True


def _refuse_other_size(settings: Settings) -> None:
    """Brokers of another cluster size run in this state dir: their ports are ours."""
    mine = {node.proc.name for node in nodes(settings)}
    others = [node.proc.name for node in running_nodes(settings) if node.proc.name not in mine]
    if others:
        raise OperatorError(f"Kafka of another size runs in {settings.state_dir} ({', '.join(others)}), not the "
                            f"{settings.kafka_brokers} broker(s) of QUOTAFLOW_KAFKA_BROKERS; stop it first with "
                            f"'quotaflow stack down'")


def _configure_node(settings: Settings, node: Node, java: str, libs: Path) -> Path:
    """Write a cluster broker's config; format its storage on first start, with the
    cluster's id (made once, kept beside the brokers' folders)."""
    log_dir = node.data / "data"
    node.data.mkdir(parents=True, exist_ok=True)
    everyone = nodes(settings)
    rf, min_isr = settings.kafka_replication_factor, settings.kafka_min_insync_replicas
    config = node.data / "server.properties"
    config.write_text(SERVER_PROPERTIES.format(
        node_id=node.n, voters=",".join(f"{o.n}@127.0.0.1:{o.controller_port}" for o in everyone), port=node.port,
        controller_port=node.controller_port, log_dir=log_dir, rf=rf, min_isr=min_isr, cluster=CLUSTER_PROPERTIES))
    (node.data / "log4j2.properties").write_text(LOG4J2_PROPERTIES.format(log_file=node.log_file))
    if not (log_dir / "meta.properties").exists():
        id_file = node.data.parent / "cluster.id"
        if not id_file.exists():
            id_file.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))
        _format(java, libs, node.data, config, id_file.read_text().strip())
    return config


def _start_cluster(settings: Settings) -> bool:
    """Start the brokers that do not run (all at once: a KRaft node serves clients only
    once a quorum of controllers has elected a leader), then wait until every broker has
    registered and every partition has a leader."""
    _refuse_other_size(settings)
    formed = cluster_size(settings)
    if formed and formed != settings.kafka_brokers:  # its controller quorum is fixed at its size
        raise OperatorError(f"a cluster of {formed} Kafka brokers was formed in {settings.state_dir / 'kafka-cluster'}; "
                            f"set QUOTAFLOW_KAFKA_BROKERS={formed}, or remove that folder (its topics with it) "
                            f"to form one of {settings.kafka_brokers}")
    missing = [node for node in nodes(settings) if node.proc.pid() is None]
    if not missing:
        return False
    java = java_command()
    for node in missing:
        ensure_port_free(node.port, f"Kafka broker {node.n}", "QUOTAFLOW_KAFKA_PORT")
        ensure_port_free(node.controller_port, f"the Kafka controller of broker {node.n}",
                         "QUOTAFLOW_KAFKA_CONTROLLER_PORT")
    libs = ensure_jars(settings)
    for node in missing:
        config = _configure_node(settings, node, java, libs)
        argv = [java, f"-Xmx{settings.kafka_heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={node.data / 'log4j2.properties'}",
                "-cp", f"{libs}/*", MAIN_CLASS, str(config)]
        node.proc.start(argv, node.data / "stdout.log", marker=str(config))

    def failed() -> list[Node]:
        return [node for node in missing if node.proc.pid() is None]

    def stop_started() -> None:
        for node in missing:
            node.proc.stop()

    if not wait_until(lambda: failed() or all(port_open(node.port) for node in missing), 120) or failed():
        down = failed() or [node for node in missing if not port_open(node.port)]
        logs = "\n".join(f"broker {node.n}:\n{tail(node.log_file, 8)}" for node in down)
        stop_started()
        raise OperatorError(f"Kafka broker(s) {', '.join(str(node.n) for node in down)} did not start within "
                            f"120 s; log:\n{logs}")
    if not asyncio.run(_wait_ready(settings.kafka_bootstrap, 90, brokers=settings.kafka_brokers)):
        stop_started()
        raise OperatorError(f"the Kafka brokers opened their ports but do not all serve metadata; log of broker "
                            f"{missing[0].n}:\n{tail(missing[0].log_file)}")
    return True


class _NotReady(Exception):
    """The broker answers, but some partition has no leader yet."""


async def _wait_ready(bootstrap: str, timeout_s: float, brokers: int = 1) -> bool:
    """The broker answers and leads every partition of every topic. An open port
    is not enough: until the controller unfences the broker, topics have no
    leader and topic creation fails. With several, every broker has registered
    (topics with 3 replicas cannot be made before), and no partition lacks a
    replica in sync (a restarted broker has caught up)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def ready() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            if brokers > 1 and len(cluster["brokers"]) < brokers:
                raise _NotReady("brokers not registered yet")
            topics = await admin.list_topics()
            partitions = [p for t in await admin.describe_topics(topics) for p in t["partitions"]] if topics else []
            if not all(p["error_code"] == 0 and p["leader"] >= 0 for p in partitions):
                raise _NotReady("partitions without a leader")
            if brokers > 1 and not all(len(p["isr"]) == len(p["replicas"]) for p in partitions):
                raise _NotReady("replicas not in sync yet")
        finally:
            await admin.close()

    try:  # a starting broker refuses connections, then serves partitions without leaders: not worth a warning
        await retry(ready, "waiting for Kafka to serve metadata", on=Exception, max_s=0.5,
                    give_up_after_s=timeout_s, level=logging.DEBUG, logger=log)
        return True
    except Exception:
        return False


def stop(settings: Settings) -> bool:
    """Stop every broker of the state dir that runs; True if any did. The brokers of a
    cluster get SIGTERM together: one by one, the last would wait for a controller quorum
    that is gone before it shuts down."""
    running = running_nodes(settings)
    if len(running) <= 1:
        return any([node.proc.stop(timeout_s=60) for node in running])
    with ThreadPoolExecutor(len(running)) as pool:
        return any(list(pool.map(lambda node: node.proc.stop(timeout_s=60), running)))


def write_lock(settings: Settings) -> Path:
    """Resolve the jars afresh and record their sums (for a version bump)."""
    with tempfile.TemporaryDirectory() as tmp:
        resolve_jars(settings, Path(tmp))
        lines = [f"{sha256(p)}  {p.name}" for p in sorted(Path(tmp).glob("*.jar"))]
    target = Path(__file__).parent / "kafka" / f"jars-{KAFKA_VERSION}.sha256"
    target.write_text(f"# Apache Kafka {KAFKA_VERSION} broker runtime (kafka_2.13 and its runtime dependencies)\n"
                      + "\n".join(lines) + "\n")
    return target


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-lock"]:
        from quotaflow.core.settings import get_settings

        print(write_lock(get_settings()))
    else:
        sys.exit("usage: python -m deploy.kafka --write-lock")
