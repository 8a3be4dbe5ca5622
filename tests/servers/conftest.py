"""The servers' own fixtures. `pytest_plugins` only works in the rootdir's conftest, so they are imported here."""

from fresco.servers.pytest_plugin import cassandra_server, redis_server

__all__ = ["cassandra_server", "redis_server"]
