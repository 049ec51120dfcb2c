"""Snapshots of a booted microVM: how a VM starts in seconds instead of twenty.

Under TCG most of a microVM's start is the guest booting and Python importing
ipykernel (docs/host-notes.md). Every VM of one shape does that alike up to
where its PID 1 waits for the sandbox's own settings (guest/microvm/pid1.py), with
the warm kernel process already imported (guest/warm_kernel.py). So the first VM
of a shape is booted to that point and saved with QEMU's migration to a file
(`build`), and every later VM of that shape starts from the file (`-incoming fd:`)
and goes on from there.

The shape is what QEMU's saved state or the guest's memory holds: the boot files,
the agent, QEMU and its accelerator, memory, vCPUs, the writable layer's size and
whether a workspace device is there. Only VMs without a network device are made
this way (a restored guest would keep its snapshot's link); the others boot.
Restored VMs share, by construction, their snapshot's memory layout (guest kernel
and Python), Python's hash seed and the boot id: each VM is still its own, what
its code could learn of them is about its own VM only. The guest kernel's random
pool is reseeded from the host's entropy before anything runs (pid1.py), and
Python's `random` module in the kernel (warm_kernel.py).

Snapshot files are root's (QEMU, running as the kernel's user, gets an open
descriptor) under `<image>/microvm/snapshots/`, written whole (fsync, rename);
at most MAX_SNAPSHOTS, the least recently used go first, for the shapes are the
users' to choose. One build runs at a time on the host (a start that finds
another shape's build under way boots instead of waiting), in the cgroup of the
sandbox that asked for it, as a user of its own (BUILDER: no kernel's QEMU runs
as it, so none can reach into the VM being saved), with QEMU's seccomp sandbox
on; it is killed on any failure, and the caller then boots the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import platform
import pwd
import select
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import SandboxError
from ..images.boot import SNAPSHOT_BUILDER, BootFiles

MAX_SNAPSHOTS = 8
BUILDER = SNAPSHOT_BUILDER
"""The user builds run as, made by `jupyter sandbox image build`."""
BUILD_TIMEOUT = 300.0
"""Seconds for a snapshot's VM to boot and warm up (about 20 under TCG)."""
MIGRATE_TIMEOUT = 60.0
READY = b"ready\n"
DONE = ("completed", "failed", "cancelled")
"""query-migrate's last states."""
_locks: dict[str, asyncio.Lock] = {}
_failed: set[str] = set()
"""Shapes whose build failed in this process: their VMs boot, without trying again."""


def _forget_parents_locks() -> None:
    """After fork, in the child: the parent's locks belong to its I/O loop (and may be
    held by a build that goes on there, not here)."""
    _locks.clear()


os.register_at_fork(after_in_child=_forget_parents_locks)


class Busy(Exception):
    """Another shape's snapshot is being made on this host."""


def builder() -> tuple[int, int]:
    """Uid and gid of BUILDER."""
    try:
        entry = pwd.getpwnam(BUILDER)
    except KeyError:
        raise SandboxError(f"no user {BUILDER}: run `jupyter sandbox image build`") from None
    return entry.pw_uid, entry.pw_gid


