"""Small helpers shared by the server, notebook and client tests."""

from __future__ import annotations

import socket
import subprocess

from provisioner.backends.gvisor import runsc_root
from provisioner.state import sandboxes_dir


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
    if not runsc_root().is_dir():
        return []
    return subprocess.run(
        ["runsc", f"--root={runsc_root()}", "list", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def sandboxes_of(kernel_id: str) -> list[str]:
    """Sandbox ids runsc knows for this kernel (other tests' sandboxes are ignored)."""
    return [sid for sid in runsc_list() if kernel_id in sid]


def bundles_of(kernel_id: str) -> list[str]:
    """The kernel's sandbox folders under /run/jupyter-sandbox/sandboxes."""
    return sorted(p.name for p in sandboxes_dir().glob(f"jsb-{kernel_id}-*"))
