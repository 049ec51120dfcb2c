"""Storing a finished tree as an image, and removing an image.

Every image ends here, whatever made its tree (the recipe: build.py; a Binder
folder, an OCI image or a rootfs folder: imports.py): `building` gives a locked
scratch folder beside the image, `store` finishes the tree (set-id bits cleared,
kernelspecs listed, content hashed) and swaps it in with its manifest, so that a
failed build never breaks a working image and leaves nothing behind.
`remove_image` deletes one no sandbox uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..hostcmd import quietly
from ..limits import format_size
from ..state import records
from .kernels import find_kernels
from .store import DEFAULT_IMAGE, image_dir, images_dir, tree_digest


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if mnt == prefix or mnt.startswith(prefix + "/"):
                    found.append(mnt)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path, log: logging.Logger) -> None:
    """Delete a build tree, first detaching anything mounted inside it.

    debootstrap mounts /proc and /sys in its target; a crash can leave them
    behind, and deleting through a mount would destroy host files.
    """
    if not os.path.lexists(path):
        return
    for mnt in mounts_under(path):
        log.warning("unmounting leftover mount %s", mnt)
        quietly(["umount", "--lazy", mnt], log)
    left = mounts_under(path)
    if left:
        log.error("not deleting %s: still mounted: %s", path, ", ".join(left))
        return
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.error("could not delete %s completely", path)


def _swap_in(folder: Path, new_root: Path, manifest: dict[str, Any], tmp: Path) -> None:
    """Replace folder/{rootfs,manifest.json} with the new build, or change nothing.

    The manifest goes first and comes back last: a crash half-way leaves a
    rootfs without a manifest (rejected by find_image, rebuilt next time),
    never a rootfs paired with the wrong manifest. The old tree is moved into
    the build's temp dir, which the caller deletes.
    """
    rootfs, mpath = folder / "rootfs", folder / "manifest.json"
    new_manifest = tmp / "manifest.json"
    with open(new_manifest, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    new_manifest.chmod(0o644)
    undo: list[tuple[Path, Path]] = []  # (where it is now, where it was)
    try:
        if os.path.lexists(mpath):
            mpath.rename(tmp / "old-manifest.json")
            undo.append((tmp / "old-manifest.json", mpath))
        if os.path.lexists(rootfs):
            rootfs.rename(tmp / "old-rootfs")
            undo.append((tmp / "old-rootfs", rootfs))
        new_root.rename(rootfs)
        undo.append((rootfs, new_root))
        new_manifest.rename(mpath)
    except BaseException:
        for now, was in reversed(undo):
            with contextlib.suppress(OSError):
                now.rename(was)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def strip_setid(root: Path) -> None:
    """Clear setuid/setgid bits (su, mount, passwd, ...).

    The kernel runs unprivileged; nothing in a notebook needs these, and without
    them code in the kernel cannot become root inside the sandbox even if the
    runtime forgets no_new_privileges.
    """
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            path = Path(dirpath, f)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                path.chmod(stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def real_dirs(root: Path, rel: str) -> Path:
    """`root`/`rel` as a real directory of `root`, each component too (made 0755 where
    missing). An untrusted tree may hold anything on the way, symlinks to the host's
    folders among them: a symlink or file in the way is removed, never followed, so
    what is written there afterwards stays inside `root`."""
    here = root
    for part in Path(rel).parts:
        here = here / part
        if here.is_symlink() or (os.path.lexists(here) and not here.is_dir()):
            here.unlink()
        if not os.path.lexists(here):
            here.mkdir(mode=0o755)
    return here


def clear_path(root: Path, rel: str) -> Path:
    """`root`/`rel`, made absent, its parents real directories of `root` (`real_dirs`)."""
    target = real_dirs(root, str(Path(rel).parent)) / Path(rel).name
    if target.is_symlink() or (os.path.lexists(target) and not target.is_dir()):
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    return target


@contextlib.contextmanager
def building(name: str, log: logging.Logger) -> Iterator[Path]:
    """A fresh scratch folder inside image `name`'s folder, with the image locked.

    One build per image at a time: a second caller waits, then may find the image
    up to date. Whatever a killed build left is removed first, and the scratch
    folder (with anything mounted in it) in every case when the block ends; so is
    the image's folder itself if no image was ever stored in it.
    """
    folder = image_dir(name)
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in folder.glob(".build-*"):  # left by a killed build
            log.info("removing stale build directory %s", stale)
            remove_tree(stale, log)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
        try:
            yield tmp
        finally:
            remove_tree(tmp, log)
            if not any(os.path.lexists(folder / part) for part in ("manifest.json", "rootfs")):
                shutil.rmtree(folder, ignore_errors=True)  # a first build that failed
    finally:
        os.close(fd)


def store(name: str, tmp: Path, manifest: dict[str, Any], log: logging.Logger,
          max_bytes: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Make `tmp`/rootfs image `name`: clear its set-id bits, list its kernelspecs
    (images/kernels.py), hash it, and swap it in with `manifest` plus those facts.
    Returns the manifest as stored. ImageError if the tree is larger than `max_bytes`
    (a Binder folder's postBuild writes the tree itself: its size is known only now)."""
    root = tmp / "rootfs"
    root.chmod(0o755)
    strip_setid(root)
    kernels = find_kernels(root, log)
    digest, size = tree_digest(root)
    if max_bytes is not None and size > max_bytes:
        raise ImageError(
            f"image {name} is {format_size(size)}B, larger than the limit of "
            f"{format_size(max_bytes)}B (set with --max-size)"
        )
    manifest = {**manifest, "name": name, "kernels": kernels, "content_hash": digest,
                "size_bytes": size}  # fmt: skip
    # A sandbox's root is an overlay over the image's tree: the old tree must not be
    # deleted under it. Checked as late as it can be (kernels do not take the lock).
    _refuse_if_used(name, "rebuilt")
    _swap_in(image_dir(name), root, manifest, tmp)
    log.info("image %s stored: %s (%.0f MB, kernels: %s)", name, image_dir(name) / "rootfs",
             size / 1e6, ", ".join(kernels) or "none")  # fmt: skip
    return manifest


