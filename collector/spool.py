"""Disk spool of the producer core (collector/producer.py): Kafka records kept in
append-only segment files while Kafka is unreachable or slow, read back oldest first
when it is back.

Layout of a spool directory (one process at a time: ``LOCK`` is held with flock):

- ``NNNNNNNNNNNNNNNN.qfspool``: segments, numbered in the order they were written. A
  segment starts with ``SEGMENT_MAGIC`` and holds frames back to back; a new segment is
  started once the current one would pass ``segment_bytes``.
- A frame: ``FRAME_MAGIC`` (4 bytes, 0xFF first: never in UTF-8, so never in the JSON of
  an event), the body's length (u32 LE), CRC-32 of length and body (u32 LE, zlib's), the
  body: the length of a JSON header (u32 LE), the header ``[topic, key hex | null,
  [[header, value hex], ...], events]``, then the record's value as it goes to Kafka.

Every append is written and fsync'd (the file, and the directory when a segment is
created) before the caller hears it is spooled. The reader checks each frame's CRC: a
torn tail (a process killed mid-write) or a damaged frame (a flipped byte) is skipped
with a count (``quotaflow_collector_spool_corrupt_total{kind}``) and a log line, and
reading goes on at the next frame that checks out; no content makes it raise. A frame
naming a topic the spool was not opened for is skipped too (kind ``foreign``): what is
replayed goes only where its writer could send.

A segment is deleted once every frame in it was acknowledged (``ack``). How far a
segment was acknowledged is kept in memory only: a segment partly replayed when its
process stopped is replayed from its start by the next one (at-least-once; the stages
downstream drop the copies by event_id). When the spool
holds more than ``max_bytes`` after an append, its oldest segment is dropped, after its
unacknowledged events are counted (``quotaflow_collector_spool_events_total{outcome=
"dropped"}``, ``quotaflow_collector_spool_segments_dropped_total``) and logged. If that
segment was being replayed at that moment, the events of the batch in flight count as
dropped even if Kafka acknowledges them afterwards.

Thread-safe (one lock): the producer core appends and reads from worker threads so that
no disk I/O runs on its event loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

import orjson
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"QFSPOOL\x01"
FRAME_MAGIC = b"\xffQF\x01"
_FRAME_HEAD = struct.Struct("<4sII")  # magic, body length, crc32(length + body)
_LEN = struct.Struct("<I")
SUFFIX = ".qfspool"
MAX_BODY = 256 * 1024 * 1024  # a longer length field is damage, not a record

SPOOL_EVENTS = Counter("quotaflow_collector_spool_events_total",
                       "Events through the collector's disk spool: spooled, replayed (acknowledged by Kafka), "
                       "dropped (oldest segment dropped at the spool's byte bound)", ["outcome"])
SEGMENTS_DROPPED = Counter("quotaflow_collector_spool_segments_dropped_total",
                           "Spool segments dropped, oldest first, because the spool was at its byte bound")
CORRUPT = Counter("quotaflow_collector_spool_corrupt_total",
                  "Damaged stretches of spool segments skipped on replay: torn_tail (a write cut short), checksum "
                  "(a frame whose CRC does not match), header (not a segment), foreign (a topic not ours)", ["kind"])
SPOOL_BYTES = Gauge("quotaflow_collector_spool_bytes", "Bytes in the collector's disk spool segments")


class SpoolLocked(RuntimeError):
    """Another process (or emitter) has the spool directory open."""


@dataclass(frozen=True)
class Record:
    """One Kafka record as a collector publishes it; ``events``: how many events it
    carries (0 for a dead letter)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    events: int = 1

    @property
    def size(self) -> int:
        return len(self.value) + len(self.key or b"") + sum(len(k) + len(v) for k, v in self.headers) + 64


def encode_frame(record: Record) -> bytes:
    head = orjson.dumps([record.topic, None if record.key is None else record.key.hex(),
                         [[name, value.hex()] for name, value in record.headers], record.events])
    body = _LEN.pack(len(head)) + head + record.value
    length = _LEN.pack(len(body))
    return FRAME_MAGIC + length + _LEN.pack(zlib.crc32(body, zlib.crc32(length))) + body


def _decode_body(body: bytes) -> Record:
    """The record in a body whose CRC checked out; ValueError if it still makes no sense."""
    (head_len,) = _LEN.unpack_from(body)
    if head_len > len(body) - 4:
        raise ValueError("header longer than the body")
    topic, key, headers, events = orjson.loads(body[4:4 + head_len])
    if not (isinstance(topic, str) and isinstance(events, int) and events >= 0 and isinstance(headers, list)):
        raise ValueError("bad header")
    return Record(topic, None if key is None else bytes.fromhex(key), bytes(body[4 + head_len:]),
                  tuple((str(name), bytes.fromhex(value)) for name, value in headers), events)


@dataclass
class Damage:
    kind: str  # torn_tail, checksum, header, foreign
    start: int  # offset in the segment
    length: int


