"""The producer core's partitioner takes each key's hash from a bounded cache (schemas
key_hash, collector/producer.py): it must put every record where aiokafka's default
partitioner, and so the processors, expect it."""

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.collector.producer import _partition
from quotaflow.schemas.event_partitions import key_hash, partition_of


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.binary(max_size=80), min_size=1, max_size=20), partitions=st.integers(1, 200))
def test_a_keys_partition_is_the_default_partitioners_first_time_and_after(keys, partitions):
    all_partitions = list(range(partitions))
    for _ in range(2):  # hashed, then remembered
        for key in keys:
            assert _partition(key, all_partitions, all_partitions) == DefaultPartitioner()(key, all_partitions,
                                                                                           all_partitions)


@given(org=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True), partitions=st.integers(1, 64))
def test_an_orgs_records_land_on_the_partition_the_processor_counts_it_on(org, partitions):
    assert _partition(org.encode(), list(range(partitions)), []) == partition_of(org, partitions)


def test_past_its_bound_keys_are_hashed_again_and_still_placed_alike():
    maxsize = key_hash.cache_info().maxsize
    assert maxsize == 65_536
    parts = list(range(12))
    keys = [f"bound-org{i}".encode() for i in range(maxsize + 10)]  # more keys than the cache holds
    assert [_partition(k, parts, parts) for k in keys] == [DefaultPartitioner()(k, parts, parts) for k in keys]
    assert key_hash.cache_info().currsize == maxsize
    early = keys[:10]  # pushed out by the later ones: hashed again
    assert [_partition(k, parts, parts) for k in early] == [DefaultPartitioner()(k, parts, parts) for k in early]
