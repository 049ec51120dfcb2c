"""What a microVM boots: a guest kernel, an initramfs and a root disk, made from the image.

`jupyter sandbox image build` makes them beside the image's rootfs, in
`<image>/microvm/`, from Debian's packages only:

- `vmlinux`: Debian's generic kernel (it has 9p), downloaded and unpacked, never
  installed on the host. The ELF inside the compressed bzImage is what QEMU boots
  (PVH entry): the guest then skips decompressing it, seconds under TCG.
- `initramfs.cpio.gz`: a static busybox, exactly the modules the guest needs in
  their load order, and `guest/microvm/init` and `pid1.py`.
- `root.img`: the image's rootfs as an ext4 disk without a journal, attached
  read-only to every VM; each VM writes to a tmpfs layer over it.

Each part is rebuilt only when what it comes from changed (`boot.json` records it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import pwd
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import guest
from ..errors import ImageError
from ..hostcmd import run, stream
from .build import CLEAN_ENV, FIX_AND_RETRY, FORCE_REBUILD
from .store import DEFAULT_IMAGE, image_dir, load_manifest

KERNEL_METAPACKAGE = "linux-image-amd64"
KERNEL_CACHE = Path("/var/cache/jupyter-sandbox/kernel")
MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "ext4", "overlay",
           "9pnet_virtio", "9p")  # fmt: skip
"""What the guest loads at boot (their dependencies are found and loaded first)."""
BUSYBOX_APPLETS = ("sh", "mount", "mkdir", "insmod", "switch_root", "cat", "cp", "sleep",
                   "poweroff", "reboot", "ip", "rm")  # fmt: skip
GUEST_FILES = Path(guest.__file__).parent / "microvm"
SNAPSHOT_BUILDER = "jsb-snapshot"
"""The host user that VMs being saved run as (backends/microvm_snapshot.py): no one's
kernel runs as it, so no other VM's QEMU can reach into one being saved."""
PVH_NOTE = "Unknown note type: (0x00000012)"  # XEN_ELFNOTE_PHYS32_ENTRY, as readelf names it


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initramfs: Path
    root_disk: Path


def boot_dir(name: str = DEFAULT_IMAGE) -> Path:
    """The folder of image `name`'s boot files (it may not exist yet)."""
    return image_dir(name) / "microvm"


def find_boot_files(name: str = DEFAULT_IMAGE) -> BootFiles:
    """The built boot files of image `name`; ImageError saying what to run if missing."""
    folder = boot_dir(name)
    files = BootFiles(folder / "vmlinux", folder / "initramfs.cpio.gz", folder / "root.img")
    paths = (files.kernel, files.initramfs, files.root_disk, folder / "boot.json")
    missing = ", ".join(p.name for p in paths if not p.is_file())
    if missing:
        raise ImageError(
            f"the microVM boot files of image {name} are missing ({missing}); "
            "build them with `jupyter sandbox image build` (as root)"
        )
    try:
        built_from = json.loads((folder / "boot.json").read_text()).get("guest_files")
    except (OSError, ValueError, AttributeError):
        built_from = None
    if built_from != _guest_files_digest():
        raise ImageError(
            f"the microVM initramfs of image {name} was built from another version of "
            "guest/microvm/ (init, pid1.py); rebuild it with `jupyter sandbox image build`"
        )
    return files


def _guest_files_digest() -> str:
    """What the initramfs takes from this package: a build of another version won't do."""
    return _digest(*((GUEST_FILES / name).read_bytes() for name in ("init", "pid1.py")))


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _kernel_package(log: logging.Logger) -> str:
    """The versioned kernel package the metapackage points at, e.g. linux-image-6.1.0-56-amd64."""
    for attempt in range(2):
        try:
            depends = run(["apt-cache", "depends", KERNEL_METAPACKAGE], "apt-cache depends",
                          error=ImageError, timeout=120)  # fmt: skip
        except ImageError:  # not known (yet): apt-cache exits 100
            depends = ""
        for line in depends.splitlines():
            dep = line.split(":", 1)[-1].strip()
            if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
                return dep
        if attempt == 0:  # a fresh host may have no package lists yet
            stream(["apt-get", "update", "-qq"], log, "apt-get update", error=ImageError,
                   fix=FIX_AND_RETRY)  # fmt: skip
    raise ImageError(f"apt-cache does not know {KERNEL_METAPACKAGE} even after apt-get update")


