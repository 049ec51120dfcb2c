"""Idmapped workspace mounts: the workspace's owner's files, shown as the kernel's own.

A kernel never runs as root in its sandbox, yet a root Jupyter server's notebook
folder is often root's (a server in a container, `jupyter lab --allow-root`), and
an operator may pin `kernel_uid` to someone other than a folder's owner. The
sandbox then gets the folder through an idmapped mount (Linux 5.12+,
`mount_setattr(MOUNT_ATTR_IDMAP)`): on that mount the owner's files carry the
kernel's uid and gid, and what the kernel creates lands on the host as the
owner's. Nothing on disk is chowned, no other mount of the folder changes, and
files of anyone else show up as the overflow id (nobody), as in a user namespace.

The mount is made by the privileged side (the backend as root, or the sandbox
service) from a descriptor of the folder, so what is mapped is what was checked.
It is `nosuid,nodev`; a kernel that could write set-id bits onto root's files
would still hand root to anyone who may run them from the host, and each
backend refuses those bits (gVisor: a seccomp filter; microVM: QEMU's
mapped-xattr model keeps the guest's modes out of the host's).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # x86_64
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_IDMAP = 0x100000
UNUSED_ID = 4294967294
"""Where host root's id goes in a map whose id 0 is taken by the folder's owner: the
highest valid id, which no account holds (65534 is `nobody`'s, a real user's)."""
NAMESPACE_TIMEOUT = 5.0


class _MountAttr(ctypes.Structure):
    _fields_ = [  # struct mount_attr (linux/mount.h)
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


@dataclass(frozen=True)
class IdMap:
    """Show files of host `owner` (uid, gid) as the kernel's `kernel` (uid, gid)."""

    owner: tuple[int, int]
    kernel: tuple[int, int]

    def lines(self, which: int) -> str:
        """The uid_map (which=0) or gid_map (1) of the mount's user namespace.

        Besides owner -> kernel, host root keeps an id of its own: gVisor's file
        server creates a file as root before it gives it the kernel's ids, and a
        mount refuses to create files for an id it cannot map (EOVERFLOW).
        """
        inside, outside = self.owner[which], self.kernel[which]
        entries = [(inside, outside)]
        if outside != 0:
            root_inside = 0 if inside != 0 else UNUSED_ID
            entries.append((root_inside, 0))
        return "".join(f"{a} {b} 1\n" for a, b in entries)


def user_namespace(idmap: IdMap) -> int:
    """A descriptor of a new user namespace that holds `idmap` (no process stays in it)."""
    holder = subprocess.Popen(
        ["unshare", "--user", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ours = Path("/proc/self/ns/user").stat().st_ino
        deadline = time.monotonic() + NAMESPACE_TIMEOUT
        while Path(f"/proc/{holder.pid}/ns/user").stat().st_ino == ours:
            if holder.poll() is not None or time.monotonic() > deadline:
                raise OSError("unshare --user did not make a user namespace")
            time.sleep(0.001)
        for which, name in enumerate(("uid_map", "gid_map")):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(idmap.lines(which))
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        with contextlib.suppress(OSError):
            holder.stdin.close()  # type: ignore[union-attr]
        holder.kill()
        holder.wait()


def detached_tree(folder: int | Path, idmap: IdMap | None, read_only: bool = False) -> int:
    """A detached, nosuid and nodev copy of the mount of `folder` (a descriptor or a path,
    links not followed at its last name), idmapped by `idmap` if given: a descriptor that
    keeps it alive. `read_only`: the copy is read-only itself, whatever the sandbox's
    runtime does with the read-only flag it is given (gVisor's directfs: see `rootfs.bind`).

    Attach it (`attach`, `attach_at`) or hand it to a process; close it once the sandbox
    holds the folder: the mount goes with its last user.
    """
    if isinstance(folder, int):
        dirfd, name, flags = folder, b"", _AT_EMPTY_PATH
    else:
        dirfd, name, flags = _AT_FDCWD, os.fsencode(folder), 0x100  # AT_SYMLINK_NOFOLLOW
    namespace = None if idmap is None else user_namespace(idmap)
    try:
        tree = _syscall(_SYS_OPEN_TREE, dirfd, name, flags | _OPEN_TREE_CLONE | os.O_CLOEXEC)
        try:
            attrs = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
            if read_only:
                attrs |= _MOUNT_ATTR_RDONLY
            if namespace is not None:
                attrs |= _MOUNT_ATTR_IDMAP
            attr = _MountAttr(attrs, 0, 0, namespace or 0)
            _syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                     ctypes.sizeof(attr))  # fmt: skip
        except OSError as e:
            os.close(tree)
            if idmap is None:
                raise
            raise OSError(
                e.errno,
                f"cannot show the workspace (owner uid {idmap.owner[0]}) to a kernel of uid "
                f"{idmap.kernel[0]} through an idmapped mount: {e.strerror} (its file system "
                "may not support idmapped mounts); give the folder to the kernel's user, or "
                "set workspace = 'none'",
            ) from None
        return tree
    finally:
        if namespace is not None:
            os.close(namespace)


def attach(tree: int, target: Path) -> None:
    """Mount the detached tree `tree` (from `detached_tree`) on the folder `target`."""
    attach_at(tree, _AT_FDCWD, target)


def attach_at(tree: int, dirfd: int, target: Path | str) -> None:
    """Mount the detached tree `tree` on `target`, relative to the folder `dirfd`: in the
    mount namespace the calling thread is in (which must hold `dirfd`'s mount)."""
    _syscall(_SYS_MOVE_MOUNT, tree, b"", dirfd, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH)
