"""Storing a finished tree as an image, and removing an image.

Every image ends here, whatever made its tree (the recipe: build.py; a Binder
folder, an OCI image or a rootfs folder: imports.py): `building` gives a locked
scratch folder beside the image, `store` finishes the tree (checked and made safe by
`check_tree`, kernelspecs listed, content hashed) and swaps it in with its manifest,
so that a failed build never breaks a working image and leaves nothing behind.
`remove_image` deletes one no sandbox uses. Locks live in images_dir()/.locks, never
inside the folders they guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
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
from . import unpack
from .kernels import find_kernels
from .store import DEFAULT_IMAGE, image_dir, images_dir, tree_digest


def remove_tree(path: Path, log: logging.Logger) -> None:
    """Delete a build tree, first detaching anything mounted inside it.

    debootstrap mounts /proc and /sys in its target; a crash can leave them
    behind, and deleting through a mount would destroy host files.
    """
    if not os.path.lexists(path):
        return
    for mnt in unpack.mounts_under(path):
        log.warning("unmounting leftover mount %s", mnt)
        quietly(["umount", "--lazy", mnt], log)
    left = unpack.mounts_under(path)
    if left:
        log.error("not deleting %s: still mounted: %s", path, ", ".join(left))
        return
    with contextlib.suppress(RecursionError):  # shutil.rmtree recurses: a very deep tree
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):  # rm walks any depth, and never crosses into another mount
        quietly(["rm", "-rf", "--one-file-system", "--", path], log)
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


_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID


def check_tree(root: Path, *, max_bytes: int, log: logging.Logger) -> dict[str, int]:
    """Make the untrusted tree `root` safe to store, or refuse it, in one pass; return
    counts (entries, bytes, and what was changed or removed) for the log.

    A Binder folder's postBuild (the image's own code, run as root in a sandbox) writes
    the tree directly, past unpack.py's rules, so they are enforced here on the result:
    setuid/setgid bits are cleared (nothing in a kernel may gain privileges from a
    file); the world-write bit is cleared on everything, sticky directories included
    (the store lives on the host, where any local user could write there; the agent
    makes /tmp, /var/tmp and the kernel's home writable in each sandbox's own layer);
    device nodes, fifos and sockets are removed (the sandbox gives a kernel the devices
    it needs). ImageError for a tree deeper than unpack.MAX_DEPTH, with more than
    unpack.MAX_ENTRIES entries, or larger than `max_bytes` (the larger of its disk use
    and its apparent size, each inode once), checked from metadata before any file is
    read: a sparse file of terabytes is refused without hashing it.

    Everything goes through directory fds, never following a symlink and never building
    a whole path (no PATH_MAX limit), with an explicit stack rather than recursion; an
    unreadable directory is an ImageError, not skipped.
    """
    counts = dict.fromkeys(("entries", "bytes", "setid_cleared", "world_write_cleared",
                            "specials_removed"), 0)  # fmt: skip
    seen: set[tuple[int, int]] = set()
    used = apparent = 0
    # (directory fd, its path for messages, its depth, its names not yet looked at)
    stack: list[tuple[int, str, int, Iterator[str]]] = []

    def enter(dir_fd: int, path: str, depth: int) -> None:
        try:
            names = []
            with os.scandir(dir_fd) as it:
                for entry in it:
                    counts["entries"] += 1
                    if counts["entries"] > unpack.MAX_ENTRIES:
                        raise ImageError(f"image has more than {unpack.MAX_ENTRIES} files, "
                                         "the most allowed")  # fmt: skip
                    names.append(entry.name)
        except BaseException:
            os.close(dir_fd)
            raise
        stack.append((dir_fd, path, depth, iter(names)))

    path = "/"
    try:
        enter(os.open(root, _OPEN_DIR), "", 0)
        while stack:
            dir_fd, parent, depth, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                os.close(dir_fd)
                continue
            path = f"{parent}/{name}"
            if depth >= unpack.MAX_DEPTH:  # `name` is the (depth+1)th part of its path
                raise ImageError(f"image tree deeper than {unpack.MAX_DEPTH} directories "
                                 f"(at {path[:200]}...)")  # fmt: skip
            st = os.lstat(name, dir_fd=dir_fd)
            kind = stat.S_IFMT(st.st_mode)
            if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                os.unlink(name, dir_fd=dir_fd)
                log.debug("removed %s from the image (not a file, folder or symlink)", path)
                counts["specials_removed"] += 1
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                used += st.st_blocks * 512
                apparent += st.st_size
                if max(used, apparent) > max_bytes:
                    raise ImageError(unpack.too_large(max_bytes))
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                continue  # a symlink: its own mode means nothing, and chmod would follow it
            mode = stat.S_IMODE(st.st_mode)
            safe = mode & ~_SETID & ~stat.S_IWOTH
            if safe != mode:
                os.chmod(name, safe, dir_fd=dir_fd, follow_symlinks=False)
                counts["setid_cleared"] += bool(mode & _SETID)
                counts["world_write_cleared"] += bool(mode & stat.S_IWOTH)
            if kind == stat.S_IFDIR:
                enter(os.open(name, _OPEN_DIR, dir_fd=dir_fd), path, depth + 1)
    except OSError as e:
        raise ImageError(f"cannot check the image tree at {path[:200]}: {e}") from e
    finally:
        for dir_fd, _path, _depth, _names in stack:
            os.close(dir_fd)
    counts["bytes"] = max(used, apparent)
    return counts


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


def lock_file(name: str) -> Path:
    """Image `name`'s lock: images_dir()/.locks/<name>.lock, outside the image's folder so
    that removing or renaming the folder never drops a lock someone holds or waits on.
    Lock files are never deleted (one small file per name ever built)."""
    locks = images_dir() / ".locks"
    locks.mkdir(mode=0o755, parents=True, exist_ok=True)
    return locks / f"{image_dir(name).name}.lock"


@contextlib.contextmanager
def image_lock(name: str, *, shared: bool = False) -> Iterator[None]:
    """Hold image `name`'s lock: exclusive to build or remove it, shared to use its tree
    as an input (an import copies the default image's runtime) while no one replaces it."""
    fd = os.open(lock_file(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def building(name: str, log: logging.Logger) -> Iterator[Path]:
    """A fresh scratch folder inside image `name`'s folder, with the image locked.

    One build per image at a time: a second caller waits, then may find the image
    up to date. Whatever a killed build left is removed first, and the scratch
    folder (with anything mounted in it) in every case when the block ends; so is
    the image's folder itself if no image was ever stored in it. The folder is made
    only once the lock is held: the build before may have removed it.
    """
    folder = image_dir(name)
    with image_lock(name):
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        for stale in folder.glob(".build-*"):  # left by a killed build
            log.info("removing stale build directory %s", stale)
            remove_tree(stale, log)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
        try:
            yield tmp
        finally:
            remove_tree(tmp, log)
            if not any(os.path.lexists(folder / part) for part in ("manifest.json", "rootfs")):
                remove_tree(folder, log)  # a first build that failed


def _swap_out(folder: Path, tmp: Path) -> None:
    """Undo `_swap_in`: the new tree and manifest go back into `tmp`, the old ones (if
    any) back into `folder`; manifest out first and back last, as there."""
    moves = [(folder / "manifest.json", tmp / "manifest.json"),
             (folder / "rootfs", tmp / "rootfs"),
             (tmp / "old-rootfs", folder / "rootfs"),
             (tmp / "old-manifest.json", folder / "manifest.json")]  # fmt: skip
    for now, to in moves:
        if os.path.lexists(now):
            now.rename(to)


def store(name: str, tmp: Path, manifest: dict[str, Any], log: logging.Logger, *,
          max_bytes: int) -> dict[str, Any]:  # fmt: skip
    """Make `tmp`/rootfs image `name`: make its tree safe or refuse it (`check_tree`,
    which refuses a tree larger than `max_bytes` before reading any file: a Binder
    folder's postBuild writes the tree itself, its size is known only now), list its
    kernelspecs (images/kernels.py), hash it, and swap it in with `manifest` plus those
    facts. Returns the manifest as stored."""
    root = tmp / "rootfs"
    root.chmod(0o755)
    checked = check_tree(root, max_bytes=max_bytes, log=log)
    log.info("image %s checked: %d entries, %sB; cleared %d set-id and %d world-write "
             "bits, removed %d devices, fifos or sockets", name, checked["entries"],
             format_size(checked["bytes"]), checked["setid_cleared"],
             checked["world_write_cleared"], checked["specials_removed"])  # fmt: skip
    kernels = find_kernels(root, log)
    digest, size = tree_digest(root)
    manifest = {**manifest, "name": name, "kernels": kernels, "content_hash": digest,
                "size_bytes": size}  # fmt: skip
    # A sandbox's root is an overlay over the image's tree: the old tree must not be
    # deleted under it. Checked as late as it can be (kernels do not take the lock),
    # and again once swapped: a kernel that started in between keeps the old tree.
    _refuse_if_used(name, "rebuilt")
    _swap_in(image_dir(name), root, manifest, tmp)
    try:
        _refuse_if_used(name, "rebuilt")
    except ImageError:
        _swap_out(image_dir(name), tmp)
        raise
    log.info("image %s stored: %s (%.0f MB, kernels: %s)", name, image_dir(name) / "rootfs",
             size / 1e6, ", ".join(kernels) or "none")  # fmt: skip
    return manifest


def users_of(name: str) -> list[str]:
    """The kernels whose sandboxes run on image `name` (live or not yet collected).
    Paths are compared resolved: a record may spell the same folder another way."""
    rootfs = os.path.realpath(image_dir(name) / "rootfs")
    return [r.kernel_id for r in records() if r.image and os.path.realpath(r.image) == rootfs]


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
    missing = f"no image {name!r} in {images_dir()}; `jupyter sandbox image ls` lists them"
    if not folder.is_dir():
        raise ImageError(missing)
    with image_lock(name):
        if not folder.is_dir():  # removed while we waited
            raise ImageError(missing)
        gone = images_dir() / f".removing-{name}-{os.getpid()}"
        _refuse_if_used(name, "removed")
        folder.rename(gone)
        try:
            _refuse_if_used(name, "removed")
        except ImageError:
            gone.rename(folder)
            raise
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
    an image never stored, an image half removed by a process that is gone. Only folders
    with a lock in images_dir()/.locks are touched: building() made those."""
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
        lock = images_dir() / ".locks" / f"{entry.name}.lock"
        if entry.name.startswith(".") or entry.is_symlink() or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
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
                remove_tree(entry, log)
                removed.append(str(entry))
        finally:
            os.close(fd)
    if removed:
        log.info("removed what interrupted image builds left: %s", ", ".join(removed))
    return removed
