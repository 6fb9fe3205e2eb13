"""Real receivers for alert delivery tests: an HTTP server that records what it is sent and
answers as scripted (webhooks, Slack), and an aiosmtpd SMTP server that keeps the
messages it accepts. Both listen on 127.0.0.1 on a port the OS picks."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import threading
import time
import warnings
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float = field(default_factory=time.time)


Answer = tuple[int, bytes, float]  # status, body, seconds to wait before answering


class HttpReceiver:
    """Answers each request with the next scripted answer (the last one once they run out),
    or with ``judge(request)`` when given (a check of the request's shape)."""

    def __init__(self, answers: list[Answer] | None = None, judge: Callable[[Request], Answer] | None = None):
        self.answers = list(answers or [(200, b"ok", 0)])
        self.judge = judge
        self.requests: list[Request] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                length = int(self.headers.get("content-length", 0))
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
                receiver.requests.append(request)
                if receiver.judge is not None:
                    status, body, delay = receiver.judge(request)
                else:
                    status, body, delay = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                time.sleep(delay)  # a slow receiver, as scripted
                with contextlib.suppress(OSError):  # the client may have given up already
                    self.send_response(status)
                    self.send_header("content-type", "text/plain")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "HttpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Keep:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


class SmtpReceiver:
    """aiosmtpd in the test's event loop; with ``credentials``, it requires AUTH (over plain
    TCP, as a local test allows) and refuses others with 535."""

    def __init__(self, credentials: tuple[str, str] | None = None):
        self.handler = _Keep()
        self.credentials = credentials
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def messages(self) -> list[tuple[str, list[str], EmailMessage]]:
        return self.handler.messages

    def _authenticate(self, server, session, envelope, mechanism, data) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == self.credentials
        return AuthResult(success=ok, handled=False)

    async def __aenter__(self) -> "SmtpReceiver":
        loop = asyncio.get_running_loop()
        kwargs = {}
        if self.credentials:
            kwargs = dict(auth_required=True, auth_require_tls=False, authenticator=self._authenticate)
        def protocol() -> SMTP:
            with warnings.catch_warnings():  # AUTH without TLS: what a local test server may do
                warnings.simplefilter("ignore", UserWarning)
                return SMTP(self.handler, hostname="receiver.test", **kwargs)

        self.server = await loop.create_server(protocol, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()