def _unpacked_kernel(log: logging.Logger) -> tuple[str, Path]:
    """(version, folder) of Debian's kernel package, downloaded and unpacked once."""
    package = _kernel_package(log)
    version = package.removeprefix("linux-image-")
    folder = KERNEL_CACHE / version
    if (folder / ".done").exists():
        return version, folder / "x"
    log.info("downloading the guest kernel %s", package)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # apt downloads as its own _apt user
    stream(["apt-get", "download", package], log, f"apt-get download {package}",
           error=ImageError, cwd=folder, fix=FIX_AND_RETRY)  # fmt: skip
    folder.chmod(0o755)
    (deb,) = folder.glob("*.deb")
    stream(["dpkg", "-x", deb, folder / "x"], log, "unpacking the guest kernel",
           error=ImageError, fix=FIX_AND_RETRY)  # fmt: skip
    # the package ships no modules.dep: its postinst makes it
    stream(["depmod", "-b", folder / "x", version], log, "depmod for the guest kernel",
           error=ImageError, fix=FIX_AND_RETRY)  # fmt: skip
    deb.unlink()
    (folder / ".done").touch()
    return version, folder / "x"


def _extract_vmlinux(bzimage: Path, out: Path) -> None:
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")  # the xz stream holding the kernel proper
    elf = lzma.LZMADecompressor().decompress(data[start:]) if start >= 0 else b""
    if elf[:4] != b"\x7fELF":
        raise ImageError(f"no ELF kernel inside {bzimage}")
    out.write_bytes(elf)
    notes = run(["readelf", "-n", out], "readelf -n", error=ImageError, fix=FIX_AND_RETRY)
    if PVH_NOTE not in notes:
        raise ImageError(f"{bzimage} has no PVH entry point: QEMU cannot boot its vmlinux")


def _module_order(version: str, tree: Path) -> list[Path]:
    """Every module file the guest needs, dependencies before their users."""
    order: list[Path] = []
    for module in MODULES:
        text = run(
            ["modprobe", "-d", tree, "-S", version, "--show-depends", module], f"modprobe {module}",
            error=ImageError, env=CLEAN_ENV, fix=FORCE_REBUILD,
        )  # fmt: skip
        for line in text.splitlines():
            verb, _, rest = line.partition(" ")
            path = Path(rest.split()[0]) if verb == "insmod" and rest else None
            if path is not None and path not in order:
                order.append(path)
    return order


def _make_initramfs(modules: list[Path], out: Path, log: logging.Logger) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory(prefix="jsb-initramfs-") as tmp:
        root = Path(tmp)
        for sub in ("bin", "dev", "proc", "sys", "run", "newroot", "lower", "rw", "etc",
                    "lib/modules"):  # fmt: skip
            (root / sub).mkdir(parents=True)
        shutil.copy(busybox, root / "bin/busybox")
        for applet in BUSYBOX_APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        for module in modules:
            shutil.copy(module, root / "lib/modules" / module.name)
        (root / "etc/modules.order").write_text("".join(f"{m.name}\n" for m in modules))
        shutil.copy(GUEST_FILES / "init", root / "init")
        (root / "init").chmod(0o755)
        shutil.copy(GUEST_FILES / "pid1.py", root / "etc/pid1.py")
        # the kernel gives /init its stdio on /dev/console, before devtmpfs is mounted
        os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
        os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
        stream(
            [
                "/bin/sh",
                "-c",
                "find . -print0 | sort -z | cpio --null -o -H newc --owner=0:0 "
                '--quiet | gzip -9 -n > "$0"',
                out,
            ],
            log,
            "packing the initramfs",
            error=ImageError,
            cwd=root,
            fix=FIX_AND_RETRY,
        )


