"""Each sandbox's own view of the guest image: a host overlay mount over it.

runsc creates missing mount points (a workspace's path) in the root folder it is
given, on the host, before the sandbox's own memory layer exists. Giving it a
per-sandbox overlay keeps those folders, and anything else, out of the shared
image: the image stays read-only and one tenant's paths never show in another's.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def mount(image: Path, bundle: Path) -> Path:
    """Mount `bundle`/rootfs as an overlay of `image` with a throwaway upper layer."""
    root, upper, work = bundle / "rootfs", bundle / "upper", bundle / "work"
    for folder in (root, upper, work):
        folder.mkdir(mode=0o700, exist_ok=True)
    upper.chmod(image.stat().st_mode & 0o7777)  # the merged root takes the upper's mode
    options = f"lowerdir={image},upperdir={upper},workdir={work}"
    result = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise OSError(f"cannot mount the sandbox's root over {image}: {result.stderr.strip()}")
    return root


def unmount(bundle: Path) -> None:
    """Undo `mount`, if it is mounted; safe to call at any point of a failed start."""
    root = bundle / "rootfs"
    if root.exists() and _mounted(root):
        subprocess.run(["umount", str(root)], capture_output=True, check=False)
        if _mounted(root):  # still busy: detach now, the kernel frees it when the last user goes
            subprocess.run(["umount", "--lazy", str(root)], capture_output=True, check=False)


def remove_bundle(bundle: Path) -> None:
    """Unmount and delete a sandbox's folder, never descending into a mounted root."""
    unmount(bundle)
    root = bundle / "rootfs"
    if root.exists() and _mounted(root):
        raise OSError(f"{root} is still mounted; not removing {bundle}")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(bundle)
