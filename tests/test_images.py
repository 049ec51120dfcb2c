"""The guest image: built for real (debootstrap + pip), checked for real (runsc).

The first run builds the image at the default location (minutes, needs root
and the network); later runs find it up to date and take seconds.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import require_sandbox
from provisioner.guest.layout import GUEST_PYTHON, KERNEL_HOME, KERNEL_UID

from provisioner.errors import ImageError
from provisioner.images import boot
from provisioner.images.build import build_image, recipe_hash
from provisioner.images.store import find_image, images_dir, load_manifest, verify_image

pytestmark = pytest.mark.timeout(1800)  # a first build downloads ~110 MB and takes minutes

RUNSC = shutil.which("runsc") or "/usr/local/bin/runsc"
REQUIRED = ("ipykernel", "numpy", "pandas", "matplotlib")


@pytest.fixture(scope="module")
def rootfs() -> Path:
    if os.geteuid() != 0 and load_manifest() is None:
        require_sandbox()  # skips here, fails under CI
    return build_image()


@pytest.fixture(scope="module")
def manifest(rootfs: Path) -> dict:
    m = load_manifest()
    assert m is not None
    return m


def test_image_exists(rootfs: Path) -> None:
    assert rootfs == images_dir() / "python3" / "rootfs"
    assert find_image() == rootfs
    assert find_image(str(rootfs)) == rootfs
    # lexists: the venv's python is an absolute symlink, meaningful only inside the guest.
    for rel in (GUEST_PYTHON, "/usr/bin/python3"):
        assert os.path.lexists(rootfs / rel.lstrip("/")), rel
    home = (rootfs / KERNEL_HOME.lstrip("/")).stat()
    # Not world-writable in the store on the host (the agent makes it so in each sandbox)
    assert stat.S_IMODE(home.st_mode) == 0o755


def test_manifest_records_what_is_inside(rootfs: Path, manifest: dict) -> None:
    assert manifest["name"] == "python3"
    assert manifest["recipe_hash"] == recipe_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["content_hash"])
    built = datetime.datetime.fromisoformat(manifest["built_at"])
    assert built.utcoffset() == datetime.timedelta(0)
    assert built <= datetime.datetime.now(datetime.timezone.utc)
    assert manifest["size_bytes"] > 100_000_000
    assert manifest["debian_packages"]["python3"].startswith("3.11")
    assert manifest["python_version"].startswith("3.11.")
    # The pins of the recipe are what got installed.
    pins = dict(
        line.split("==")
        for line in (Path(__file__).parents[1] / "guest/image/requirements.txt")
        .read_text()
        .splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in REQUIRED:
        assert manifest["python_packages"][name] == pins[name].strip(), name


def test_rebuild_with_nothing_changed_is_a_fast_noop(rootfs: Path, manifest: dict) -> None:
    t = time.monotonic()
    assert build_image() == rootfs
    assert time.monotonic() - t < 5
    assert load_manifest()["built_at"] == manifest["built_at"]


def test_tree_matches_its_content_hash(rootfs: Path) -> None:
    verify_image()


def test_missing_image_tells_what_to_run() -> None:
    with pytest.raises(ImageError, match="jupyter sandbox image build"):
        find_image("does-not-exist")
    with pytest.raises(ImageError, match="jupyter sandbox image build"):
        find_image("/nonexistent/rootfs")
    with pytest.raises(ImageError):
        find_image("../../etc")
    assert load_manifest("does-not-exist") is None


def test_rootfs_is_not_the_host(rootfs: Path) -> None:
    assert rootfs.resolve() != Path("/")
    assert not rootfs.samefile("/")
    assert not (rootfs / "root").samefile("/root")
    assert not (rootfs / "etc").samefile("/etc")
    # debootstrap copies these from the host; the build replaces them.
    assert (rootfs / "etc/hostname").read_text() == "sandbox\n"
    assert "nameserver" not in (rootfs / "etc/resolv.conf").read_text()
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages*"))


def test_no_setuid_or_setgid_files(rootfs: Path) -> None:
    found = [
        str(p)
        for p in rootfs.rglob("*")
        if not p.is_symlink() and p.is_file() and p.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    ]
    assert found == []


def test_runs_under_runsc_as_the_kernel_user(rootfs: Path, manifest: dict, tmp_path: Path) -> None:
    require_sandbox()  # after the image exists: skips without runsc or root, fails under CI
    code = (
        "import os, pwd, ipykernel, numpy, pandas, matplotlib, matplotlib.pyplot; "
        "print('ok', os.getuid(), pwd.getpwuid(os.getuid()).pw_name, numpy.__version__)"
    )
    bundle, state = tmp_path / "bundle", tmp_path / "state"
    bundle.mkdir()
    subprocess.run([RUNSC, "spec", "--", GUEST_PYTHON, "-c", code], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": False}
    config["process"]["terminal"] = False
    config["process"]["user"] = {"uid": KERNEL_UID, "gid": KERNEL_UID}
    config["process"]["env"] = ["PATH=/opt/venv/bin:/usr/bin:/bin", f"HOME={KERNEL_HOME}"]
    (bundle / "config.json").write_text(json.dumps(config))
    cid = f"test-images-{uuid.uuid4().hex[:8]}"
    argv = [RUNSC, "--root", str(state), "--platform=systrap", "--network=none"]
    try:
        res = subprocess.run(
            [*argv, "--overlay2=root:memory", "run", "--bundle", str(bundle), cid],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run([*argv, "delete", "--force", cid], capture_output=True)
    assert res.returncode == 0, res.stderr[-2000:]
    # No "Matplotlib is building the font cache" line: the cache is in the image.
    numpy = manifest["python_packages"]["numpy"]
    assert res.stdout.split() == ["ok", str(KERNEL_UID), "sandbox", numpy], res.stdout


def test_boot_files_of_another_guest_version_are_refused(tmp_path, monkeypatch):
    """An initramfs built from another guest/microvm/init (an upgrade without a rebuild)
    would start agents that miss what this version's host tells them: refused, saying why."""
    for name in ("vmlinux", "initramfs.cpio.gz", "root.img"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setattr(boot, "boot_dir", lambda name: tmp_path)
    (tmp_path / "boot.json").write_text(json.dumps({"guest_files": "0" * 16}))
    with pytest.raises(ImageError, match="another version of guest/microvm/"):
        boot.find_boot_files("python3")
    (tmp_path / "boot.json").write_text(json.dumps({"guest_files": boot._guest_files_digest()}))
    assert boot.find_boot_files("python3").kernel == tmp_path / "vmlinux"


def test_gc_removes_what_interrupted_image_builds_left(tmp_path: Path) -> None:
    """A build killed half-way leaves its scratch folder (and, for a first build, the
    image's folder); a removal killed half-way, the image moved aside. `jupyter sandbox
    gc` removes those, and never a build that is running or an image that is stored."""
    store = tmp_path / "images"
    (store / "stored/rootfs").mkdir(parents=True)
    (store / "stored/manifest.json").write_text("{}")
    (store / ".locks").mkdir()
    (store / ".locks/stored.lock").touch()
    (store / "stored/.build-killed/rootfs/usr").mkdir(parents=True)
    (store / "first/.build-killed").mkdir(parents=True)
    (store / ".locks/first.lock").touch()
    (store / "busy/.build-running").mkdir(parents=True)
    (store / ".locks/busy.lock").touch()
    (store / "stray/.build-x").mkdir(parents=True)  # no lock: not made by a build
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store / f".removing-gone-{dead.pid}/rootfs").mkdir(parents=True)
    (store / f".removing-live-{os.getpid()}").mkdir()
    with open(store / ".locks/busy.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running build holds it
        done = subprocess.run(
            [str(Path(sys.executable).parent / "jupyter"), "sandbox", "gc"],
            env={**os.environ, "JUPYTER_SANDBOX_IMAGES_DIR": str(store)},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    left = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    assert left == [
        ".locks", ".locks/busy.lock", ".locks/first.lock", ".locks/stored.lock",
        f".removing-live-{os.getpid()}", "busy", "busy/.build-running",
        "stored", "stored/manifest.json", "stored/rootfs", "stray", "stray/.build-x",
    ]  # fmt: skip


def test_a_build_step_printing_without_newlines_is_read_in_bounded_pieces() -> None:
    """A hostile postBuild may print gigabytes without a newline: the build reads its
    output in pieces of at most MAX_LINE characters, never as one line."""
    import resource

    from provisioner.hostcmd import MAX_LINE, TAIL_CHARS, TAIL_LINES, stream

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="exit status 3") as failed:
        stream(["sh", "-c", "head -c 300000000 /dev/zero | tr '\\\\0' x; exit 3"],
               logging.getLogger("test"), "a noisy step", error=ImageError)  # fmt: skip
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 64 * 1024, f"the reader grew by {grown} KiB"  # 300 MB were printed
    assert len(str(failed.value)) < TAIL_LINES * (TAIL_CHARS + 1) + 200
    assert MAX_LINE <= 1 << 20
