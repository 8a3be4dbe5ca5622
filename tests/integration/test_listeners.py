"""The report a test prints when a port stops answering: which process listens there and how many
connections wait in its accept queue."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.integration.listeners import describe_listeners, listeners_on

pytestmark = pytest.mark.integration

# A process that listens and never accepts, as a server whose event loop is stuck would.
SILENT = """import socket, time
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""


def test_a_listener_that_never_accepts_is_named_with_its_queue() -> None:
    with subprocess.Popen([sys.executable, "-c", SILENT], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                deadline = time.monotonic() + 10
                while (found := listeners_on(port)) and found[0].queued == 0:  # the handshake completes in the kernel
                    assert time.monotonic() < deadline, found
                    time.sleep(0.01)
                assert [(listener.pids, listener.queued) for listener in found] == [((child.pid,), 1)]
                report = describe_listeners(port)
            assert f"1 queued unaccepted; {child.pid} ({sys.executable} -c import socket, time" in report, report
            assert f"threads of {child.pid}:" in report, report
        finally:
            child.kill()
            child.wait()


def test_a_port_nobody_listens_on_has_no_listener() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: like the supervisor's port holder
        port = held.getsockname()[1]
        assert listeners_on(port) == []
        assert describe_listeners(port) == f"listeners on port {port}:"
