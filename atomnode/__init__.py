"""atomnode: a Gearman-compatible job server with a durable queue and a worker supervisor."""

__version__ = "0.1.0"
