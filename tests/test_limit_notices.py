"""A kernel the memory limit kills says so under the cell that ran, whoever listens.

Nobody polls here: not the test, not a restarter (except the server's own, as in
production). The notice must come from the provisioner's own watch of the sandbox,
for an allocation made at once and for one that grows, to an async client, to a
blocking client without a restarter (as an agent product drives a kernel), and to
a browser's websocket through a real jupyter_server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import queue
import time
from pathlib import Path

import pytest
import websocket
from conftest import BACKENDS, READY_TIMEOUT, require_sandbox
from jupyter_client import AsyncKernelManager, KernelManager
from jupyter_client.kernelspec import KernelSpec
from test_server import KernelSocket, jupyter_server
from traitlets.config import Config

from provisioner.provisioner import GVisorProvisioner

MEMORY_LIMIT = "384M"
REASON = f"it exceeded its memory limit, memory_limit = {MEMORY_LIMIT}"
ALLOCATIONS = {
    # One allocation, every page touched at once: the kernel is dead within a second.
    # The issue's own: 1500 MiB. A VM's guest kernel refuses a single allocation above
    # its RAM outright (MemoryError, the kernel lives), so there it is one it accepts.
    ("gvisor", "one-shot"): "b = bytearray(1500 * 2**20); b[::4096] = b'x' * len(b[::4096])",
    ("microvm", "one-shot"): "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])",
    # Growing 50 MiB at a time (b'x' * n touches every page).
    ("gvisor", "gradual"): "chunks = []\nwhile True: chunks.append(b'x' * 50 * 2**20)",
    ("microvm", "gradual"): "chunks = []\nwhile True: chunks.append(b'x' * 50 * 2**20)",
}
TOLD_WITHIN = {"gvisor": 5.0, "microvm": 40.0}
"""Seconds from the request to the notice: the allocation itself takes most of it in a
VM under TCG (~5 s measured); gVisor's kernels are told within ~1 s."""
GONE_WITHIN = 10.0
"""Seconds for the sandbox to end once told (a VM powers itself off)."""

EVERY_ALLOCATION = [
    pytest.param("gvisor", "one-shot"),
    pytest.param("gvisor", "gradual"),
    pytest.param("microvm", "one-shot"),
    pytest.param("microvm", "gradual"),
]
ONE_PER_MICROVM = [  # microVMs under TCG are slow: one case each where every gVisor one runs
    pytest.param("gvisor", "one-shot"),
    pytest.param("gvisor", "gradual"),
]
SETTINGS = Config({"SandboxProvisioner": {"memory_limit": MEMORY_LIMIT}})


def is_notice(message: dict) -> bool:
    return message["msg_type"] == "stream" and "[jupyter-sandbox]" in message["content"]["text"]


def assert_told(notice: dict | None, request: str, started: float, backend: str) -> None:
    """The notice came, on stderr of the cell that ran, in time."""
    assert notice is not None, "the notebook was not told why its kernel died"
    took = time.monotonic() - started
    assert notice["content"]["name"] == "stderr"
    assert f"The sandbox stopped this kernel: {REASON}." in notice["content"]["text"]
    assert notice["parent_header"]["msg_id"] == request
    assert took < TOLD_WITHIN[backend], f"told after {took:.1f} s"


@pytest.mark.parametrize(("backend", "allocation"), EVERY_ALLOCATION)
async def test_an_async_client_is_told(no_leftovers, workspace: Path, backend, allocation):
    require_sandbox(backend)
    km = AsyncKernelManager(kernel_name=BACKENDS[backend], config=SETTINGS)
    await km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        started = time.monotonic()
        request = kc.execute(ALLOCATIONS[backend, allocation])
        notice = None
        while notice is None and time.monotonic() - started < TOLD_WITHIN[backend]:
            try:
                message = await kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            notice = message if is_notice(message) else None
        assert_told(notice, request, started, backend)
        deadline = time.monotonic() + GONE_WITHIN  # only now does anyone poll
        while await km.is_alive():
            assert time.monotonic() < deadline, "the kernel was told dead but lives on"
            await asyncio.sleep(0.1)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


