"""Analytics over the events stored in ClickHouse: the questions (queries.py), the
time windows and the rollup that answers them (window.py), who may ask (scope.py),
and the HTTP JSON/CSV API (app.py, server.py)."""
