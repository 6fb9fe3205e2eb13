"""Analytics over the events stored in ClickHouse: the questions (queries.py), the
time range a question covers and the rollup that answers it (window.py), who may ask
(scope.py), and the HTTP JSON/CSV API (app.py, server.py)."""
