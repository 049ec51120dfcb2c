"""Host mounts the double makes under its state folder, and taking them away safely.

Every mount of the double (container roots and their layers, memory-backed
emptyDirs, subPath binds) lies under the state folder, so `unmount_under` finds
them all in /proc/self/mountinfo, after a crash too. `remove_tree` never
descends into a mount: a subPath bind of a claim is a user's data.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from provisioner import hostcmd

log = logging.getLogger(__name__)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_points_under(top: Path) -> list[Path]:
    """Mount points at or below `top`, deepest first."""
    base = str(top).rstrip("/")
    with open("/proc/self/mountinfo") as mounts:
        points = [_unescape(line.split()[4]) for line in mounts]
    found = {Path(p) for p in points if p == base or p.startswith(base + "/")}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(top: Path) -> None:
    """Unmount everything at or below `top`, deepest first; a busy one is detached (it goes
    when its last user does, and its path no longer leads into it). Never raises."""
    for point in mount_points_under(top):
        if not hostcmd.quietly(["umount", point], log, ("not mounted", "no mount point")):
            hostcmd.quietly(["umount", "--lazy", point], log, ("not mounted", "no mount point"))


def remove_tree(top: Path) -> bool:
    """Unmount what is below `top`, then delete it: True if it is gone. Never deletes
    through a mount that stayed (then it logs and returns False)."""
    unmount_under(top)
    if left := mount_points_under(top):
        log.error("not removing %s: %s still mounted", top, ", ".join(map(str, left)))
        return False
    shutil.rmtree(top, ignore_errors=True)
    return not top.exists()


def tmpfs(target: Path, size: int | None, mode: int) -> None:
    """Mount a tmpfs of `size` bytes (None: the kernel's default, half the memory) at
    `target`, with root folder `mode`."""
    options = f"mode={mode:o},nosuid,nodev" + (f",size={size}" if size else "")
    hostcmd.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", target], "emptyDir volume")


def read_only(target: Path) -> None:
    """Make the bind mount at `target` read-only."""
    hostcmd.run(["mount", "-o", "remount,bind,ro", target], "read-only volume")


def bind_read_only(source: Path, target: Path) -> None:
    """Bind the folder or file `source` onto `target` (made here), read-only on the host.

    Read-only for runsc alone is not enough: runsc 20240729 with directfs (its default)
    truncates a file that a container opens with O_TRUNC on a read-only bind, although the
    open itself fails with EROFS. The kubelet mounts a read-only claim read-only on the node
    too; here every read-only volume is.
    """
    if source.is_dir():
        target.mkdir(mode=0o700, parents=True)
    else:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.touch(mode=0o600)
    hostcmd.run(["mount", "--bind", source, target], "read-only volume")
    read_only(target)


def bind_fd(fd: int, target: Path) -> None:
    """Bind what `fd` (an O_PATH descriptor of this process) names onto `target`: the path
    that led to it may change meanwhile, the bind does not follow."""
    hostcmd.run(["mount", "--bind", f"/proc/{os.getpid()}/fd/{fd}", target], "subPath volume")
