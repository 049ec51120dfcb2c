"""Where guest images live, and finding one at kernel start.

A kernel must never see the host's ``/``: it runs on a built image::

    images_dir()/<name>/rootfs/          the tree runsc uses as the OCI root
    images_dir()/<name>/manifest.json    what is inside and how it was built
    images_dir()/<name>/microvm/         what a microVM boots (boot.py)

This module is what a kernel start needs: it reads, never writes, and needs
neither root nor the network. Images are made by build.py (the default one, from
the project's recipe) and imports.py (from an OCI image, a Binder folder or a
rootfs folder), and stored or removed by install.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..guest.layout import AGENT_PYTHON

logger = logging.getLogger(__name__)

IMAGES_DIR = Path("/var/lib/jupyter-sandbox/images")
"""Documented, root-owned home of built images; ``JUPYTER_SANDBOX_IMAGES_DIR`` overrides it."""
DEFAULT_IMAGE = "python3"
"""The image a kernel runs on when its kernelspec names none."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def images_dir() -> Path:
    """Where images live; read at call time so tests and operators can redirect it."""
    override = os.environ.get("JUPYTER_SANDBOX_IMAGES_DIR")
    return Path(override) if override else IMAGES_DIR


def image_dir(name: str) -> Path:
    """The folder of image `name` (it may not exist yet); ImageError for a name that is
    not one: names become path components, and must not walk out of images_dir()."""
    if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise ImageError(
            f"invalid image name {name!r}: use letters, digits, '.', '_' or '-' "
            "(or an absolute path to a rootfs directory)"
        )
    return images_dir() / name


def _missing_parts(rootfs: Path) -> list[str]:
    """What a usable rootfs lacks: the agent's own Python (images/runtime.py). Uses
    lexists: an image's absolute symlinks would resolve against the *host's* / here."""
    return [rel for rel in (AGENT_PYTHON.lstrip("/"),) if not os.path.lexists(rootfs / rel)]


def find_image(name_or_path: str = DEFAULT_IMAGE) -> Path:
    """Return the rootfs directory of a built image, ready to use as an OCI root.

    A name is looked up under images_dir() and needs its manifest (a tree
    without one is a build that never finished). An absolute path is taken as
    a rootfs directory made by other means; only its interpreters are checked.
    """
    if Path(name_or_path).is_absolute():
        rootfs = Path(name_or_path)
        manifest: Path | None = None
    else:
        rootfs = image_dir(name_or_path) / "rootfs"
        manifest = rootfs.parent / "manifest.json"
    build_hint = (
        "build it with `jupyter sandbox image build` (as root), "
        "and check the host with `jupyter sandbox doctor`"
    )
    if not rootfs.is_dir():
        raise ImageError(f"guest image not found: {rootfs} does not exist; {build_hint}")
    if manifest is not None and not manifest.is_file():
        raise ImageError(
            f"guest image {rootfs} is incomplete (no {manifest.name}: an interrupted build?); "
            f"{build_hint}"
        )
    missing = _missing_parts(rootfs)
    if missing:
        raise ImageError(
            f"guest image {rootfs} is incomplete (missing {', '.join(missing)}); {build_hint}"
        )
    return rootfs


def load_manifest(name: str = DEFAULT_IMAGE) -> dict[str, Any] | None:
    """The image's manifest, or None if it is missing or unreadable (i.e. not built)."""
    path = image_dir(name) / "manifest.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable image manifest %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def list_images() -> list[tuple[str, dict[str, Any]]]:
    """Every complete image (one with a manifest), by name, with its manifest."""
    try:
        entries = sorted(images_dir().iterdir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.name.startswith(".") or not _NAME_RE.fullmatch(entry.name):
            continue
        manifest = load_manifest(entry.name)
        if manifest is not None:
            found.append((entry.name, manifest))
    return found


def tree_digest(root: Path) -> tuple[str, int]:
    """Content hash and apparent size (bytes, each inode once) of a directory tree.

    Covers sorted relative paths, file type and mode, owner, file contents,
    symlink targets and device numbers, so any change an attacker or a stray
    `chroot` could make to the image changes the hash.
    """
    outer = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    seen: set[tuple[int, int]] = set()
    size = 0
    # Depth first, each directory's entries sorted, a directory's own line before its
    # content: an explicit stack of (directory fd, its path, its names left), not
    # recursion, so that no depth of tree raises RecursionError.
    stack: list[tuple[int, bytes, Iterator[str]]] = []

    def enter(dir_fd: int, path: bytes) -> None:
        try:
            stack.append((dir_fd, path, iter(sorted(os.listdir(dir_fd)))))
        except BaseException:
            os.close(dir_fd)
            raise

    try:
        enter(os.open(root, os.O_RDONLY | os.O_DIRECTORY), b"")
        while stack:
            dir_fd, rel, names = stack[-1]
            entry_name = next(names, None)
            if entry_name is None:
                stack.pop()
                os.close(dir_fd)
                continue
            name = os.fsencode(entry_name)
            path = rel + b"/" + name if rel else name
            st = os.lstat(name, dir_fd=dir_fd)
            mode = st.st_mode
            if stat.S_ISREG(mode):
                inner = hashlib.sha256()
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    while n := os.readv(fd, [buf]):
                        inner.update(view[:n])
                finally:
                    os.close(fd)
                data = inner.hexdigest().encode()
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_size
            elif stat.S_ISLNK(mode):
                data = os.fsencode(os.readlink(name, dir_fd=dir_fd))
                size += st.st_size
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                data = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}".encode()
            else:
                data = b""
            outer.update(b"%s\0%o\0%d\0%d\0%s\n" % (path, mode, st.st_uid, st.st_gid, data))
            if stat.S_ISDIR(mode):
                enter(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd),
                      path)  # fmt: skip
    finally:
        for dir_fd, _rel, _names in stack:
            os.close(dir_fd)
    return outer.hexdigest(), size


def rebuild_hint(name: str) -> str:
    """How to build image `name` again: the default from its recipe, any other from the
    source its manifest names."""
    if name == DEFAULT_IMAGE:
        return "run `jupyter sandbox image build --force`"
    source = (load_manifest(name) or {}).get("source") or {}
    where = source.get("reference") or source.get("folder") or "SOURCE"
    return f"run `jupyter sandbox image build {name} --from {where}`"


def verify_image(name: str = DEFAULT_IMAGE) -> None:
    """Check that an image's tree still matches its manifest's content hash.

    Slow-ish (reads every file): meant for `doctor`, not for each kernel start.
    """
    rootfs = find_image(name)
    manifest = load_manifest(name) or {}
    digest, _ = tree_digest(rootfs)
    if digest != manifest.get("content_hash"):
        raise ImageError(
            f"guest image {rootfs} was modified after it was built (content hash mismatch); "
            f"{rebuild_hint(name)}"
        )
