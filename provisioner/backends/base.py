"""The backend interface: what a kind of sandbox provides, and what every kind shares.

`Backend` is one kind (its settings, how to make, reap and check its sandboxes);
`Sandbox` one sandbox of it; `SandboxSpec` everything a backend needs to make one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .. import cgroups, quotas
from ..checks import Check
from ..console import Console
from ..errors import SandboxError
from ..guest.layout import AGENT_DIR, AGENT_PYTHON, KERNEL_UID
from ..idmap import IdMap
from ..limits import Limits
from ..network import gc as network_gc
from ..network.host import in_namespace
from ..network.sandbox import SandboxNetwork
from ..network.spec import NetworkSpec
from ..settings import COMMON, Setting
from ..state import Record, process_start_time
from ..tunnel import Tunnel


@dataclass(frozen=True)
class Mount:
    source: Path
    destination: str
    read_only: bool
    fd: int | None = None
    """An O_PATH descriptor of `source`, opened without following links
    (`workspace.open_folder`): the backend mounts what it names, the folder whose owner
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
    """Empty for a sandbox started before its kernel is known (a warm pool's): its kernel,
    user, owner and folders come with `Sandbox.claim`."""
    rootfs: Path
    """The read-only guest image; each sandbox gets a throwaway writable layer over it."""
    agent_dir: Path
    """Host folder with the guest agent, mounted read-only at `AGENT_DIR` in the guest."""
    limits: Limits
    mounts: tuple[Mount, ...] = field(default_factory=tuple)
    user: str = ""
    """Whose sandbox it is: its cgroup sits in the user's, which holds the user's quota."""
    owner: tuple[int, int] = (KERNEL_UID, KERNEL_UID)
    """Host uid and gid the sandbox acts as (the kernel's; the workspace's owner)."""
    network: NetworkSpec = field(default_factory=NetworkSpec)
    """none (no network device at all), egress or open; see `network.sandbox.SandboxNetwork`."""
    warm: str = ""
    """For a sandbox of a warm pool: the Python of the kernel to keep warm in it (its modules
    imported before any kernel claims it: guest/warm_kernel.py); "" for none."""


def kernel_user(spec: SandboxSpec) -> str:
    """What the agent takes as the kernel's uid, gid and rlimits (JSB_KERNEL, see agent.py):
    fixed when the sandbox is made, whatever the channel's holder asks later."""
    uid, gid = spec.owner
    return f"{uid},{gid},{spec.limits.pids or 0},{spec.limits.open_files}"


AGENT_ARGV = (AGENT_PYTHON, "-S", "-s", "-E", "-B", f"{AGENT_DIR}/agent.py")
"""The agent runs on its own Python in every image, never the image's (images/runtime.py),
and without `site` (-S): nothing of the image's /etc is imported by a root process."""


class Channel(abc.ABC):
    """How the host reaches a started sandbox's agent: what the tunnel runs over."""

    @abc.abstractmethod
    async def attach(self, tunnel: Tunnel, console: Console) -> None:
        """Hand the channel to `tunnel` (and what the sandbox prints to `console`): they
        own it from now on. I/O loop only."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of a channel that was never attached. Idempotent."""


