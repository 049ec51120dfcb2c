"""Which accelerator microVMs use: KVM where the host really runs a guest under it, else TCG.

The presence of /dev/kvm proves nothing: some hosts' KVM only runs guests with
special (PVM) kernels, and a stock guest hangs there without a word. So the
answer comes from a short probe boot of the real guest kernel under KVM,
watched for its first console output, and is kept for the rest of the host's
uptime (in /run).

Nor does root opening /dev/kvm: a VM's QEMU runs as the kernel's user with no
group but the device's own (`kvm_group`), so a device only root may open
(0600) means TCG, and Debian's 0660 root:kvm means QEMU gets the `kvm` group.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import itertools
import json
import os
import pwd
import re
import select
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .state import runtime_dir

PROBE_TIMEOUT = 5.0
"""Seconds a KVM guest gets to boot to its root-mount step (a working one needs under 1)."""
KVM_DEVICE = Path("/dev/kvm")
BOOTED = b"VFS: "
"""What the guest kernel prints once it is up and looks for a root (the probe gives none)."""


@dataclass(frozen=True)
class Accel:
    name: str
    """"kvm" or "tcg"."""
    reason: str


def tsc_arguments() -> str:
    """The guest kernel's TSC settings under TCG: it hangs at random calibrating the TSC
    (docs/host-notes.md), so it is told the rate. QEMU's TCG TSC is the host's own, so that
    rate is the host's: any other makes the guest's clock run fast or slow (2 GHz on a
    2.1 GHz host: 5% fast, three minutes an hour)."""
    return f"tsc_early_khz={host_tsc_khz()} tsc=reliable"


def host_tsc_khz() -> int:
    """The host's TSC rate: the kernel's own figure where it gives one; else, on a host
    without frequency scaling (a VM: where TCG runs), /proc/cpuinfo's "cpu MHz", which
    is then the TSC's rate; else the nominal rate in the CPU's model name ("@ 2.10GHz");
    else 2 GHz. Stable from one call to the next: it is part of a VM's shape."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    scaling = Path("/sys/devices/system/cpu/cpu0/cpufreq").exists()
    with contextlib.suppress(OSError, ValueError), open("/proc/cpuinfo") as cpuinfo:
        for line in itertools.takewhile(str.strip, cpuinfo):
            name, _, value = (part.strip() for part in line.partition(":"))
            if name == "cpu MHz" and not scaling:
                return round(float(value) * 1000)
            if name == "model name" and (nominal := re.search(r"@ ([0-9.]+)GHz", value)):
                return round(float(nominal[1]) * 1_000_000)
    return 2_000_000


def kvm_group(device: Path | None = None) -> int | None:
    """The group a VM's QEMU must hold to open `device` as an ordinary user (it runs as the
    kernel's user, groups cleared): None if any user may open it, the device's group if
    that group may (0660 root:kvm, as Debian's udev makes it). PermissionError if only
    root may (0600, or group root, which QEMU must never get): not KVM for QEMU, whatever
    root's own open says. OSError if it is missing. `device`: KVM_DEVICE unless given."""
    device = device or KVM_DEVICE
    st = device.stat()
    if not stat.S_ISCHR(st.st_mode):
        raise OSError(errno.ENODEV, f"{device} is not a character device")
    if st.st_mode & 0o006 == 0o006:
        return None
    if st.st_mode & 0o060 == 0o060 and st.st_gid != 0:
        return st.st_gid
    try:
        owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
    except KeyError:
        owner = f"{st.st_uid}:{st.st_gid}"
    raise PermissionError(
        errno.EACCES,
        f"{device} is {stat.filemode(st.st_mode)} {owner}: QEMU, which runs as "
        "the kernel's user, may not open it (Debian's udev makes it 0660 root:kvm)",
    )


def _cache() -> Path:
    return runtime_dir() / "accel.json"


def probe(qemu: str, kernel: Path, accel: str = "kvm", timeout: float = PROBE_TIMEOUT) -> Accel:
    """Boot `kernel` under `accel` until it wants a root disk, or give up after `timeout`.

    Not the first output: a bzImage's setup code prints even where the kernel then hangs.
    """
    if accel == "kvm":
        try:
            kvm_group()
            os.close(os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            return Accel("tcg", f"/dev/kvm cannot be opened ({e.strerror})")
    command_line = f"console=ttyS0 earlyprintk=ttyS0 panic=-1 {tsc_arguments()}"
    argv = [qemu, "-M", "microvm", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kernel), "-append", command_line, "-serial", "stdio"]  # fmt: skip
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as e:
        return Accel("tcg", f"cannot run {qemu}: {e}")
    assert process.stdout is not None
    output = b""
    try:
        while BOOTED not in output and len(output) < 1 << 20:
            left = timeout - (time.monotonic() - started)
            if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
                break
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
    finally:
        process.kill()
        _, errors = process.communicate()
    seconds = time.monotonic() - started
    if BOOTED in output:
        return Accel(accel, f"a probe guest booted under {accel.upper()} in {seconds:.1f} s")
    detail = errors.decode(errors="replace").strip().splitlines()[-1:] or ["no error"]
    return Accel(
        "tcg",
        f"/dev/kvm is there but a probe guest did not boot under {accel.upper()} in {timeout:g} s "
        f"({len(output)} bytes of console, {detail[0]}); it may run only special guests "
        "(e.g. PVM)",
    )


def choose(qemu: str, kernel: Path, wanted: str = "auto") -> Accel:
    """The accelerator for new VMs: `wanted` if forced, else the cached or probed answer."""
    if wanted in ("kvm", "tcg"):
        return Accel(wanted, "set by configuration (accel)")
    try:
        return Accel(**json.loads(_cache().read_text()))
    except (OSError, ValueError, TypeError):
        pass
    found = probe(qemu, kernel)
    _cache().parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = _cache().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(found)))
    tmp.replace(_cache())
    return found
