"""`scripts/cassandra-node`: `fetch` the Cassandra jars, or `start --dir D` a node in the foreground for people."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from fresco.servers._process import ServerError
from fresco.servers.cassandra import CassandraNode, cassandra_version, fetch_jars


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`fetch` the jars, or `start --dir D` a node in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="cassandra-node", description="A real single-node Cassandra for local runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="fetch the cassandra-all jars into the cache (Maven)")
    start = commands.add_parser("start", help="run one node in the foreground; its data stays in --dir")
    start.add_argument("--dir", type=Path, default=Path(".cassandra"), help="node dir (default: ./.cassandra)")
    start.add_argument("--timeout", type=float, default=CassandraNode.start_timeout_s)
    args = parser.parse_args(argv)
    # A terminal closing or `kill` should stop the node cleanly too, not only Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        if args.command == "fetch":
            began = time.monotonic()
            print(f"cassandra-all {cassandra_version()} jars in {fetch_jars()} ({time.monotonic() - began:.1f}s)")
            return 0
        node = CassandraNode(base_dir=args.dir)
        began = time.monotonic()
        node.start(args.timeout)
    except ServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"Cassandra {node.release_version} ready in {time.monotonic() - began:.1f}s: CQL on 127.0.0.1:{node.port}")
    print(f"  storage port {node.storage_port}, JMX port {node.jmx_port}, logs in {node.base_dir / 'logs'}")
    print("Ctrl-C stops it.", flush=True)
    try:
        while node.running:
            time.sleep(1.0)
        print(f"Cassandra exited; see {node.system_log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        node.stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
