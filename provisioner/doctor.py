"""Checks that this host can run sandboxed kernels, each with how to fix a failure."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import cgroups
from .accel import choose as choose_accel
from .backends.microvm_snapshot import snapshot_dir
from .idmap import IdMap, mapped_tree
from .images import ImageError, find_image, load_manifest, verify_image
from .microvm_image import find_boot_files
from .network import tap as network_tap

RUNSC_MIN_DATE = 20240729
_TUNGETFEATURES = 0x800454CF
INSTALL = "run `make setup` in the jupyter-sandbox checkout (or `bash scripts/install-host.sh`)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def runsc_version(runsc: str) -> tuple[str, int | None]:
    out = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0] if out else "unknown"
    match = re.search(r"(20\d{6})", first)
    return first, int(match.group(1)) if match else None


def check_platform(runsc: str, platform: str) -> Check:
    """Run a trivial sandbox on `platform`: the only proof that it works here."""
    with tempfile.TemporaryDirectory(prefix="jsb-doctor-") as tmp:
        cmd = [
            runsc,
            f"--root={tmp}/state",
            f"--platform={platform}",
            "--network=none",
            "do",
            "--",
            "/bin/true",
        ]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return Check(
                f"platform {platform}",
                False,
                "timed out after 30 s",
                "choose another platform: c.GVisorProvisioner.platform = 'systrap'",
            )
    if result.returncode:
        return Check(
            f"platform {platform}",
            False,
            result.stderr.strip()[-300:],
            "choose another platform: c.GVisorProvisioner.platform = 'systrap'",
        )
    return Check(f"platform {platform}", True, "a test sandbox ran")


NETWORK_TOOLS = {"ip": "iproute2", "nft": "nftables", "nsenter": "util-linux",
                 "conntrack": "conntrack"}  # fmt: skip
"""Host tools kernels with a network (egress, open) need, and their Debian packages."""


def check_network_tools() -> Check:
    """The tools provisioner/network runs: without conntrack, a removed kernel's flows linger."""
    missing = [tool for tool in NETWORK_TOOLS if shutil.which(tool) is None]
    if not missing:
        return Check("network tools", True, ", ".join(NETWORK_TOOLS))
    packages = " ".join(NETWORK_TOOLS[tool] for tool in missing)
    return Check(
        "network tools",
        False,
        f"missing {', '.join(missing)} (needed for network = 'egress' or 'open')",
        f"apt-get install {packages}, or {INSTALL}",
    )


def run_checks(
    runsc_path: str = "runsc", platform: str = "systrap", image: str = "python3"
) -> list[Check]:
    checks = [
        Check(
            "privileges",
            os.geteuid() == 0,
            "running as root" if os.geteuid() == 0 else f"running as uid {os.geteuid()}",
            "run the Jupyter server as root (an unprivileged mode is planned)",
        ),
    ]
    runsc = shutil.which(runsc_path)
    if runsc is None:
        checks.append(Check("runsc", False, f"{runsc_path!r} not found", INSTALL))
    else:
        version, date = runsc_version(runsc)
        new_enough = date is not None and date >= RUNSC_MIN_DATE
        checks.append(
            Check(
                "runsc",
                new_enough,
                f"{runsc}: {version}",
                "" if new_enough else f"systrap needs runsc >= {RUNSC_MIN_DATE}; {INSTALL}",
            )
        )
        if os.geteuid() == 0:
            checks.append(check_platform(runsc, platform))
    version = "v2" if cgroups.is_v2() else "v1 (hybrid)"
    memory = Path("/sys/fs/cgroup/memory.max" if cgroups.is_v2() else "/sys/fs/cgroup/memory")
    checks.append(
        Check(
            "cgroups",
            cgroups.is_v2() or memory.exists(),
            f"cgroup {version}",
            "mount the cgroup memory controller; limits cannot be enforced without it",
        )
    )
    checks.append(check_network_tools())
    if os.geteuid() == 0:
        checks.append(check_idmap())
    try:
        rootfs = find_image(image)
        manifest = load_manifest(image)
        if manifest is not None:  # a named image: its files must still match its manifest
            verify_image(image)
        built = (manifest or {}).get("built_at", "?")
        checks.append(Check("image", True, f"{rootfs} (built {built}, content verified)"))
    except ImageError as e:
        checks.append(Check("image", False, str(e), "run `jupyter sandbox image build --force`"))
    checks += microvm_checks(image)
    return checks


