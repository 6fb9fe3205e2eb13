"""Which files are which: content fingerprints, the files open, and how far each file's
lines are read and safe.

A file is known by its fingerprint: a hash of its first line (up to ``fingerprint_bytes``),
as Vector's file source does; a file is not read until it has a whole first line (or
that many bytes). Its ``Progress`` (read to where, safe up to where, what is in flight)
belongs to the fingerprint, not to the open file (``Tracked``: a path, an inode, a
descriptor), so that

- a file renamed by rotation keeps its descriptor and its progress: it is read to its
  end while the new file at its old name is read from its start;
- a copy made by copytruncate has the same first line, hence the same progress: once the
  original is truncated (it shrank, or its first line changed) the copy takes over and is
  read on from where the original was;
- a new file on a deleted file's inode has another first line: read from its start.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field

from quotaflow.collector.ship.events import LineIds

GZIP_MAGIC = b"\x1f\x8b"


def fingerprint(fd: int, max_bytes: int) -> str | None:
    """The fingerprint of an open file's first line (at most ``max_bytes``), None while
    it has neither a whole first line nor that many bytes."""
    head = os.pread(fd, max_bytes, 0)
    newline = head.find(b"\n")
    if newline >= 0:
        head = head[:newline + 1]
    elif len(head) < max_bytes:
        return None
    return hashlib.sha256(head).hexdigest()[:32]


def compressed(fd: int) -> bool:
    """A gzip file (a rotated log compressed): never read as lines."""
    return os.pread(fd, 2, 0) == GZIP_MAGIC


@dataclass(eq=False)
class Chunk:
    """Lines read at once from one file, safe once every record carrying their events or
    dead letters was acknowledged (or spooled)."""

    end: int  # the line boundary after them
    bytes: int = 0
    events: int = 0
    dead: int = 0
    open_batches: int = 0  # org batches holding events of these lines, not yet submitted
    futures: list = field(default_factory=list)


@dataclass(eq=False)
class Progress:
    fingerprint: str
    read_at: int  # the next line to read starts here
    committed: int  # every line before this is safe
    ids: LineIds
    path: str = ""
    dev: int = 0
    ino: int = 0
    skipping: bool = False  # inside a line over the length bound: its rest is skipped
    safe_end: int = 0  # the last line boundary read (read_at, unless skipping)
    owner: "Tracked | None" = None
    pending: collections.deque = field(default_factory=collections.deque)
    seen_ms: int = 0
    dirty: bool = False  # committed moved since the last checkpoint written


@dataclass(eq=False)
class Tracked:
    path: str
    fd: int
    dev: int
    ino: int
    size: int = 0
    progress: Progress | None = None
    gone_since: float | None = None  # left the configured paths (rotated away, deleted) at this time
    last_growth: float = 0.0
    at_end: bool = False  # nothing more to read the last time
    waiting_for: str | None = None  # the fingerprint another open file already reads (a copy beside it)

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
