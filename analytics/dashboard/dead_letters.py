"""The dead letters of a timeframe, read back from the dead-letter topic for the dashboard
(operators only: a record there may be any tenant's).

    GET /v1/dead_letters?timeframe=1h|24h|7d|30d     JSON: the newest first, counts by stage and field
    GET /v1/dead_letters.csv?timeframe=...           the same rows as CSV

What a dead letter is shown as: its time (the broker's), the stage that refused it, the
reason (the headers of schemas/deadletter.py, cut to REASON_CHARS), where it came from.
Never its value: the refused record as published, which is what an operator replays, not
what a page shows. At most SCAN_PER_PARTITION records a partition are read back (the
newest); the answer says when that left some of the timeframe out (``complete``).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from quotaflow.analytics.scope import Scope
from quotaflow.analytics.timing import server_timing
from quotaflow.analytics.window import TIMEFRAMES
from quotaflow.schemas import deadletter
from quotaflow.schemas.ids import show
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC

log = logging.getLogger(__name__)

SCAN_PER_PARTITION = 2000
READ_TIMEOUT_S = 5.0
FETCH_MAX_WAIT_MS = 50  # a fetch left in flight after a read delays the next read's offset requests this long at most
REASON_CHARS = 300
COLUMNS = ("at", "stage", "field", "reason", "source_topic", "source_partition", "source_offset", "source_index",
           "source_file", "source_file_offset")


@dataclass
class Recent:
    rows: list[dict[str, Any]] = field(default_factory=list)  # newest first
    complete: bool = True


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _field(reason: str) -> str:
    """What a reason is about: the field it names first ("status: must be ..." -> status)."""
    head = reason.split(":", 1)[0].strip()
    return head if 0 < len(head) <= 40 and " " not in head else "(other)"


def _row(ts_ms: int, headers: list | tuple | None) -> dict[str, Any]:
    h = deadletter.read_headers(headers)
    reason = h.get(deadletter.HEADER_REASON, "")
    return {"at": _iso(ts_ms), "stage": h.get(deadletter.HEADER_STAGE, ""), "field": _field(reason),
            "reason": reason[:REASON_CHARS], "source_topic": h.get(deadletter.HEADER_SOURCE_TOPIC, ""),
            "source_partition": h.get(deadletter.HEADER_SOURCE_PARTITION, ""),
            "source_offset": h.get(deadletter.HEADER_SOURCE_OFFSET, ""),
            "source_index": h.get(deadletter.HEADER_SOURCE_INDEX, ""),
            "source_file": h.get(deadletter.HEADER_SOURCE_FILE, ""),
            "source_file_offset": h.get(deadletter.HEADER_SOURCE_FILE_OFFSET, "")}


class DeadLetters:
    """Reads the dead-letter topic back; one read at a time, on one consumer of no group
    (it commits nothing and moves nobody's offsets), connected on first use."""

    def __init__(self, bootstrap: str):
        self._bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None  # the topic's partitions (a consumer's metadata may lack them)
        self._lock = asyncio.Lock()

    async def _open(self) -> tuple[AIOKafkaConsumer, AIOKafkaAdminClient]:
        if self._consumer is None or self._admin is None:
            await self.close()
            timeout_ms = int(READ_TIMEOUT_S * 1000)
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, request_timeout_ms=timeout_ms)
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None,
                                              enable_auto_commit=False, request_timeout_ms=timeout_ms,
                                              fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
            await self._admin.start()
            await self._consumer.start()
        return self._consumer, self._admin

    async def read(self, since_ms: int) -> Recent:
        async with self._lock:
            try:
                return await asyncio.wait_for(self._read(since_ms), READ_TIMEOUT_S * 2)
            except BaseException:
                await self.close()  # a consumer left mid-read is not reused
                raise

    async def _read(self, since_ms: int) -> Recent:
        consumer, admin = await self._open()
        (topic,) = await admin.describe_topics([DEAD_LETTER_TOPIC])
        tps = [TopicPartition(DEAD_LETTER_TOPIC, p["partition"]) for p in topic.get("partitions", ())]
        out = Recent()
        if not tps:
            return out
        # Paused but while a read needs them: an assigned partition is fetched in the background,
        # a fetch waits at the broker for records (fetch_max_wait_ms), and the offset requests
        # of the next read, on the same connection, would wait behind it.
        consumer.assign(tps)
        consumer.pause(*tps)
        ends = await consumer.end_offsets(tps)
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        pending = {}
        for tp in tps:
            start = found[tp].offset if found.get(tp) is not None else ends[tp]
            if ends[tp] - start > SCAN_PER_PARTITION:
                start, out.complete = ends[tp] - SCAN_PER_PARTITION, False
            if start < ends[tp]:
                consumer.seek(tp, start)
                consumer.resume(tp)
                pending[tp] = ends[tp]
        deadline = time.monotonic() + READ_TIMEOUT_S
        while pending:
            if time.monotonic() > deadline:
                out.complete = False
                break
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < pending.get(tp, -1) and r.timestamp >= since_ms:
                        out.rows.append(_row(r.timestamp, r.headers))
            for tp in list(pending):
                if await consumer.position(tp) >= pending[tp]:
                    consumer.pause(tp)
                    del pending[tp]
        consumer.pause(*tps)
        out.rows.sort(key=lambda r: r["at"], reverse=True)
        return out

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        admin, self._admin = self._admin, None
        for stop in (consumer.stop if consumer else None, admin.close if admin else None):
            if stop is not None:
                try:
                    await stop()
                except Exception:  # a client that never connected: nothing to release
                    pass


