"""Where live sandboxes are recorded, so that `ps` can list them and `gc` can reap them.

Each sandbox owns one directory under the runtime dir (its bundle), holding a
`record.json` that names the kernel and the server process that owns it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import rootfs

RUNTIME_DIR = Path("/run/jupyter-sandbox")


def runtime_dir() -> Path:
    return Path(os.environ.get("JUPYTER_SANDBOX_RUNTIME_DIR", RUNTIME_DIR))


def sandboxes_dir() -> Path:
    return runtime_dir() / "sandboxes"


def process_start_time(pid: int) -> int | None:
    """The kernel's start tick of a process, to tell it from a later one with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class Record:
    sandbox_id: str
    kernel_id: str
    backend: str
    created: float = field(default_factory=time.time)
    owner_pid: int = field(default_factory=os.getpid)
    owner_start: int | None = field(default_factory=lambda: process_start_time(os.getpid()))
    cgroup: str = ""
    user: str = ""
    """Whose quota the sandbox counts against."""
    memory: int = 0
    """Bytes of the user's memory quota the sandbox holds (its memory limit)."""
    pid: int = 0
    """The host process the sandbox lives in (`runsc run`, QEMU), and its start time (to
    tell it from a later process with the same pid)."""
    pid_start: int | None = None
    image: str = ""
    """The rootfs of the image the sandbox runs on: `image rm` refuses an image in use."""
    runtime: str = ""
    """The runtime's binary that made the sandbox (runsc, as `runsc_path` found it), so
    that whoever removes it (gc too) uses the same one, wherever it is installed."""
    uid: int | None = None
    """The caller's uid, for a sandbox the sandbox service made (`service/`): only that
    uid may touch it, and a restarted service adopts it."""
    netns: str = ""
    """The sandbox's network namespace, veth (host end), nftables table and /30 (network/);
    each recorded before it is made, so that gc can remove what a crash left."""
    veth: str = ""
    nft_table: str = ""
    subnet: str = ""
    network_mode: str = ""
    egress_allow: list[str] = field(default_factory=list)
    """The network's mode and allowlist: a restarted sandbox service answers its DNS again."""

    @property
    def directory(self) -> Path:
        return sandboxes_dir() / self.sandbox_id

    def process_alive(self) -> bool:
        """Whether the sandbox's host process still runs (not a zombie, not a later pid)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return bool(self.pid) and fields[0] not in "ZX" and int(fields[19]) == self.pid_start

    def owner_alive(self) -> bool:
        """Whether the server that made this sandbox still runs (not just its pid)."""
        started = process_start_time(self.owner_pid)
        return started is not None and started == self.owner_start

    def save(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.directory / "record.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.directory / "record.json")

    def remove(self) -> None:
        rootfs.remove_bundle(self.directory)


_RENAMED = {"vm_pid": "pid", "vm_start": "pid_start"}
"""Fields of records written by earlier versions, and their names now."""


def records() -> list[Record]:
    """Every recorded sandbox; unreadable records are skipped (gc removes their folders)."""
    found = []
    for path in sorted(sandboxes_dir().glob("*/record.json")):
        try:
            saved = json.loads(path.read_text())
            found.append(Record(**{_RENAMED.get(key, key): v for key, v in saved.items()}))
        except (OSError, ValueError, TypeError):
            continue
    return found
