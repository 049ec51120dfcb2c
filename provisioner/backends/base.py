"""The backend interface: what the provisioner needs from any kind of sandbox."""

from __future__ import annotations

import abc
import asyncio
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import cgroups, quotas
from ..errors import SandboxError
from ..idmap import IdMap
from ..limits import Limits
from ..network.spec import NetworkSpec
from ..state import Record

__all__ = ["SandboxError"]


@dataclass(frozen=True)
class Mount:
    source: Path
    destination: str
    read_only: bool
    fd: int | None = None
    """An O_PATH descriptor of `source`, opened without following links
    (`provisioner.open_folder`): the backend mounts what it names, the folder whose owner
    was read, whatever the path names by then. Whoever opened it closes it."""
    owner: tuple[int, int] | None = None
    """The host uid and gid that own `source`. When they are not the kernel's
    (`SandboxSpec.owner`), the backend mounts it idmapped (`idmap.py`)."""

    def idmap(self, kernel: tuple[int, int]) -> IdMap | None:
        """How to show this folder to a kernel running as `kernel`, or None: as it is."""
        if self.owner is None or self.owner[0] == kernel[0]:
            return None
        return IdMap(owner=self.owner, kernel=kernel)


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to create one sandbox."""

    sandbox_id: str
    kernel_id: str
    rootfs: Path
    """The read-only guest image; each sandbox gets a throwaway writable layer over it."""
    agent_dir: Path
    """Host folder with the guest agent, mounted read-only at `AGENT_DIR` in the guest."""
    limits: Limits
    mounts: tuple[Mount, ...] = field(default_factory=tuple)
    user: str = ""
    """Whose sandbox it is: its cgroup sits in the user's, which holds the user's quota."""
    owner: tuple[int, int] = (1000, 1000)
    """Host uid and gid the sandbox acts as (the kernel's; the workspace's owner)."""
    network: NetworkSpec = field(default_factory=NetworkSpec)
    """none (no network device at all), egress or open; see `network.sandbox.SandboxNetwork`."""


def kernel_user(spec: SandboxSpec) -> str:
    """What the agent takes as the kernel's uid, gid and rlimits (JSB_KERNEL, see agent.py):
    fixed when the sandbox is made, whatever the channel's holder asks later."""
    uid, gid = spec.owner
    return f"{uid},{gid},{spec.limits.pids or 0},{spec.limits.open_files}"


AGENT_DIR = "/opt/jupyter-sandbox"
AGENT_ARGV = ("/usr/bin/python3", "-s", "-E", "-B", f"{AGENT_DIR}/agent.py")


@dataclass(frozen=True)
class Channel:
    """The host's ends of a running sandbox's pipes."""

    read_fd: int
    """Frames from the agent."""
    write_fd: int
    """Frames to the agent."""
    console_fd: int
    """What the sandbox prints outside the tunnel."""


class Sandbox(abc.ABC):
    """One sandbox. The methods run on the shared I/O loop."""

    backend: str

    def __init__(self, spec: SandboxSpec, log: logging.Logger) -> None:
        self.spec = spec
        self.log = log
        self.record = Record(
            sandbox_id=spec.sandbox_id,
            kernel_id=spec.kernel_id,
            backend=self.backend,
            cgroup=f"{cgroups.user_cgroup(spec.user)}/{spec.sandbox_id}",
            user=spec.user,
            memory=spec.limits.memory or 0,
        )
        """What the host keeps of the sandbox, saved before anything is made for it."""
        self.process: subprocess.Popen | None = None
        """The host process the sandbox lives in (`runsc run`, QEMU), once started."""

    @abc.abstractmethod
    async def start(self) -> Channel:
        """Create and start the sandbox with the agent as its first process."""

    def poll(self) -> int | None:
        """Exit status once the sandbox has ended, else None. Must be cheap."""
        return None if self.process is None else self.process.poll()

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop every process of the sandbox at once."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Kill if needed and remove everything the sandbox had on the host. Idempotent."""

    def memory_usage(self) -> int | None:
        """Bytes of memory charged to the whole sandbox, if known."""
        return cgroups.memory_usage(self.record.cgroup)

    def out_of_memory(self) -> bool:
        """Whether the host's OOM killer struck inside the sandbox's cgroup. Must be cheap.

        It may take one of the runtime's own processes (a gVisor helper, QEMU) and
        leave the sandbox wedged: the provisioner then stops all of it.
        """
        return cgroups.oom_kills(self.record.cgroup) > 0

    async def wait_out_of_memory(self) -> bool:
        """Wait until the host's OOM killer strikes inside the sandbox: True; False once its
        cgroup is gone. Sleeps on the kernel's notification where it gives one (see
        `cgroups.wait_for_oom_kill`). Cancel it to stop watching."""
        return await cgroups.wait_for_oom_kill(self.record.cgroup)

    async def ended(self, within: float) -> bool:
        """Whether the sandbox's host process ends within `within` seconds (polled)."""
        deadline = asyncio.get_running_loop().time() + within
        while self.poll() is None:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def cpu_seconds(self) -> float | None:
        """CPU time used by the whole sandbox so far, if known."""
        return cgroups.cpu_seconds(self.record.cgroup)


def forget(record: Record, log: logging.Logger) -> None:
    """Remove what the host keeps of any backend's sandbox once it has ended: its cgroup,
    its user's cgroup if that is now empty, and its folder. Never raises."""
    cgroups.remove(record.cgroup)  # what cannot go yet is left for gc
    try:
        if record.user:
            quotas.release(record.user)
        record.remove()
    except OSError as e:
        log.warning("could not remove the folder of sandbox %s: %s", record.sandbox_id, e)
