"""A request's path as an endpoint the event schema takes: the one normalisation every
stage that turns paths into events uses (the gateway's middleware, the log shipper), so
the same path is the same endpoint whoever published it."""

from __future__ import annotations

import re
from urllib.parse import quote

from quotaflow.schemas.event_fields import ENDPOINT_MAX, RAW_ID_SEGMENT

TRUNCATED = "/{truncated}"  # ends an endpoint cut to ENDPOINT_MAX at a segment boundary

# A path segment replaced by {id}: every segment the event schema refuses as a raw id, and
# also runs of 16 or more hex digits and dashes in other id formats, which the schema
# accepts but which would still make an endpoint per id.
_RAW_ID = re.compile(rf"(?:{RAW_ID_SEGMENT}|[0-9a-fA-F-]{{16,}})")
# What a segment may hold besides letters, digits and -._~ (which quote keeps anyway):
# ENDPOINT_PATTERN's characters but '/' (the separator) and '%' (quoted, so that a
# decoded path's '%' cannot pass for an escape).
_SEGMENT_SAFE = "!$&'()*+,;=:@{}"
# The common case, a path of such characters only, short enough: each raw-id segment
# replaced in one pass, the rest as it is (what quote would leave unchanged).
_PLAIN = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@{}/-]*")
_RAW_ID_SEGMENTS = re.compile(rf"(?<=/)(?:{RAW_ID_SEGMENT}|[0-9a-fA-F-]{{16,}})(?=/|$)")


def fit_endpoint(path: str) -> str:
    """A path or template as an endpoint the schema takes: raw-id segments become {id},
    other characters outside ENDPOINT_PATTERN are percent-encoded (UTF-8), and one longer
    than ENDPOINT_MAX is cut at a segment boundary and marked with /{truncated}."""
    if len(path) <= ENDPOINT_MAX and _PLAIN.fullmatch(path):
        return _RAW_ID_SEGMENTS.sub("{id}", path)
    segments = path.split("/")
    if path.startswith("/"):
        segments = segments[1:]
    out = "/" + "/".join("{id}" if _RAW_ID.fullmatch(s) else quote(s, safe=_SEGMENT_SAFE, errors="replace")
                         for s in segments)
    if len(out) > ENDPOINT_MAX:
        out = out[:out.rfind("/", 0, ENDPOINT_MAX - len(TRUNCATED) + 1)] + TRUNCATED
    return out
