"""The gVisor backend: one `runsc run` per kernel, the agent's stdio as the channel.

Settings of its own: `runsc_path` and `platform`. Each sandbox is an OCI bundle
(`oci_spec`) over its own overlay of the image (`rootfs.py`), in a cgroup made
here (so the OOM count outlives runsc's), started inside its network namespace
when it has a network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import cgroups, hostcmd, rootfs
from ..checks import INSTALL, Check
from ..errors import SandboxError
from ..guest.layout import (
    AGENT_DIR,
    AGENT_OPENSSL_CONF,
    CLAIM_DIR,
    CLAIMED,
    WARM_ENV,
    WARM_USER_ENV,
)
from ..settings import KERNELSPEC, OPERATOR, POOL, Setting, one_of, text_value
from ..state import Record, runtime_dir, sandboxes_dir
from .base import (
    AGENT_ARGV,
    Backend,
    Channel,
    Mount,
    PipeChannel,
    Sandbox,
    SandboxSpec,
    find_binary,
    kernel_user,
)
from .gvisor_claim import claim as claim_sandbox
from .gvisor_claim import claim_folder

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
    # To narrow the bounding set of what it starts (the kernel, a warm kernel process) to
    # CAP_SETUID and CAP_SETGID before they run anything of the image (kernel_init.py).
    "CAP_SETPCAP",
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


def runsc_root() -> Path:
    return runtime_dir() / "runsc"


def warm_env(spec: SandboxSpec) -> list[str]:
    """The agent's environment for a warm pool's sandbox: the kernel's Python, and the
    kernel's user (part of the pool's shape), which its kernel process runs as from its
    start (guest/kernel_init.py `start_warm`)."""
    return [f"{WARM_ENV}={spec.warm}", f"{WARM_USER_ENV}={kernel_user(spec)}"]


def oci_spec(spec: SandboxSpec, root: Path, tmp: Path, cgroup: str, claim: Path,
             files: tuple[Mount, ...] = ()) -> dict:  # fmt: skip
    """The OCI runtime config of one sandbox, with `tmp` bound at /tmp (`rootfs.tmp`);
    `claim` is the host's side of its claim folder (the kernel's user and folders come
    through it: `gvisor_claim.py`), `files` are extra mounts (resolv.conf)."""
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
        {
            "destination": "/tmp",
            "type": "bind",
            "source": str(tmp),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        },
        {
            "destination": CLAIM_DIR,
            "type": "bind",
            "source": str(claim),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        },
    ]
    for mount in files:
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
                f"JSB_KERNEL={CLAIMED}",
                f"OPENSSL_CONF={AGENT_OPENSSL_CONF}",
                *(warm_env(spec) if spec.warm else []),
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
    def __init__(self, backend: Backend, spec: SandboxSpec, log: logging.Logger, runsc: str,
                 platform: str) -> None:  # fmt: skip
        super().__init__(backend, spec, log)
        self.runsc = runsc
        self.platform = platform
        self.record.runtime = runsc
        self.moved_from = ""
        """The pool's cgroup of a claimed sandbox, once its move began (see `claim`)."""

    async def start(self) -> Channel:
        """Start the sandbox; give it to its kernel at once if its spec names one (one made
        ahead, a warm pool's, waits for `claim`)."""
        channel = await self.boot()
        if self.spec.kernel_id:
            try:
                await self.claim(self.spec)
            except BaseException:
                channel.close()
                raise
        return channel

    async def claim(self, kernel: SandboxSpec) -> None:
        """Give the started sandbox to `kernel`'s kernel (`gvisor_claim.py`): its cgroup moves
        under the kernel's user's if it waited in the pool's, and its folders and user are
        handed to the agent. OSError (then `destroy` it) if that fails."""
        assert self.process is not None, "claim a started sandbox"
        cgroup = f"{cgroups.user_cgroup(kernel.user)}/{self.spec.sandbox_id}"
        if self.record.cgroup != cgroup:
            # Both are the sandbox's until the move is done: whichever is left goes with it.
            self.moved_from, self.record.cgroup = self.record.cgroup, cgroup
            await asyncio.shield(asyncio.to_thread(cgroups.move, self.moved_from, cgroup))
        kernel = dataclasses.replace(kernel, sandbox_id=self.spec.sandbox_id)
        bundle = self.record.directory
        await asyncio.to_thread(claim_sandbox, kernel, bundle, self.process.pid)
        self.spec = kernel
        self.record.kernel_id, self.record.user = kernel.kernel_id, kernel.user

    async def stopped(self) -> None:
        if self.moved_from:  # a claim's move that did not end: its source too
            await asyncio.to_thread(cgroups.remove, self.moved_from)

    async def boot(self) -> Channel:
        """Start `runsc run` with the agent, the kernel's folders and user still to come."""
        prefix = await self.open_network()
        bundle = self.record.directory
        root = await asyncio.to_thread(
            rootfs.mount, self.spec.rootfs, bundle, self.spec.limits.disk
        )
        files: tuple[Mount, ...] = ()
        if self.network is not None:
            files = tuple(
                Mount(source=source, destination=destination, read_only=True)
                for source, destination in self.network.guest_files(bundle)
            )
        # The agent's folder is this server's own code: read-only on the host too.
        agent = await asyncio.to_thread(rootfs.bind, self.spec.agent_dir, bundle, True, "agent")
        claim = claim_folder(bundle)
        claim.mkdir(mode=0o755)
        spec = dataclasses.replace(self.spec, agent_dir=agent)
        # Made here, not by runsc: runsc removes the cgroups it made as soon as the
        # sandbox ends, before it lets go of the channel, and with them the count of
        # OOM kills that says why it ended (read in `out_of_memory`; `destroy` removes it).
        memory = self.spec.limits.memory
        await asyncio.to_thread(cgroups.set_memory_limit, self.record.cgroup, memory)
        config = oci_spec(spec, root, rootfs.tmp(bundle), self.record.cgroup, claim, files)
        (bundle / "config.json").write_text(json.dumps(config))
        runsc_root().mkdir(mode=0o700, parents=True, exist_ok=True)
        to_guest_r, to_guest_w = os.pipe2(os.O_CLOEXEC)
        from_guest_r, from_guest_w = os.pipe2(os.O_CLOEXEC)
        console_r, console_w = os.pipe2(os.O_CLOEXEC)
        try:
            process = subprocess.Popen(
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
        self.started(process)
        return PipeChannel(read_fd=from_guest_r, write_fd=to_guest_w, console_fd=console_r)

    async def kill(self) -> None:
        if self.process is not None and self.poll() is None:
            # It fails typically because the sandbox ended meanwhile: not worth a warning.
            argv = runsc_command(self.runsc, "kill", "--all", self.spec.sandbox_id, "KILL")
            await asyncio.to_thread(hostcmd.quietly, argv, self.log, level=logging.DEBUG)


def runsc_command(runsc: str, *args: str) -> list[str]:
    """A runsc command against this project's state root."""
    return [runsc, f"--root={runsc_root()}", *args]


RUNSC_MIN_DATE = 20240729
"""The oldest runsc release with the systrap platform and `--overlay2` as used here."""


def runsc_version(runsc: str) -> tuple[str, int | None]:
    """runsc's version line and its release date (YYYYMMDD), if it says one."""
    try:
        out = hostcmd.run([runsc, "--version"], "runsc --version")
    except SandboxError as e:
        return str(e), None
    first = out.splitlines()[0] if out else "unknown"
    match = re.search(r"(20\d{6})", first)
    return first, int(match.group(1)) if match else None


def check_platform(runsc: str, platform: str) -> Check:
    """Run a trivial sandbox on `platform`: the only proof that it works here."""
    fix = "choose another platform: c.GVisorProvisioner.platform = 'systrap'"
    with tempfile.TemporaryDirectory(prefix="jsb-doctor-") as tmp:
        argv = [runsc, f"--root={tmp}/state", f"--platform={platform}", "--network=none",
                "do", "--", "/bin/true"]  # fmt: skip
        try:
            hostcmd.run(argv, f"platform {platform}")
        except SandboxError as e:
            return Check(f"platform {platform}", False, str(e)[-300:], fix)
    return Check(f"platform {platform}", True, "a test sandbox ran")


class GVisor(Backend):
    """gVisor: a user-space kernel (the Sentry) between the kernel's code and the host."""

    name = "gvisor"
    title = "gVisor"
    provisioner_class = "GVisorProvisioner"
    poolable = True
    settings = (
        Setting(
            name="runsc_path", kind="text", default="runsc",
            help="The runsc binary (a name on PATH, or a path).",
            parse=text_value, who=frozenset({OPERATOR, KERNELSPEC}),
            enforced="backends/gvisor.py",
        ),
        Setting(
            name="platform", kind="choice", default="systrap",
            help="gVisor platform. systrap is fast and needs nothing from the host; kvm "
            "needs a usable /dev/kvm.",
            parse=one_of("systrap", "ptrace", "kvm"), who=frozenset({OPERATOR, KERNELSPEC}),
            enforced="backends/gvisor.py (runsc --platform)", choices=("systrap", "ptrace", "kvm"),
        ),
        *POOL,
    )  # fmt: skip

    async def create(self, spec: SandboxSpec, settings: Mapping[str, Any],
                     log: logging.Logger) -> Sandbox:  # fmt: skip
        runsc = find_binary(
            settings["runsc_path"], "runsc_path", "run `jupyter sandbox doctor` to see how to "
            "install it"
        )  # fmt: skip
        return GVisorSandbox(self, spec, log, runsc, settings["platform"])

    def remove_runtime(self, record: Record, log: logging.Logger) -> None:
        if runsc_root().is_dir():
            runsc = record.runtime or shutil.which("runsc") or "runsc"
            argv = runsc_command(runsc, "delete", "--force", record.sandbox_id)
            hostcmd.quietly(argv, log, gone=("does not exist", "not found"))

    def orphans(self, known: set[str]) -> list[str]:
        if not runsc_root().is_dir():
            return []
        try:
            listed = hostcmd.run(runsc_command("runsc", "list", "--quiet"), "runsc list")
        except SandboxError:
            return []
        # A starting sandbox has its folder before runsc knows it: spare those.
        return [
            sandbox_id
            for sandbox_id in listed.split()
            if sandbox_id.startswith("jsb-")
            and sandbox_id not in known
            and not (sandboxes_dir() / sandbox_id).exists()
        ]

    def checks(self, settings: Mapping[str, Any], image: str) -> list[Check]:
        runsc_path, platform = settings["runsc_path"], settings["platform"]
        try:
            runsc = find_binary(runsc_path, "runsc_path", INSTALL)
        except SandboxError:
            return [Check("runsc", False, f"{runsc_path!r} not found", INSTALL)]
        version, date = runsc_version(runsc)
        new_enough = date is not None and date >= RUNSC_MIN_DATE
        fix = "" if new_enough else f"systrap needs runsc >= {RUNSC_MIN_DATE}; {INSTALL}"
        checks = [Check("runsc", new_enough, f"{runsc}: {version}", fix)]
        if os.geteuid() == 0:
            checks.append(check_platform(runsc, platform))
        return checks


GVISOR = GVisor()
