"""QUOTAFLOW_KAFKA_BROKERS as the settings, the topics and the stack read it: pure logic,
no server (the cluster itself runs in tests/test_kafka_cluster.py, `make test-cluster`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotaflow.core.settings import KAFKA_BROKER_PORT_STEP, Settings, describe_error
from quotaflow.deploy import kafka, stack
from quotaflow.deploy.topics import MIN_INSYNC_REPLICAS, wanted


@pytest.fixture(autouse=True)
def defaults(monkeypatch):
    """The settings' defaults, not the test stack's ports (tests/conftest.py sets them)."""
    for name in list(os.environ):
        if name.startswith("QUOTAFLOW_"):
            monkeypatch.delenv(name)


def test_one_broker_is_the_default_and_as_before(tmp_path):
    s = Settings(state_dir=tmp_path)
    assert (s.kafka_brokers, s.kafka_bootstrap, s.kafka_heap) == (1, "127.0.0.1:19092", "768m")
    assert s.kafka_is_local and (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (1, 1)
    (node,) = kafka.nodes(s)
    assert (node.proc.name, node.port, node.controller_port, node.data) == ("kafka", 19092, 19093, tmp_path / "kafka")
    assert all(t.replication_factor == 1 and MIN_INSYNC_REPLICAS not in t.topic_configs for t in wanted(s))


def test_three_brokers_have_ports_data_and_replicas_of_their_own(tmp_path):
    s = Settings(state_dir=tmp_path, kafka_brokers=3)
    assert s.kafka_bootstrap == "127.0.0.1:19092,127.0.0.1:19192,127.0.0.1:19292" and s.kafka_is_local
    assert s.kafka_heap == "320m" and Settings(state_dir=tmp_path, kafka_brokers=3, kafka_heap="1g").kafka_heap == "1g"
    nodes = kafka.nodes(s)
    assert [(n.n, n.proc.name, n.port, n.controller_port) for n in nodes] == [
        (1, "kafka-1", 19092, 19093), (2, "kafka-2", 19192, 19193), (3, "kafka-3", 19292, 19293)]
    assert len({n.data for n in nodes} | {tmp_path / "kafka"}) == 4  # apart from a single broker's
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (3, 2)
    assert all(t.replication_factor == 3 and t.topic_configs[MIN_INSYNC_REPLICAS] == "2" for t in wanted(s))


@given(st.integers(1, 5))
def test_replicas_follow_the_brokers(brokers):
    s = Settings(state_dir="/nonexistent", kafka_brokers=brokers)
    assert s.kafka_replication_factor == min(brokers, 3)
    assert 1 <= s.kafka_min_insync_replicas < max(s.kafka_replication_factor, 2)
    assert len(set(s.kafka_bootstrap.split(","))) == brokers


@pytest.mark.parametrize("given_, says", [
    ({"kafka_brokers": 0}, "QUOTAFLOW_KAFKA_BROKERS (kafka_brokers): Input should be greater than or equal to 1"),
    ({"kafka_brokers": 6}, "QUOTAFLOW_KAFKA_BROKERS (kafka_brokers): Input should be less than or equal to 5"),
    ({"kafka_brokers": 3, "kafka_port": 65400}, "must be at most 65535"),
    ({"kafka_brokers": 3, "redis_port": 19192}, "differ from each other and from QUOTAFLOW_REDIS_PORT"),
    ({"kafka_brokers": 2, "kafka_controller_port": 19192}, "differ from each other"),
])
def test_a_cluster_whose_ports_cannot_be_is_refused_by_name(tmp_path, given_, says):
    with pytest.raises(Exception) as exc:
        Settings(state_dir=tmp_path, **given_)
    assert says in describe_error(exc.value)


def test_test_stacks_keep_their_broker_ports_apart(tmp_path):
    """A worker's cluster ports meet no port of a stack up to 3 workers (75 ports) away."""
    cluster = stack.isolated_env(29000, tmp_path, tmp_path, brokers=3)
    assert cluster["QUOTAFLOW_KAFKA_BROKERS"] == "3"
    s = Settings(**{k.removeprefix("QUOTAFLOW_").lower(): v for k, v in cluster.items()})
    broker_ports = {p for pair in s.kafka_broker_ports[1:] for p in pair}
    single = stack.isolated_env(29000, tmp_path, tmp_path)
    others = {int(v) + 25 * w for w in range(-3, 4) for k, v in single.items() if k.endswith("_PORT")}
    assert broker_ports and not broker_ports & others
    assert KAFKA_BROKER_PORT_STEP * 2 + 93 < 379  # below the Redis port of the base


def test_the_cluster_config_names_every_voter_and_the_replicas(tmp_path):
    s = Settings(state_dir=tmp_path, kafka_brokers=3)
    text = kafka.SERVER_PROPERTIES.format(node_id=2, port=19192, controller_port=19193, log_dir=tmp_path,
                                          voters="1@127.0.0.1:19093,2@127.0.0.1:19193,3@127.0.0.1:19293",
                                          rf=s.kafka_replication_factor, min_isr=s.kafka_min_insync_replicas,
                                          cluster=kafka.CLUSTER_PROPERTIES)
    props = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert props["process.roles"] == "broker,controller" and props["node.id"] == "2"
    assert props["controller.quorum.voters"].count("@") == 3
    for name in ("default.replication.factor", "offsets.topic.replication.factor",
                 "transaction.state.log.replication.factor", "share.coordinator.state.topic.replication.factor"):
        assert props[name] == "3", name
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"
    assert props["unclean.leader.election.enable"] == "false"
    assert props["broker.session.timeout.ms"] == "6000"  # a dead node fenced sooner than Kafka's 9 s


def test_brokers_is_refused_where_it_means_nothing(tmp_path):
    env = {**os.environ, "QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_KAFKA_PORT": "1"}  # nothing to meet
    result = subprocess.run([sys.executable, "-m", "quotaflow", "stack", "status", "--brokers", "3"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "--brokers is for 'stack up' and 'stack start'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "quotaflow", "stack", "up", "--brokers", "9"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "invalid configuration: QUOTAFLOW_KAFKA_BROKERS (kafka_brokers)" in result.stderr
    assert not (tmp_path / "kafka-cluster").exists()
