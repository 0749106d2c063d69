"""Free ports come from below the ephemeral range, distinct and bindable."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

from genmesh.launcher.ports import LOWEST_PORT, ephemeral_range, free_ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    span = ephemeral_range()
    ports = free_ports(12)
    assert len(set(ports)) == 12
    if span is not None and span[0] - LOWEST_PORT >= 1200:
        assert all(LOWEST_PORT <= p < span[0] for p in ports)
    with ExitStack() as stack:  # every one can be bound
        for port in ports:
            stack.enter_context(socket.socket()).bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_returned() -> None:
    low = LOWEST_PORT + 300  # a 300-port window, 290 of them held here
    with ExitStack() as stack:
        held = set()
        for port in range(LOWEST_PORT, low):
            if len(held) == 290:
                break
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use already: just as good
            held.add(port)
        for _ in range(5):
            ports = free_ports(3, ephemeral=(low, 60999))
            assert len(set(ports)) == 3 and not set(ports) & held


def test_the_ephemeral_range_is_read_from_the_kernel_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "range", tmp_path / "bad"
    good.write_text("32768\t60999\n")
    bad.write_text("nonsense\n")
    assert ephemeral_range(good) == (32768, 60999)
    assert ephemeral_range(bad) is None
    assert ephemeral_range(tmp_path / "missing") is None


def test_without_room_below_the_range_the_kernel_chooses() -> None:
    ports = free_ports(4, ephemeral=(LOWEST_PORT + 10, 60999))
    assert len(set(ports)) == 4
    assert all(p > 0 for p in ports)
