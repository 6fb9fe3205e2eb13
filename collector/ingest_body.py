"""What the HTTP ingest reads of a request body, all of it hostile: its media type and
encoding, its bytes bounded while they arrive (also after gzip decompression, so a zip
bomb stops at the same bound), and its events, a JSON array or NDJSON lines.

Problems of the whole body are a ``BodyError`` (its status: 400, 413 or 415, and a
reason naming what is wrong, never the body's content). Problems of one item (a line
that is not JSON or too long) are that item's, so that the other events of the body
are taken; the app judges each event against the schema.
"""

from __future__ import annotations

import zlib
from typing import Any, AsyncIterator, NamedTuple

import orjson

JSON = "application/json"
NDJSON = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")
ENCODINGS = ("identity", "gzip", "x-gzip")


class BodyError(Exception):
    def __init__(self, status: int, code: str, reason: str):
        self.status, self.code, self.reason = status, code, reason
        super().__init__(reason)


class Item(NamedTuple):
    """One item of the body: its document, or why it has none; ``line`` for NDJSON (from 1)."""

    doc: Any
    error: str | None
    line: int | None


def media(content_type: str | None, content_encoding: str | None) -> tuple[bool, bool]:
    """(NDJSON?, gzip?) for the request's headers; BodyError 415 naming the header."""
    kind, _, params = (content_type or "").partition(";")
    kind = kind.strip().lower()
    if kind not in (JSON, *NDJSON):
        shown = kind[:60] if kind.isascii() and kind.isprintable() else "a non-ASCII value"
        raise BodyError(415, "unsupported_media_type",
                        f"Content-Type must be {JSON} (a JSON array of events) or {NDJSON[0]} (one event per line); "
                        f"got {shown or 'none'}")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise BodyError(415, "unsupported_media_type", "events are UTF-8 JSON: charset must be utf-8")
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise BodyError(415, "unsupported_content_encoding",
                        "Content-Encoding must be gzip or identity (none)")
    return kind in NDJSON, encoding in ("gzip", "x-gzip")


def declared_length(content_length: str | None, limit: int) -> None:
    """Refuse a body whose Content-Length already says it is too large, before reading it."""
    if content_length is None:
        return
    value = content_length.strip()
    if not (value.isascii() and value.isdigit()):
        raise BodyError(400, "bad_content_length", "Content-Length must be a number of bytes")
    if len(value) > 18 or int(value) > limit:
        raise BodyError(413, "body_too_large", f"the body may be {limit} bytes at most "
                                               "(QUOTAFLOW_INGEST_MAX_BODY_BYTES); send fewer events per request")


async def read(chunks: AsyncIterator[bytes], *, limit: int, gzip: bool) -> bytes:
    """The body, decompressed if ``gzip``, read chunk by chunk and given up on (413) as
    soon as what arrived, or what it decompresses to, passes ``limit`` bytes."""
    received = 0
    out = bytearray()
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
    started = False
    async for chunk in chunks:
        if not chunk:
            continue
        received += len(chunk)
        if received > limit:
            raise BodyError(413, "body_too_large", f"the body may be {limit} bytes at most "
                                                   "(QUOTAFLOW_INGEST_MAX_BODY_BYTES); send fewer events per request")
        if inflater is None:
            out += chunk
            continue
        started = True
        data = chunk
        while data:
            try:
                out += inflater.decompress(data, limit - len(out) + 1)
            except zlib.error as exc:
                raise BodyError(400, "bad_gzip", f"the body is not valid gzip ({exc})") from None
            if len(out) > limit:
                raise BodyError(413, "body_too_large", f"the body decompresses to more than {limit} bytes "
                                                       "(QUOTAFLOW_INGEST_MAX_BODY_BYTES)")
            if inflater.eof:  # a gzip member ended: another may follow (concatenated members are one stream)
                data = inflater.unused_data
                if data:
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                data = inflater.unconsumed_tail
    if inflater is not None and started and not inflater.eof:
        raise BodyError(400, "bad_gzip", "the gzip stream ends before its end (truncated)")
    if not out:
        raise BodyError(400, "empty_body", "the body holds no events")
    return bytes(out)


def items(body: bytes, *, ndjson: bool, max_events: int, max_line: int) -> list[Item]:
    """The body's items in order. A JSON body must be an array; NDJSON is one event per
    line (blank lines skipped), each line judged alone."""
    if not ndjson:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BodyError(400, "bad_json", f"the body is not valid UTF-8 JSON ({str(exc)[:200]})") from None
        if type(doc) is not list:
            raise BodyError(400, "bad_json", f"the body must be a JSON array of events, got a JSON "
                                             f"{_json_type(doc)} (or send NDJSON: {NDJSON[0]})")
        if not doc:
            raise BodyError(400, "empty_body", "the array holds no events")
        if len(doc) > max_events:
            raise BodyError(413, "too_many_events", f"at most {max_events} events per request "
                                                    f"(QUOTAFLOW_INGEST_MAX_EVENTS), got {len(doc)}")
        return [Item(d, None, None) for d in doc]
    out = []
    for number, raw in enumerate(body.split(b"\n"), 1):
        line = raw.strip(b" \t\r")
        if not line:
            continue
        if len(out) >= max_events:
            raise BodyError(413, "too_many_events", f"at most {max_events} events per request "
                                                    "(QUOTAFLOW_INGEST_MAX_EVENTS)")
        if len(line) > max_line:
            out.append(Item(None, f"line of {len(line)} bytes, longer than the {max_line} an event may be "
                                  "(QUOTAFLOW_INGEST_MAX_LINE_BYTES); not parsed", number))
            continue
        try:
            out.append(Item(orjson.loads(line), None, number))
        except orjson.JSONDecodeError as exc:
            out.append(Item(None, f"not valid UTF-8 JSON ({str(exc)[:200]})", number))
    if not out:
        raise BodyError(400, "empty_body", "the body holds no events (only blank lines)")
    return out


def _json_type(doc: Any) -> str:
    return {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(doc), "null")
