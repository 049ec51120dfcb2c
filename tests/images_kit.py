"""Imported images for the tests that run kernels on them, made once per test session.

- `imported_image`: the default image re-imported as an OCI image, the way an operator
  brings their own: its rootfs as one layer plus a layer of the test's own, written as
  an OCI layout, turned by skopeo into a `docker-archive` (what `docker save` writes),
  and built with `jupyter sandbox image build NAME --from docker-archive:FILE`. Python
  kernels run on it like on the default, so the attack suite attacks it too.
- `hostile_openssl_image`: the same, with a layer whose OpenSSL configuration
  (`HOSTILE_OPENSSL_CNF`) harms any process that reads it: the agent must not.
- `r_image`: an image with R and IRkernel and no Python at all: a Debian root made by
  debootstrap in a scratch folder, built with `--from FOLDER` (a root filesystem).

Each is removed with `jupyter sandbox image rm` when the session ends (nothing left).
`kernelspecs(...)` installs an image's kernels under a prefix that `JUPYTER_PATH`
then names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_sandbox
from oci_kit import entry, layer, require_tools, skopeo_copy
from provisioner.guest.layout import KERNEL_PATH, KERNEL_UID

from provisioner.images.build import DEBIAN_MIRROR, DEBIAN_SUITE, DEBOOTSTRAP_CACHE
from provisioner.images.oci_layout import TAR_LAYER, RunConfig, add_layer, write_image
from provisioner.images.store import find_image, image_dir, images_dir, load_manifest

IMPORTED = "jsb-test-imported"
R_IMAGE = "jsb-test-r"
MARKER = "/etc/jsb-test-layer"
"""A file only the test's own layer of `imported_image` has."""
HOSTILE_OPENSSL = "jsb-test-openssl"
OPENSSL_CNF = ("etc/ssl/openssl.cnf", "usr/lib/ssl/openssl.cnf")
"""Where an image's OpenSSL looks for its configuration (Debian: the second links to the
first), and so would the agent's own libcrypto (a copy of Debian's) without OPENSSL_CONF."""
HOSTILE_OPENSSL_CNF = b"""\
# Hostile to any process that reads it (tests/security/test_hostile_images.py).
# It reads its own stdin as more configuration: the agent's is the host's channel.
.include /proc/self/fd/0
# Its OpenSSL fails to start (no TLS context: LIBRARY_HAS_NO_CIPHERS) ...
config_diagnostics = 1
openssl_conf = jsb_init

[jsb_init]
providers = jsb_providers

[jsb_providers]
jsb = jsb_provider

# ... for it loads a module of the image's (here one that is missing) into the process.
[jsb_provider]
module = /opt/jsb-hostile/provider.so
activate = 1
"""
IMAGE_CONFIG = RunConfig(env=[f"PATH={KERNEL_PATH}", "LANG=C.UTF-8"], working_dir="/",
                         user=str(KERNEL_UID))  # fmt: skip
"""The run config of `imported_image`: the default image's environment and kernel user."""


