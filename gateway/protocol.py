"""The HTTP/1.1 protocol the check endpoint is served with: uvicorn's h11 protocol, with
the request head bounded and a refusal the client can read.

Two things uvicorn's own does not do (0.54, h11 0.16):

- h11 bounds a request head only while it is incomplete, so a head that arrives in
  one read is taken whole, however large (100 kB passed); here every head larger
  than MAX_HEAD_BYTES is refused, complete or not.
- A refused request was answered 400 and the socket closed at once, with the rest
  of the client's request unread: the kernel then resets the connection, and the
  client sees a TCP reset instead of the answer (a 1 MB header did). Here the answer
  is the status h11 hints (431 for a head too large), the write side is shut, and
  what the client still sends is read and dropped until it closes, for at most
  LINGER_S (nginx's lingering close does the same).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line and headers; nginx reads 8 kB per header line by default
LINGER_S = 5.0
_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}
_BODIES = {
    400: b"invalid HTTP request\n",
    431: f"request head too large: request line and headers may hold at most {MAX_HEAD_BYTES} bytes\n".encode(),
}


def _head_bytes(request: h11.Request) -> int:
    return len(request.method) + len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers) + 12


class _BoundedConnection(h11.Connection):
    """h11's connection, refusing complete request heads over the bound as well, and
    remembering the status hint of the error it raised."""

    def __init__(self, max_head: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.error_status = 400

    def next_event(self):  # type: ignore[override]
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status = exc.error_status_hint
            raise
        if isinstance(event, h11.Request) and _head_bytes(event) > self.max_head:
            self.error_status = 431
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


class BoundedH11Protocol(H11Protocol):
    max_head = MAX_HEAD_BYTES

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _BoundedConnection(self.max_head)
        self._lingering: asyncio.TimerHandle | None = None

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn for any request h11 refused: answer with the hinted status
        and close gracefully (see the module's docstring)."""
        status = self.conn.error_status if self.conn.error_status in _BODIES else 400
        log.info("request refused before the application", extra={"status": status})
        body = _BODIES[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after what is buffered: the client reads the answer, then EOF
        self._lingering = self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._lingering is None:
            super().data_received(data)
        # else: the rest of a refused request, read only so the client can read the answer

    def eof_received(self) -> bool | None:
        if self._lingering is not None:
            self.transport.close()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)
