"""Giving a started gVisor sandbox to its kernel: the kernel's user and folders.

Every gVisor sandbox is started before it knows its kernel, so that one made ahead
(a warm pool's, provisioner/pool.py) and one made for a kernel now are the same
sandbox; the claim then gives it its kernel (guest/layout.py `CLAIM_DIR`).

runsc cannot add a folder to a running sandbox: its file server (the gofer) holds the
mounts it was started with in a mount namespace of its own, and the Sentry reaches the
host's files through the gofer's mounts only. So the claim mounts each folder into the
gofer's namespace, under the claim folder the sandbox has had bound since its start:
`open_tree` copies the folder's mount in the host's namespace (detached, nosuid, nodev,
read-only and idmapped as it must be: what the kernel may do with it is decided on the
host), and a thread that joined the gofer's namespace attaches it there (`move_mount`).
The Sentry finds it at its first look-up of that name, which the agent makes only
after the claim; the agent then mounts it where it belongs (`take_claim`).

The kernel's user (`kernel_user`) is written there too, beside the folders' places: it
comes from the host, never from the channel's holder (who writes LAUNCH).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from pathlib import Path

from ..guest.layout import CLAIM_DIR
from ..idmap import attach_at, detached_tree
from .base import SandboxSpec, kernel_user

GOFER_TIMEOUT = 30.0
"""Seconds runsc gets to start the sandbox's gofer (it needs tens of milliseconds)."""
CLONE_FS, CLONE_NEWNS = 0x200, 0x20000
_libc = ctypes.CDLL(None, use_errno=True)


def claim_folder(bundle: Path) -> Path:
    """The host's side of the sandbox's `CLAIM_DIR` (bound read-write, the folder root's:
    the host writes it with O_EXCL|O_NOFOLLOW only; the agent covers it once it read it,
    kernel_init hides it from the kernel and from a warm kernel process)."""
    return bundle / "claim"


def gofer_pid(runsc_pid: int, timeout: float = GOFER_TIMEOUT) -> int:
    """The pid of the gofer of the sandbox whose `runsc run` is `runsc_pid`, once it has
    mounted the claim folder in its namespace. OSError if `runsc run` ended, or its gofer
    did not get that far, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not Path(f"/proc/{runsc_pid}").exists():
            raise OSError(f"runsc (pid {runsc_pid}) ended before its gofer started")
        for child in _children(runsc_pid):
            if _gofer_ready(child):
                return int(child)
        if time.monotonic() > deadline:
            raise OSError(f"the gofer of runsc (pid {runsc_pid}) did not mount {CLAIM_DIR} "
                          f"within {timeout:.0f} s")  # fmt: skip
        time.sleep(0.005)


def _children(pid: int) -> list[str]:
    """The child processes of `pid`, whichever of its threads started them (runsc is a Go
    program: any of its threads may)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    return children


def _gofer_ready(pid: str) -> bool:
    """Whether `pid` is a gofer that has mounted the claim folder (its mount table's paths
    are relative to its root, the sandbox's)."""
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0] != b"runsc-gofer":
            return False
        with open(f"/proc/{pid}/mountinfo") as mounts:
            return any(line.split()[4] == CLAIM_DIR for line in mounts)
    except OSError:
        return False


def _attach_in_namespace(pid: int, trees: list[tuple[int, str]]) -> None:
    """Mount each detached tree at its path (relative to the root of process `pid`) in
    `pid`'s mount namespace. A thread of its own joins that namespace (after unsharing its
    filesystem attributes, which a process's threads otherwise share and which setns
    needs to itself) and ends once done: no other thread of this process changes
    namespace."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_CLOEXEC)
    namespace = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            for call, args, what in (
                (_libc.unshare, (CLONE_FS,), "unshare"),
                (_libc.setns, (namespace, CLONE_NEWNS), "setns"),
            ):
                if call(*args) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"{what}: {os.strerror(errno)}")
            for tree, path in trees:
                attach_at(tree, root, path)
        except BaseException as e:  # re-raised in the caller
            failed.append(e)

    try:
        thread = threading.Thread(target=run, name="sandbox-claim")
        thread.start()
        thread.join()
    finally:
        os.close(root)
        os.close(namespace)
    if failed:
        raise failed[0]


def claim(spec: SandboxSpec, bundle: Path, runsc_pid: int) -> None:
    """Give the running sandbox in `bundle` to `spec`'s kernel: its folders (`spec.mounts`,
    as `spec.owner` may see them) attached in the gofer's namespace, their places and the
    kernel's user written for the agent. Blocking: call it in a thread. OSError if a
    folder cannot be attached (the caller destroys the sandbox)."""
    folder = os.open(
        claim_folder(bundle), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    )
    places = []
    trees: list[tuple[int, str]] = []
    try:
        for index, mount in enumerate(spec.mounts):
            os.mkdir(str(index), mode=0o755, dir_fd=folder)  # EEXIST if the guest made it
            source = mount.source if mount.fd is None else mount.fd
            trees.append((detached_tree(source, mount.idmap(spec.owner), mount.read_only),
                          f"{CLAIM_DIR.lstrip('/')}/{index}"))  # fmt: skip
            places.append({"destination": mount.destination, "read_only": mount.read_only})
        if trees:
            _attach_in_namespace(gofer_pid(runsc_pid), trees)
        for name, text in (("mounts.json", json.dumps(places)), ("kernel", kernel_user(spec))):
            _write_new(folder, name, text)
    finally:
        for tree, _ in trees:
            os.close(tree)
        os.close(folder)


def _write_new(folder: int, name: str, text: str) -> None:
    """Write `name` in the claim folder `folder` as a file of its own, never through a link
    or a file the guest made there (its root may write into the folder): FileExistsError,
    and the claim fails, if the name is taken."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=folder)  # fmt: skip
    with os.fdopen(fd, "w") as f:
        f.write(text)
