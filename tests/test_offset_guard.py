"""OffsetGuard: the processor's defence against records the stream skips or repeats
(pure logic; the broker probe and the seek are given as plain functions)."""

import asyncio

from quotaflow.processors.offset_guard import APPLY, REDELIVERED, REFETCH, RESEEK_AFTER_S, OffsetGuard, next_offset_key


class Log:
    """The partition as the broker holds it: which offsets are real records."""

    def __init__(self, real_offsets):
        self.real = sorted(real_offsets)
        self.seeks = []

    async def probe(self, partition, offset):
        return next((o for o in self.real if o >= offset), None)

    async def seek(self, partition, offset):
        self.seeks.append((partition, offset))


def run(guard, deliveries, partition=0):
    return [asyncio.run(guard.check(partition, o)) for o in deliveries]


def test_in_order_records_are_applied_and_repeats_skipped():
    log = Log(range(100))
    data = {}
    guard = OffsetGuard(data, log.probe, log.seek)
    assert run(guard, [10, 11, 12, 11, 12, 13]) == [APPLY, APPLY, APPLY, REDELIVERED, REDELIVERED, APPLY]
    assert data[next_offset_key(0)] == 14 and log.seeks == []


def test_skipped_records_are_fetched_again():
    """The stream jumps from 74 to 81 (as Faust did after a worker restart): the guard
    seeks back to 75, drops what arrives before 75, then applies 75.. in order."""
    log = Log(range(200))
    guard = OffsetGuard({}, log.probe, log.seek)
    assert run(guard, [73, 74, 81, 82]) == [APPLY, APPLY, REFETCH, REFETCH]
    assert log.seeks == [(0, 75)]
    assert run(guard, list(range(75, 84))) == [APPLY] * 9
    assert log.seeks == [(0, 75)]


def test_a_legitimate_gap_is_not_fetched_again():
    """Offsets 75 and 76 hold transaction markers, not records: nothing was skipped."""
    log = Log([73, 74, 77, 78])
    guard = OffsetGuard({}, log.probe, log.seek)
    assert run(guard, [73, 74, 77, 78]) == [APPLY] * 4
    assert log.seeks == []


def test_a_skip_after_a_marker_seeks_to_the_first_real_record():
    log = Log([74, 76, 77, 78, 79])  # 75 is a marker, 76-78 were skipped by the stream
    guard = OffsetGuard({}, log.probe, log.seek)
    assert run(guard, [74, 79]) == [APPLY, REFETCH]
    assert log.seeks == [(0, 76)]
    assert run(guard, [76, 77, 78, 79]) == [APPLY] * 4


def test_a_seek_that_brings_nothing_back_is_repeated_and_forgotten_on_rebalance():
    now = [0.0]
    log = Log(range(100))
    guard = OffsetGuard({}, log.probe, log.seek, clock=lambda: now[0])
    run(guard, [10, 20])
    assert log.seeks == [(0, 11)]
    asyncio.run(guard.reseek_stale())
    assert log.seeks == [(0, 11)]  # not yet
    now[0] += RESEEK_AFTER_S + 1
    assert run(guard, [21]) == [REFETCH]
    assert log.seeks == [(0, 11), (0, 11)]
    guard.reset()
    assert run(guard, [30]) == [REFETCH]  # a new gap after the rebalance: probed and sought again
    assert log.seeks[-1] == (0, 11)


def test_partitions_are_independent():
    log = Log(range(100))
    data = {}
    guard = OffsetGuard(data, log.probe, log.seek)
    assert asyncio.run(guard.check(0, 5)) == APPLY
    assert asyncio.run(guard.check(1, 50)) == APPLY
    assert asyncio.run(guard.check(0, 6)) == APPLY
    assert (data[next_offset_key(0)], data[next_offset_key(1)]) == (7, 51)


def test_a_partition_with_records_to_read_that_stands_still_is_sought():
    """The stream delivered 10, then dropped what followed (Faust drops records below
    the highest offset it delivered): no later record comes to reveal the gap, so the
    guard looks at the end offsets on a timer and seeks back to the next offset."""
    now = [0.0]
    log = Log(range(100))
    guard = OffsetGuard({}, log.probe, log.seek, clock=lambda: now[0])
    run(guard, [10])
    asyncio.run(guard.unstick({0: 100}))
    now[0] += RESEEK_AFTER_S - 1
    asyncio.run(guard.unstick({0: 100}))
    assert log.seeks == []  # not still for long enough yet
    now[0] += 2
    asyncio.run(guard.unstick({0: 100}))
    assert log.seeks == [(0, 11)]
    assert run(guard, [12, 11, 12]) == [REFETCH, APPLY, APPLY]  # only the sought record lets it go on


def test_a_partition_that_moves_or_has_nothing_to_read_is_left_alone():
    now = [0.0]
    log = Log(range(100))
    guard = OffsetGuard({}, log.probe, log.seek, clock=lambda: now[0])
    run(guard, [10])
    for offset in range(11, 20):  # progress between looks
        asyncio.run(guard.unstick({0: 100}))
        now[0] += RESEEK_AFTER_S
        run(guard, [offset])
    now[0] += 10 * RESEEK_AFTER_S
    asyncio.run(guard.unstick({0: 20}))  # read up to the end: nothing to seek
    asyncio.run(guard.unstick({0: 20}))
    assert log.seeks == []


def test_the_backlog_counts_skipped_records_that_the_group_offsets_passed():
    log = Log(range(300))
    guard = OffsetGuard({}, log.probe, log.seek)
    assert guard.backlog({0: 300}, {}) == 300  # nothing applied yet: every record is still to apply
    assert guard.backlog({0: 300}, {0: 120}) == 180  # ... every record still in the log
    run(guard, [0, 1, 2])
    assert guard.backlog({0: 300, 1: 0}, {}) == 297  # an empty partition has nothing to apply
    assert guard.backlog({0: 300, 1: 50}, {1: 10}) == 297 + 40
    run(guard, [100])  # the stream skipped 3..99: they are still to be applied
    assert guard.backlog({0: 300}, {}) == 297
    run(guard, range(3, 300))
    assert guard.backlog({0: 300}, {}) == 0


def test_a_seek_undone_by_records_in_flight_is_repeated_after_the_batch():
    """Records fetched before the seek still arrive after it (74 -> 81 is the skip; 82
    and 83 were in flight); the stream then drops the refetched ones below them. The
    guard seeks again once the batch that brought them is through, not RESEEK_AFTER_S
    later."""
    log = Log(range(200))
    guard = OffsetGuard({}, log.probe, log.seek, clock=lambda: 0.0)
    assert run(guard, [73, 74, 81, 82]) == [APPLY, APPLY, REFETCH, REFETCH]
    asyncio.run(guard.after_batch())
    assert log.seeks == [(0, 75), (0, 75)]
    assert run(guard, [83]) == [REFETCH]  # still in flight
    asyncio.run(guard.after_batch())
    assert log.seeks == [(0, 75), (0, 75), (0, 75)]
    assert run(guard, [75, 76]) == [APPLY, APPLY]  # the seek took
    asyncio.run(guard.after_batch())
    assert log.seeks == [(0, 75), (0, 75), (0, 75)]  # nothing more to repeat


def test_the_record_that_reveals_a_skip_alone_does_not_repeat_the_seek():
    log = Log(range(200))
    guard = OffsetGuard({}, log.probe, log.seek, clock=lambda: 0.0)
    assert run(guard, [73, 74, 81]) == [APPLY, APPLY, REFETCH]
    asyncio.run(guard.after_batch())
    assert log.seeks == [(0, 75)]