def agent_digest(agent_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(agent_dir.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def shape_key(argv: list[str], boot: BootFiles, agent_dir: Path, accel: str) -> str:
    """Names a snapshot: any change to what is in it makes another name. `argv` is the
    VM's QEMU command line, the same for every VM of the shape (`backends.microvm`)."""
    binary = Path(argv[0]).resolve()
    files = [binary, boot.kernel, boot.initramfs, boot.root_disk]
    fields = {
        "argv": argv,
        "files": [[str(f), *_identity(f)] for f in files],
        "boot": (boot.kernel.parent / "boot.json").read_text(),
        "agent": agent_digest(agent_dir),
        # a KVM guest's CPU is the host's own (-cpu host): a VM saved on one restores
        # only on the same CPU and host kernel
        "host": [platform.release(), _cpu()] if accel == "kvm" else [],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _cpu() -> str:
    """The host CPU's model and flags, as /proc/cpuinfo gives them for the first CPU."""
    with open("/proc/cpuinfo") as cpuinfo:
        wanted = ("model name", "flags", "microcode")
        return "\n".join(line.strip() for line in itertools.takewhile(str.strip, cpuinfo)
                         if line.startswith(wanted))  # fmt: skip


def snapshot_dir(boot: BootFiles) -> Path:
    return boot.kernel.parent / "snapshots"


def open_snapshot(boot: BootFiles, key: str) -> int | None:
    """A read-only descriptor of the snapshot `key`, if there is one (and mark it used)."""
    path = snapshot_dir(boot) / f"{key}.vmstate"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # for MAX_SNAPSHOTS: least recently used first
    return fd


async def ensure(boot: BootFiles, key: str, start: Callable[..., subprocess.Popen],
                 log: logging.Logger) -> int | None:  # fmt: skip
    """A descriptor of the snapshot `key`, built first if missing; None if it cannot be.

    `start(ports, extra_argv, pass_fds, console)` starts the shape's VM as `build`
    needs it: its three ports on `ports`, QMP in `extra_argv`, as BUILDER.
    """
    fd = open_snapshot(boot, key)
    if fd is not None or key in _failed:
        return fd
    async with _locks.setdefault(key, asyncio.Lock()):  # one build per key in this process
        stop = threading.Event()
        building = asyncio.ensure_future(asyncio.to_thread(build, boot, key, start, log, stop))
        try:
            await asyncio.shield(building)
        except asyncio.CancelledError:  # the start was given up: so is the build, at once
            stop.set()
            with contextlib.suppress(Exception):
                await building
            raise
        except Busy as e:
            log.info("the snapshot of another VM shape is being made (%s); booting this VM", e)
            return None
        except Exception as e:  # e.g. a guest that is not ready in time: it boots instead
            _failed.add(key)
            log.warning("no snapshot for this VM shape (%s); booting its VMs instead", e)
            return None
    return open_snapshot(boot, key)


def build(boot: BootFiles, key: str, start: Callable[..., subprocess.Popen],
          log: logging.Logger, stop: threading.Event) -> None:  # fmt: skip
    """Boot a VM of the shape to pid1's "ready" and save it as the snapshot `key`;
    given up (and its VM killed) once `stop` is set. Busy if another shape's build
    holds the host's lock; a build of the same shape elsewhere is waited for."""
    folder = snapshot_dir(boot)
    folder.mkdir(mode=0o700, exist_ok=True)
    with open(folder / ".lock", "a+") as lock:  # says which shape is being built
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.seek(0)
                if lock.read(64) != key:
                    raise Busy(key) from None
                if stop.wait(0.2):
                    raise SandboxError("the snapshot's build was given up") from None
        if (folder / f"{key}.vmstate").exists():
            return
        lock.truncate(0)
        lock.write(key)
        lock.flush()
        for stale in folder.glob(".*.tmp"):  # of a builder killed mid-way: none runs now
            stale.unlink(missing_ok=True)
        began = time.monotonic()
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        try:
            _save(tmp, start, stop)
            tmp.replace(folder / f"{key}.vmstate")
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)  # the rename too, before any VM starts from it
            finally:
                os.close(dir_fd)
        finally:
            tmp.unlink(missing_ok=True)
            lock.truncate(0)
    size = (folder / f"{key}.vmstate").stat().st_size
    log.info("made the snapshot of a VM shape in %.1f s (%s, %d MiB)",
             time.monotonic() - began, key, size >> 20)  # fmt: skip
    _evict(folder)


def forget(boot: BootFiles, key: str, log: logging.Logger) -> None:
    """Remove the snapshot `key` (a VM failed to start from it): the next VM of its
    shape makes it again."""
    with contextlib.suppress(FileNotFoundError):
        (snapshot_dir(boot) / f"{key}.vmstate").unlink()
        log.warning("removed the snapshot %s: a VM did not start from it", key)


def _save(path: Path, start: Callable[..., subprocess.Popen], stop: threading.Event) -> None:
    # Every port's host end stays open until QEMU quits: the ports' state is saved too.
    qmp, qmp_theirs = socket.socketpair()
    config, config_theirs = socket.socketpair()
    ends = [qmp, qmp_theirs, config, config_theirs, *socket.socketpair(), *socket.socketpair()]
    ports = (ends[5].fileno(), ends[7].fileno(), config_theirs.fileno())
    console = tempfile.TemporaryFile()  # noqa: SIM115  (closed in finally, with the rest)
    process: subprocess.Popen | None = None
    try:
        extra = ["-chardev", f"socket,id=qmp,fd={qmp_theirs.fileno()}",
                 "-mon", "chardev=qmp,mode=control"]  # fmt: skip
        process = start(ports, extra, (qmp_theirs.fileno(),), console)
        deadline = time.monotonic() + BUILD_TIMEOUT
        _wait_ready(config, process, deadline, stop)
        monitor = _Monitor(qmp, time.monotonic() + MIGRATE_TIMEOUT)
        monitor.call("qmp_capabilities")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            getfd = {"execute": "getfd", "arguments": {"fdname": "out"}}
            socket.send_fds(qmp, [json.dumps(getfd).encode() + b"\n"], [fd])
            monitor.reply()
            monitor.call("migrate", uri="fd:out")
            saved_by = time.monotonic() + MIGRATE_TIMEOUT
            while (status := monitor.call("query-migrate").get("status")) not in DONE:
                if stop.is_set() or time.monotonic() > saved_by:
                    raise SandboxError(f"the VM was not saved in {MIGRATE_TIMEOUT:g} s")
                time.sleep(0.05)
            if status != "completed":
                raise SandboxError(f"QEMU could not save the VM: {monitor.call('query-migrate')}")
            os.fsync(fd)
        finally:
            os.close(fd)
        monitor.call("quit")
        process.wait(timeout=10)
    except BaseException as e:
        if process is not None:
            process.kill()
            process.wait()
            console.seek(0)
            tail = console.read()[-2000:].decode(errors="replace").strip()
            if tail and isinstance(e, (OSError, SandboxError, ValueError)):
                raise SandboxError(f"{e}; its console ended with: {tail}") from e
        raise
    finally:
        for end in ends:
            end.close()
        console.close()


def _wait_ready(config: socket.socket, process: subprocess.Popen, deadline: float,
                stop: threading.Event) -> None:  # fmt: skip
    """Until pid1 says "ready" (its warm kernel process imported), not "ready cold"."""
    data = b""
    while not data.endswith(b"\n"):
        if stop.is_set():
            raise SandboxError("the snapshot's build was given up")
        left = deadline - time.monotonic()
        if left <= 0:
            raise SandboxError(f"the VM was not ready in {BUILD_TIMEOUT:g} s")
        if process.poll() is not None:
            raise SandboxError(f"QEMU ended with status {process.returncode} while booting")
        if select.select([config], [], [], min(left, 0.5))[0]:
            chunk = config.recv(64)
            data += chunk
            if not chunk or len(data) > 64:
                raise SandboxError(f"the VM said {data!r} on its config port")
    if data != READY:
        said = data.decode(errors="replace").strip()
        raise SandboxError(f"the VM said {said!r}, not {READY.strip()!r}: not worth saving")


class _Monitor:
    """Just enough of QMP: one command at a time, events skipped."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        self.file = sock.makefile("rb")
        self.sock = sock
        self.read()  # the greeting

    def read(self) -> dict:
        line = self.file.readline(1 << 20)
        if not line:
            raise SandboxError("QEMU's monitor closed")
        return json.loads(line)

    def reply(self) -> dict:
        while True:
            message = self.read()
            if "error" in message:
                raise SandboxError(f"QEMU: {message['error'].get('desc', message)}")
            if "return" in message:
                return message["return"]

    def call(self, command: str, **arguments: object) -> dict:
        message = {"execute": command, "arguments": arguments}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        return self.reply()


def _evict(folder: Path) -> None:
    snapshots = sorted(folder.glob("*.vmstate"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in snapshots[MAX_SNAPSHOTS:]:
        old.unlink(missing_ok=True)
