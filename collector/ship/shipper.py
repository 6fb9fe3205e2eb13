"""The access-log shipper: tails files, turns their lines into events, publishes them
through the producer core (collector/producer.py: idempotent, acks=all, zstd, a disk
spool when Kafka is away), and checkpoints each file's position once its lines are safe.

One loop on one event loop, in turns:

1. every ``poll_interval_s``, look at the configured paths (files.py says which file is
   which: renamed, truncated, a copy, new, gone);
2. read from each file with unread lines (a chunk, at most ``CHUNK_BYTES``), parse each
   line (formats.py), make its event (events.py) or its dead letter, and add the events
   to their org's batch; a batch goes out as one record (a JSON array keyed by the org,
   as the emitter publishes) when full or ``LINGER_S`` old, or when nothing is left to read;
3. settle: a chunk whose records all came back DELIVERED (acknowledged by Kafka) or
   SPOOLED (fsync'd to the spool, which this shipper or the next one over the same
   directory replays) moves its file's safe position, in order, chunk by chunk; a LOST
   record (the spool's disk failing) makes the file read again from its safe position:
   the copies carry the same event ids;
4. every ``checkpoint_interval_s``, write the safe positions (checkpoints.py).

What is read and not yet safe is bounded (``memory_bytes``): past it, reading waits.
A crash loses no line and may ship the lines after the last checkpoint again; they are
the same events (same ids), which the processor and the sink take once
(schemas/dedup.py), within QUOTAFLOW_DEDUP_WINDOW_S of the first copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from quotaflow.collector.producer import DELIVERED, SPOOLED, ProducerCore
from quotaflow.collector.ship import formats
from quotaflow.collector.ship.checkpoints import CheckpointFile, Entry
from quotaflow.collector.ship.events import EventBuilder, LineIds
from quotaflow.collector.ship.files import Chunk, Progress, Tracked, compressed, fingerprint
from quotaflow.collector.ship.routes import RouteMap
from quotaflow.collector.spool import Record
from quotaflow.core.redact import redact
from quotaflow.schemas import deadletter
from quotaflow.schemas.api_keys import SCAN_PATTERN
from quotaflow.schemas.events import partition_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC

log = logging.getLogger(__name__)

LINES = Counter("quotaflow_ship_lines_total", "Access-log lines the shipper made safe (acknowledged by Kafka or "
                "spooled), by outcome: shipped (an event), dead_lettered (refused, with the reason)", ["outcome"])
BYTES = Counter("quotaflow_ship_bytes_total", "Bytes of access-log lines the shipper made safe")
NORMALISED = Counter("quotaflow_ship_normalised_total", "Fields of shipped events changed to fit the event schema, "
                     "by field", ["field"])
ROTATIONS = Counter("quotaflow_ship_rotations_total", "Rotations the shipper followed, by kind: renamed (a file "
                    "read on under its new name), truncated (its contents replaced: read from the start), "
                    "copy (a copy read on where its original stopped)", ["kind"])
REREADS = Counter("quotaflow_ship_rereads_total", "Times the shipper read a file again from its safe position "
                  "because a record of it was lost")
CHECKPOINTS = Counter("quotaflow_ship_checkpoint_writes_total", "Checkpoint files written")
FILES = Gauge("quotaflow_ship_files", "Files the shipper has open")
LAG = Gauge("quotaflow_ship_lag_bytes", "Bytes in the open files after their safe positions")

CHUNK_BYTES = 1024 * 1024  # read at once from a file
BATCH_EVENTS = 1000  # events of one org in one record at most
BATCH_BYTES = 512 * 1024  # line bytes behind one record at most (the record is smaller)
LINGER_S = 0.1  # an org's batch waits at most this long for more events
MAX_OPEN_FILES = 1024
DEAD_LETTER_VALUE_BYTES = 4096  # of a refused line, in its dead letter
PROGRESS_LOG_S = 10.0
DEAD_LETTER_LOG_S = 10.0
_SCAN = re.compile(SCAN_PATTERN)
_QUERY = re.compile(r"\?[^\s\"]*")  # a query string may carry a token under any name


@dataclass
class ShipConfig:
    paths: tuple[str, ...]
    format: str = "nginx_json"
    fields: dict[str, str] | None = None
    routes: tuple[str, ...] = ()
    service: str = ""
    default_org_id: str | None = None
    default_api_key_id: str | None = None
    state_dir: Path = Path(".quotaflow/ship")
    fingerprint_bytes: int = 1024
    max_line_bytes: int = 64 * 1024
    poll_interval_s: float = 0.25
    checkpoint_interval_s: float = 1.0
    checkpoint_ttl_s: float = 7 * 86400.0
    rotate_wait_s: float = 60.0
    start_at: str = "beginning"
    memory_bytes: int = 32 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Any) -> "ShipConfig":
        return cls(paths=settings.ship_paths, format=settings.ship_format, fields=dict(settings.ship_fields),
                   routes=settings.ship_routes, service=settings.ship_service, default_org_id=settings.ship_org_id,
                   default_api_key_id=settings.ship_api_key_id, state_dir=settings.ship_state_dir,
                   fingerprint_bytes=settings.ship_fingerprint_bytes, max_line_bytes=settings.ship_max_line_bytes,
                   poll_interval_s=settings.ship_poll_interval_s,
                   checkpoint_interval_s=settings.ship_checkpoint_interval_s,
                   checkpoint_ttl_s=settings.ship_checkpoint_ttl_s, rotate_wait_s=settings.ship_rotate_wait_s,
                   start_at=settings.ship_start_at, memory_bytes=settings.collector_memory_bytes)


class ConfigProblem(ValueError):
    """A shipper setting that cannot work; the message names the variable."""


class _Batch:
    __slots__ = ("events", "chunks", "bytes", "since")

    def __init__(self, now: float):
        self.events: list[dict] = []
        self.chunks: list[Chunk] = []
        self.bytes = 0
        self.since = now


class Shipper:
    def __init__(self, config: ShipConfig, core: ProducerCore):
        if not config.paths:
            raise ConfigProblem("QUOTAFLOW_SHIP_PATHS: no file to ship; name the access logs (globs allowed)")
        try:
            self.parse = formats.parser(config.format, config.fields or {})
        except ValueError as exc:
            raise ConfigProblem(f"QUOTAFLOW_SHIP_FIELDS: {exc}") from None
        try:
            routes = RouteMap(config.routes)
        except ValueError as exc:
            raise ConfigProblem(f"QUOTAFLOW_SHIP_ROUTES: {exc}") from None
        service = config.service or formats.SERVER[config.format]
        try:
            self.builder = EventBuilder(routes, service=service, latency_ms_per_unit=formats.LATENCY_MS[config.format],
                                        default_org_id=config.default_org_id,
                                        default_api_key_id=config.default_api_key_id)
        except ValueError as exc:
            raise ConfigProblem(f"QUOTAFLOW_SHIP_SERVICE / _ORG_ID / _API_KEY_ID: {exc}") from None
        self.config = config
        self.core = core
        self.checkpoints = CheckpointFile(Path(config.state_dir) / "checkpoints.json", config.checkpoint_ttl_s)
        self.entries: dict[str, Entry] = {}  # fingerprint -> its last checkpoint (what was loaded, then written)
        self.progress: dict[str, Progress] = {}  # fingerprint -> progress, for the files seen in this run
        self.files: dict[tuple[int, int], Tracked] = {}  # (device, inode) -> the file open
        self._read_size = max(CHUNK_BYTES, config.max_line_bytes + 1)
        self._open: dict[str, _Batch] = {}  # org -> events not yet in a record
        self._unsettled = 0  # line bytes read and not yet safe
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._first_scan = True
        self._said_too_many = False
        self._said_internal_error = False
        self._dirty = False
        self._last_checkpoint = 0.0
        self._next_scan = 0.0
        self.shipped = 0  # lines made safe as events
        self.dead_lettered = 0  # lines made safe as dead letters
        self._last_log = (time.monotonic(), 0)
        self._dead_logged: dict[str, tuple[float, int]] = {}  # kind of refusal -> (last logged, not logged since)

    # --- running ---

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self, until_idle: bool = False) -> None:
        """Ship until stop(); with ``until_idle``, until every file is read to its end and
        everything read is safe (then return). Writes the checkpoint on the way out."""
        self.entries = self.checkpoints.load()
        try:
            while not self._stop.is_set():
                self._wake.clear()  # a delivery from here on makes the wait below return at once
                now = time.monotonic()
                if now >= self._next_scan:
                    self._scan()
                    self._next_scan = now + self.config.poll_interval_s
                read = self._read_round() if self._unsettled < self.config.memory_bytes // 2 else False
                self._flush_batches(everything=not read)
                self._settle()
                self._maybe_checkpoint()
                self._maybe_log()
                if until_idle and not read and self._idle():
                    break
                if read:
                    await asyncio.sleep(0)  # the producer's tasks run between chunks
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), max(0.0, self._next_scan - time.monotonic()))
        finally:
            self._flush_batches(everything=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.core.flush(), self.core.stop_timeout_s)
            self._settle()
            self._write_checkpoint()
            for f in self.files.values():
                f.close()
            self.files.clear()
            FILES.set(0)

    def checkpoint_now(self) -> None:
        """Settle what came back and write the checkpoint: after the producer core's stop,
        which spools what Kafka had not acknowledged, so those lines count as safe."""
        self._settle()
        self._write_checkpoint()

    def _idle(self) -> bool:
        return (not self._open and self._unsettled == 0
                and all(not p.pending for p in self.progress.values())
                and all(f.at_end or f.progress is None for f in self.files.values()))

    # --- files ---

    def _scan(self) -> None:
        now = time.monotonic()
        found: dict[tuple[int, int], str] = {}
        for pattern in self.config.paths:
            for path in sorted(glob.glob(pattern)):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.setdefault((st.st_dev, st.st_ino), path)
        # files already open first: a truncated original gives its progress up before its copy is looked at
        for key, f in list(self.files.items()):
            path = found.get(key)
            if path is None:
                if f.gone_since is None:
                    f.gone_since = now
            else:
                f.gone_since = None
                if path != f.path:
                    if f.progress is not None:
                        ROTATIONS.labels("renamed").inc()
                        log.info("file renamed; reading it on", extra={"from": f.path, "to": path})
                    f.path = path
            self._look_at(f, now)
        for key, path in found.items():
            if key not in self.files and len(self.files) < MAX_OPEN_FILES:
                f = self._open_file(path, key, now)
                if f is not None:
                    self._look_at(f, now)
        if not found and self._first_scan:
            log.warning("no file matches QUOTAFLOW_SHIP_PATHS yet; waiting for one", extra={"paths": list(self.config.paths)})
        if len(found) > MAX_OPEN_FILES and not self._said_too_many:
            self._said_too_many = True
            log.warning("more files match the paths than the shipper keeps open; the rest wait",
                        extra={"files": len(found), "max": MAX_OPEN_FILES})
        self._first_scan = False
        lag = 0
        for f in self.files.values():
            if f.progress is not None:
                lag += max(0, f.size - f.progress.committed)
        LAG.set(lag)
        FILES.set(len(self.files))

    def _open_file(self, path: str, key: tuple[int, int], now: float) -> Tracked | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot open a log file", extra={"path": path, "error": exc.strerror})
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key:  # replaced between stat and open: the next scan sees the new one
            os.close(fd)
            return None
        if compressed(fd):
            log.info("compressed file skipped (name only uncompressed logs in the paths)", extra={"path": path})
            os.close(fd)
            self.files[key] = Tracked(path, -1, *key, size=st.st_size, at_end=True)  # remembered, never read
            return None
        f = Tracked(path, fd, *key, size=st.st_size, last_growth=now)
        self.files[key] = f
        return f

    def _look_at(self, f: Tracked, now: float) -> None:
        """A file's size and first line now: grown, truncated, replaced, or finished with."""
        if f.fd < 0:
            if f.gone_since is not None:
                del self.files[f.key]
            return
        size = os.fstat(f.fd).st_size
        if size != f.size:
            if size > f.size:
                f.last_growth, f.at_end = now, False
            shrunk = size < f.size
            f.size = size
        else:
            shrunk = False
        p = f.progress
        if p is not None:
            head = fingerprint(f.fd, self.config.fingerprint_bytes)
            if head != p.fingerprint or shrunk:
                ROTATIONS.labels("truncated").inc()
                log.info("file truncated or replaced; reading it from its start", extra={"path": f.path})
                self._detach(f)
                if head == p.fingerprint:  # rewritten with the very same first line: start it over
                    self._rewind(p, 0)
                    p.committed = 0
                    p.dirty = True
                f.last_growth, f.at_end = now, False
        if f.progress is None:
            self._attach(f)
        if f.gone_since is not None and now - max(f.gone_since, f.last_growth) >= self.config.rotate_wait_s:
            if f.progress is None or f.at_end:
                if f.progress is not None and f.size > f.progress.read_at:
                    log.warning("file closed with an unfinished last line", extra={
                        "path": f.path, "bytes": f.size - f.progress.read_at})
                self._detach(f)
                f.close()
                del self.files[f.key]

    def _attach(self, f: Tracked) -> None:
        fp = fingerprint(f.fd, self.config.fingerprint_bytes)
        if fp is None:
            return  # no whole first line yet
        p = self.progress.get(fp)
        if p is None:
            p = self._new_progress(fp, f)
        elif p.owner is not None and p.owner is not f:
            if f.waiting_for != fp:
                log.info("file with the same first line as one being read: read once the other is done with",
                         extra={"path": f.path, "other": p.owner.path})
            f.waiting_for = fp
            return
        elif f.waiting_for == fp:
            ROTATIONS.labels("copy").inc()
            log.info("reading a copy on where its original stopped", extra={"path": f.path, "offset": p.read_at})
        f.waiting_for = None
        p.owner, f.progress = f, p
        p.path, p.dev, p.ino = f.path, f.dev, f.ino
        f.at_end = False

    def _new_progress(self, fp: str, f: Tracked) -> Progress:
        entry = self.entries.get(fp)
        if entry is not None:
            if entry.offset <= f.size:
                start = entry.offset
            elif (entry.dev, entry.ino) != f.key:
                start = f.size  # a copy shorter than what was shipped of its original: nothing left in it
            else:
                start = 0  # the same inode, shorter, the same first line: rewritten
                log.warning("file shorter than its checkpoint; reading it from its start", extra={"path": f.path})
        elif self.config.start_at == "end" and self._first_scan:
            start = _line_start_before(f.fd, f.size)
        else:
            start = 0
        p = Progress(fp, read_at=start, committed=start, ids=LineIds(fp), safe_end=start)
        self.progress[fp] = p
        if entry is not None or start:
            log.info("file resumed", extra={"path": f.path, "offset": start, "checkpointed": entry is not None})
        return p

    def _detach(self, f: Tracked) -> None:
        p = f.progress
        if p is not None and p.owner is f:
            p.owner = None
        f.progress = None

    # --- reading ---

    def _read_round(self) -> bool:
        """One chunk from each file with unread lines; whether anything was read."""
        read = False
        for f in list(self.files.values()):
            p = f.progress
            if p is None or f.fd < 0 or f.at_end:
                continue
            if p.read_at >= f.size:
                size = os.fstat(f.fd).st_size  # grown since the scan?
                if size > f.size:
                    f.size, f.last_growth = size, time.monotonic()
                if p.read_at >= f.size:
                    f.at_end = True
                    continue
            try:
                data = os.pread(f.fd, self._read_size, p.read_at)
            except OSError as exc:
                log.warning("cannot read a log file", extra={"path": f.path, "error": exc.strerror})
                f.at_end = True
                continue
            if not data:
                f.at_end = True
                continue
            if self._take(f, p, data):
                read = True
            else:
                f.at_end = True  # only an unfinished line: wait for its end
        return read

    def _take(self, f: Tracked, p: Progress, data: bytes) -> bool:
        """Ship the whole lines of ``data`` (read at ``p.read_at``); whether it used any."""
        began = base = p.read_at
        max_line = self.config.max_line_bytes
        chunk = Chunk(end=p.safe_end)
        if p.skipping:  # the rest of a line over the bound
            newline = data.find(b"\n")
            if newline < 0:
                data, base = b"", base + len(data)
                p.read_at = base
            else:
                p.skipping = False
                base += newline + 1
                data = data[newline + 1:]
                p.read_at = p.safe_end = chunk.end = base
        last = data.rfind(b"\n")
        if last >= 0:
            self._lines(f, p, chunk, data[:last], base)
            p.read_at = p.safe_end = chunk.end = base + last + 1
        if len(data) - (last + 1) >= max_line:  # a line over the bound, not ended within it: refuse it, skip its rest
            start = base + last + 1
            self._dead_letter(f, p, chunk, data[last + 1:last + 1 + max_line], start,
                              f"line longer than {max_line} bytes (QUOTAFLOW_SHIP_MAX_LINE_BYTES); its first bytes "
                              "are kept here")
            p.skipping = True
            p.read_at = base + len(data)
        chunk.bytes = p.read_at - began
        if not chunk.bytes:
            return False  # only an unfinished line
        self._unsettled += chunk.bytes
        p.pending.append(chunk)
        return True

    def _lines(self, f: Tracked, p: Progress, chunk: Chunk, block: bytes, base: int) -> None:
        parse, build, ids = self.parse, self.builder.build, p.ids
        max_line = self.config.max_line_bytes
        batches, now = self._open, time.monotonic()
        pos = base
        for line in block.split(b"\n"):
            start, pos = pos, pos + len(line) + 1
            if len(line) > max_line:
                self._dead_letter(f, p, chunk, line[:max_line], start,
                                  f"line longer than {max_line} bytes (QUOTAFLOW_SHIP_MAX_LINE_BYTES)")
                continue
            try:
                event = build(parse(line), ids, start)
            except formats.LineError as exc:
                self._dead_letter(f, p, chunk, line, start, exc.reason)
                continue
            except Exception as exc:  # a bug must not stop the shipping of every other line
                if not self._said_internal_error:  # once: the dead letters count the rest
                    self._said_internal_error = True
                    log.exception("line handling failed")
                self._dead_letter(f, p, chunk, line, start, f"internal error ({type(exc).__name__})")
                continue
            org = event["org_id"]
            batch = batches.get(org)
            if batch is None:
                batch = batches[org] = _Batch(now)
            events = batch.events
            events.append(event)
            if not batch.chunks or batch.chunks[-1] is not chunk:
                batch.chunks.append(chunk)
                chunk.open_batches += 1
            batch.bytes += len(line)
            chunk.events += 1
            if len(events) >= BATCH_EVENTS or batch.bytes >= BATCH_BYTES:
                self._submit_batch(org)
        if self.builder.normalised:
            for name, count in self.builder.normalised.items():
                NORMALISED.labels(name).inc(count)
            self.builder.normalised.clear()

    def _dead_letter(self, f: Tracked, p: Progress, chunk: Chunk, line: bytes, offset: int, reason: str) -> None:
        text = line[:DEAD_LETTER_VALUE_BYTES].decode("utf-8", errors="replace")
        value = _QUERY.sub("?***", _SCAN.sub("***", redact(text))).encode()
        headers = deadletter.headers(reason, deadletter.STAGE_COLLECTOR, ts_ms=int(time.time() * 1000),
                                     file=f.path, file_offset=offset, fingerprint=p.fingerprint)
        fut = self.core.submit(Record(DEAD_LETTER_TOPIC, None, value, tuple(headers), events=0), want_outcome=True)
        fut.add_done_callback(self._woken)
        chunk.futures.append(fut)
        chunk.dead += 1
        # one line per kind of refusal every DEAD_LETTER_LOG_S: a log of refused lines (a flood of
        # requests without a key, say) must not flood the shipper's own log
        kind, now = reason.split(" (", 1)[0][:80], time.monotonic()
        last, since = self._dead_logged.get(kind, (-DEAD_LETTER_LOG_S, 0))
        if now - last >= DEAD_LETTER_LOG_S:
            if len(self._dead_logged) >= 1024:
                self._dead_logged.clear()
            self._dead_logged[kind] = (now, 0)
            log.warning("log line dead-lettered", extra={"reason": reason, "path": f.path, "offset": offset,
                                                         "more_like_it_before": since})
        else:
            self._dead_logged[kind] = (last, since + 1)

    # --- records ---

    def _flush_batches(self, everything: bool) -> None:
        if not self._open:
            return
        if everything:
            orgs = list(self._open)
        else:
            old = time.monotonic() - LINGER_S
            orgs = [org for org, b in self._open.items() if b.since <= old]
        for org in orgs:
            self._submit_batch(org)

    def _submit_batch(self, org: str) -> None:
        batch = self._open.pop(org)
        record = Record(EVENTS_TOPIC, partition_key(org), orjson.dumps(batch.events), events=len(batch.events))
        fut = self.core.submit(record, want_outcome=True)
        fut.add_done_callback(self._woken)
        for chunk in batch.chunks:
            chunk.futures.append(fut)
            chunk.open_batches -= 1

    def _woken(self, _fut: asyncio.Future) -> None:
        self._wake.set()

    def _settle(self) -> None:
        for p in self.progress.values():
            pending = p.pending
            while pending:
                chunk = pending[0]
                if chunk.open_batches or not all(fut.done() for fut in chunk.futures):
                    break
                pending.popleft()
                self._unsettled -= chunk.bytes
                outcomes = {None if fut.cancelled() else fut.result() for fut in chunk.futures}
                if outcomes <= {DELIVERED, SPOOLED}:
                    p.committed = chunk.end
                    p.dirty = self._dirty = True
                    self.shipped += chunk.events
                    self.dead_lettered += chunk.dead
                    LINES.labels("shipped").inc(chunk.events)
                    LINES.labels("dead_lettered").inc(chunk.dead)
                    BYTES.inc(chunk.bytes)
                else:  # lost: read these lines again (the same event ids)
                    REREADS.inc()
                    log.warning("records of a file were lost; reading it again from its safe position",
                                extra={"path": p.path, "offset": p.committed})
                    self._rewind(p, p.committed)
                    break

    def _rewind(self, p: Progress, offset: int) -> None:
        for chunk in p.pending:
            self._unsettled -= chunk.bytes
        p.pending.clear()
        p.read_at = p.safe_end = offset
        p.skipping = False
        if p.owner is not None:
            p.owner.at_end = False

    # --- checkpoints ---

    def _maybe_checkpoint(self) -> None:
        if self._dirty and time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval_s:
            self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        now_ms = int(time.time() * 1000)
        for fp, p in self.progress.items():
            if p.owner is not None or p.dirty or fp not in self.entries:
                self.entries[fp] = Entry(p.committed, p.path, p.dev, p.ino, now_ms)
            p.dirty = False
        try:
            self.entries = self.checkpoints.save(self.entries, now_ms)
        except OSError as exc:  # the disk full, say: shipping goes on; a crash would ship again from the last one
            log.error("cannot write the checkpoint file", extra={"path": str(self.checkpoints.path),
                                                                 "error": exc.strerror})
            return
        CHECKPOINTS.inc()
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        # forget progress of files gone and expired from the checkpoints
        for fp in [fp for fp, p in self.progress.items() if p.owner is None and not p.pending
                   and fp not in self.entries]:
            del self.progress[fp]

    def _maybe_log(self) -> None:
        now = time.monotonic()
        at, before = self._last_log
        if now - at >= PROGRESS_LOG_S:
            done = self.shipped + self.dead_lettered
            log.info("shipping", extra={"lines_shipped": self.shipped, "dead_lettered": self.dead_lettered,
                                        "lines_per_s": round((done - before) / (now - at)), "files": len(self.files),
                                        "lag_bytes": int(LAG._value.get()), "spooled": self.core.spooled})
            self._last_log = (now, done)


def _line_start_before(fd: int, size: int) -> int:
    """Where the line holding byte ``size`` starts (the end, when the file ends a line)."""
    if size == 0:
        return 0
    at = max(0, size - 65536)
    tail = os.pread(fd, size - at, at)
    newline = tail.rfind(b"\n")
    return at + newline + 1 if newline >= 0 else at

