"""Ports for the servers the tests and the bench start: picked before any is bound, so a
port the kernel hands out twice must not become two servers' port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bench import procs


class _Socket:
    """A socket whose port-0 binds hand out ``ports`` in turn (the kernel repeating one)."""

    ports: Iterator[int] = iter(())

    def __init__(self, *_: Any) -> None:
        self.port = 0

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self.port = address[1] or next(self.ports)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_ports_picked_together_are_distinct_and_clear_of_bus_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(procs.socket, "socket", _Socket)
    # the kernel hands 40000 out three times, and 30000 once (its bus port would be 40000)
    _Socket.ports = iter([40000, 40000, 30000, 40000, 40001, 40002])
    assert procs.node_ports(3) == [40000, 40001, 40002]
    _Socket.ports = iter([41000, 41000, 41001])
    first = procs.free_port()
    assert (first, procs.free_port([first])) == (41000, 41001)
