"""The gVisor backend: one `runsc run` per kernel, the agent's stdio as the channel."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from .. import cgroups, rootfs
from ..network import gc as network_gc
from ..network.sandbox import SandboxNetwork
from ..state import Record, process_start_time, runtime_dir
from .base import (
    AGENT_ARGV,
    AGENT_DIR,
    Channel,
    Mount,
    Sandbox,
    SandboxError,
    SandboxSpec,
    forget,
    kernel_user,
)

AGENT_CAPABILITIES = [
    # The agent (sandbox root, inside gVisor only) needs these to start the kernel
    # as an unprivileged user and signal it, and CAP_SYS_ADMIN to start it in a PID
    # and mount namespace of its own with its own /proc (guest/kernel_init.py: gVisor's
    # procfs shows any process's fds and environ to all); the kernel itself gets none.
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_SYS_ADMIN",
]


SET_ID_BITS = (0o4000, 0o2000)
"""S_ISUID and S_ISGID: a kernel may not put them on any file (see `no_set_id_bits`)."""


def no_set_id_bits() -> dict:
    """An OCI seccomp filter (applied by gVisor to every process in the sandbox) that
    refuses, with EPERM, every way to give a file a set-user- or set-group-id bit.

    On a workspace mounted idmapped (`idmap.py`) what the kernel creates belongs to
    the folder's owner on the host, root included: such a bit would hand the owner's
    powers to anyone who may run the file there. Nothing a kernel does needs them.
    """
    # Each call that can set a mode, and the index of its mode argument.
    where = {"chmod": 1, "fchmod": 1, "creat": 1, "mknod": 1,
             "fchmodat": 2, "open": 2, "mknodat": 2, "openat": 3}  # fmt: skip
    rules: list[dict] = [
        {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
         "args": [{"index": index, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}]}
        for name, index in where.items() for bit in SET_ID_BITS
    ]  # fmt: skip
    # Its mode hides in a struct that seccomp cannot read; glibc falls back to openat.
    rules.append({"names": ["openat2"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": rules}  # fmt: skip


def host_pids_limit(guest_pids: int) -> int:
    """Host tasks for a sandbox whose guest may have `guest_pids` tasks (measured, with margin)."""
    return 2 * guest_pids + 256


def find_runsc(path: str) -> str:
    found = shutil.which(path)
    if found is None:
        raise SandboxError(
            f"runsc not found (runsc_path = {path!r}); run `jupyter sandbox doctor` "
            "to see how to install it"
        )
    return found


def runsc_root() -> Path:
    return runtime_dir() / "runsc"


def oci_spec(spec: SandboxSpec, root: Path, cgroup: str, files: tuple[Mount, ...] = ()) -> dict:
    """The OCI runtime config of one sandbox; `files` are extra mounts (resolv.conf)."""
    limits = spec.limits
    resources: dict = {}
    if limits.memory:
        # memory+swap equal to memory: swap counts against the limit
        resources["memory"] = {"limit": limits.memory, "swap": limits.memory}
    if limits.cpu:
        period = cgroups.CPU_PERIOD_US
        resources["cpu"] = {"quota": int(limits.cpu * period), "period": period}
    if limits.pids:
        # The host counts gVisor's own threads and stub processes here; the guest's
        # processes are held by RLIMIT_NPROC below, and this is only the backstop.
        resources["pids"] = {"limit": host_pids_limit(limits.pids)}
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        {
            "destination": AGENT_DIR,
            "type": "bind",
            "source": str(spec.agent_dir),
            "options": ["rbind", "ro"],
        },
    ]
    for mount in (*spec.mounts, *files):
        mounts.append(
            {
                "destination": mount.destination,
                "type": "bind",
                "source": str(mount.source),
                "options": ["rbind", "ro" if mount.read_only else "rw", "nosuid", "nodev"],
            }
        )
    return {
        "ociVersion": "1.0.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": list(AGENT_ARGV),
            "env": [
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                f"JSB_KERNEL={kernel_user(spec)}",
            ],
            "cwd": "/",
            "capabilities": {
                key: AGENT_CAPABILITIES for key in ("bounding", "effective", "permitted")
            },
            "noNewPrivileges": True,
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": limits.open_files, "soft": limits.open_files},
                # per uid, processes and threads: binds the kernel, not the root agent
                *(
                    [{"type": "RLIMIT_NPROC", "hard": limits.pids, "soft": limits.pids}]
                    if limits.pids
                    else []
                ),
            ],
        },
        # The sandbox's own overlay of the image, writable up to disk_limit (rootfs.py).
        "root": {"path": str(root), "readonly": False},
        "hostname": "sandbox",
        "mounts": mounts,
        "annotations": {"jupyter-sandbox.kernel-id": spec.kernel_id},
        "linux": {
            # With a network, runsc is started inside the sandbox's own namespace and
            # passes it on (--network=host): asking for a new one would leave only lo.
            "namespaces": [
                {"type": t}
                for t in ("pid", "network", "ipc", "uts", "mount")
                if t != "network" or spec.network.mode == "none"
            ],
            "cgroupsPath": cgroup,
            "resources": resources,
            "seccomp": no_set_id_bits(),
        },
    }


class GVisorSandbox(Sandbox):
    backend = "gvisor"

    def __init__(self, spec: SandboxSpec, log, runsc: str, platform: str) -> None:
        super().__init__(spec, log)
        self.runsc = runsc
        self.platform = platform
        self.network: SandboxNetwork | None = None

    async def start(self) -> Channel:
        self.record.save()
        bundle = self.record.directory
        root = await asyncio.to_thread(
            rootfs.mount, self.spec.rootfs, bundle, self.spec.limits.disk
        )
        files: tuple[Mount, ...] = ()
        prefix: list[str] = []
        if self.spec.network.mode != "none":
            self.network = SandboxNetwork(self.spec.network, self.record, self.log)
            await self.network.open()
            files = tuple(
                Mount(source=source, destination=destination, read_only=True)
                for source, destination in self.network.guest_files(bundle)
            )
            # nsenter, not `ip netns exec`: that remounts /sys, and runsc then cannot
            # find the cgroups. nsenter execs runsc, so the process is runsc itself.
            nsenter = shutil.which("nsenter") or "nsenter"
            prefix = [nsenter, f"--net={self.network.netns_path}", "--"]
        mounts = [await asyncio.to_thread(self.host_mount, m, bundle) for m in self.spec.mounts]
        spec = dataclasses.replace(self.spec, mounts=tuple(mounts))
        # Made here, not by runsc: runsc removes the cgroups it made as soon as the
        # sandbox ends, before it lets go of the channel, and with them the count of
        # OOM kills that says why it ended (read in `out_of_memory`; `destroy` removes it).
        memory = self.spec.limits.memory
        await asyncio.to_thread(cgroups.set_memory_limit, self.record.cgroup, memory)
        config = oci_spec(spec, root, self.record.cgroup, files)
        (bundle / "config.json").write_text(json.dumps(config))
        runsc_root().mkdir(mode=0o700, parents=True, exist_ok=True)
        to_guest_r, to_guest_w = os.pipe2(os.O_CLOEXEC)
        from_guest_r, from_guest_w = os.pipe2(os.O_CLOEXEC)
        console_r, console_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.process = subprocess.Popen(
                [
                    *prefix,
                    self.runsc,
                    f"--root={runsc_root()}",
                    f"--platform={self.platform}",
                    "--oci-seccomp",  # the config's `no_set_id_bits`
                    # host: the guest's sockets are the namespace's, behind its firewall
                    "--network=host" if self.network else "--network=none",
                    # Writes land in gVisor's own memory layer (fast: no host round
                    # trip), whose file lives on the sandbox's disk_limit tmpfs.
                    f"--overlay2=root:dir={rootfs.layer(bundle)}",
                    "run",
                    f"--bundle={bundle}",
                    self.spec.sandbox_id,
                ],
                stdin=to_guest_r,
                stdout=from_guest_w,
                stderr=console_w,
                start_new_session=True,  # a Ctrl-C at the server reaches the kernel only through us
            )
        except OSError:
            for fd in (to_guest_w, from_guest_r, console_r):
                os.close(fd)
            raise
        finally:
            for fd in (to_guest_r, from_guest_w, console_w):
                os.close(fd)
        self.record.pid = self.process.pid
        self.record.pid_start = process_start_time(self.process.pid)
        self.record.save()
        return Channel(read_fd=from_guest_r, write_fd=to_guest_w, console_fd=console_r)

    def host_mount(self, mount: Mount, bundle: Path) -> Mount:
        """`mount` with a source runsc may take as it is: the folder itself, or a bind
        of it in the bundle where only root can change what the path names (a caller's
        descriptor), idmapped if its owner is not the kernel."""
        idmap = mount.idmap(self.spec.owner)
        if idmap is not None:
            source = mount.source if mount.fd is None else mount.fd
            return dataclasses.replace(mount, source=rootfs.bind_mapped(source, bundle, idmap))
        if mount.fd is not None:
            return dataclasses.replace(mount, source=rootfs.bind(mount.fd, bundle))
        return mount

    async def kill(self) -> None:
        if self.process is not None and self.poll() is None:
            sandbox_id = self.spec.sandbox_id
            result = await asyncio.to_thread(
                run_runsc, self.runsc, "kill", "--all", sandbox_id, "KILL"
            )
            if result.returncode:  # typically: it ended meanwhile
                self.log.debug("runsc kill %s: %s", sandbox_id, result.stderr.strip())

    async def destroy(self) -> None:
        await self.kill()
        if self.process is not None:
            for _ in range(100):
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.process.kill()
                self.process.wait()
        if self.network is not None:
            self.network.close()
        await asyncio.to_thread(reap, self.record, self.log, self.runsc)


def run_runsc(runsc: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a runsc command against this project's state root, capturing its output."""
    return subprocess.run(
        [runsc, f"--root={runsc_root()}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def reap(record: Record, log: logging.Logger, runsc: str = "runsc") -> None:
    """Remove a sandbox's container, network, root mount, cgroup and bundle, whoever made it."""
    runsc = shutil.which(runsc) or runsc
    if runsc_root().is_dir():
        try:
            result = run_runsc(runsc, "delete", "--force", record.sandbox_id)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("runsc delete %s: %s", record.sandbox_id, e)
        else:
            output = result.stdout + result.stderr
            if result.returncode and "does not exist" not in output and "not found" not in output:
                log.warning("runsc delete %s: %s", record.sandbox_id, output.strip())
    network_gc.remove(record, log)  # never raises
    forget(record, log)