def scan(data: bytes, base: int, topics: Collection[str] | None = None
         ) -> Iterator[tuple[int, Record | Damage]]:
    """(offset after it, the record or the damage) for each frame in ``data``, which
    starts at segment offset ``base``. Damage is skipped to the next frame that checks
    out; an incomplete frame at the end is a torn tail."""
    raw = bytes(data)
    data = memoryview(raw)
    pos, end = 0, len(data)
    while pos < end:
        bad = None
        if end - pos < _FRAME_HEAD.size:
            bad = "torn_tail"
        else:
            magic, length, crc = _FRAME_HEAD.unpack_from(data, pos)
            if magic != FRAME_MAGIC or length > MAX_BODY:
                bad = "checksum"
            elif pos + _FRAME_HEAD.size + length > end:
                # Too long for what is there: cut short, unless a frame follows (a damaged length).
                bad = "checksum" if _next_frame(raw, pos + 1) is not None else "torn_tail"
            else:
                body = data[pos + _FRAME_HEAD.size:pos + _FRAME_HEAD.size + length]
                if zlib.crc32(body, zlib.crc32(data[pos + 4:pos + 8])) != crc:
                    bad = "checksum"
                else:
                    try:
                        record = _decode_body(bytes(body))
                    except (ValueError, TypeError, struct.error, orjson.JSONDecodeError):
                        bad = "checksum"
                    else:
                        nxt = pos + _FRAME_HEAD.size + length
                        if topics is not None and record.topic not in topics:
                            yield base + nxt, Damage("foreign", base + pos, nxt - pos)
                        else:
                            yield base + nxt, record
                        pos = nxt
                        continue
        if bad == "torn_tail":
            yield base + end, Damage(bad, base + pos, end - pos)
            return
        nxt = _next_frame(raw, pos + 1)
        nxt = end if nxt is None else nxt
        yield base + nxt, Damage(bad, base + pos, nxt - pos)
        pos = nxt


def _next_frame(raw: bytes, start: int) -> int | None:
    """Offset of the next frame at or after ``start`` whose CRC checks out, if any."""
    data = memoryview(raw)
    pos = start
    while True:
        pos = raw.find(FRAME_MAGIC, pos)
        if pos < 0 or pos + _FRAME_HEAD.size > len(raw):
            return None
        _, length, crc = _FRAME_HEAD.unpack_from(raw, pos)
        stop = pos + _FRAME_HEAD.size + length
        if length <= MAX_BODY and stop <= len(raw) and zlib.crc32(
                data[pos + _FRAME_HEAD.size:stop], zlib.crc32(data[pos + 4:pos + 8])) == crc:
            return pos
        pos += 1


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int  # bytes written and fsync'd (all of the file for a segment found on open)
    acked: int  # frames before this offset are acknowledged
    counted: int = 0  # damage before this offset was counted already (reads repeat after a failed send)

    @property
    def pending(self) -> int:
        return self.size - self.acked


@dataclass
class Batch:
    """Records read from one segment, [start, end) in it; ``ack`` it once Kafka has
    acknowledged every record."""

    seq: int
    start: int
    end: int
    records: list[Record] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(r.events for r in self.records)


