"""Starting and driving the measured kernels, and what one run keeps while it goes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends import Backend
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

READY_TIMEOUT = 120.0
MSG_TIMEOUT = 60.0
SERVICE_TIMEOUT = 30.0
"""Seconds the run's own sandbox service gets to listen, and to stop."""


@dataclass(frozen=True)
class Kind:
    """One kind of kernel the run measures: local, a backend's, or a backend's variant."""

    label: str
    """Its key in the raw results: "local", a backend's name, a variant's label."""
    title: str
    kernelspec: str
    backend: Backend | None = None
    """The backend whose kernels these are (None: the local kernel)."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Traits of the backend's provisioner for these kernels."""
    via_service: bool = False
    warm: bool = False
    """Started from the run's warm pool (`Variant.warm`)."""


LOCAL = Kind("local", "local", "python3")


def kinds(backends: list[Backend]) -> dict[str, Kind]:
    """label -> Kind: local, each backend, and each of its variants."""
    found = {LOCAL.label: LOCAL}
    for backend in backends:
        found[backend.name] = Kind(
            backend.name, backend.title, backend.kernelspec, backend, backend.settings
        )
        for variant in backend.variants:
            found[variant.label] = Kind(
                variant.label,
                variant.title,
                variant.kernelspec or backend.kernelspec,
                backend,
                {**backend.settings, **variant.settings},
                variant.via_service,
                variant.warm,
            )
    return found


@dataclass
class Run:
    """The state of one benchmark run: where its kernels start, where its own sandbox
    service listens, and what its sandboxes were (for the leftover check and the header)."""

    cwd: str
    """The kernels' working folder, owned by the kernel's uid as a notebook folder is."""
    service_socket: Path = field(
        default_factory=lambda: Path(tempfile.gettempdir()) / f"jsb-bench-{os.getpid()}.sock"
    )
    sandboxes: set[str] = field(default_factory=set)
    """Every sandbox id this run created, to check at the end that none is left."""
    accelerators: dict[str, set[str]] = field(default_factory=dict)
    """backend name -> the accelerators ("tcg", "kvm") its VMs used in this run."""


class Kernel:
    """One kernel and its client. `stop()` is safe to call whatever state it is in."""

    def __init__(self, run: Run, kind: Kind) -> None:
        self.run = run
        self.kind = kind
        self.label = kind.label
        config = Config()
        if kind.backend is not None:
            section = config[kind.backend.provisioner]
            for name, value in kind.settings.items():
                section[name] = value
            if kind.via_service:
                section.service_socket = str(run.service_socket)
        self.km = AsyncKernelManager(kernel_name=kind.kernelspec, config=config)
        self.kc: Any = None
        self.start_seconds = 0.0

    async def start(self) -> float:
        """Start the kernel; return (and keep in `start_seconds`) seconds from
        start_kernel() to the first kernel_info_reply."""
        t0 = time.perf_counter()
        try:
            await self.km.start_kernel(cwd=self.run.cwd)
        finally:
            if self.sandbox_id:
                self.run.sandboxes.add(self.sandbox_id)
        accel = getattr(getattr(self.km.provisioner, "sandbox", None), "accel", None)
        if accel is not None and self.kind.backend is not None:
            self.run.accelerators.setdefault(self.kind.backend.name, set()).add(accel.name)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=READY_TIMEOUT)
        self.start_seconds = time.perf_counter() - t0
        return self.start_seconds

    async def stop(self) -> None:
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
            self.kc = None
        try:
            if self.km.has_kernel:
                await asyncio.wait_for(self.km.shutdown_kernel(now=True), 60)
            else:
                await asyncio.wait_for(self.km.cleanup_resources(), 60)
        except Exception as e:  # keep going: the leftover check at the end will tell
            print(f"warning: shutting down the {self.label} kernel: {e!r}", file=sys.stderr)

    @property
    def sandbox_id(self) -> str:
        return getattr(self.km.provisioner, "sandbox_id", "") if self.km.provisioner else ""


@contextlib.asynccontextmanager
async def running(run: Run, kind: Kind) -> AsyncIterator[Kernel]:
    """A started kernel of `kind`, stopped on the way out whatever happened."""
    kernel = Kernel(run, kind)
    try:
        await kernel.start()
        yield kernel
    finally:
        await kernel.stop()


@contextlib.contextmanager
def sandbox_service(run: Run) -> Iterator[None]:
    """The sandbox service as its own process, on `run.service_socket`, for the run's
    `via_service` kernels; no policy bounds them."""
    policy = run.service_socket.with_suffix(".toml")
    policy.write_text("[default]\n")
    # No warm pool in the service: its row is a cold start through it, as gVisor's own.
    argv = [str(Path(sys.executable).parent / "jupyter-sandbox"), "serve",
            f"--socket={run.service_socket}", f"--policy={policy}", "--log-level=WARN",
            "--GVisorProvisioner.pool_size=0"]  # fmt: skip
    process = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + SERVICE_TIMEOUT
        while not run.service_socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sandbox service did not start")
            time.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=SERVICE_TIMEOUT)
        policy.unlink()


def parent_id(msg: dict) -> str | None:
    return msg.get("parent_header", {}).get("msg_id")


async def wait_reply(kc: Any, msg_id: str) -> dict:
    """The shell reply to `msg_id` (other replies are skipped)."""
    while True:
        msg = await kc.get_shell_msg(timeout=MSG_TIMEOUT)
        if parent_id(msg) == msg_id:
            return msg


async def wait_idle(kc: Any, msg_id: str, on_msg: Callable[[dict], None] | None = None) -> None:
    """Until the kernel's `status: idle` for `msg_id`, passing each iopub message of that
    request to `on_msg`."""
    while True:
        msg = await kc.get_iopub_msg(timeout=MSG_TIMEOUT)
        if parent_id(msg) != msg_id:
            continue
        if on_msg is not None:
            on_msg(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return
