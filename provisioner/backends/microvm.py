"""The microVM backend: one QEMU `-M microvm` per kernel, with its own guest kernel.

The VM boots the image's boot files (`images/boot.py`): the image as a read-only
disk under a tmpfs layer of `disk_limit`, the agent's folder and the workspace
over virtio-9p, and the tunnel's channel on two virtio-serial ports (one per
direction, so that the host's ends behave like the gVisor backend's pipes). A
third port, the config port, is the backend's own: the sandbox's settings go to
the guest's PID 1 there (`guest_settings`), never through the channel's holder.
A VM without a network device is started from a snapshot of its shape when it
can be (`microvm_snapshot`), else booted.

QEMU runs with the least the host allows: as the workspace's owner (not root:
the 9p share then creates files as that user, and a guest that took root inside
the VM can do no more on the host than that user), with QEMU's seccomp sandbox
on, no network device unless the kernel's network mode asks for one, and in a
cgroup of its own that holds the VM's memory, CPU quota and the host tasks.

With a network mode other than none, the sandbox gets the same namespace,
link, firewall and DNS responder as a gVisor one (`network/sandbox.py`); its
virtio-net device is backed by a tap device there, bridged with the
namespace's end of the link. The backend (root) attaches to the tap and hands
QEMU the descriptor, as libvirt does: QEMU never opens /dev/net/tun, which may
stay root's alone. QEMU still runs inside that namespace, so that a guest that
took QEMU over reaches no more of the network than the guest itself. The
guest's init takes the sandbox's address, gateway and resolver from the kernel
command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .. import cgroups
from ..accel import Accel, choose, kvm_group, tsc_arguments
from ..checks import INSTALL, Check
from ..errors import ImageError, SandboxError
from ..idmap import detached_tree
from ..images.boot import BootFiles, find_boot_files
from ..images.store import load_manifest
from ..ioloop import in_thread
from ..network import tap as network_tap
from ..network.sandbox import SandboxNetwork
from ..settings import KERNELSPEC, OPERATOR, Setting, flag, one_of, text_value
from ..state import Record, process_start_time
from . import microvm_snapshot
from .base import (
    Backend,
    Channel,
    Mount,
    PipeChannel,
    Sandbox,
    SandboxSpec,
    find_binary,
    kernel_user,
)

PORT = "org.jupyter.sandbox"
"""Names of the virtio-serial ports: PORT.in (to the guest), PORT.out, PORT.config."""
TB_CACHE_MIB = 256
"""TCG's translated-code cache; QEMU's default (1 GiB) would be charged to every VM."""
QEMU_OVERHEAD = (TB_CACHE_MIB + 192) << 20
"""Host memory a VM needs beyond its RAM: QEMU itself and TCG's cache."""
HOST_TASKS = 64
"""QEMU's own threads (vCPUs, I/O workers): the guest's processes are not host tasks."""
POWER_OFF_GRACE = 3.0
"""Seconds a VM whose channel closed gets to power itself off before it is killed."""
QEMU_FAILED = 1
"""QEMU's exit status for its own errors (a guest that powers off gives 0)."""
WARM_PYTHON = "/opt/venv/bin/python"
"""The warm kernel process's Python: the python3-microvm kernelspec's, as it names it
(its sys.executable is then the same as a fresh kernel's)."""


def warm_python(rootfs: Path) -> str:
    """WARM_PYTHON for the default image, else "" (no warm process).

    The warm process runs as the guest's root until the launch hands it over, with the
    image's Python and whatever its site-packages run at start-up (.pth files): only
    the image this project builds from its recipe is trusted that far. Kernels of
    imported images start cold (the agent runs them as the kernel's user)."""
    manifest = load_manifest(rootfs.parent.name) if rootfs.name == "rootfs" else None
    trusted = (manifest or {}).get("source", {}).get("kind") == "recipe"
    return WARM_PYTHON if trusted and os.path.lexists(rootfs / WARM_PYTHON.lstrip("/")) else ""