class Spool:
    def __init__(self, directory: Path | str, *, max_bytes: int, segment_bytes: int,
                 topics: Collection[str] | None = None):
        if segment_bytes < 4096 or max_bytes < 2 * segment_bytes:
            raise ValueError("the spool needs segment_bytes >= 4096 and max_bytes >= 2 * segment_bytes")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.topics = None if topics is None else frozenset(topics)
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []  # oldest first; the last one is appended to
        self._active: _Segment | None = None  # created by this process, open for appends
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._next_seq = 1
        self.corrupt = 0  # damaged stretches skipped
        self.dropped_events = 0
        self.dropped_segments = 0

    # --- opening and closing ---

    def open(self) -> None:
        """Take the directory (SpoolLocked if another holder has it) and find the
        segments a previous holder left, to be read before anything appended now."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolLocked(f"spool directory {self.directory} is in use by another emitter; "
                              "give each process a directory of its own") from None
        self._lock_fd = fd
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            stem = path.name[:-len(SUFFIX)]
            if stem.isdigit():
                found.append(_Segment(int(stem), path, path.stat().st_size, len(SEGMENT_MAGIC)))
        found.sort(key=lambda s: s.seq)
        self._next_seq = found[-1].seq + 1 if found else 1
        for seg in [s for s in found if s.pending <= 0]:  # no frame: created, then killed before a write
            seg.path.unlink(missing_ok=True)
            found.remove(seg)
        self._segments = found
        if found:
            log.info("spool: segments left by a previous run will be replayed",
                     extra={"segments": len(found), "bytes": self.total_bytes, "directory": str(self.directory)})
        self._gauge()

    def close(self) -> None:
        with self._lock:
            self._close_active()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._active = None

    # --- what it holds ---

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def empty(self) -> bool:
        """Nothing left to replay. Without the lock (a copy of the list is taken at once):
        the event loop asks, and must not wait for a write's fsync."""
        return all(s.pending <= 0 for s in list(self._segments))

    def segment_paths(self) -> list[Path]:
        with self._lock:
            return [s.path for s in self._segments]

    # --- writing ---

    def append(self, records: list[Record]) -> None:
        """Write the records and fsync them; then, if the spool is over its byte bound,
        drop its oldest segments (counted and logged) until it is not."""
        if not records:
            return
        with self._lock:
            pending: list[bytes] = []
            pending_bytes = 0
            for frame in map(encode_frame, records):
                if self._active is None or (self._active.size + pending_bytes + len(frame) > self.segment_bytes
                                            and self._active.size + pending_bytes > len(SEGMENT_MAGIC)):
                    if pending:
                        self._write(pending)
                        pending, pending_bytes = [], 0
                    self._roll()
                pending.append(frame)
                pending_bytes += len(frame)
            self._write(pending)
            SPOOL_EVENTS.labels("spooled").inc(sum(r.events for r in records))
            while self.total_bytes > self.max_bytes and len(self._segments) > 1:
                self._drop_oldest()
            self._gauge()

    def _roll(self) -> None:
        self._close_active()
        seq = self._next_seq
        self._next_seq += 1
        path = self.directory / f"{seq:016d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            _write_all(fd, SEGMENT_MAGIC)
            os.fsync(fd)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._active = _Segment(seq, path, len(SEGMENT_MAGIC), len(SEGMENT_MAGIC), len(SEGMENT_MAGIC))
        self._segments.append(self._active)

    def _write(self, frames: list[bytes]) -> None:
        data = b"".join(frames)
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            # What reached the file may be part of a frame: appending after it would bury the
            # frames that follow behind damage, so the next append starts a new segment.
            self._active.size = os.fstat(self._fd).st_size if self._fd is not None else self._active.size
            self._close_active()
            raise
        self._active.size += len(data)

    def _drop_oldest(self) -> None:
        seg = self._segments[0]
        if seg is self._active:
            self._close_active()
        records = events = 0
        try:
            for _, item in self._scan(seg, count=False):
                if isinstance(item, Record):
                    records += 1
                    events += item.events
        except OSError as exc:
            log.warning("spool: could not read the segment being dropped to count it", extra={"error": str(exc)})
        self._segments.pop(0)
        self.dropped_events += events
        self.dropped_segments += 1
        SPOOL_EVENTS.labels("dropped").inc(events)
        SEGMENTS_DROPPED.inc()
        log.error("spool full: dropped its oldest segment", extra={
            "segment": seg.path.name, "records": records, "events": events, "bytes": seg.size,
            "max_bytes": self.max_bytes})
        seg.path.unlink(missing_ok=True)
        _fsync_dir(self.directory)

    # --- reading back ---

    def read(self, max_bytes: int) -> Batch | None:
        """Records not yet acknowledged from the oldest segment that has any, up to about
        ``max_bytes`` (one record at least); None when there is nothing to read. The same
        records come back until they are acknowledged."""
        with self._lock:
            for seg in self._segments:
                if seg.pending > 0:
                    break
            else:
                return None
            batch = Batch(seg.seq, seg.acked, seg.acked)
            size = 0
            for end, item in self._scan(seg, count=True):
                batch.end = end
                if isinstance(item, Record):
                    batch.records.append(item)
                    size += item.size
                    if size >= max_bytes:
                        break
            return batch

    def ack(self, batch: Batch) -> None:
        """The batch's records are acknowledged; a segment with nothing left is deleted
        (the active one too: the next append starts a new one)."""
        with self._lock:
            seg = next((s for s in self._segments if s.seq == batch.seq), None)
            if seg is None or seg.acked != batch.start:
                return  # dropped meanwhile, or acknowledged already
            seg.acked = batch.end
            SPOOL_EVENTS.labels("replayed").inc(batch.events)
            if seg.pending <= 0:
                if seg is self._active:
                    self._close_active()
                self._segments.remove(seg)
                seg.path.unlink(missing_ok=True)
                _fsync_dir(self.directory)
            self._gauge()

    def _scan(self, seg: _Segment, count: bool) -> Iterator[tuple[int, Record | Damage]]:
        with open(seg.path, "rb") as f:
            if seg.acked <= len(SEGMENT_MAGIC):
                head = f.read(len(SEGMENT_MAGIC))
                if head != SEGMENT_MAGIC:
                    if count and seg.counted < seg.size:
                        self._damaged(seg, Damage("header", 0, seg.size))
                    yield seg.size, Damage("header", 0, seg.size)
                    return
            f.seek(seg.acked)
            data = f.read(seg.size - seg.acked)
        for end, item in scan(data, seg.acked, self.topics):
            if isinstance(item, Damage) and count and item.start >= seg.counted:
                self._damaged(seg, item)
            yield end, item

    def _damaged(self, seg: _Segment, damage: Damage) -> None:
        seg.counted = damage.start + damage.length
        self.corrupt += 1
        CORRUPT.labels(damage.kind).inc()
        log.warning("spool: skipped a damaged stretch of a segment", extra={
            "segment": seg.path.name, "kind": damage.kind, "offset": damage.start, "bytes": damage.length})

    def _gauge(self) -> None:
        SPOOL_BYTES.set(self.total_bytes)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
