"""Free loopback ports, for meshes started beside others (tests, benchmarks).

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, the same
range it draws the source ports of outgoing connections from: between the moment a
port is found free and the moment a server binds it (seconds, for a mesh that starts
Redis and the services before Envoy), any connection on the machine may take it, and
the server fails with "address already in use". So ports are drawn at random from
below that range, where no outgoing connection lands, and checked by binding them.
"""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10_000  # below: well-known and registered services' usual ports
MAX_TRIES_PER_PORT = 50


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's range for outgoing connections' ports; None where it is not known."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_ports(n: int, host: str = "127.0.0.1", *,
               ephemeral: tuple[int, int] | None = None) -> list[int]:
    """``n`` distinct ports free right now (held open together, so never the same),
    outside the ephemeral range when there is room below it; else the kernel's choice.
    ``ephemeral``: the range to avoid (default: the kernel's)."""
    span = ephemeral or ephemeral_range()
    if span is None or span[0] - LOWEST_PORT < 100 * n:
        return _kernel_ports(n, host)
    rng = random.SystemRandom()
    with ExitStack() as stack:
        ports: list[int] = []
        for _ in range(n * MAX_TRIES_PER_PORT):
            if len(ports) == n:
                break
            port = rng.randrange(LOWEST_PORT, span[0])
            if port in ports:
                continue
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((host, port))
            except OSError:  # in use
                continue
            ports.append(port)
        if len(ports) < n:  # a crowded range: let the kernel choose the rest
            ports += [p for p in _kernel_ports(n, host) if p not in ports][:n - len(ports)]
        return ports


def _kernel_ports(n: int, host: str) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
