"""The ClickHouse contract: the tables (DDL in NNNN_*.sql, names in tables.py), how they
are created (migrate.py) and kept (retention.py), and how a stage reaches them
(client.py). The sink writes them; the query API reads them."""
