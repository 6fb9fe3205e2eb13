"""Where an event goes on the events topic: its record's key, and its org's partition."""

from __future__ import annotations

from functools import lru_cache

from aiokafka.partitioner import murmur2


def partition_key(org_id: str) -> bytes:
    """Kafka key of an event. By org: all keys of an org land in one partition,
    so per-key and per-org counts are both local to one processor."""
    return org_id.encode()


# Bounded (the keys are the publishers' input). murmur2 in Python costs more than the rest of
# reading a one-event record, and a tenth of a collector's CPU per record sent.
@lru_cache(maxsize=65_536)
def key_hash(key: bytes) -> int:
    """Kafka's default partitioner's hash of a record key (murmur2, made positive), as the
    Java client and aiokafka compute it: a record goes to partition key_hash % partitions."""
    return murmur2(key) & 0x7FFFFFFF


def partition_of(org_id: str, partitions: int) -> int:
    """The partition an org's events belong on: where Kafka's default partitioner (murmur2
    of the key, as in the Java client, aiokafka and the emitter) puts a record keyed by
    the org. A processor counts an org's events on that partition only; records a
    publisher placed elsewhere (another partitioner, another key) are forwarded there."""
    return key_hash(partition_key(org_id)) % partitions


# On a record the processor forwarded to its org's partition: "topic/partition/offset"
# of the record as published. Such a copy is for counting only; the sink stores the original.
FORWARDED_HEADER = "qf.forwarded.from"
