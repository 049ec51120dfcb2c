"""Kernels shut down while clients connect: every connection the host accepted is closed.

nbclient's suite once failed on `ResourceWarning: unclosed transport`, raised in the
test process: on Python 3.11 a listening `asyncio.Server` closed while connections it
had just accepted were still being set up leaves them unclosed (an assertion in
`Server._attach`). Here clients connect to all five ports in a loop while the kernel
shuts down: connections made once the shutdown began must all be closed by the host,
the ports must refuse connections after it, and the test process must warn of nothing.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import warnings

import pytest
from conftest import READY_TIMEOUT, execute
from jupyter_client.ioloop import AsyncIOLoopKernelManager

ZMTP_GREETING_START = b"\xff" + b"\0" * 8 + b"\x7f"


KEPT = 48
"""Connections the hammer keeps open through the shutdown: under the tunnel's stream limit."""


class Hammer(threading.Thread):
    """Opens connections to `ports` in a loop until `stop`. Once `began` (the shutdown is
    under way) it counts what it made and keeps the first `KEPT` of them open: the host
    must close each, whether or not the kernel ever heard of it."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__()
        self.ports = ports
        self.began, self.stop = threading.Event(), threading.Event()
        self.connected_during = threading.Event()
        """Set once a connection was made after `began`: the shutdown starts then, so that
        some connection is surely in flight however the threads are scheduled."""
        self.before = self.during = 0
        self.kept: list[socket.socket] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for port in self.ports:
                during = self.began.is_set()
                try:
                    conn = socket.create_connection(("127.0.0.1", port), timeout=0.2)
                except OSError:
                    continue  # the port is closed: the kernel is going
                try:
                    conn.sendall(ZMTP_GREETING_START)
                except OSError:
                    conn.close()
                    continue
                if not during:
                    self.before += 1
                    conn.close()
                    continue
                self.during += 1
                self.connected_during.set()
                if len(self.kept) < KEPT:
                    self.kept.append(conn)
                else:
                    conn.close()

    def closed_by_the_host(self, conn: socket.socket) -> bool:
        """Whether the host side of `conn` is closed: EOF or a reset, after what the
        kernel may have sent (its greeting), within a few seconds."""
        conn.settimeout(5)
        try:
            while conn.recv(1 << 16):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True


async def test_shutdown_while_clients_connect_leaves_no_connection_open(
    no_leftovers, workspace, kernel_name
):
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", ResourceWarning)
        for now in (True, False):
            km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
            await km.start_kernel(cwd=str(workspace))
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            reply, _, _ = await execute(kc, "1")
            assert reply["status"] == "ok"
            ports = [km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port]
            hammer = Hammer(ports)
            hammer.start()
            try:
                await asyncio.sleep(0.3)
                kc.stop_channels()
                hammer.began.set()
                await asyncio.to_thread(hammer.connected_during.wait, 10)
                await km.shutdown_kernel(now=now)
                await asyncio.sleep(0.2)  # connecting on, to ports that must be gone
            finally:
                hammer.stop.set()
                hammer.join()
            try:
                assert hammer.before > 0, "no client connected before the shutdown"
                assert hammer.during > 0, "no client connected during the shutdown"
                held = [c for c in hammer.kept if not hammer.closed_by_the_host(c)]
                assert held == [], f"{len(held)} of {len(hammer.kept)} connections left open"
                for port in ports:
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
            finally:
                for conn in hammer.kept:
                    conn.close()
            gc.collect()
    unclosed = [str(w.message) for w in warned if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
