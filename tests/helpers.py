"""Small helpers shared by the server, notebook and client tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from provisioner.backends.gvisor import runsc_root
from provisioner.state import records, sandboxes_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def runsc_list() -> list[str]:
    """Every container id under this project's runsc state root."""
    if not runsc_root().is_dir() or shutil.which("runsc") is None:
        return []
    return subprocess.run(
        ["runsc", f"--root={runsc_root()}", "list", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def claimed_by(kernel_id: str) -> set[str]:
    """Sandboxes of a warm pool that this kernel claimed: their ids were made before the
    kernel's (`jsb-pool-...`), their records name it."""
    return {r.sandbox_id for r in records() if r.kernel_id == kernel_id}


def sandboxes_of(kernel_id: str) -> list[str]:
    """Running sandboxes of this kernel, either backend (other tests' are ignored)."""
    claimed = claimed_by(kernel_id)
    return [sid for sid in runsc_list() + microvm_list() if kernel_id in sid or sid in claimed]


def bundles_of(kernel_id: str) -> list[str]:
    """The kernel's sandbox folders under /run/jupyter-sandbox/sandboxes."""
    claimed = claimed_by(kernel_id)
    return sorted(p.name for p in sandboxes_dir().iterdir()
                  if p.name.startswith(f"jsb-{kernel_id}-") or p.name in claimed)  # fmt: skip


def microvm_list() -> list[str]:
    """Sandbox ids of every running QEMU of the microVM backend (named by `-name`)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-name" in argv[:-1] and b"process=jsb-microvm" in argv[argv.index(b"-name") + 1]:
            found.append(argv[argv.index(b"-name") + 1].split(b",")[0].decode())
    return found


def kill_from_outside(sandbox) -> None:
    """Kill a sandbox the way a crash or an operator would: not through the provisioner."""
    if sandbox.backend == "microvm":
        os.kill(sandbox.record.pid, signal.SIGKILL)
    else:
        subprocess.run(
            ["runsc", f"--root={runsc_root()}", "kill", "--all", sandbox.record.sandbox_id, "KILL"],
            check=True,
        )