@pytest.mark.parametrize(
    ("backend", "allocation"), [*ONE_PER_MICROVM, pytest.param("microvm", "gradual")]
)
def test_a_blocking_client_without_a_restarter_is_told(
    no_leftovers, workspace: Path, backend, allocation
):
    require_sandbox(backend)
    km = KernelManager(kernel_name=BACKENDS[backend], config=SETTINGS)
    km.start_kernel(cwd=str(workspace))
    assert km._restarter is None  # nothing polls this kernel
    kc = km.blocking_client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=READY_TIMEOUT)
        started = time.monotonic()
        request = kc.execute(ALLOCATIONS[backend, allocation])
        notice = None
        while notice is None and time.monotonic() - started < TOLD_WITHIN[backend]:
            try:
                message = kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            notice = message if is_notice(message) else None
        assert_told(notice, request, started, backend)
        deadline = time.monotonic() + GONE_WITHIN  # only now does anyone poll
        while km.is_alive():
            assert time.monotonic() < deadline, "the kernel was told dead but lives on"
            time.sleep(0.1)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def limited_kernelspec(jupyter_path: Path, backend: str) -> str:
    """A copy of `backend`'s kernelspec under `jupyter_path` with the memory limit; its name."""
    name = f"{BACKENDS[backend]}-{MEMORY_LIMIT}"
    source = Path(__file__).parent.parent / "kernelspecs" / BACKENDS[backend] / "kernel.json"
    spec = json.loads(source.read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = {"memory_limit": MEMORY_LIMIT}
    folder = jupyter_path / "kernels" / name
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(spec))
    return name


@pytest.mark.parametrize(
    ("backend", "allocation"), [*ONE_PER_MICROVM, pytest.param("microvm", "one-shot")]
)
def test_a_websocket_client_is_told(
    no_leftovers, workspace: Path, tmp_path: Path, backend, allocation
):
    require_sandbox(backend)
    jupyter_path = tmp_path / "jupyter-path"
    name = limited_kernelspec(jupyter_path, backend)
    with jupyter_server(workspace, tmp_path / "server", JUPYTER_PATH=str(jupyter_path)) as server:
        kernel_id = server.start_kernel(name)
        ws = KernelSocket(server, kernel_id)
        try:
            ws.execute("pass", timeout=READY_TIMEOUT)  # the kernel is up and answering
            started = time.monotonic()
            request = ws.send(
                "execute_request",
                {"code": ALLOCATIONS[backend, allocation], "silent": False, "store_history": True,
                 "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
            )  # fmt: skip
            notice = None
            while notice is None and time.monotonic() - started < TOLD_WITHIN[backend]:
                ws.ws.settimeout(0.5)
                try:
                    message = json.loads(ws.ws.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if message["channel"] == "iopub" and is_notice(message):
                    notice = message
            assert_told(notice, request, started, backend)
        finally:
            ws.close()
            server.delete(f"/api/kernels/{kernel_id}")


async def test_a_failed_limit_watch_is_logged(caplog: pytest.LogCaptureFixture):
    """Nobody awaits the watch: if stopping the sandbox fails (runsc kill raising), the
    provisioner's log says so with the error, not asyncio's "Task exception was never
    retrieved" at some garbage collection. A cancelled watch (the kernel's cleanup) is
    normal and logs nothing."""
    provisioner = GVisorProvisioner(kernel_id="k-watch", kernel_spec=KernelSpec(argv=["x"]))

    async def kill_fails() -> None:
        raise OSError("runsc kill: it went away")

    caplog.set_level(logging.DEBUG)
    failed = provisioner._watch_limits(kill_fails())
    cancelled = provisioner._watch_limits(asyncio.sleep(60))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.wait([failed, cancelled])
    await asyncio.sleep(0)  # the done-callbacks run
    del failed, cancelled
    gc.collect()

    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.getMessage()) for r in logged] == [
        (provisioner.log.name, "kernel k-watch: the watch of its memory limit failed")
    ]
    assert isinstance(logged[0].exc_info[1], OSError)
