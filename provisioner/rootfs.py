"""Each sandbox's own root: an overlay of the read-only image, and a tmpfs for its writes.

The tmpfs (`layer`) is `disk_limit` bytes. gVisor keeps the sandbox's writable
layer in a file there (`--overlay2=root:dir=`), so a kernel that fills its disk
gets ENOSPC, and everything goes away with the sandbox. Its /tmp is a folder on
the same tmpfs (`tmp`), so /tmp shares the budget. The host overlay gives
runsc a root of the sandbox's own to make missing mount points in (a
workspace's path): they never reach the shared image or another tenant's view.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from .hostcmd import quietly, run

logger = logging.getLogger(__name__)


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def _mount(argv: list[str], what: str) -> None:
    run(["mount", *argv], f"cannot mount {what}")


def layer(bundle: Path) -> Path:
    """The sandbox's tmpfs of `disk_limit` bytes."""
    return bundle / "layer"


def tmp(bundle: Path) -> Path:
    """The sandbox's /tmp: a folder on its `disk_limit` tmpfs, bound over /tmp.

    Why a mount of its own: runsc mounts a tmpfs of the sandbox's memory over a /tmp
    that is empty when the sandbox starts (runsc/boot/vfs.go `mountTmp`), which only
    `memory_limit` bounds; a kernel could fill it past `disk_limit`. As in a pod
    (docs/kubernetes.md), /tmp starts empty: what an image keeps in /tmp is hidden.
    """
    return layer(bundle) / "tmp"


def mount(image: Path, bundle: Path, disk_limit: int) -> Path:
    """Mount `bundle`/rootfs: `image` under a writable layer of at most `disk_limit` bytes."""
    root, writable = bundle / "rootfs", layer(bundle)
    for folder in (root, writable):
        folder.mkdir(mode=0o700, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={disk_limit},mode=0700", "tmpfs", str(writable)],
           "the sandbox's writable layer")  # fmt: skip
    upper, work = writable / "upper", writable / "work"
    upper.mkdir(mode=image.stat().st_mode & 0o7777)  # the merged root takes the upper's mode
    work.mkdir(mode=0o700)
    tmp(bundle).mkdir()
    tmp(bundle).chmod(0o1777)  # sticky and open to all, as /tmp is (mkdir obeys umask)
    options = f"lowerdir={image},upperdir={upper},workdir={work}"
    _mount(["-t", "overlay", "overlay", "-o", options, str(root)], f"a root over {image}")
    return root


def bind(folder: int | Path, bundle: Path, read_only: bool, name: str = "workspace") -> Path:
    """Bind `folder` (a descriptor or a path) to `bundle`/`name` and return that path.

    runsc then mounts it from there, where only root can change what the path
    names; the caller's own path could meanwhile be swapped for a link. A read-only
    folder is bound read-only: runsc's directfs (its default) opens the host's files
    itself, and runsc 20240729 empties a file opened with O_TRUNC on a bind that is
    read-only in the OCI spec only (while it answers EROFS): the host's own mount
    must refuse it (docs/host-notes.md).
    """
    target = bundle / name
    target.mkdir(mode=0o700)
    source = f"/proc/{os.getpid()}/fd/{folder}" if isinstance(folder, int) else str(folder)
    options = ["-o", "ro"] if read_only else []  # util-linux binds, then remounts read-only
    _mount(["--bind", *options, source, str(target)], f"the sandbox's {name}")
    return target


def _unmount(path: Path) -> None:
    if path.exists() and _mounted(path):
        quietly(["umount", path], logger, gone=("target is busy",))
        if _mounted(path):  # still busy: detach now, the kernel frees it when the last user goes
            quietly(["umount", "--lazy", path], logger)


def remove_bundle(bundle: Path) -> None:
    """Unmount and delete a sandbox's folder, never descending into a mounted root or layer."""
    for mounted in (bundle / "rootfs", layer(bundle), bundle / "workspace", bundle / "agent"):
        _unmount(mounted)
        if mounted.exists() and _mounted(mounted):
            raise OSError(f"{mounted} is still mounted; not removing {bundle}")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(bundle)