@dataclass(frozen=True)
class PipeChannel(Channel):
    """The host's ends of a running sandbox's pipes (gVisor's stdio, a VM's serial ports)."""

    read_fd: int
    """Frames from the agent."""
    write_fd: int
    """Frames to the agent."""
    console_fd: int
    """What the sandbox prints outside the tunnel."""

    async def attach(self, tunnel: Tunnel, console: Console) -> None:
        await console.attach(self.console_fd)
        await tunnel.attach(self.read_fd, self.write_fd)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd, self.console_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Sandbox(abc.ABC):
    """One sandbox of some backend. The methods run on the shared I/O loop.

    The base holds what every backend does alike: the record, the network
    (`open_network`), the host process's bookkeeping (`started`) and the end of a
    sandbox (`destroy`: the backend's `stop`, a grace period, SIGKILL, then its
    backend's `reap`). A backend says how to `start` and `kill` its kind.
    """

    stop_grace = 5.0
    """Seconds the host process gets to end after `stop` before it is SIGKILLed."""

    def __init__(self, backend: Backend, spec: SandboxSpec, log: logging.Logger) -> None:
        self.kind = backend
        self.spec = spec
        self.log = log
        self.record = Record(
            sandbox_id=spec.sandbox_id,
            kernel_id=spec.kernel_id,
            backend=backend.name,
            # One made ahead of its kernel (a warm pool's) waits in the pool's cgroup.
            cgroup=f"{cgroups.user_cgroup(spec.user) if spec.kernel_id else cgroups.POOL}"
            f"/{spec.sandbox_id}",
            user=spec.user,
            memory=spec.limits.memory or 0,
            image=str(spec.rootfs),
        )
        """What the host keeps of the sandbox, saved before anything is made for it."""
        self.process: subprocess.Popen | None = None
        """The host process the sandbox lives in (`runsc run`, QEMU), once started."""
        self.network: SandboxNetwork | None = None
        """The sandbox's network namespace, firewall and DNS, if its mode is not none."""

    @property
    def backend(self) -> str:
        return self.record.backend

    @abc.abstractmethod
    async def start(self) -> Channel:
        """Create and start the sandbox with the agent as its first process. On failure
        the caller calls `destroy`, which removes whatever was made."""

    async def claim(self, kernel: SandboxSpec) -> None:
        """Give this sandbox, started before its kernel was known (its spec names no
        kernel: a warm pool's), to `kernel`'s kernel: the same shape, and the kernel's id,
        user, owner and folders. Only a `Backend.poolable` backend's sandboxes can; the
        caller destroys the sandbox if this fails."""
        raise SandboxError(f"a {self.kind.title} sandbox cannot be made ahead of its kernel")

    def poll(self) -> int | None:
        """Exit status once the sandbox has ended, else None. Must be cheap."""
        return None if self.process is None else self.process.poll()

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop every process of the sandbox at once."""

    async def stop(self) -> None:
        """Ask the sandbox to end, before `destroy` waits `stop_grace` for it: by default
        `kill`. A backend whose sandbox ends by itself once its channel closes (a VM
        powering off) does less."""
        await self.kill()

    async def stopped(self) -> None:  # noqa: B027 (a hook: most backends need nothing here)
        """Called by `destroy` once the host process has ended, before the reap."""

    async def destroy(self) -> None:
        """Stop the sandbox if needed and remove everything it had on the host. Idempotent."""
        await self.stop()
        process = self.process
        if process is not None and not await self.ended(self.stop_grace):
            process.kill()
            await asyncio.to_thread(process.wait)
        await self.stopped()
        if self.network is not None:
            self.network.close()
        await asyncio.to_thread(self.kind.reap, self.record, self.log)

    async def open_network(self, tap: bool = False) -> list[str]:
        """Make the sandbox's network if its mode asks for one (removing what it made if
        that fails): the command prefix that runs the sandbox's host process inside it."""
        self.record.save()
        if self.spec.network.mode == "none":
            return []
        self.network = SandboxNetwork(self.spec.network, self.record, self.log, tap=tap)
        await self.network.open()
        return in_namespace(self.network.netns_path)

    def started(self, process: subprocess.Popen) -> None:
        """Record the sandbox's host process (and its start time: a later process with the
        same pid is not it), so that `gc` finds it after a crash."""
        self.process = process
        self.record.pid = process.pid
        self.record.pid_start = process_start_time(process.pid)
        self.record.save()

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

    def stopped_by(self) -> str:
        """Why the platform stopped the sandbox from outside, in words for its user (a
        Kubernetes pod evicted, its node lost), or "". Must be cheap. Host backends: ""
        (their stops from outside are the memory limit's: `out_of_memory`)."""
        return ""

    async def wait_stopped(self) -> bool:
        """Wait until something outside the kernel stops the sandbox (the OOM killer; a
        platform's `stopped_by`): True; False once the sandbox is gone. Cancel it to stop
        watching. By default the memory limit is the only such thing."""
        return await self.wait_out_of_memory()

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