def _make_root_disk(rootfs: Path, out: Path, log: logging.Logger) -> None:
    du = run(["du", "-sk", "--apparent-size", rootfs], "du", error=ImageError, timeout=600,
             env=CLEAN_ENV, fix=FORCE_REBUILD)  # fmt: skip
    used = int(du.split()[0]) * 1024
    inodes = sum(1 + len(dirs) + len(files) for _, dirs, files in os.walk(rootfs))
    size_mb = used * 11 // 10 // 2**20 + 64  # the tree, 10% and room for metadata
    stream(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "jsb-root",
            "-O",
            "^has_journal",
            "-N",
            str(inodes + inodes // 4 + 1024),
            "-E",
            "lazy_itable_init=0,root_owner=0:0",
            "-m",
            "0",
            "-d",
            rootfs,
            out,
            f"{size_mb}M",
        ],
        log,
        "making the microVM root disk (mkfs.ext4 -d)",
        error=ImageError,
        fix=FIX_AND_RETRY,
    )


def build_boot_files(name: str, rootfs: Path, log: logging.Logger) -> BootFiles:
    """Make (or confirm current) the microVM boot files of image `name`."""
    manifest = load_manifest(name) or {}
    folder = boot_dir(name)
    folder.mkdir(mode=0o755, exist_ok=True)
    record_path = folder / "boot.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    built_before = dict(record)
    version, tree = _unpacked_kernel(log)
    bzimage = tree / "boot" / f"vmlinuz-{version}"
    files = BootFiles(folder / "vmlinux", folder / "initramfs.cpio.gz", folder / "root.img")

    if record.get("kernel") != version or not files.kernel.exists():
        log.info("extracting the guest kernel %s", version)
        _extract_vmlinux(bzimage, folder / "vmlinux.tmp")
        (folder / "vmlinux.tmp").replace(files.kernel)
        record["kernel"] = version

    modules = _module_order(version, tree)
    initramfs_hash = _digest(
        version.encode(),
        (GUEST_FILES / "init").read_bytes(),
        (GUEST_FILES / "pid1.py").read_bytes(),
        " ".join(m.name for m in modules).encode(),
        " ".join(BUSYBOX_APPLETS).encode(),
    )
    if record.get("initramfs") != initramfs_hash or not files.initramfs.exists():
        log.info("making the initramfs (%d modules)", len(modules))
        _make_initramfs(modules, folder / "initramfs.tmp", log)
        (folder / "initramfs.tmp").replace(files.initramfs)
        record["initramfs"] = initramfs_hash

    content = str(manifest.get("content_hash", ""))
    if record.get("root_disk") != content or not content or not files.root_disk.exists():
        log.info("making the root disk from %s", rootfs)
        tmp = folder / "root.img.tmp"
        tmp.unlink(missing_ok=True)
        _make_root_disk(rootfs, tmp, log)
        tmp.chmod(0o444)
        tmp.replace(files.root_disk)
        record["root_disk"] = content
    for path in (files.kernel, files.initramfs):
        path.chmod(0o444)  # QEMU runs as the kernel's user: world-readable, never writable
    try:
        pwd.getpwnam(SNAPSHOT_BUILDER)
    except KeyError:
        log.info("adding the system user %s (it makes microVM snapshots)", SNAPSHOT_BUILDER)
        stream(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                "/nonexistent", "--shell", "/usr/sbin/nologin", SNAPSHOT_BUILDER],
               log, f"useradd {SNAPSHOT_BUILDER}", error=ImageError,
               fix=FIX_AND_RETRY)  # fmt: skip
    record["modules"] = [m.name for m in modules]
    record["guest_files"] = _guest_files_digest()
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    if record != built_before:  # VMs saved from the old files (backends/microvm_snapshot.py)
        shutil.rmtree(folder / "snapshots", ignore_errors=True)
    return files
