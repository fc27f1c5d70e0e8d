"""The durable queue: the SQLite store (the only module that knows SQL)."""
