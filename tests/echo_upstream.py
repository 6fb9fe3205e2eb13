"""The API behind nginx in tests/test_nginx.py: /index.html is a page, any other path answers
the request headers it received as JSON (what nginx forwarded: the identity it verified, and
none of the client's own identity headers). Logs each request line to stderr, as http.server."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.endswith("/index.html"):
            body, kind = b"hello from the api\n", "text/html"
        else:
            body, kind = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(), "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
