"""The kernel's workspace: which host folder a sandbox mounts, and whose the kernel is.

The notebook's folder is mounted at the same path in the sandbox (rw, ro, or
none). Never a system folder, never writable when it holds the server's own
software, and always by an O_PATH descriptor opened without following links,
so that the folder whose owner was read is the one mounted. Its owner decides
the kernel's uid (`kernel_owner`); the sandbox service's callers may mount only
folders they own and always get their own uid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from . import guest
from .backends.base import Mount
from .errors import SandboxError
from .guest.layout import KERNEL_HOME, KERNEL_UID

SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                "/run", "/sbin", "/sys", "/usr", "/var/lib", "/var/run", "/var/log", "/var/cache",
                "/var/spool", "/var/tmp")  # fmt: skip
"""Folders that are never mounted as a kernel's workspace, nor is anything inside them."""
SYSTEM_DIRS = frozenset({"/", "/home", "/mnt", "/media", "/opt", "/srv", "/tmp", "/var"})
"""Folders never mounted themselves (their subfolders may be)."""


def open_folder(path: Path) -> int:
    """An O_PATH descriptor of folder `path`, opened one name at a time without following
    any link, so that what is checked (its owner) is what gets mounted: whoever owns a
    folder on the way could otherwise swap a name for a link meanwhile. OSError if `path`
    is missing, not absolute and normal, not a folder, or has a link in it."""
    if not path.is_absolute() or any(part in (".", "..") for part in path.parts):
        raise OSError(errno.EINVAL, f"not an absolute, normal path: {path}")
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        for name in path.parts[1:]:
            parent, fd = fd, -1
            try:
                fd = os.open(name, flags, dir_fd=parent)
            finally:
                os.close(parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def open_owned_folder(path: Path, uid: int) -> int:
    """`open_folder(path)`, if `uid` owns it; SandboxError if not (callers resolve their
    own links first: the provisioner sends a resolved path)."""
    refused = SandboxError(f"will not mount {path} into a sandbox: it is not a folder you own")
    try:
        fd = open_folder(path)
    except OSError:  # missing, a link, not a folder: the same words whether or not it exists
        raise refused from None
    if os.fstat(fd).st_uid != uid:
        os.close(fd)
        raise refused
    return fd


def server_installation() -> dict[str, Path]:
    """What of this server's own software a kernel must never be able to write: its Python
    environment and this package (a `.pth` file or a changed module runs as the server,
    with its secrets, the next time it starts)."""
    return {"the server's Python environment": Path(sys.prefix).resolve(),
            "the server's Python": Path(sys.base_prefix).resolve(),
            "jupyter-sandbox itself": Path(__file__).resolve().parent,
            "the guest agent": Path(guest.__file__).resolve().parent}  # fmt: skip


def close_mounts(mounts: tuple[Mount, ...]) -> None:
    """Close the descriptors `mount_workspace` opened (once the sandbox holds its folder)."""
    for mount in mounts:
        if mount.fd is not None:
            with contextlib.suppress(OSError):
                os.close(mount.fd)


def mount_workspace(mode: str, cwd: str | None, caller_uid: int | None = None
                    ) -> tuple[str, tuple[Mount, ...]]:  # fmt: skip
    """The kernel's cwd in the guest and its mounts, for workspace `mode` (rw, ro, none) and
    the kernel's working directory `cwd` on the host (default: this process's).

    Each mount carries an O_PATH descriptor of its folder and the owner read from it,
    so that the folder whose owner decides the kernel's ids is the one mounted: the
    caller closes them (`close_mounts`) once the sandbox started or failed to.
    `caller_uid`: the sandbox service's caller, who may mount only a folder it owns.
    """
    if mode == "none":
        return KERNEL_HOME, ()
    confined = caller_uid not in (None, 0)
    path = Path(cwd or Path.cwd())
    if not confined:  # a caller's path is taken as it is, links refused (open_owned_folder)
        path = path.resolve()
    if str(path) in SYSTEM_DIRS or any(path.is_relative_to(tree) for tree in SYSTEM_TREES):
        raise SandboxError(
            f"will not mount {path} into a sandbox: it is a system folder. Start the "
            "kernel from a project folder, or set workspace = 'none'"
        )
    read_only = mode == "ro"
    if not read_only:
        for what, place in server_installation().items():
            if place.is_relative_to(path) or path.is_relative_to(place):
                raise SandboxError(
                    f"will not mount {path} writable into a sandbox: it holds {what} "
                    f"({place}), which a kernel could change to run code as this server."
                    " Start the kernel from a folder of notebooks, or set workspace = 'ro'"
                )
    if confined:
        fd = open_owned_folder(path, caller_uid)  # type: ignore[arg-type]
    else:
        try:
            fd = open_folder(path)
        except OSError:
            raise SandboxError(f"the kernel's working directory {path} does not exist") from None
    found = os.fstat(fd)
    mount = Mount(source=path, destination=str(path), read_only=read_only, fd=fd,
                  owner=(found.st_uid, found.st_gid))  # fmt: skip
    return str(path), (mount,)


def kernel_owner(mounts: tuple[Mount, ...], kernel_uid: int | None) -> tuple[int, int]:
    """Host uid and gid of a root caller's kernel: the workspace's owner's, else KERNEL_UID
    (or `kernel_uid`, the operator's); never 0. The sandbox service gives any other
    caller's kernel its own.

    A kernel never runs as root: a root-owned workspace (or one whose owner is not
    `kernel_uid`) is mounted idmapped, its owner's files shown as the kernel's."""
    uid = gid = KERNEL_UID
    for mount in mounts:
        if mount.owner is not None and mount.owner[0] != 0:
            uid, gid = mount.owner
            gid = gid or uid  # a folder of group root: the kernel still gets a group of its own
    if kernel_uid is not None:
        uid = gid = kernel_uid
    return uid, gid
