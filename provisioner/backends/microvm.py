"""The microVM backend: one QEMU `-M microvm` per kernel, with its own guest kernel.

The VM boots the image's boot files (`microvm_image`): the image as a read-only
disk under a tmpfs layer of `disk_limit`, the agent's folder and the workspace
over virtio-9p, and the tunnel's channel on two virtio-serial ports (one per
direction, so that the host's ends behave like the gVisor backend's pipes).

QEMU runs with the least the host allows: as the workspace's owner (not root:
the 9p share then creates files as that user, and a guest that took root inside
the VM can do no more on the host than that user), with QEMU's seccomp sandbox
on, no network device unless the kernel's network mode asks for one, and in a
cgroup of its own that holds the VM's memory, CPU quota and the host tasks.

With a network mode other than none, the sandbox gets the same namespace,
link, firewall and DNS responder as a gVisor one (`network.py`); QEMU runs
inside that namespace and its virtio-net device is backed by a tap device
there, bridged with the namespace's end of the link, and the guest's init
takes the sandbox's address, gateway and resolver from the kernel command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import time

from .. import cgroups, network
from ..accel import Accel
from ..microvm_image import BootFiles
from ..state import Record, process_start_time
from .base import Channel, Sandbox, SandboxError, SandboxSpec, forget, kernel_user

PORT = "org.jupyter.sandbox"
"""Names of the channel's virtio-serial ports: PORT.in (to the guest), PORT.out."""
TB_CACHE_MIB = 256
"""TCG's translated-code cache; QEMU's default (1 GiB) would be charged to every VM."""
QEMU_OVERHEAD = (TB_CACHE_MIB + 192) << 20
"""Host memory a VM needs beyond its RAM: QEMU itself and TCG's cache."""
HOST_TASKS = 64
"""QEMU's own threads (vCPUs, I/O workers): the guest's processes are not host tasks."""
POWER_OFF_GRACE = 3.0
"""Seconds a VM whose channel closed gets to power itself off before it is killed."""
MSIZE = 524288


def find_qemu(path: str) -> str:
    found = shutil.which(path)
    if found is None:
        raise SandboxError(
            f"QEMU not found (qemu_path = {path!r}); run `make setup` or "
            "`apt-get install qemu-system-x86`, and `jupyter sandbox doctor`"
        )
    return found


def guest_mac(sandbox_id: str) -> str:
    """A locally administered MAC of QEMU's range, the same for the same sandbox."""
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def qemu_argv(spec: SandboxSpec, qemu: str, boot: BootFiles, accel: Accel,
              channel_fds: tuple[int, int],
              net: network.SandboxNetwork | None = None) -> list[str]:  # fmt: skip
    """QEMU's command line for one sandbox; with `net`, a virtio-net device on its tap."""
    limits = spec.limits
    memory_mib = (limits.memory or 2 << 30) >> 20
    cpus = max(1, math.ceil(limits.cpu or 1))
    command_line = [
        "console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests",
        # under TCG the TSC calibration hangs at random without these (HOST-NOTES.md)
        "tsc_early_khz=2000000", "tsc=reliable",
        f"jsb.tmp={limits.disk}",
        f"jsb.kernel={kernel_user(spec)}",
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
        "-device", "virtio-serial-device,max_ports=3",
        "-chardev", f"socket,id=in,fd={channel_fds[0]}",
        "-device", f"virtserialport,chardev=in,name={PORT}.in",
        "-chardev", f"socket,id=out,fd={channel_fds[1]}",
        "-device", f"virtserialport,chardev=out,name={PORT}.out",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]  # fmt: skip
    for mount in spec.mounts:  # the workspace, at the same path
        argv += [
            # QEMU opens it as the sandbox's owner (the caller): its own permissions apply
            "-fsdev", "local,id=workspace,path=" + str(mount.source).replace(",", ",,")
            + ",security_model=passthrough"
            + (",readonly=on" if mount.read_only else ""),
            "-device", "virtio-9p-device,fsdev=workspace,mount_tag=workspace",
        ]  # fmt: skip
        command_line += [f"jsb.ws={mount.destination}", f"jsb.ws_ro={int(mount.read_only)}"]
    if net is not None:
        # The tap exists already (network.py), owned by QEMU's user: no script, no helper.
        argv += [
            "-netdev", f"tap,id=net0,ifname={network.TAP_IF},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=net0,mac={guest_mac(spec.sandbox_id)}",
        ]  # fmt: skip
        command_line += net.kernel_arguments()
    return [*argv, "-append", " ".join(command_line)]


