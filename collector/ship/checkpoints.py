"""The shipper's checkpoint file: how far each file's lines are safe (acknowledged by Kafka,
or in the producer core's fsync'd spool, which the next run replays), by the file's
content fingerprint.

Keyed by fingerprint, not by inode: a new file that got a deleted file's inode (Vector
keyed by device and inode, and a new file colliding with a stale entry lost its lines:
vectordotdev/vector#23076) has other contents, hence another key, and is read from its
start; a file renamed by rotation, or its copy made by copytruncate, keeps its key and
is read on from where its lines stopped being safe. The device, inode and path are
kept beside, for the operator and to choose between two files with one fingerprint.

Written whole, atomically: a temporary file, fsync, rename over the old one, fsync of
the directory, so a crash leaves the old file or the new one, never a mix (a zero-byte
registry after a power loss: elastic/beats#3537). Entries of files not seen for
``ttl_s`` are dropped when it is written, so it does not grow for ever
(vectordotdev/vector#19736); "seen" is judged when the shipper runs, so entries do
not expire merely because the shipper was stopped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from quotaflow.core.errors import OperatorError

log = logging.getLogger(__name__)

VERSION = 1


@dataclass
class Entry:
    offset: int  # every line before this byte is safe
    path: str
    dev: int
    ino: int
    seen_ms: int  # when the shipper last saw a file with this fingerprint


class CheckpointFile:
    def __init__(self, path: Path, ttl_s: float):
        self.path = Path(path)
        self.ttl_ms = int(ttl_s * 1000)

    def load(self) -> dict[str, Entry]:
        """The entries, {} when there is no file yet. A file that is not one (edited by
        hand, another program's) stops the start rather than being ignored: ignoring it
        would ship every file again from its start."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = orjson.loads(data)
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')!r}, not {VERSION}")
            entries = {}
            for fingerprint, e in doc["files"].items():
                entry = Entry(int(e["offset"]), str(e["path"]), int(e["dev"]), int(e["ino"]), int(e["seen_ms"]))
                if not isinstance(fingerprint, str) or entry.offset < 0:
                    raise ValueError("a negative offset")
                entries[fingerprint] = entry
            return entries
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise OperatorError(f"the shipper's checkpoint file {self.path} is damaged ({str(exc)[:200]}); move it "
                                "away to read every file from its start (QUOTAFLOW_SHIP_START_AT=end: from their "
                                "ends)") from None

    def save(self, entries: dict[str, Entry], now_ms: int) -> dict[str, Entry]:
        """Write the entries seen within the TTL; returns them (the expired left out)."""
        kept = {fp: e for fp, e in entries.items() if now_ms - e.seen_ms <= self.ttl_ms}
        if len(kept) < len(entries):
            log.info("checkpoints of files not seen for a while dropped",
                     extra={"dropped": len(entries) - len(kept), "ttl_s": self.ttl_ms / 1000})
        data = orjson.dumps({"version": VERSION, "files": {fp: asdict(e) for fp, e in kept.items()}})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return kept