def users_of(name: str) -> list[str]:
    """The kernels whose sandboxes run on image `name` (live or not yet collected)."""
    rootfs = str(image_dir(name) / "rootfs")
    return [r.kernel_id for r in records() if r.image == rootfs]


def remove_image(name: str, log: logging.Logger) -> None:
    """Delete image `name` and everything made from it (microVM files, snapshots).

    ImageError if it does not exist, or while a sandbox uses it: checked again after
    the image is moved out of the way, so a kernel that started in between keeps it.
    """
    if name == DEFAULT_IMAGE:
        raise ImageError(
            f"{DEFAULT_IMAGE} is the default image: every image takes the agent's runtime "
            "from it and Binder folders build on it; rebuild it with "
            "`jupyter sandbox image build --force` instead"
        )
    folder = image_dir(name)
    if not folder.is_dir():
        raise ImageError(
            f"no image {name!r} in {images_dir()}; `jupyter sandbox image ls` lists them"
        )
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        gone = images_dir() / f".removing-{name}-{os.getpid()}"
        _refuse_if_used(name, "removed")
        folder.rename(gone)
        try:
            _refuse_if_used(name, "removed")
        except ImageError:
            gone.rename(folder)
            raise
    finally:
        os.close(fd)
    remove_tree(gone, log)
    log.info("image %s removed", name)


def _refuse_if_used(name: str, what: str) -> None:
    users = users_of(name)
    if users:
        raise ImageError(
            f"image {name!r} is in use by {len(users)} kernel(s) ({', '.join(users[:5])}) "
            f"and cannot be {what}; shut them down first (`jupyter sandbox ps` lists them)"
        )


def collect_leftovers(log: logging.Logger) -> list[str]:
    """Remove what killed builds and removals left in the store, and return it: the
    scratch folders of builds no one is running (an image's lock is free), the folder of
    an image never stored, an image half removed by a process that is gone."""
    try:
        entries = sorted(images_dir().iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if entry.name.startswith(".removing-"):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                remove_tree(entry, log)
                removed.append(str(entry))
            continue
        if entry.is_symlink() or not (entry / ".lock").is_file():
            continue
        try:
            fd = os.open(entry / ".lock", os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:  # not root: the store is not ours to tidy
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a build or removal is running
            for stale in sorted(entry.glob(".build-*")):
                remove_tree(stale, log)
                removed.append(str(stale))
            if not any(os.path.lexists(entry / part) for part in ("manifest.json", "rootfs")):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
        finally:
            os.close(fd)
    if removed:
        log.info("removed what interrupted image builds left: %s", ", ".join(removed))
    return removed
