"""Who listens on a TCP port, and how many connections wait there unaccepted: what a test that timed
out talking to a port shows, so that a rare hang names the process holding the connection (and where
its threads are) instead of only "timed out"."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


@dataclass(frozen=True)
class Listener:
    """One listening socket: its owner (0 when no process of ours can be seen holding it) and its accept queue."""

    address: str  # as /proc/net/tcp writes it, e.g. 0100007F:B5D1
    inode: int
    queued: int  # connections the kernel has completed that the owner has not accepted yet
    pids: tuple[int, ...]


def listeners_on(port: int) -> list[Listener]:
    """Every socket listening on `port` (IPv4 and IPv6) in this network namespace."""
    found: list[tuple[str, int, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, queues, inode = fields[1], fields[3], fields[4], int(fields[9])
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                found.append((local, inode, int(queues.split(":")[1], 16)))
    owners = _socket_owners({inode for _, inode, _ in found})
    return [Listener(local, inode, queued, tuple(sorted(owners.get(inode, ())))) for local, inode, queued in found]


def _socket_owners(inodes: set[int]) -> dict[int, set[int]]:
    """The pids holding each socket inode (those whose file descriptors we may read)."""
    owners: dict[int, set[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue  # gone, or not ours to read
        for link in links:
            if link.startswith("socket:[") and (inode := int(link[8:-1])) in inodes:
                owners.setdefault(inode, set()).add(int(proc.name))
    return owners


def describe_listeners(port: int, stacks: bool = True) -> str:
    """A report of `port`'s listeners: owner, command line and accept queue of each, and (with
    `stacks`) each owner's Python threads as py-spy dumps them."""
    lines = [f"listeners on port {port}:"]
    pids: set[int] = set()
    for listener in listeners_on(port):
        pids.update(listener.pids)
        owners = ", ".join(f"{pid} ({_command(pid)})" for pid in listener.pids) or "no visible process"
        lines.append(f"  {listener.address} inode {listener.inode}: {listener.queued} queued unaccepted; {owners}")
    if stacks:
        for pid in sorted(pids):
            lines.append(f"threads of {pid}:\n{_stack(pid)}")
    return "\n".join(lines)


def _command(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
        return " ".join(words)[:160]
    except OSError:
        return "?"


def _stack(pid: int) -> str:
    spy = Path(sys.executable).parent / "py-spy"
    try:
        done = subprocess.run(
            [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"  (py-spy dump failed: {err})"
    return (done.stdout + done.stderr).strip()
