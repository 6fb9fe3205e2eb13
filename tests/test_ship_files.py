"""The shipper's files: fingerprints, the checkpoint file, and rotation (rename,
copytruncate, a restart in the middle of one, a new file colliding with a stale
checkpoint), the last ones shipping to the real Kafka: every line's event arrives, and
no other."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import shutil
import time
from pathlib import Path

import orjson
import pytest

from quotaflow.collector.producer import ProducerCore
from quotaflow.collector.ship.checkpoints import CheckpointFile, Entry
from quotaflow.collector.ship.events import LineIds
from quotaflow.collector.ship.files import fingerprint
from quotaflow.collector.ship.shipper import Shipper, ShipConfig
from quotaflow.core.errors import OperatorError
from quotaflow.schemas import deadletter
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from tests.pipeline import read_all, unique


def test_a_file_is_fingerprinted_by_its_first_whole_line(tmp_path):
    path = tmp_path / "a.log"
    path.write_bytes(b'{"first": 1')
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fingerprint(fd, 1024) is None  # no whole first line yet
        with open(path, "ab") as f:
            f.write(b'}\n{"second": 2}\n')
        first = fingerprint(fd, 1024)
        shutil.copyfile(path, tmp_path / "copy")
        with open(tmp_path / "copy", "ab") as f:
            f.write(b"more\n")
        copy = os.open(tmp_path / "copy", os.O_RDONLY)
        assert fingerprint(copy, 1024) == first  # a copy (copytruncate's) is the same file
        os.close(copy)
        assert fingerprint(fd, 8) is not None and fingerprint(fd, 8) != first  # a long first line: its first bytes
        path.write_bytes(b'{"other": 1}\n')
        assert fingerprint(fd, 1024) not in (None, first)
    finally:
        os.close(fd)


def test_checkpoint_file_round_trip_expiry_and_damage(tmp_path):
    cp = CheckpointFile(tmp_path / "ship" / "checkpoints.json", ttl_s=3600)
    assert cp.load() == {}
    now = int(time.time() * 1000)
    entries = {"a" * 32: Entry(10, "/x/access.log", 1, 2, now), "b" * 32: Entry(99, "/x/old.log", 1, 3, now - 7_200_000)}
    kept = cp.save(entries, now)
    assert set(kept) == {"a" * 32} and cp.load() == kept  # the entry not seen for two hours is gone
    assert sorted(p.name for p in cp.path.parent.iterdir()) == ["checkpoints.json"]  # no temporary left
    cp.path.write_bytes(b'{"version": 1, "files": {"x": {"offset": "ten"}}}')
    with pytest.raises(OperatorError, match="checkpoint file .* is damaged"):
        cp.load()


# --- rotation, shipping to Kafka ---------------------------------------------------------------

def line(org: str, i: int) -> bytes:
    return orjson.dumps({"time": f"{time.time():.3f}", "method": "GET", "path": f"/v1/items/{i}", "status": "200",
                         "response_bytes": "10", "latency": "0.001", "client_ip": "198.51.100.7",
                         "user_agent": "t", "org_id": org, "api_key_id": "k"}) + b"\n"


def append(path: Path, org: str, n: int, start: int = 0) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(line(org, start + i) for i in range(n)))


def expected_ids(*contents: bytes) -> set[str]:
    """The event id of every event line of these file contents: uuid5 of the content's
    fingerprint and the line's offset."""
    ids = set()
    for data in contents:
        first = data[:data.index(b"\n") + 1]
        line_id = LineIds(hashlib.sha256(first).hexdigest()[:32])
        offset = 0
        for ln in data.splitlines(keepends=True):
            if ln.startswith(b'{"time"'):  # not the malformed line a test adds
                ids.add(line_id(offset))
            offset += len(ln)
    return ids


def shipper(settings, state: Path, paths: list[Path]) -> Shipper:
    core = ProducerCore(settings.kafka_bootstrap, spool_dir=state / "spool",
                        spool_topics=(EVENTS_TOPIC, DEAD_LETTER_TOPIC))
    return Shipper(ShipConfig(paths=tuple(map(str, paths)), state_dir=state, poll_interval_s=0.05,
                              rotate_wait_s=0.5, checkpoint_interval_s=0.1, checkpoint_ttl_s=3600), core)


async def shipped_ids(settings, org: str) -> collections.Counter:
    ids = collections.Counter()
    for rec in await read_all(settings, EVENTS_TOPIC):
        if rec.key == org.encode():
            ids.update(e["event_id"] for e in orjson.loads(rec.value))
    return ids


