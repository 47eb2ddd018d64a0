"""`gradwatch demo`'s port probe: a port whose last connection is in TIME_WAIT is free (uvicorn
binds with SO_REUSEADDR and would get it), a port with a listener is busy."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from gradwatch.server.commands.demo import DemoError, ensure_port_free


def _port_in_time_wait() -> int:
    """A port whose server side closed a connection first: that socket sits in TIME_WAIT. The
    listener sets SO_REUSEADDR as uvicorn's does (Linux lets a new socket share a TIME_WAIT port
    only when both set it)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server closes first: its end goes to TIME_WAIT
        assert client.recv(1) == b""
        client.close()
    _wait_for_time_wait(port)
    return port


def _tcp_states(port: int) -> set[str]:
    """States (hex, as /proc/net/tcp spells them) of the IPv4 sockets with local port `port`."""
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            states.add(fields[3])
    return states


def _wait_for_time_wait(port: int, timeout: float = 10.0) -> None:
    """Until the kernel has moved the closed connection to TIME_WAIT (06) and nothing else is on
    the port (the closing handshake takes a moment; this waits for the state, not for a time)."""
    deadline = time.monotonic() + timeout
    while _tcp_states(port) != {"06"}:
        assert time.monotonic() < deadline, f"port {port}: states {_tcp_states(port)}"
        time.sleep(0.01)


def test_a_port_in_time_wait_counts_as_free():
    port = _port_in_time_wait()
    with socket.socket() as plain:  # the reference: a bind without SO_REUSEADDR is refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    ensure_port_free(port)  # no DemoError


def test_a_port_with_a_listener_is_busy():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with pytest.raises(DemoError, match="already in use"):
            ensure_port_free(listener.getsockname()[1])
