"""Where an event goes on the events topic: its record's key, and its org's partition."""

from __future__ import annotations

from functools import lru_cache

from aiokafka.partitioner import murmur2


def partition_key(org_id: str) -> bytes:
    """Kafka key of an event. By org: all keys of an org land in one partition,
    so per-key and per-org counts are both local to one processor."""
    return org_id.encode()


@lru_cache(maxsize=65_536)  # murmur2 in Python costs more than the rest of reading a one-event record
def partition_of(org_id: str, partitions: int) -> int:
    """The partition an org's events belong on: where Kafka's default partitioner (murmur2
    of the key, as in the Java client, aiokafka and the emitter) puts a record keyed by
    the org. A processor counts an org's events on that partition only; records a
    publisher placed elsewhere (another partitioner, another key) are forwarded there."""
    return (murmur2(partition_key(org_id)) & 0x7FFFFFFF) % partitions


# On a record the processor forwarded to its org's partition: "topic/partition/offset"
# of the record as published. Such a copy is for counting only; the sink stores the original.
FORWARDED_HEADER = "qf.forwarded.from"