def check_idmap() -> Check:
    """Whether this host can idmap a folder (`idmap.py`): what a kernel needs on a workspace
    that its uid does not own (root's), tried on a folder of /tmp's file system."""
    name = "workspaces of other owners (idmapped mounts)"
    with tempfile.TemporaryDirectory(prefix="jsb-doctor-") as folder:
        try:
            os.close(mapped_tree(Path(folder), IdMap(owner=(0, 0), kernel=(1000, 1000))))
        except OSError as e:
            return Check(name, False, str(e), "use Linux 5.12 or later (6.x for tmpfs)")
    return Check(name, True, "a root-owned folder is shown to uid 1000 as its own")


def check_tun() -> Check:
    """A microVM with a network gets a tap device that this process, as root, attaches to
    for QEMU (`network.tap.open_tap`): /dev/net/tun must be a working tun driver that it can
    open and that can make taps as attached. Its mode does not matter (QEMU never opens it)."""
    name, tun = "microVM: tap devices", network_tap.TUN_DEVICE
    needed = "(needed for network = 'egress' or 'open')"
    try:
        fd = os.open(tun, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Check(name, False, f"{tun} does not exist {needed}",
                     "modprobe tun (or run the server where /dev/net/tun exists)")  # fmt: skip
    except OSError as e:
        return Check(name, False, f"cannot open {tun}: {e} {needed}",
                     "run the Jupyter server (or the sandbox service) as root")  # fmt: skip
    try:
        features = struct.unpack("I", fcntl.ioctl(fd, _TUNGETFEATURES, bytes(4)))[0]
    except OSError as e:
        return Check(name, False, f"{tun} is no tun driver: {e} {needed}", "modprobe tun")
    finally:
        os.close(fd)
    if features & network_tap.TAP_FLAGS != network_tap.TAP_FLAGS:
        return Check(name, False, f"{tun} cannot make taps with virtio-net headers "
                     f"(features {features:#x}) {needed}", "a Linux kernel with tun")  # fmt: skip
    return Check(name, True, f"{tun} opens as uid {os.geteuid()}; QEMU gets an attached tap")


def microvm_checks(image: str, qemu_path: str = "qemu-system-x86_64") -> list[Check]:
    """QEMU, the boot files, and which accelerator VMs get (probed once per host boot)."""
    qemu = shutil.which(qemu_path)
    if qemu is None:
        return [Check("microVM: qemu", False, f"{qemu_path!r} not found", INSTALL)]
    checks = [Check("microVM: qemu", True, qemu), check_tun()]
    try:
        boot = find_boot_files(image)
    except ImageError as e:
        return [*checks, Check("microVM: boot files", False, str(e), "run `make setup`")]
    checks.append(Check("microVM: boot files", True, f"{boot.kernel.parent}"))
    chosen = choose_accel(qemu, boot.kernel)
    checks.append(Check("microVM: accelerator", True, f"{chosen.name.upper()}: {chosen.reason}"))
    saved = sorted(snapshot_dir(boot).glob("*.vmstate"))
    size = sum(p.stat().st_size for p in saved) >> 20
    checks.append(Check("microVM: snapshots", True,
                        f"{len(saved)} VM shapes saved ({size} MiB) in {snapshot_dir(boot)}; "
                        "the first VM of a shape makes it"))  # fmt: skip
    return checks
