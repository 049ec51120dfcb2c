"""Building a guest image: root only, from the recipe in ``guest/image/``.

Each image is a Debian bookworm ``minbase`` tree with a virtualenv at
``/opt/venv`` holding ipykernel and the scientific stack, with the kernel's
user (guest/layout.py) and a manifest of what is inside, put where store.py
finds it.

Building needs root (debootstrap, chroot) and the network (Debian archive,
PyPI); using an image needs neither. A build is skipped when the recipe has not
changed, and a new image replaces the old one only once it is complete, so a
failed build never breaks a working installation.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..guest.layout import GUEST_PYTHON, KERNEL_HOME, KERNEL_PATH, KERNEL_UID, KERNEL_USER
from ..hostcmd import run, stream
from .install import building, store
from .runtime import build_runtime
from .store import DEFAULT_IMAGE, find_image, image_dir, load_manifest
from .unpack import DEFAULT_MAX_SIZE

logger = logging.getLogger(__name__)

WHEEL_CACHE = Path("/var/cache/jupyter-sandbox/wheels")
"""Wheels downloaded on the host, reused by later builds."""
DEBOOTSTRAP_CACHE = Path("/var/cache/jupyter-sandbox/debootstrap")
"""Debian .debs fetched by debootstrap, reused by later builds."""
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_CACHE_DIR": "1",
}
"""Minimal, predictable environment for the build's commands in the chroot, and on the
host where they need no network: the host's environment (tokens, proxies, PIP_*
settings) has no business there."""
FIX_AND_RETRY = (
    "Fix the cause, then run `jupyter sandbox image build` again "
    "(`jupyter sandbox doctor` checks the host)."
)
"""What a failed build step's error ends with."""
FORCE_REBUILD = (
    "Run `jupyter sandbox image build --force` (`jupyter sandbox doctor` checks the host)."
)
"""What a failed question about a built tree (a version, a listing) ends with."""

# Bump when the build steps below change what ends up in the image, so that
# existing images are rebuilt even though the recipe files did not change.
_BUILDER_VERSION = 3
# Files in guest/image that do not influence the build (editing them must not
# trigger a multi-minute rebuild).
_NOT_RECIPE = {"README.md"}
# How long a question about the tree being built may take (a version, a listing): far
# more than it needs, so that only a hung command ends on it.
_FACT_TIMEOUT = 300


def _recipe_files() -> list[tuple[str, bytes]]:
    folder = importlib.resources.files("provisioner.guest") / "image"
    files = [
        (entry.name, entry.read_bytes())
        for entry in folder.iterdir()
        if entry.is_file() and entry.name not in _NOT_RECIPE and not entry.name.startswith(".")
    ]
    if not any(n == "debian-packages.txt" for n, _ in files) or not any(
        n == "requirements.txt" for n, _ in files
    ):
        raise ImageError(
            f"image recipe not found in {folder}: the jupyter-sandbox installation is "
            "broken; reinstall it, then run `jupyter sandbox doctor`"
        )
    return sorted(files)


def recipe_hash() -> str:
    """sha256 over the recipe files and the builder version: equal hash, equal image."""
    h = hashlib.sha256(f"jupyter-sandbox-image-builder {_BUILDER_VERSION}\n".encode())
    for name, data in _recipe_files():
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _recipe_lines(text: str) -> list[str]:
    """Non-empty lines with '#' comments stripped."""
    return [s for s in (line.split("#", 1)[0].strip() for line in text.splitlines()) if s]


def _host_env() -> dict[str, str]:
    # debootstrap and pip need the host's network settings (proxy, CA bundle),
    # but a predictable PATH and locale.
    env = dict(os.environ)
    env.update(
        PATH=CLEAN_ENV["PATH"] + ":" + env.get("PATH", ""),
        LC_ALL="C.UTF-8",
        DEBIAN_FRONTEND="noninteractive",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


def _check_host() -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "building a guest image needs root (debootstrap, chroot): run "
            "`sudo jupyter sandbox image build`"
        )
    missing = [
        tool for tool in ("debootstrap", "chroot") if not shutil.which(tool, path=CLEAN_ENV["PATH"])
    ]
    if missing:
        raise ImageError(
            f"{', '.join(missing)} not found: run scripts/install-host.sh as root, then "
            "`jupyter sandbox doctor` and `jupyter sandbox image build`"
        )


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.unlink(missing_ok=True)  # replace symlinks too, never write through them
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    path.chmod(mode)


def _clear_dir(path: Path, keep: Sequence[str] = ()) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    for entry in path.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _step(log: logging.Logger, msg: str) -> float:
    log.info("image build: %s", msg)
    return time.monotonic()


