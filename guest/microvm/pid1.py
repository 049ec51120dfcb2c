"""PID 1 of the microVM after switch_root: warm up, take the sandbox's settings, run
the agent, power off.

First what every VM of an image does alike: start the warm kernel process
(guest/warm_kernel.py, with the Python the command line names in jsb.warm=),
import the agent (the 9p share at /opt/jupyter-sandbox), wait for both, and
unmount the share (QEMU cannot snapshot a VM with a 9p share mounted). Then say
"ready" on the config port and wait there for this sandbox's settings. The host
snapshots the VM at that point once per VM shape and restores every later VM of
that shape from the snapshot (provisioner/backends/microvm_snapshot.py): they all
go on from here. A VM booted afresh gets its settings at once.

The settings come from whoever made the sandbox, on a port of its own, never from
the channel's holder: fresh entropy for the guest kernel's random pool (a restored
pool is every other restored VM's too), the kernel's user and rlimits, and the
workspace to mount. Then the guest asks the host for the time, and the agent runs
in this process, so that it is PID 1 exactly as under gVisor (it reaps orphans).
When it returns, for whatever reason, this syncs and powers the VM off, which
ends QEMU. A PID 1 that just exited would panic the guest kernel instead.
"""

import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

AGENT_DIR = "/opt/jupyter-sandbox"
# Before anything here imports ssl: not the image's openssl.cnf (layout.AGENT_OPENSSL_CONF).
os.environ["OPENSSL_CONF"] = os.devnull
CONFIG_FD = 5
"""The config port, opened by init."""
CONNECTION_FILE = "/run/kernel/connection.json"
"""Where the agent writes the kernel's connection file (agent.RUNTIME_DIR)."""
MAX_CONFIG = 65536
WARM_TIMEOUT = 300
"""Seconds the warm kernel process gets to import ipykernel (10-15 s under TCG)."""
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MSIZE = 524288
LIBC = ctypes.CDLL(None, use_errno=True)
WarmUp = tuple[subprocess.Popen, socket.socket]
"""The warm kernel process and pid1's end of its control socket."""


def log(msg: str) -> None:
    sys.stderr.write(f"pid1: {msg}\n")
    sys.stderr.flush()


def command_line() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        return dict(arg.partition("=")[::2] for arg in f.read().split() if arg.startswith("jsb."))


def start_warm_kernel(python: str) -> WarmUp | None:
    """The warm kernel process; its command line says which kernel it is to become (for
    `ps`: the agent hands it the connection file's path again with the launch)."""
    if not python:
        return None
    ours, theirs = socket.socketpair()
    kernel = ["-m", "ipykernel_launcher", "-f", CONNECTION_FILE]
    argv = [python, f"{AGENT_DIR}/warm_kernel.py", *kernel]
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr,
            pass_fds=(theirs.fileno(),), cwd="/",
            # LANG as a kernel's by default: the locale acts when Python starts
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "JSB_WARM_FD": str(theirs.fileno())},
        )  # fmt: skip
    except OSError as e:
        log(f"no warm kernel process: {e}")
        ours.close()
        return None
    finally:
        theirs.close()
    return process, ours


def wait_warm(warm: WarmUp | None) -> bool:
    if warm is None:
        return False
    process, control = warm
    control.settimeout(WARM_TIMEOUT)
    try:
        if control.recv(16) == b"warm\n":
            control.settimeout(None)
            os.environ["JSB_WARM"] = f"{process.pid},{control.detach()}"
            return True
    except OSError:
        pass
    log("the warm kernel process did not get ready; kernels start afresh")
    process.kill()
    control.close()
    return False


def read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk or len(data) + len(chunk) > MAX_CONFIG:
            raise ValueError("the config port closed or sent too much")
        data += chunk
    return data


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def reseed(entropy: bytes) -> None:
    """Mix the host's entropy into the pool and reseed the CRNG from it, now."""
    with open("/dev/urandom", "wb") as urandom:
        info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        fcntl.ioctl(urandom, RNDADDENTROPY, info)
        fcntl.ioctl(urandom, RNDRESEEDCRNG)


def mount_workspace(path: str, read_only: bool) -> None:
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"bad workspace path {path!r}")
    Path(path).mkdir(mode=0o755, parents=True, exist_ok=True)
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    options = f"trans=virtio,version=9p2000.L,msize={MSIZE},access=client"
    check(LIBC.mount(b"workspace", path.encode(), b"9p", flags, options.encode()),
          f"mount the workspace at {path}")  # fmt: skip


def set_clock() -> None:
    """Take the host's time: a restored VM's clock says when its snapshot was taken."""
    os.write(CONFIG_FD, b"time\n")
    time.clock_settime(time.CLOCK_REALTIME, float(read_line(CONFIG_FD)))


def settle() -> None:
    """Everything before the agent runs; see the module's docstring."""
    warm = start_warm_kernel(command_line().get("jsb.warm", ""))
    sys.path.insert(0, AGENT_DIR)
    import agent  # noqa: F401  (imported now, so that a snapshot has it imported)

    warmed = wait_warm(warm)
    check(LIBC.umount2(AGENT_DIR.encode(), 0), f"unmount {AGENT_DIR}")
    os.write(CONFIG_FD, b"ready\n" if warmed else b"ready cold\n")  # a cold one is not saved
    config = json.loads(read_line(CONFIG_FD))
    reseed(bytes.fromhex(config["entropy"]))
    log("the host's entropy mixed in, the random pool reseeded")
    os.environ["JSB_KERNEL"] = str(config["kernel"])
    workspace = config.get("workspace")
    if workspace:
        mount_workspace(str(workspace["path"]), bool(workspace["read_only"]))
    set_clock()
    os.close(CONFIG_FD)


status = 1
try:
    settle()
    sys.argv = [f"{AGENT_DIR}/agent.py"]
    import agent

    agent.main()
except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
except BaseException:
    traceback.print_exc()
finally:
    try:
        sys.stderr.write(f"pid1: the agent ended with status {status}; powering off\n")
        sys.stderr.flush()
        os.sync()
    finally:
        LIBC.reboot(RB_POWER_OFF)
        LIBC.reboot(RB_AUTOBOOT)  # QEMU runs with -no-reboot: this ends it too
        os._exit(status)