def guest_mac(sandbox_id: str) -> str:
    """A locally administered MAC of QEMU's range, the same for the same sandbox."""
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def qemu_argv(spec: SandboxSpec, qemu: str, boot: BootFiles, accel: Accel,
              fds: tuple[int, int, int],
              net: tuple[SandboxNetwork, int] | None = None,
              mapped_workspace: int | None = None) -> list[str]:  # fmt: skip
    """QEMU's command line for one sandbox, its ports on `fds` (in, out, config); with
    `net` (the network, a descriptor of its tap: `network.tap.open_tap`), a virtio-net device
    on that tap; with `mapped_workspace`, the workspace is that descriptor's idmapped tree
    (`idmap.py`). Same for every sandbox of the same shape."""
    limits = spec.limits
    memory_mib, cpus = vm_size(spec)
    command_line = [
        "console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests",
        *(tsc_arguments().split() if accel.name == "tcg" else []),
        f"jsb.tmp={limits.disk}", f"jsb.warm={warm_python(spec.rootfs)}",
    ]  # fmt: skip
    argv = [
        qemu, "-name", f"{spec.sandbox_id},process=jsb-microvm", "-M", "microvm",
        "-accel", "kvm" if accel.name == "kvm" else f"tcg,tb-size={TB_CACHE_MIB}",
        "-cpu", "host" if accel.name == "kvm" else "max",  # numpy needs max under TCG
        "-m", str(memory_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(boot.kernel), "-initrd", str(boot.initramfs),
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        "-drive", f"file={boot.root_disk},format=raw,if=none,id=root,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-fsdev", f"local,id=agent,path={spec.agent_dir},security_model=none,readonly=on",
        "-device", "virtio-9p-device,fsdev=agent,mount_tag=agent",
        "-device", "virtio-serial-device,max_ports=4",
    ]  # fmt: skip
    for fd, name in zip(fds, ("in", "out", "config"), strict=True):
        argv += ["-chardev", f"socket,id={name},fd={fd}",
                 "-device", f"virtserialport,chardev={name},name={PORT}.{name}"]  # fmt: skip
    argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    for mount in spec.mounts:  # the workspace; pid1.py mounts it at its destination
        if mapped_workspace is None:
            # QEMU opens it as the sandbox's owner (the caller): its own permissions apply
            fsdev = "path=" + str(mount.source).replace(",", ",,") + ",security_model=passthrough"
        else:
            # Its owner's files are QEMU's own there; the guest's modes stay in xattrs,
            # so a set-id bit never reaches a file that is, on the host, its owner's.
            fsdev = f"path=/proc/self/fd/{mapped_workspace},security_model=mapped-xattr"
        argv += [
            "-fsdev", f"local,id=workspace,{fsdev}" + (",readonly=on" if mount.read_only else ""),
            "-device", "virtio-9p-device,fsdev=workspace,mount_tag=workspace",
        ]  # fmt: skip
    if net is not None:
        sandbox_network, tap = net  # attached already: QEMU opens nothing, runs no script
        argv += [
            "-netdev", f"tap,id=net0,fd={tap}",
            "-device", f"virtio-net-device,netdev=net0,mac={guest_mac(spec.sandbox_id)}",
        ]  # fmt: skip
        command_line += sandbox_network.kernel_arguments()
    return [*argv, "-append", " ".join(command_line)]


def vm_size(spec: SandboxSpec) -> tuple[int, int]:
    """The VM's RAM in MiB and its vCPUs."""
    limits = spec.limits
    return (limits.memory or 2 << 30) >> 20, max(1, math.ceil(limits.cpu or 1))


def guest_settings(spec: SandboxSpec) -> bytes:
    """What pid1.py takes from the config port: this sandbox's, not its shape's."""
    workspace = None
    for mount in spec.mounts:
        workspace = {"path": mount.destination, "read_only": mount.read_only}
    settings = {"entropy": os.urandom(64).hex(), "kernel": kernel_user(spec),
                "workspace": workspace}  # fmt: skip
    return json.dumps(settings).encode() + b"\n"


async def serve_settings(sock: socket.socket, settings: bytes) -> None:
    """Give the guest its settings, then once the time when it asks; then let go."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, settings)
        said = b""  # "ready[ cold]\n" (a VM booted afresh says it first), then "time\n"
        while not said.endswith(b"time\n"):
            chunk = await loop.sock_recv(sock, 64)
            said += chunk
            if not chunk or len(said) > 64:
                return
        await loop.sock_sendall(sock, f"{time.time():.6f}\n".encode())
    except OSError:
        pass
    finally:
        sock.close()


def spawn(argv: list[str], uid: int, gid: int, *, procs: Sequence[Path] = (),
          prefix: Sequence[str] = (), pass_fds: Sequence[int] = (), stdout: Any,
          die_with_parent: bool = False) -> subprocess.Popen:  # fmt: skip
    """Start QEMU (`argv`) as uid:gid without capabilities, in cgroups `procs` before
    anything of QEMU runs, after `prefix` (nsenter into its network namespace). Its only
    supplementary group is /dev/kvm's when it runs under KVM and needs that (`qemu_groups`)."""
    # The shell joins the cgroups, then becomes QEMU through setpriv.
    join = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done'
    return subprocess.Popen(
        [
            "/bin/sh", "-c", f'{join}; shift; exec "$@"', "sh", *map(str, procs), "--",
            *prefix, "setpriv", f"--reuid={uid}", f"--regid={gid}", *qemu_groups(argv),
            "--inh-caps=-all", "--no-new-privs",
            *(["--pdeathsig", "KILL"] if die_with_parent else []), *argv,
        ],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stdout,
        pass_fds=pass_fds,
        start_new_session=True,
    )  # fmt: skip


def qemu_groups(argv: list[str]) -> list[str]:
    """setpriv's group option for QEMU `argv`: under KVM, /dev/kvm's group if it needs it
    (0660 root:kvm: as libvirt's QEMU is in `kvm`), else none. SandboxError if QEMU, as an
    ordinary user, could not open /dev/kvm at all (say KVM was forced by `accel`)."""
    if argv[argv.index("-accel") + 1] != "kvm":
        return ["--clear-groups"]
    try:
        group = kvm_group()
    except OSError as e:
        raise SandboxError(f"accel kvm: {e.strerror}; use accel = 'tcg' or 'auto'") from None
    return ["--clear-groups"] if group is None else [f"--groups={group}"]


class MicroVMSandbox(Sandbox):
    stop_grace = POWER_OFF_GRACE
    """The agent powers the VM off once its channel closes: it gets a moment to."""

    def __init__(self, backend: Backend, spec: SandboxSpec, log: logging.Logger, qemu: str,
                 boot: BootFiles, accel: Accel, use_snapshots: bool = True) -> None:  # fmt: skip
        super().__init__(backend, spec, log)
        self.qemu = qemu
        self.boot = boot
        self.accel = accel
        self.use_snapshots = use_snapshots
        self.shape = ""
        """The key of this VM's shape's snapshot (microvm_snapshot.shape_key)."""
        self.restored = False
        self.settings_task: asyncio.Task | None = None

    async def start(self) -> Channel:
        uid, gid = self.spec.owner
        prefix = await self.open_network(tap=True)
        limits = self.spec.limits
        memory = None if limits.memory is None else limits.memory + QEMU_OVERHEAD
        procs = await asyncio.to_thread(
            cgroups.create, self.record.cgroup, memory, limits.cpu, HOST_TASKS
        )
        snapshot = await self.snapshot(procs) if self.network is None else None
        tap = workspace = None
        try:
            workspace = await self.mapped_workspace()
            if self.network is not None:
                tap = self.open_tap(self.network)
            return self.spawn(uid, gid, procs, prefix, snapshot, tap, workspace)
        finally:
            for fd in (snapshot, tap, workspace):  # QEMU has its own copies by now, or failed
                if fd is not None:
                    os.close(fd)

    def open_tap(self, net: SandboxNetwork) -> int:
        """A descriptor of the network's tap, for QEMU. Called in the I/O loop, not a worker
        thread: it takes a millisecond, and a cancelled wait would leak the descriptor."""
        try:
            return network_tap.open_tap(net.netns_path)
        except OSError as e:
            raise SandboxError(f"network setup: {e}") from None

    def spawn(self, uid: int, gid: int, procs: list[Path], prefix: list[str],
              snapshot: int | None, tap: int | None, workspace: int | None) -> Channel:  # fmt: skip
        """Start QEMU (from `snapshot`, a descriptor, if given; on the network's `tap`, a
        descriptor, if given; with `workspace`, the workspace's idmapped tree, if given)
        and serve its settings. The caller closes all three."""
        to_guest, qemu_in = socket.socketpair()
        from_guest, qemu_out = socket.socketpair()
        settings, qemu_settings = socket.socketpair()
        console_r, console_w = os.pipe2(os.O_CLOEXEC)
        qemu_ends = (qemu_in.fileno(), qemu_out.fileno(), qemu_settings.fileno())
        net = None if self.network is None or tap is None else (self.network, tap)
        argv = qemu_argv(self.spec, self.qemu, self.boot, self.accel, qemu_ends, net, workspace)
        pass_fds = (*qemu_ends, *(fd for fd in (workspace, tap) if fd is not None))
        if snapshot is not None:
            argv += ["-incoming", f"fd:{snapshot}"]
            pass_fds += (snapshot,)
            self.log.info("sandbox %s starts from the snapshot of its shape", self.spec.sandbox_id)
        try:
            process = spawn(
                argv, uid, gid, procs=procs, prefix=prefix, pass_fds=pass_fds, stdout=console_w
            )
        except BaseException:  # e.g. no QEMU, or no /dev/kvm it may open (qemu_groups)
            for end in (to_guest, from_guest, settings):
                end.close()
            os.close(console_r)
            raise
        finally:
            for end in (qemu_in, qemu_out, qemu_settings):
                end.close()
            os.close(console_w)
        self.restored = snapshot is not None
        self.started(process)
        settings.setblocking(False)
        self.settings_task = asyncio.create_task(
            serve_settings(settings, guest_settings(self.spec))
        )
        return PipeChannel(
            read_fd=from_guest.detach(), write_fd=to_guest.detach(), console_fd=console_r
        )

    async def mapped_workspace(self) -> int | None:
        """A descriptor of the workspace's idmapped tree, if its owner is not the kernel's.

        Made on a worker thread (it starts a process to hold the user namespace); if the
        wait is cancelled, the descriptor is closed once the thread has made it."""
        for mount in self.spec.mounts:
            idmap = mount.idmap(self.spec.owner)
            if idmap is not None:
                folder = mount.source if mount.fd is None else mount.fd
                tree = asyncio.to_thread(detached_tree, folder, idmap, mount.read_only)
                made = asyncio.ensure_future(tree)
                try:
                    return await asyncio.shield(made)
                except asyncio.CancelledError:
                    made.add_done_callback(close_made_fd)
                    raise
        return None

    async def snapshot(self, procs: list[Path]) -> int | None:
        """A descriptor of the snapshot of this VM's shape (made if missing, by a VM in
        this sandbox's cgroups `procs`), or None."""
        if not self.use_snapshots:
            return None
        try:
            builder = microvm_snapshot.builder()
        except SandboxError as e:
            self.log.warning("no snapshots (%s); booting the VM", e)
            return None
        if self.spec.owner[0] == builder[0]:
            raise SandboxError(f"a kernel may not run as {microvm_snapshot.BUILDER}")
        # The snapshot's VM: this shape, no one's, a workspace device that is never mounted.
        template = dataclasses.replace(
            self.spec, sandbox_id="jsb-snapshot",
            mounts=tuple(Mount(self.boot.kernel.parent, "/", True) for _ in self.spec.mounts),
        )  # fmt: skip
        shape = qemu_argv(template, self.qemu, self.boot, self.accel, (0, 1, 2))
        self.shape = microvm_snapshot.shape_key(
            shape, self.boot, self.spec.agent_dir, self.accel.name
        )

        def start(ports: tuple[int, int, int], extra: list[str], pass_fds: tuple[int, ...],
                  console: Any) -> subprocess.Popen:  # fmt: skip
            argv = qemu_argv(template, self.qemu, self.boot, self.accel, ports) + extra
            return spawn(argv, *builder, procs=procs, pass_fds=(*ports, *pass_fds),
                         stdout=console, die_with_parent=True)  # fmt: skip

        return await microvm_snapshot.ensure(self.boot, self.shape, start, self.log)

    async def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    async def stop(self) -> None:
        """Nothing to ask: the agent powers the VM off once its channel closes (`destroy`
        waits `stop_grace` for that). The guest's settings are no longer served."""
        if self.settings_task is not None:
            self.settings_task.cancel()

    async def stopped(self) -> None:
        process = self.process
        if self.restored and process is not None and process.returncode == QEMU_FAILED:
            # QEMU itself failed, most likely to load the snapshot: make it again
            await asyncio.to_thread(microvm_snapshot.forget, self.boot, self.shape, self.log)


def close_made_fd(made: asyncio.Future) -> None:
    """Close the descriptor a future that nobody awaits any more made, if it made one."""
    if not made.cancelled() and made.exception() is None and made.result() is not None:
        os.close(made.result())


class MicroVM(Backend):
    """QEMU microVMs: a guest kernel of the sandbox's own, under KVM where it works, else TCG."""

    name = "microvm"
    title = "microVM"
    provisioner_class = "MicroVMProvisioner"
    changed_defaults = MappingProxyType({"startup_timeout": 120.0})
    """A VM boots (when no snapshot of its shape exists yet) in 15-30 s under TCG."""
    settings = (
        Setting(
            name="qemu_path", kind="text", default="qemu-system-x86_64",
            help="The QEMU binary (a name on PATH, or a path).",
            parse=text_value, who=frozenset({OPERATOR, KERNELSPEC}),
            enforced="backends/microvm.py",
        ),
        Setting(
            name="accel", kind="choice", default="auto",
            help="auto: KVM where a probe guest boots under it (once per host boot), else "
            "TCG. `jupyter sandbox doctor` says which and why.",
            parse=one_of("auto", "kvm", "tcg"), who=frozenset({OPERATOR, KERNELSPEC}),
            enforced="accel.py (the probe), backends/microvm.py", choices=("auto", "kvm", "tcg"),
        ),
        Setting(
            name="snapshots", kind="flag", default=True,
            help="Start VMs without a network device from a snapshot of their shape (made by "
            "the first VM of each shape) instead of booting them: seconds instead of ~20 under "
            "TCG. See backends/microvm_snapshot.py for what restored VMs share.",
            parse=flag, who=frozenset({OPERATOR, KERNELSPEC}),
            enforced="backends/microvm_snapshot.py",
        ),
    )  # fmt: skip

    async def create(self, spec: SandboxSpec, settings: Mapping[str, Any],
                     log: logging.Logger) -> Sandbox:  # fmt: skip
        if Path(settings["image"]).is_absolute():
            raise SandboxError(
                "microVM kernels need a built image name (image = 'python3'), not a rootfs path"
            )
        hint = "run `make setup` or `apt-get install qemu-system-x86`, and `jupyter sandbox doctor`"
        qemu = find_binary(settings["qemu_path"], "qemu_path", hint)
        boot = find_boot_files(settings["image"])
        chosen = await in_thread(choose, qemu, boot.kernel, settings["accel"])
        return MicroVMSandbox(self, spec, log, qemu, boot, chosen, settings["snapshots"])

    def remove_runtime(self, record: Record, log: logging.Logger) -> None:
        """Stop the VM's QEMU if it still runs (not a later process with its pid)."""
        pid = record.pid
        if record.process_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while process_start_time(pid) == record.pid_start and time.monotonic() < deadline:
                time.sleep(0.02)  # it leaves its cgroup once its parent (or init) reaps it

    def checks(self, settings: Mapping[str, Any], image: str) -> list[Check]:
        """QEMU, the tap devices, the boot files, and which accelerator VMs get (probed
        once per host boot), and the saved snapshots."""
        try:
            qemu = find_binary(settings["qemu_path"], "qemu_path", INSTALL)
        except SandboxError:
            return [Check("microVM: qemu", False, f"{settings['qemu_path']!r} not found",
                          INSTALL)]  # fmt: skip
        checks = [Check("microVM: qemu", True, qemu), check_tun()]
        try:
            boot = find_boot_files(image)
        except ImageError as e:
            return [*checks, Check("microVM: boot files", False, str(e), "run `make setup`")]
        checks.append(Check("microVM: boot files", True, f"{boot.kernel.parent}"))
        chosen = choose(qemu, boot.kernel)
        checks.append(Check("microVM: accelerator", True,
                            f"{chosen.name.upper()}: {chosen.reason}"))  # fmt: skip
        saved = sorted(microvm_snapshot.snapshot_dir(boot).glob("*.vmstate"))
        size = sum(p.stat().st_size for p in saved) >> 20
        checks.append(Check("microVM: snapshots", True,
                            f"{len(saved)} VM shapes saved ({size} MiB) in "
                            f"{microvm_snapshot.snapshot_dir(boot)}; the first VM of a shape "
                            "makes it"))  # fmt: skip
        return checks


_TUNGETFEATURES = 0x800454CF


def check_tun() -> Check:
    """A microVM with a network gets a tap device that this process, as root, attaches to
    for QEMU (`network.tap.open_tap`): /dev/net/tun must be a working tun driver that it can
    open and that can make taps as attached. Its mode does not matter (QEMU never opens it)."""
    name, tun = "microVM: tap devices", network_tap.TUN_DEVICE
    needed = "(needed for network = 'egress' or 'open')"
    try:
        fd = os.open(tun, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Check(name, False, f"{tun} does not exist {needed}",
                     "modprobe tun (or run the server where /dev/net/tun exists)")  # fmt: skip
    except OSError as e:
        return Check(name, False, f"cannot open {tun}: {e} {needed}",
                     "run the Jupyter server (or the sandbox service) as root")  # fmt: skip
    try:
        features = struct.unpack("I", fcntl.ioctl(fd, _TUNGETFEATURES, bytes(4)))[0]
    except OSError as e:
        return Check(name, False, f"{tun} is no tun driver: {e} {needed}", "modprobe tun")
    finally:
        os.close(fd)
    if features & network_tap.TAP_FLAGS != network_tap.TAP_FLAGS:
        return Check(name, False, f"{tun} cannot make taps with virtio-net headers "
                     f"(features {features:#x}) {needed}", "a Linux kernel with tun")  # fmt: skip
    return Check(name, True, f"{tun} opens as uid {os.geteuid()}; QEMU gets an attached tap")


MICROVM = MicroVM()
