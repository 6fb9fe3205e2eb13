"""The collectors' disk spool (collector/spool.py) on its own: segment files written and
read back, damage skipped and counted, the byte bound, a second holder refused, what a
previous run left. Pure file logic: no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.collector.spool import (
    CORRUPT,
    FRAME_MAGIC,
    SEGMENT_MAGIC,
    SEGMENTS_DROPPED,
    SPOOL_EVENTS,
    Record,
    Spool,
    SpoolLocked,
    encode_frame,
)

TOPICS = ("quotaflow.requests.v1", "quotaflow.deadletter.v1")


def record(i: int, size: int = 100, topic: str = TOPICS[0]) -> Record:
    return Record(topic, f"org-{i % 3}".encode(), (f'{{"i":{i}}}'.encode() + b" " * size)[:max(size, 8)],
                  (("h", bytes([i % 256])),), events=i % 7 + 1)


def open_spool(path: Path, max_bytes: int = 1 << 20, segment_bytes: int = 64 << 10) -> Spool:
    spool = Spool(path, max_bytes=max_bytes, segment_bytes=segment_bytes, topics=TOPICS)
    spool.open()
    return spool


def drain(spool: Spool, max_bytes: int = 10_000) -> list[Record]:
    """Everything the spool holds, in order, acknowledged as it is read."""
    out = []
    while (batch := spool.read(max_bytes)) is not None:
        out += batch.records
        spool.ack(batch)
    return out


def sample(counter, *labels) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


def test_round_trip_in_order_across_segments(tmp_path):
    spool = open_spool(tmp_path, segment_bytes=4096)
    records = [record(i, size=300) for i in range(60)]
    for i in range(0, 60, 7):
        spool.append(records[i:i + 7])
    assert len(spool.segment_paths()) > 3  # rolled: each segment at most 4096 bytes
    assert all(p.stat().st_size <= 4096 for p in spool.segment_paths())
    assert drain(spool, max_bytes=1000) == records
    assert spool.empty() and spool.segment_paths() == []  # every segment deleted once acknowledged
    spool.close()


def test_a_batch_not_acknowledged_is_read_again(tmp_path):
    spool = open_spool(tmp_path)
    records = [record(i) for i in range(10)]
    spool.append(records)
    first = spool.read(350)
    assert first.records == records[:len(first.records)] and 0 < len(first.records) < 10
    assert spool.read(350).records == first.records  # not acknowledged: the same again
    spool.ack(first)
    assert drain(spool) == records[len(first.records):]
    spool.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.binary(max_size=300), min_size=1, max_size=20),
       keys=st.lists(st.none() | st.binary(max_size=20), min_size=20, max_size=20))
def test_any_record_comes_back_as_written(tmp_path_factory, values, keys):
    path = tmp_path_factory.mktemp("spool")
    records = [Record(TOPICS[i % 2], keys[i], v, (("qf.error.reason", v[:10]),), events=i) for i, v in enumerate(values)]
    spool = open_spool(path)
    spool.append(records)
    spool.close()
    again = open_spool(path)
    assert drain(again) == records
    again.close()


def test_a_torn_tail_is_skipped_counted_and_the_rest_replayed(tmp_path):
    spool = open_spool(tmp_path)
    records = [record(i) for i in range(20)]
    spool.append(records)
    spool.close()
    [segment] = list(tmp_path.glob("*.qfspool"))
    size = segment.stat().st_size
    last = len(encode_frame(records[-1]))
    os.truncate(segment, size - last // 2)  # the process died mid-write of the last record
    before = sample(CORRUPT, "torn_tail")

    again = open_spool(tmp_path)
    assert drain(again) == records[:-1]
    assert sample(CORRUPT, "torn_tail") == before + 1 and again.corrupt == 1
    assert list(tmp_path.glob("*.qfspool")) == []  # replayed, so deleted
    again.close()


@pytest.mark.parametrize("where", ["body", "length", "magic"])
def test_a_flipped_byte_loses_that_record_only(tmp_path, where):
    spool = open_spool(tmp_path)
    records = [record(i) for i in range(20)]
    spool.append(records)
    spool.close()
    [segment] = list(tmp_path.glob("*.qfspool"))
    data = bytearray(segment.read_bytes())
    start = len(SEGMENT_MAGIC) + sum(len(encode_frame(r)) for r in records[:7])  # the 8th record's frame
    assert data[start:start + 4] == FRAME_MAGIC
    at = {"magic": start + 1, "length": start + 5, "body": start + 40}[where]
    data[at] ^= 0x20
    segment.write_bytes(bytes(data))
    before = sample(CORRUPT, "checksum")

    again = open_spool(tmp_path)
    assert drain(again, max_bytes=300) == records[:7] + records[8:]
    assert sample(CORRUPT, "checksum") == before + 1  # counted once, though read in several batches
    again.close()


def test_a_file_that_is_not_a_segment_is_skipped(tmp_path):
    (tmp_path / "0000000000000001.qfspool").write_bytes(b"not a segment at all")
    before = sample(CORRUPT, "header")
    spool = open_spool(tmp_path)
    assert drain(spool) == []
    assert sample(CORRUPT, "header") == before + 1
    spool.append([record(1)])  # numbered after what was there
    assert drain(spool) == [record(1)]
    spool.close()


def test_a_record_for_another_topic_is_not_replayed(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=64 << 10)  # a writer that may send anywhere
    spool.open()
    spool.append([record(1), record(2, topic="quotaflow.keys.v1"), record(3)])
    spool.close()
    before = sample(CORRUPT, "foreign")
    again = open_spool(tmp_path)
    assert drain(again) == [record(1), record(3)]
    assert sample(CORRUPT, "foreign") == before + 1
    again.close()


def test_full_spool_drops_the_oldest_segment_counted(tmp_path):
    spool = open_spool(tmp_path, max_bytes=8192, segment_bytes=4096)
    records = [record(i, size=500) for i in range(40)]
    dropped_before, segments_before = sample(SPOOL_EVENTS, "dropped"), sample(SEGMENTS_DROPPED)
    for r in records:
        spool.append([r])
        assert spool.total_bytes <= 8192
    kept = drain(spool)
    # What is left is the newest records, in order; everything older was dropped, counted.
    assert kept == records[len(records) - len(kept):] and 0 < len(kept) < 40
    lost = sum(r.events for r in records[:len(records) - len(kept)])
    assert spool.dropped_events == lost
    assert sample(SPOOL_EVENTS, "dropped") == dropped_before + lost
    assert sample(SEGMENTS_DROPPED) == segments_before + spool.dropped_segments > segments_before
    spool.close()


def test_a_second_holder_is_refused_until_the_first_closes(tmp_path):
    first = open_spool(tmp_path)
    with pytest.raises(SpoolLocked, match="in use"):
        open_spool(tmp_path)
    first.close()
    open_spool(tmp_path).close()


def test_what_a_previous_run_left_comes_first(tmp_path):
    old = open_spool(tmp_path, segment_bytes=4096)
    old.append([record(i, size=300) for i in range(30)])
    half = old.read(2000)
    old.ack(half)  # some were replayed before it stopped
    old.close()
    new = open_spool(tmp_path, segment_bytes=4096)
    new.append([record(100)])
    got = drain(new)
    # The acknowledged part of the first segment may be read again (the acknowledgement is
    # kept in memory only): at least once, then in order.
    rest = [record(i, size=300) for i in range(30)][len(half.records):]
    assert got[-len(rest) - 1:] == rest + [record(100)]
    new.close()


def test_bounds_are_checked(tmp_path):
    with pytest.raises(ValueError):
        Spool(tmp_path, max_bytes=4096, segment_bytes=4096)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=5000), flips=st.lists(st.integers(min_value=0, max_value=5000), max_size=5),
       junk=st.binary(max_size=200))
def test_no_damage_makes_the_reader_raise(tmp_path_factory, cut, flips, junk):
    path = tmp_path_factory.mktemp("spool")
    records = [record(i, size=150) for i in range(20)]
    spool = open_spool(path)
    spool.append(records)
    spool.close()
    [segment] = list(path.glob("*.qfspool"))
    data = bytearray(segment.read_bytes())
    for at in flips:
        data[at % len(data)] ^= 0xA5
    segment.write_bytes(bytes(data[:max(len(SEGMENT_MAGIC), len(data) - cut)]) + junk)
    again = open_spool(path)
    got = drain(again)
    # Whatever survives is records as written, in order: damage drops records, never invents them.
    it = iter(records)
    assert all(any(r == w for w in it) for r in got)
    assert again.empty() and list(path.glob("*.qfspool")) == []
    again.close()


@pytest.mark.parametrize("content", [b"", SEGMENT_MAGIC[:3], SEGMENT_MAGIC])
def test_a_segment_without_a_frame_is_removed_at_open(tmp_path, content):
    (tmp_path / "0000000000000007.qfspool").write_bytes(content)  # killed between creating it and a write
    spool = open_spool(tmp_path)
    assert spool.empty() and list(tmp_path.glob("*.qfspool")) == []
    spool.append([record(1)])
    assert [p.name for p in spool.segment_paths()] == ["0000000000000008.qfspool"]
    assert drain(spool) == [record(1)]
    spool.close()
