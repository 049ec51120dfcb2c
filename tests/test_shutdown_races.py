"""Kernels shut down while clients connect: every connection the host accepted is closed.

nbclient's suite once failed on `ResourceWarning: unclosed transport`, raised in the
test process: on Python 3.11 a listening `asyncio.Server` closed while connections it
had just accepted were still being set up leaves them unclosed (an assertion in
`Server._attach`). Here clients connect to all five ports in a loop while the kernel
shuts down, and the test process must warn of nothing.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import warnings

from conftest import READY_TIMEOUT, execute
from jupyter_client.ioloop import AsyncIOLoopKernelManager

ZMTP_GREETING_START = b"\xff" + b"\0" * 8 + b"\x7f"


def connect_in_a_loop(ports: list[int], stop: threading.Event, counted: list[int]) -> None:
    """Open and drop connections to `ports` until `stop`; how many were made, to `counted`."""
    made = 0
    while not stop.is_set():
        for port in ports:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(ZMTP_GREETING_START)
                made += 1
            except OSError:
                pass  # the port is closed: the kernel is going
    counted.append(made)


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
            stop = threading.Event()
            made: list[int] = []
            hammer = threading.Thread(target=connect_in_a_loop, args=(ports, stop, made))
            hammer.start()
            await asyncio.sleep(0.3)
            kc.stop_channels()
            await km.shutdown_kernel(now=now)
            stop.set()
            hammer.join()
            assert made[0] > 0, "no client connected: the race was not tried"
            gc.collect()
    unclosed = [str(w.message) for w in warned if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
