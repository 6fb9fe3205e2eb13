"""Apache Kafka for the local stack: one KRaft broker (broker + controller in one JVM).

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
from importlib import resources
from pathlib import Path

from quotaflow.core.errors import OperatorError
from quotaflow.core.retry import retry
from quotaflow.core.settings import Settings
from quotaflow.deploy.procs import Proc, ensure_port_free, port_open, tail, wait_until
from quotaflow.deploy.system_packages import ensure_command, which

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
JAVA_MIN = 17
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dir}
num.partitions=1
# Topics are created on purpose (deploy/topics.py, Faust); a typo must not create one.
auto.create.topics.enable=false
# One broker: every internal topic has a single replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.check.interval.ms=60000
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


def proc(settings: Settings) -> Proc:
    return Proc("kafka", settings.state_dir / "run")


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
    config.write_text(SERVER_PROPERTIES.format(port=settings.kafka_port, controller_port=settings.kafka_controller_port,
                                               log_dir=log_dir))
    (data / "log4j2.properties").write_text(LOG4J2_PROPERTIES.format(log_file=log_file(settings)))
    if not (log_dir / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        result = subprocess.run(
            [java, "-cp", f"{libs}/*", f"-Dlog4j2.configurationFile={data / 'log4j2.properties'}",
             STORAGE_TOOL, "format", f"--cluster-id={cluster_id}", "-c", str(config)],  # ids may start with "-"
            capture_output=True, text=True)
        if result.returncode != 0:
            raise OperatorError(f"formatting Kafka storage failed:\n{(result.stdout + result.stderr).strip()[-1500:]}")
    return config


def start(settings: Settings) -> bool:
    """Start the broker unless it already runs; wait until it serves metadata. True if started."""
    p = proc(settings)
    if p.pid() is not None:
        return False
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


class _NotReady(Exception):
    """The broker answers, but some partition has no leader yet."""


async def _wait_ready(bootstrap: str, timeout_s: float) -> bool:
    """The broker answers and leads every partition of every topic. An open port
    is not enough: until the controller unfences the broker, topics have no
    leader and topic creation fails."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def ready() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.describe_cluster()
            topics = await admin.list_topics()
            if topics and not all(p["error_code"] == 0 and p["leader"] >= 0
                                  for t in await admin.describe_topics(topics) for p in t["partitions"]):
                raise _NotReady("partitions without a leader")
        finally:
            await admin.close()

    try:  # a starting broker refuses connections, then serves partitions without leaders: not worth a warning
        await retry(ready, "waiting for Kafka to serve metadata", on=Exception, max_s=0.5,
                    give_up_after_s=timeout_s, level=logging.DEBUG, logger=log)
        return True
    except Exception:
        return False


def stop(settings: Settings) -> bool:
    return proc(settings).stop(timeout_s=60)


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