async def until(cond, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.stack
def test_rename_and_copytruncate_while_running_ship_every_line(live_stack, tmp_path):
    org = unique("rot")
    log, rotated = tmp_path / "access.log", tmp_path / "access.log.1"

    async def scenario() -> tuple[bytes, ...]:
        s = shipper(live_stack, tmp_path / "state", [log, rotated])
        await s.core.start()
        task = asyncio.create_task(s.run())
        try:
            append(log, org, 100)
            await until(lambda: s.shipped >= 100, "the first lines")
            append(log, org, 50, 100)  # written just before the rename: likely unread when it happens
            os.rename(log, rotated)
            append(log, org, 30, 150)  # the new file (nginx -s reopen)
            await until(lambda: s.shipped >= 180, "the renamed file's rest and the new file")
            first = rotated.read_bytes()
            append(log, org, 20, 180)  # copytruncate, the lines after the last read
            shutil.copyfile(log, rotated)
            os.truncate(log, 0)
            append(log, org, 10, 200)
            await until(lambda: s.shipped >= 210, "the copy's rest and the truncated file's new lines")
            return first, rotated.read_bytes(), log.read_bytes()
        finally:
            s.stop()
            await task
            await s.core.stop()

    contents = asyncio.run(scenario())
    ids = asyncio.run(shipped_ids(live_stack, org))
    assert set(ids) == expected_ids(*contents) and len(set(ids)) == 210


@pytest.mark.stack
def test_restart_mid_rotation_and_a_new_file_on_a_stale_checkpoint_lose_nothing(live_stack, tmp_path):
    """Stopped, then the log rotated by rename (with lines it had not read) and a new file
    created whose inode a stale checkpoint entry names (vector#22954, vector#23076): the
    next run reads the renamed file on from its checkpoint and the new one from its start;
    the stale entry expires."""
    org = unique("restart")
    log, rotated, state = tmp_path / "access.log", tmp_path / "access.log.1", tmp_path / "state"

    async def run_once() -> Shipper:
        s = shipper(live_stack, state, [log, rotated])
        await s.core.start()
        try:
            await s.run(until_idle=True)
        finally:
            await s.core.stop()
        return s

    append(log, org, 50)
    key = "qf_live_" + "A" * 30 + "_AbC123"
    bad = f'{{"path": "/login?password=hunter2&api_key={key}", "org_id": "{org}", oops\n'.encode()
    with open(log, "ab") as f:
        f.write(bad)
    bad_at = log.stat().st_size - len(bad)
    first = asyncio.run(run_once())
    assert (first.shipped, first.dead_lettered) == (50, 1)
    append(log, org, 25, 50)
    os.rename(log, rotated)
    append(log, org, 40, 75)
    st = os.stat(log)
    cp = CheckpointFile(state / "checkpoints.json", ttl_s=3600)
    stale_ms = int(time.time() * 1000) - 7_200_000  # a deleted file on this inode, last seen two hours ago
    cp.save({**cp.load(), "f" * 32: Entry(1000, str(log), st.st_dev, st.st_ino, stale_ms)}, now_ms=stale_ms)

    second = asyncio.run(run_once())
    assert second.shipped == 65
    ids = asyncio.run(shipped_ids(live_stack, org))
    assert set(ids) == expected_ids(rotated.read_bytes(), log.read_bytes()) and len(set(ids)) == 115
    assert "f" * 32 not in cp.load() and len(cp.load()) == 2
    # the malformed line: dead-lettered once, with the reason, the file and the offset, no secret in it
    letters = [r for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC))
               if deadletter.read_headers(r.headers).get(deadletter.HEADER_SOURCE_FILE) in (str(log), str(rotated))]
    assert len(letters) == 1
    headers = deadletter.read_headers(letters[0].headers)
    assert headers[deadletter.HEADER_REASON].startswith("not JSON") and headers[deadletter.HEADER_STAGE] == "collector"
    assert int(headers[deadletter.HEADER_SOURCE_FILE_OFFSET]) == bad_at
    assert letters[0].value.startswith(b'{"path": "/login?***') and b"hunter2" not in letters[0].value
    assert key.encode() not in letters[0].value


@pytest.mark.stack
def test_lines_over_the_bound_are_dead_lettered_and_an_unfinished_line_waits(live_stack, tmp_path):
    """A line over QUOTAFLOW_SHIP_MAX_LINE_BYTES within one read, one longer than a read
    (its rest skipped), and a last line not ended yet (shipped once it is)."""
    org = unique("long")
    log, state = tmp_path / "access.log", tmp_path / "state"
    append(log, org, 1)
    long_at = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"x" * 1000 + b"\n")
    append(log, org, 1, 1)
    huge_at = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"y" * (2 * 1024 * 1024 + 10) + b"\n")
    append(log, org, 1, 2)
    unfinished = line(org, 3)
    with open(log, "ab") as f:
        f.write(unfinished[:40])

    async def run_once() -> Shipper:
        core = ProducerCore(live_stack.kafka_bootstrap, spool_dir=state / "spool",
                            spool_topics=(EVENTS_TOPIC, DEAD_LETTER_TOPIC))
        s = Shipper(ShipConfig(paths=(str(log),), state_dir=state, max_line_bytes=256), core)
        await core.start()
        try:
            await s.run(until_idle=True)
        finally:
            await core.stop()
        return s

    first = asyncio.run(run_once())
    assert (first.shipped, first.dead_lettered) == (3, 2)
    with open(log, "ab") as f:
        f.write(unfinished[40:])
    second = asyncio.run(run_once())
    assert (second.shipped, second.dead_lettered) == (1, 0)
    ids = asyncio.run(shipped_ids(live_stack, org))
    assert set(ids) == expected_ids(log.read_bytes()) and len(set(ids)) == 4
    letters = [deadletter.read_headers(r.headers) | {"value": r.value}
               for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC))
               if deadletter.read_headers(r.headers).get(deadletter.HEADER_SOURCE_FILE) == str(log)]
    assert [(int(h[deadletter.HEADER_SOURCE_FILE_OFFSET]), h[deadletter.HEADER_REASON].split(" (")[0], len(h["value"]))
            for h in letters] == [(long_at, "line longer than 256 bytes", 256), (huge_at, "line longer than 256 bytes", 256)]