def routes(authorize: Callable[[Request], Scope | str], reader: DeadLetters | None,
           clock: Callable[[], float] = time.time) -> list[BaseRoute]:
    def error(status: int, message: str) -> JSONResponse:
        headers = {"www-authenticate": 'Bearer realm="quotaflow"'} if status == 401 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def recent(request: Request) -> tuple[Recent, int, int] | Response:
        scope = authorize(request)
        if isinstance(scope, str):
            return error(401, scope)
        if scope.org_id is not None:
            return error(403, "dead letters are for operator tokens: a record there may be any org's")
        params = dict(request.query_params.multi_items())
        unknown = set(params) - {"timeframe"}
        if unknown:
            return error(400, f"unknown parameter {show(sorted(unknown)[0])}; known: timeframe")
        timeframe = params.get("timeframe", "24h")
        if timeframe not in TIMEFRAMES:
            return error(400, f"timeframe: must be one of {', '.join(TIMEFRAMES)}, got {show(timeframe)}")
        if reader is None:
            return error(503, "dead letters are not available in this process (no Kafka configured)")
        now_ms = int(clock() * 1000)
        try:
            started = time.perf_counter()
            found = await reader.read(now_ms - TIMEFRAMES[timeframe])
            request.state.timing = server_timing(kafka=time.perf_counter() - started)
            return found, now_ms - TIMEFRAMES[timeframe], now_ms
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            log.warning("dead letters not read", extra={"error": repr(exc)[:300]})
            return error(503, "Kafka did not answer; dead letters are not available right now")

    async def as_json(request: Request) -> Response:
        got = await recent(request)
        if isinstance(got, Response):
            return got
        r, start, end = got
        by = Counter((row["stage"], row["field"]) for row in r.rows)
        return JSONResponse({"question": "dead_letters", "source": DEAD_LETTER_TOPIC, "from": _iso(start),
                             "to": _iso(end), "complete": r.complete, "total": len(r.rows),
                             "by_reason": [{"stage": s, "field": f, "count": n} for (s, f), n in by.most_common()],
                             "columns": list(COLUMNS), "rows": r.rows[:1000]},
                            headers={"server-timing": request.state.timing})

    async def as_csv(request: Request) -> Response:
        got = await recent(request)
        if isinstance(got, Response):
            return got
        r, _, _ = got
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(COLUMNS)
        for row in r.rows:
            out.writerow([row[c] for c in COLUMNS])
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="quotaflow-dead_letters.csv"',
                                 "x-quotaflow-complete": "true" if r.complete else "false"})

    return [Route("/v1/dead_letters.csv", as_csv), Route("/v1/dead_letters", as_json)]