class MicroVMSandbox(Sandbox):
    backend = "microvm"

    def __init__(self, spec: SandboxSpec, log: logging.Logger, qemu: str, boot: BootFiles,
                 accel: Accel) -> None:  # fmt: skip
        super().__init__(spec, log)
        self.qemu = qemu
        self.boot = boot
        self.accel = accel
        self.network: network.SandboxNetwork | None = None

    async def start(self) -> Channel:
        if " " in "".join(m.destination for m in self.spec.mounts):
            raise SandboxError("a microVM workspace path may not contain spaces")
        self.record.save()
        uid, gid = self.spec.owner
        prefix: list[str] = []
        if self.spec.network.mode != "none":
            self.network = network.SandboxNetwork(
                self.spec.network, self.record, self.log, tap_owner=(uid, gid)
            )
            await self.network.open()  # removes what it made if it fails
            # nsenter, not `ip netns exec` (which remounts /sys); it execs what follows.
            nsenter = shutil.which("nsenter") or "nsenter"
            prefix = [nsenter, f"--net={self.network.netns_path}", "--"]
        limits = self.spec.limits
        memory = None if limits.memory is None else limits.memory + QEMU_OVERHEAD
        procs = await asyncio.to_thread(
            cgroups.create, self.record.cgroup, memory, limits.cpu, HOST_TASKS
        )
        to_guest, qemu_in = socket.socketpair()
        from_guest, qemu_out = socket.socketpair()
        console_r, console_w = os.pipe2(os.O_CLOEXEC)
        # The shell joins QEMU's cgroups before anything of QEMU runs, then becomes
        # QEMU (as the workspace's owner, without capabilities) through setpriv.
        join = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done'
        argv = [
            "/bin/sh", "-c", f'{join}; shift; exec "$@"', "sh", *map(str, procs), "--",
            *prefix, "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=-all", "--no-new-privs",
            *qemu_argv(self.spec, self.qemu, self.boot, self.accel,
                       (qemu_in.fileno(), qemu_out.fileno()), self.network),
        ]  # fmt: skip
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console_w,
                stderr=console_w,
                pass_fds=(qemu_in.fileno(), qemu_out.fileno()),
                start_new_session=True,
            )
        except OSError:
            for end in (to_guest, from_guest):
                end.close()
            os.close(console_r)
            raise
        finally:
            qemu_in.close()
            qemu_out.close()
            os.close(console_w)
        self.record.pid = self.process.pid
        self.record.pid_start = process_start_time(self.process.pid)
        self.record.save()
        return Channel(
            read_fd=from_guest.detach(), write_fd=to_guest.detach(), console_fd=console_r
        )

    async def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    async def destroy(self) -> None:
        process = self.process
        if process is not None:
            # The agent powers the VM off once its channel closes: give it a moment.
            for _ in range(int(POWER_OFF_GRACE / 0.05)):
                if process.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self.network is not None:
            self.network.close()
        await asyncio.to_thread(reap, self.record, self.log)


def reap(record: Record, log: logging.Logger) -> None:
    """Stop a microVM sandbox's QEMU if it still runs, and remove what it had on the host
    (its network too, whoever made it)."""
    pid = record.pid
    if record.process_alive():  # not a later process's pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_start_time(pid) == record.pid_start and time.monotonic() < deadline:
            time.sleep(0.02)  # it leaves its cgroup once its parent (or init) reaps it
    network.remove(record, log)  # never raises; the tap and bridge go with the namespace
    forget(record, log)
