"""Real Redis, Cassandra, PostgreSQL and Prometheus servers as child processes, for tests, benchmarks and local runs."""

from fresco.servers._process import ServerError
from fresco.servers.cassandra import CassandraNode
from fresco.servers.postgres import PostgresServer
from fresco.servers.prometheus import PrometheusServer
from fresco.servers.redis import RedisClusterServers, RedisServer

__all__ = ["CassandraNode", "PostgresServer", "PrometheusServer", "RedisClusterServers", "RedisServer", "ServerError"]
