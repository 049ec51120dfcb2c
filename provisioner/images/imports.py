"""Images from anywhere: `jupyter sandbox image build NAME --from SOURCE`.

SOURCE is one of

- an OCI image: an OCI layout folder (``oci:DIR[:TAG]`` or a folder holding
  ``oci-layout``), an ``oci-archive:FILE`` or ``docker-archive:FILE`` (what
  ``docker save`` writes), or a registry reference ``docker://HOST/REPO:TAG``
  (oci.py, through skopeo);
- a Binder/repo2docker folder (``apt.txt``, ``requirements.txt``, ``postBuild``,
  ``runtime.txt``), built on the default image (binder.py);
- a root filesystem folder, copied (unpack.py).

Whatever the source, the tree is untrusted: it is made in a scratch folder beside
the image with every hostile entry refused or neutralised (unpack.py), gets the
agent's own Python (runtime.py) so that its kernels run whatever interpreter it
has or lacks, and is stored like every image (install.py), its kernelspecs listed
in its manifest.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..guest.layout import KERNEL_HOME, KERNEL_PATH, KERNEL_UID, KERNEL_USER
from . import binder, oci, unpack
from .install import building, clear_path, image_lock, real_dirs, store
from .runtime import copy_runtime
from .store import DEFAULT_IMAGE, find_image, image_dir

OCI_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""An imported image's PATH when its OCI config sets none (a rootfs folder has no config):
the one Docker and Kubernetes give a container."""


def source_kind(source: str) -> str:
    """The kind of `source` (oci, binder or rootfs); ImageError saying what it may be."""
    if oci.is_oci_source(source):
        return "oci"
    path = Path(source)
    if path.is_dir():
        if binder.is_binder_folder(path):
            return "binder"
        if any((path / part).is_dir() for part in ("usr", "bin", "etc")):
            return "rootfs"
    raise ImageError(
        f"cannot build an image from {source!r}: expected an OCI image (an OCI layout folder, "
        "oci:DIR, oci-archive:FILE, docker-archive:FILE or docker://REGISTRY/REPO:TAG), a "
        "Binder folder (apt.txt, requirements.txt, postBuild, runtime.txt) or a root "
        "filesystem folder (with usr/, bin/ or etc/)"
    )


MAX_ACCOUNTS_FILE = 1 << 20
"""An image's /etc/passwd or /etc/group larger than this is replaced, not read."""


def add_kernel_user(root: Path) -> None:
    """Give the untrusted tree `root` what the kernel's user needs, as the default image
    has it: its home (0755 here: the agent makes it writable in each sandbox), and an entry in
    /etc/passwd and /etc/group if the image has none for `KERNEL_UID` (R, pip and
    `getpass` look the user up). An image's own user of that uid (jovyan in the Jupyter
    Docker Stacks) is kept. Nothing here follows a symlink (install.real_dirs)."""
    real_dirs(root, KERNEL_HOME.lstrip("/")).chmod(0o755)
    etc = real_dirs(root, "etc")
    for name, root_line, ours in (
        ("passwd", "root:x:0:0:root:/root:/bin/sh\n",
         f"{KERNEL_USER}:x:{KERNEL_UID}:{KERNEL_UID}::{KERNEL_HOME}:/bin/sh\n"),
        ("group", "root:x:0:\n", f"{KERNEL_USER}:x:{KERNEL_UID}:\n"),
    ):  # fmt: skip
        path = etc / name
        text = root_line
        if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
            clear_path(root, f"etc/{name}")  # a symlink, a folder, a device...
        elif path.is_file() and path.stat().st_size <= MAX_ACCOUNTS_FILE:
            text = path.read_text(encoding="utf-8", errors="replace")
        if any(line.split(":")[2:3] == [str(KERNEL_UID)] for line in text.splitlines()):
            continue
        if text and not text.endswith("\n"):
            text += "\n"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + ours)


def import_image(
    name: str,
    source: str,
    *,
    max_bytes: int = unpack.DEFAULT_MAX_SIZE,
    tls_verify: bool = True,
    log: logging.Logger,
) -> dict[str, Any]:
    """Build image `name` from `source` and return its manifest.

    The default image must be built (it gives the agent's runtime, and a Binder
    folder's base); its lock is held shared throughout, so that it is not rebuilt
    under the import. On any failure the image `name` had before, if any, is
    untouched and nothing of the attempt is left; every failure is an ImageError
    naming the image (the CLI shows its message, never a traceback).
    """
    if name == DEFAULT_IMAGE:
        raise ImageError(
            f"{DEFAULT_IMAGE} is the default image, built from the project's recipe; "
            "give the imported image another name"
        )
    image_dir(name)  # a valid name, before any work
    kind = source_kind(source)
    try:
        with image_lock(DEFAULT_IMAGE, shared=True):
            return _import(name, source, kind, max_bytes=max_bytes, tls_verify=tls_verify,
                           log=log)  # fmt: skip
    except OSError as e:  # shutil.Error too: a tree the host cannot copy or delete
        raise ImageError(f"image {name}: cannot build it from {source}: {e}") from e


def _import(name: str, source: str, kind: str, *, max_bytes: int, tls_verify: bool,
            log: logging.Logger) -> dict[str, Any]:  # fmt: skip
    """`import_image`'s work, the default image's lock held."""
    default_rootfs = find_image(DEFAULT_IMAGE)
    started = time.monotonic()
    with building(name, log) as tmp:
        root = tmp / "rootfs"
        root.mkdir(mode=0o755)
        env = [f"PATH={KERNEL_PATH}"] if kind == "binder" else [OCI_DEFAULT_PATH]
        if kind == "oci":
            log.info("image %s: unpacking the OCI image %s", name, source)
            facts = oci.unpack_image(source, root, max_bytes=max_bytes, log=log,
                                     tls_verify=tls_verify)  # fmt: skip
            env = facts.get("config", {}).get("env") or env
        elif kind == "binder":
            log.info("image %s: building the Binder folder %s", name, source)
            facts = binder.build_from_binder(Path(source).resolve(), root,
                                             base_rootfs=default_rootfs, log=log)  # fmt: skip
        else:
            log.info("image %s: copying the root filesystem %s", name, source)
            report = unpack.copy_tree(Path(source).resolve(), root, unpack.Budget(max_bytes))
            facts = {"kind": "rootfs", "folder": str(Path(source).resolve()),
                     "neutralised": dataclasses.asdict(report)}  # fmt: skip
        copy_runtime(default_rootfs, root)
        add_kernel_user(root)
        # The agent's own dynamic loader would read the image's /etc/ld.so.preload and
        # load what it names into a root process: an imported image has none.
        clear_path(root, "etc/ld.so.preload")
        manifest = store(
            name,
            tmp,
            {
                "source": facts,
                "env": env,
                "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "build_seconds": round(time.monotonic() - started, 1),
            },
            log,
            max_bytes=max_bytes,
        )
    return manifest