def download_wheels(
    requirements: Path, staging: Path, py_version: str, log: logging.Logger
) -> None:
    """pip download on the HOST: pip inside the chroot cannot reach the index here.

    Downloads into an empty staging folder (so it holds exactly the resolved
    set), reusing wheels kept in WHEEL_CACHE, and then adds new ones to the cache.
    """
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    abi = "cp" + py_version.replace(".", "")
    cmd: list[str | Path] = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--only-binary=:all:", "--implementation", "cp", "--python-version", py_version,
        "--abi", abi, "--abi", "abi3", "--abi", "none",
        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux_2_28_x86_64", "--platform", "any",
        "--find-links", WHEEL_CACHE, "--dest", staging, "--requirement", requirements,
    ]  # fmt: skip
    stream(cmd, log, "downloading Python wheels on the host (pip download)", error=ImageError,
           env=_host_env(), fix=FIX_AND_RETRY)  # fmt: skip
    for wheel in staging.glob("*.whl"):
        cached = WHEEL_CACHE / wheel.name
        if not cached.exists():
            tmp = cached.with_name(f".{wheel.name}.{os.getpid()}.tmp")
            shutil.copyfile(wheel, tmp)
            tmp.replace(cached)


def build_image(
    name: str = DEFAULT_IMAGE, *, force: bool = False, log: logging.Logger | None = None
) -> Path:
    """Build (or confirm up to date) images_dir()/name and return its rootfs.

    A no-op when the manifest's recipe hash matches and the tree is complete,
    so callers may call it freely. Otherwise builds beside the target and
    swaps the result in only when everything succeeded; on failure the
    previous image, if any, is untouched and no temporary files remain.
    """
    log = log or logger
    folder = image_dir(name)
    wanted = recipe_hash()
    if not force and _is_current(name, wanted):
        log.info("image %s is up to date (%s)", name, folder / "rootfs")
        return folder / "rootfs"
    _check_host()
    with building(name, log) as tmp:
        # Another process may have finished the same build while we waited.
        if not force and _is_current(name, wanted):
            log.info("image %s is up to date (%s)", name, folder / "rootfs")
            return folder / "rootfs"
        store(name, tmp, _build(wanted, tmp, log), log, max_bytes=DEFAULT_MAX_SIZE)
    return folder / "rootfs"


def _is_current(name: str, wanted: str) -> bool:
    manifest = load_manifest(name)
    if not manifest or manifest.get("recipe_hash") != wanted:
        return False
    try:
        find_image(name)
    except ImageError:
        return False
    return True