def find_binary(path: str, setting: str, hint: str) -> str:
    """The full path of a backend's binary `path` (a name on PATH, or a path), named by
    `setting`; SandboxError with `hint` (how to install it) if there is none."""
    found = shutil.which(path)
    if found is None:
        raise SandboxError(f"{Path(path).name} not found ({setting} = {path!r}); {hint}")
    return found


class Backend(abc.ABC):
    """One kind of sandbox: its settings and how to make, reap and check it.

    A backend is one module under provisioner/backends/ with one instance of a
    subclass, listed in `provisioner.backends.BACKENDS`; the provisioner, the
    sandbox service, gc, doctor and the benchmark find it there by name.
    """

    name: str
    """As kernelspecs, records and the sandbox service know it: "gvisor"."""
    title: str
    """As people read it, in kernelspecs' display names: "gVisor"."""
    provisioner_class: str
    """The jupyter_client provisioner's class name (the traitlets config section)."""
    settings: tuple[Setting, ...] = ()
    """This backend's own settings (its binary, platform...), beside `settings.COMMON`."""
    changed_defaults: Mapping[str, Any] = MappingProxyType({})
    """Common settings whose default this backend changes (a VM boots slower), by name."""
    poolable: bool = False
    """Whether its sandboxes can be started before their kernel is known and claimed later
    (`Sandbox.claim`): a warm pool keeps some ready (provisioner/pool.py)."""
    maker: str = ""
    """Where a server's sandboxes of this backend are made, when that is neither the server
    itself nor the local sandbox service: the import path of a class with
    `for_settings(settings, log)` and `async create(SandboxRequest) -> Made` (the
    Kubernetes service's client). Named, not imported: the client sits above the seam."""

    @property
    def provisioner_name(self) -> str:
        """The entry point kernelspecs name (`kernel_provisioner.provisioner_name`)."""
        return f"{self.name}-provisioner"

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec, settings: Mapping[str, Any],
                     log: logging.Logger) -> Sandbox:  # fmt: skip
        """A sandbox of this kind for `spec`, not started yet; `settings` holds the values
        of this backend's settings (and the common ones). Raises SandboxError if this host
        or these settings cannot make one (the binary is missing, say)."""

    @abc.abstractmethod
    def remove_runtime(self, record: Record, log: logging.Logger) -> None:
        """Remove what the runtime keeps of a sandbox that may have been this backend's
        (its container state, its host process if it still runs), whoever made it. Must be
        harmless for a sandbox this backend does not know. Never raises."""

    def orphans(self, known: set[str]) -> list[str]:
        """Ids of sandboxes the runtime knows that are not in `known` and have no folder:
        what a crash left that only the runtime remembers (gc reaps them)."""
        return []

    def checks(self, settings: Mapping[str, Any], image: str) -> list[Check]:
        """What `jupyter sandbox doctor` checks for this backend, with these settings."""
        return []

    def reap(self, record: Record, log: logging.Logger) -> None:
        """Remove everything the host has of an ended sandbox of this backend (`reap`)."""
        reap(record, log, (self,))

    def declared(self) -> tuple[Setting, ...]:
        """Every setting of this backend's kernels: the common ones (with this backend's
        defaults), then its own."""
        changed = self.changed_defaults
        common = (replace(s, default=changed[s.name]) if s.name in changed else s for s in COMMON)
        return (*common, *self.settings)

    def defaults(self) -> dict[str, Any]:
        """This backend's settings at their defaults, with the common ones."""
        return {s.name: s.default for s in self.declared()}


def reap(record: Record, log: logging.Logger, kinds: Iterable[Backend]) -> None:
    """Remove everything the host has of an ended sandbox: what each of `kinds` (the
    backends it may have been made by) keeps of it, its network, its cgroup and its folder.
    Idempotent; never raises."""
    for kind in kinds:
        kind.remove_runtime(record, log)
    network_gc.remove(record, log)
    forget(record, log)


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
