"""The producer core's partitioner remembers each key's hash (collector/producer.py): it must
put every record where aiokafka's default partitioner, and so the processors, expect it."""

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.collector.producer import _KeyHashes
from quotaflow.schemas.event_partitions import partition_of


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.binary(max_size=80), min_size=1, max_size=20), partitions=st.integers(1, 200))
def test_a_keys_partition_is_the_default_partitioners_first_time_and_after(keys, partitions):
    all_partitions = list(range(partitions))
    hashes = _KeyHashes()
    for _ in range(2):  # hashed, then remembered
        for key in keys:
            assert hashes(key, all_partitions, all_partitions) == DefaultPartitioner()(key, all_partitions,
                                                                                       all_partitions)


@given(org=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True), partitions=st.integers(1, 64))
def test_an_orgs_records_land_on_the_partition_the_processor_counts_it_on(org, partitions):
    hashes = _KeyHashes()
    assert hashes(org.encode(), list(range(partitions)), []) == partition_of(org, partitions)


def test_past_its_bound_keys_are_hashed_each_time_and_still_placed_alike():
    hashes = _KeyHashes()
    hashes.MAX_KEYS = 3
    parts = list(range(12))
    keys = [f"org{i}".encode() for i in range(10)]
    assert [hashes(k, parts, parts) for k in keys] == [DefaultPartitioner()(k, parts, parts) for k in keys]
    assert len(hashes._hashes) == 3
    assert [hashes(k, parts, parts) for k in keys] == [DefaultPartitioner()(k, parts, parts) for k in keys]