def _build(wanted_hash: str, tmp: Path, log: logging.Logger) -> dict[str, Any]:
    """The build proper, in tmp/rootfs. Returns its manifest (install.store adds what
    every image's has)."""
    started = time.monotonic()
    recipe = dict(_recipe_files())
    packages = _recipe_lines(recipe["debian-packages.txt"].decode())
    root = tmp / "rootfs"
    root.mkdir(mode=0o755)
    root.chmod(0o755)

    t = _step(log, f"debootstrap {DEBIAN_SUITE} (minbase + {', '.join(packages)})")
    DEBOOTSTRAP_CACHE.mkdir(parents=True, exist_ok=True)
    stream(
        [
            "debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
            f"--cache-dir={DEBOOTSTRAP_CACHE}", DEBIAN_SUITE, root, DEBIAN_MIRROR,
        ],
        log, "debootstrap", error=ImageError, env=_host_env(), fix=FIX_AND_RETRY,
    )  # fmt: skip
    log.info("image build: debootstrap done in %.0f s", time.monotonic() - t)

    def chroot(*argv: str, what: str, user: str | None = None, **env: str) -> None:
        spec = [f"--userspec={user}"] if user else []
        stream(["chroot", *spec, root, *argv], log, what, error=ImageError,
               env={**CLEAN_ENV, **env}, fix=FIX_AND_RETRY)  # fmt: skip

    py_version = run(
        ["chroot", root, "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        "finding the guest's Python version", error=ImageError, timeout=_FACT_TIMEOUT,
        env=CLEAN_ENV, fix=FORCE_REBUILD,
    ).strip()  # fmt: skip

    _step(log, f"creating the virtualenv /opt/venv (Python {py_version})")
    chroot("python3", "-m", "venv", "/opt/venv", what="python3 -m venv /opt/venv")

    _step(log, "downloading wheels on the host")
    staging = tmp / "wheels"
    staging.mkdir()
    (staging / "requirements.txt").write_bytes(recipe["requirements.txt"])
    download_wheels(staging / "requirements.txt", staging, py_version, log)
    log.info("image build: %d wheels ready", len(list(staging.glob("*.whl"))))

    _step(log, "installing wheels into /opt/venv")
    # Copy the wheels in rather than bind-mounting: nothing to unmount on failure.
    guest_wheels = root / "tmp" / "wheels"
    shutil.copytree(staging, guest_wheels, copy_function=link_or_copy)
    chroot(
        "/opt/venv/bin/pip", "install", "--no-index", "--find-links", "/tmp/wheels",
        "--no-cache-dir", "--requirement", "/tmp/wheels/requirements.txt",
        what="pip install in the guest",
    )  # fmt: skip
    shutil.rmtree(guest_wheels)
    site_packages = root / f"opt/venv/lib/python{py_version}/site-packages"
    # A .pth file, not sitecustomize.py: Debian's own sitecustomize comes first on sys.path.
    getpid = "jupyter_sandbox_getpid"
    write_file(site_packages / f"{getpid}.py", recipe[f"{getpid}.py"].decode())
    write_file(site_packages / f"{getpid}.pth", f"import {getpid}\n")

    _step(log, f"adding user {KERNEL_USER} ({KERNEL_UID}) and tidying up")
    chroot(
        "useradd", "--uid", str(KERNEL_UID), "--user-group", "--no-create-home",
        "--home-dir", KERNEL_HOME, "--shell", "/bin/bash", KERNEL_USER,
        what="useradd",
    )  # fmt: skip
    home = root / KERNEL_HOME.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)  # the agent makes it writable in each sandbox's own layer
    tidy(root)

    _step(log, "byte-compiling Python and prebuilding the matplotlib font cache")
    try:
        chroot(
            "/opt/venv/bin/python3", "-m", "compileall", "-q",
            "/opt/venv/lib", "/usr/lib/python3", f"/usr/lib/python{py_version}",
            what="compileall",
        )  # fmt: skip
    except ImageError as e:  # a stray unparsable file must not fail the image
        log.warning("compileall reported errors (ignored): %s", str(e).splitlines()[-3:])
    # As the kernel user and HOME, so the first `import matplotlib.pyplot` in a
    # kernel neither rebuilds the cache nor prints "building the font cache".
    chroot(
        GUEST_PYTHON, "-c", "import matplotlib.font_manager",
        what="matplotlib font cache", user=f"{KERNEL_UID}:{KERNEL_UID}",
        HOME=KERNEL_HOME, MPLBACKEND="agg",
    )  # fmt: skip

    _step(log, "adding the agent's own Python (images/runtime.py)")
    build_runtime(root, root, log)

    _step(log, "writing the manifest")
    debs = run(
        ["chroot", root, "dpkg-query", "-W", "-f", "${Package}\t${Version}\n"], "dpkg-query",
        error=ImageError, timeout=_FACT_TIMEOUT, env=CLEAN_ENV, fix=FORCE_REBUILD,
    )  # fmt: skip
    pys = run(
        [
            "chroot", root, GUEST_PYTHON, "-c",
            "import json, importlib.metadata as m, platform; print(json.dumps({'python': "
            "platform.python_version(), 'packages': {d.metadata['Name']: d.version "
            "for d in m.distributions()}}))",
        ],
        "listing the guest's Python packages",
        error=ImageError, timeout=_FACT_TIMEOUT, env=CLEAN_ENV, fix=FORCE_REBUILD,
    )  # fmt: skip
    py_info = json.loads(pys)
    return {
        "source": {"kind": "recipe", "recipe_hash": wanted_hash},
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "recipe_hash": wanted_hash,
        "builder_version": _BUILDER_VERSION,
        "debian_suite": DEBIAN_SUITE,
        "debian_packages": dict(
            sorted(line.split("\t", 1) for line in debs.splitlines() if "\t" in line)
        ),
        "python_version": py_info["python"],
        # PEP 503 names ("pygments", "matplotlib-inline"): one spelling to look up.
        "python_packages": dict(
            sorted((re.sub(r"[-_.]+", "-", k).lower(), v) for k, v in py_info["packages"].items())
        ),
        "python": GUEST_PYTHON,
        "user": {
            "name": KERNEL_USER,
            "uid": KERNEL_UID,
            "gid": KERNEL_UID,
            "home": KERNEL_HOME,
        },
        "env": [f"PATH={KERNEL_PATH}"],
    }


def link_or_copy(src: str, dst: str) -> str:
    """Hard-link when possible (same filesystem: instant), copy otherwise."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)
    return dst


def tidy(root: Path) -> None:
    """Drop caches and host leftovers: smaller image, and nothing of the host inside."""
    for d, keep in (
        ("var/cache/apt", ("archives",)),
        ("var/cache/apt/archives", ("partial",)),
        ("var/cache/apt/archives/partial", ()),
        ("var/lib/apt/lists", ("partial", "lock")),
        ("var/lib/apt/lists/partial", ()),
        ("var/cache/debconf", ("config.dat", "passwords.dat", "templates.dat")),
        ("root/.cache", ()),
        ("tmp", ()),
        ("var/tmp", ()),
    ):
        _clear_dir(root / d, keep)
    for log_file in ("bootstrap.log", "dpkg.log", "alternatives.log"):
        (root / "var/log" / log_file).unlink(missing_ok=True)
    _clear_dir(root / "var/log/apt")
    for old in root.glob("var/cache/debconf/*-old"):
        old.unlink()
    # debootstrap copies the host's hostname and resolv.conf into the target.
    write_file(root / "etc/hostname", "sandbox\n")
    write_file(root / "etc/resolv.conf", "")
    write_file(
        root / "etc/hosts",
        "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
