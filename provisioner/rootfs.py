"""Each sandbox's own root: an overlay of the read-only image, and a tmpfs for its writes.

The tmpfs (`layer`) is `disk_limit` bytes. gVisor keeps the sandbox's writable
layer in a file there (`--overlay2=root:dir=`), so a kernel that fills its disk
gets ENOSPC, and everything goes away with the sandbox. The host overlay gives
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
from .idmap import IdMap, attach, mapped_tree

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
    options = f"lowerdir={image},upperdir={upper},workdir={work}"
    _mount(["-t", "overlay", "overlay", "-o", options, str(root)], f"a root over {image}")
    return root


def bind(fd: int, bundle: Path) -> Path:
    """Bind the folder open at `fd` to `bundle`/workspace and return that path.

    runsc then mounts it from there, where only root can change what the path
    names; the caller's own path could meanwhile be swapped for a link.
    """
    target = bundle / "workspace"
    target.mkdir(mode=0o700)
    _mount(["--bind", f"/proc/{os.getpid()}/fd/{fd}", str(target)], "the workspace")
    return target


def bind_mapped(folder: int | Path, bundle: Path, idmap: IdMap) -> Path:
    """Like `bind`, for a folder (a descriptor or a path) shown through `idmap`."""
    target = bundle / "workspace"
    target.mkdir(mode=0o700)
    tree = mapped_tree(folder, idmap)
    try:
        attach(tree, target)
    finally:
        os.close(tree)
    return target


def _unmount(path: Path) -> None:
    if path.exists() and _mounted(path):
        quietly(["umount", path], logger, gone=("target is busy",))
        if _mounted(path):  # still busy: detach now, the kernel frees it when the last user goes
            quietly(["umount", "--lazy", path], logger)


def remove_bundle(bundle: Path) -> None:
    """Unmount and delete a sandbox's folder, never descending into a mounted root or layer."""
    for mounted in (bundle / "rootfs", layer(bundle), bundle / "workspace"):
        _unmount(mounted)
        if mounted.exists() and _mounted(mounted):
            raise OSError(f"{mounted} is still mounted; not removing {bundle}")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(bundle)