def sandbox_cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """`jupyter sandbox ...` as the operator runs it, its output kept for the assertion."""
    jupyter = Path(sys.executable).parent / "jupyter"
    return subprocess.run([str(jupyter), "sandbox", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def build(name: str, source: str, *extra: str) -> dict:
    done = sandbox_cli("image", "build", name, "--from", source, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = load_manifest(name)
    assert manifest is not None
    return manifest


def remove(name: str) -> None:
    if load_manifest(name) is not None:
        done = sandbox_cli("image", "rm", name, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not image_dir(name).exists()
        assert not list(images_dir().glob(f".removing-{name}-*"))


def oci_layout_of(rootfs: Path, layout: Path, extra: bytes) -> None:
    """An OCI layout (tag `1`): `rootfs` as an uncompressed layer, then gzip layer `extra`."""
    layout.mkdir(parents=True)
    base = layout / "base.tar"
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(base), "."],
                   check=True, timeout=600)  # fmt: skip
    layers = [add_layer(layout, base, TAR_LAYER), add_layer(layout, extra)]
    write_image(layout, layers, tag="1", config=IMAGE_CONFIG)


def import_default(name: str, extra: bytes) -> None:
    """Build image `name` from the default image plus layer `extra`, the way an operator
    imports theirs: an OCI layout, turned by skopeo into a docker-archive, then `image
    build NAME --from docker-archive:FILE` (about half a minute)."""
    require_sandbox()
    require_tools("skopeo")
    scratch = Path(tempfile.mkdtemp(prefix="jsb-imported-", dir="/var/tmp"))
    try:
        oci_layout_of(find_image(), scratch / "layout", extra)
        archive = scratch / "image.tar"
        skopeo_copy(f"oci:{scratch / 'layout'}:1", f"docker-archive:{archive}:jsb/test:1")
        shutil.rmtree(scratch / "layout")
        build(name, f"docker-archive:{archive}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def imported_image() -> Iterator[str]:
    """The default image plus a layer, imported from a docker-archive: its name."""
    import_default(IMPORTED, layer(entry(MARKER.lstrip("/"), b"from the test's own layer\n")))
    try:
        yield IMPORTED
    finally:
        remove(IMPORTED)


@pytest.fixture(scope="session")
def hostile_openssl_image() -> Iterator[str]:
    """The default image plus a layer with `HOSTILE_OPENSSL_CNF` as its OpenSSL
    configuration (both /etc/ssl/openssl.cnf and /usr/lib/ssl/openssl.cnf): its name."""
    cnf = [entry(path, HOSTILE_OPENSSL_CNF) for path in OPENSSL_CNF]
    import_default(HOSTILE_OPENSSL, layer(*cnf))
    try:
        yield HOSTILE_OPENSSL
    finally:
        remove(HOSTILE_OPENSSL)


@pytest.fixture(scope="session")
def r_image() -> Iterator[str]:
    """R and IRkernel on Debian, no Python: its name."""
    require_sandbox()
    require_tools("debootstrap")
    scratch = Path(tempfile.mkdtemp(prefix="jsb-r-", dir="/var/tmp"))
    try:
        DEBOOTSTRAP_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=r-cran-irkernel",
             f"--cache-dir={DEBOOTSTRAP_CACHE}", DEBIAN_SUITE, str(scratch / "rootfs"),
             DEBIAN_MIRROR],
            check=True, capture_output=True, timeout=1200,
        )  # fmt: skip
        build(R_IMAGE, str(scratch / "rootfs"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        yield R_IMAGE
    finally:
        remove(R_IMAGE)


HOSTILE_STARTUP = "jsb-test-startup"
STARTUP_MODULE = b'''\
"""Run by a .pth at the start of every Python of the image: in a warm pool's sandbox,
as root, before any kernel claims it (tests/test_warm_pool.py)."""
import errno, glob, os, sys

def plant(path):
    try:
        with open(path, "a") as f:
            f.write("# planted before the claim\\n")
        return "written"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

targets = ["/etc/ld.so.preload", "/etc/jsb-planted", "/tmp/jsb-planted", "/var/tmp/jsb-planted",
           "/home/sandbox/jsb-planted", "/run/jsb-planted",
           *glob.glob("/opt/jupyter-sandbox-runtime/lib/python3*/json/__init__.py")]
sys.jsb_startup = {"uid": os.getuid(), "planted": {path: plant(path) for path in targets}}
'''
"""What `hostile_startup_image` runs in each of its Python processes as they start."""


@pytest.fixture(scope="session")
def hostile_startup_image() -> Iterator[str]:
    """The default image plus a layer whose site-packages has a .pth that imports
    `STARTUP_MODULE` at every start of the image's Python: its name."""
    site = "opt/venv/lib/python3.11/site-packages"
    files = [entry(f"{site}/jsb_startup.pth", b"import jsb_startup\n"),
             entry(f"{site}/jsb_startup.py", STARTUP_MODULE)]  # fmt: skip
    import_default(HOSTILE_STARTUP, layer(*files))
    try:
        yield HOSTILE_STARTUP
    finally:
        remove(HOSTILE_STARTUP)


def kernelspecs(image: str, prefix: Path, *args: str) -> list[str]:
    """Install `image`'s kernelspecs under `prefix` (`kernelspec install --image ... args`);
    the names installed."""
    done = sandbox_cli("kernelspec", "install", "--image", image, "--prefix", str(prefix), *args,
                       timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.split()[2] for line in done.stdout.splitlines() if line.startswith("installed")]


@pytest.fixture(scope="session")
def kernel_prefix() -> Iterator[Path]:
    """A prefix for the session's installed kernelspecs, named by JUPYTER_PATH meanwhile."""
    prefix = Path(tempfile.mkdtemp(prefix="jsb-kernelspecs-"))
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share/jupyter"), *([saved] if saved else [])]
    )
    try:
        yield prefix
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = saved
        shutil.rmtree(prefix, ignore_errors=True)
