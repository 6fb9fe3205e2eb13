"""A WSGI app behind quotaflow's WSGI middleware, as a service runs it (a SyncRateLimiter, a
BackgroundEmitter spooling to disk), and a real WSGI server for it (werkzeug's, threaded):
for the tests of the WSGI collector (Flask, Django, a broker outage)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from quotaflow.collector.background import BackgroundEmitter
from quotaflow.collector.emitter import Emitter
from quotaflow.gateway.limiter import SyncRateLimiter
from quotaflow.gateway.wsgi import ENVIRON_KEY, RateLimitMiddleware


def flask_shop() -> Flask:
    """One route, /items/<int:item_id>, answering with the identity the middleware verified."""
    app = Flask("shop")

    @app.get("/items/<int:item_id>")
    def item(item_id: int):
        who = request.environ[ENVIRON_KEY]
        return jsonify(id=item_id, org=who.org_id, key=who.api_key_id)

    return app


def behind_middleware(wsgi_app: Callable, settings: Any, route: Callable, spool_dir: Path,
                      **emitter_options: Any) -> tuple[RateLimitMiddleware, BackgroundEmitter]:
    """``wsgi_app`` behind the middleware (service "shop"), and its started emitter (close it)."""
    emitter = BackgroundEmitter(Emitter.from_settings(settings, spool_dir=spool_dir, **emitter_options)).start()
    return RateLimitMiddleware.from_settings(wsgi_app, SyncRateLimiter.from_settings(settings), emitter, settings,
                                             service="shop", route=route), emitter


@contextmanager
def served(app: Callable, port: int) -> Iterator[str]:
    """``app`` served on 127.0.0.1:``port`` while the block runs; yields its base URL."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
