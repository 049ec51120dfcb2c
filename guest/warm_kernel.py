"""A kernel process started before anyone asked for it: ipykernel already imported.

Under TCG importing ipykernel takes the guest 10-15 s, most of a microVM's start.
So the microVM's PID 1 (guest/microvm/pid1.py) starts this script as root before
the VM is snapshotted (provisioner/backends/microvm_snapshot.py): it imports the
kernel's modules, says so, and waits on its control socket. Every VM restored
from that snapshot finds it there, already warm. When the agent gets LAUNCH and
the kernel asked for is exactly `python -m ipykernel_launcher -f {connection_file}`
of this Python, it hands the launch over (`hand_over`): the process becomes the
kernel's user with the kernel's rlimits, environment and folder, as `subprocess`
would have made it, answers "ok", and runs ipykernel_launcher. Anything else
(another argv; PYTHON* or LD_* variables, which act when a process starts) gets a fresh
process, and this one is killed.

Run as a script with the image's Python, its command line the kernel's to be
(`warm_kernel.py -m ipykernel_launcher -f /run/kernel/connection.json`, as `ps`
shows it), its control socket in $JSB_WARM_FD. The agent uses `find` and `Warm`
(stdlib only, as the agent).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
from pathlib import Path

ENV = "JSB_WARM"
"""Where pid1 tells the agent about the warm process: "PID,FD" (FD: its control socket)."""
MODULES = ("ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell")
"""What ipykernel_launcher imports on its way to the first kernel_info_reply, mostly."""
MAX_LAUNCH = 2 << 20
"""Bound of the launch message (a LAUNCH is at most 1 MiB, protocol.py)."""
AT_START = ("PYTHON", "LD_", "GLIBC_TUNABLES", "MALLOC_")
"""Environment variables that act only when a process starts: a kernel that has any
gets a fresh process."""
HAND_OVER_TIMEOUT = 30.0
"""Seconds the warm process gets to become the kernel's user (it needs milliseconds)."""
PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4


class Warm:
    """The agent's handle on the warm process."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self.control = control

    def accepts(self, argv: list[str], env: dict[str, str]) -> bool:
        """Whether this process can be the kernel `argv` asks for, in `env`."""
        if len(argv) != 5 or argv[1:] != ["-m", "ipykernel_launcher", "-f", "{connection_file}"]:
            return False
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                python = f.read().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            return False
        # The same interpreter of the same environment (a venv's bin folder); nothing
        # that acts only when a process starts (this one has started); a UTF-8 locale,
        # as this one's (another codeset would change Python's encodings).
        wanted, warm = Path(argv[0]), Path(python)
        same = wanted.parent == warm.parent and wanted.resolve() == warm.resolve()
        ctype = env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG") or "C.UTF-8"
        utf8 = ctype.lower().replace("-", "").endswith("utf8")
        return same and utf8 and not any(name.startswith(AT_START) for name in env)

    def hand_over(self, launch: dict) -> None:
        """Make the process the kernel `launch` describes; OSError if it could not."""
        self.control.settimeout(HAND_OVER_TIMEOUT)
        self.control.sendall(json.dumps(launch).encode() + b"\n")
        self.control.shutdown(socket.SHUT_WR)
        answer = self.control.recv(4096).decode(errors="replace")
        self.control.close()
        if answer != "ok":
            raise OSError(answer or "the warm kernel process ended")

    def discard(self) -> None:
        self.control.close()  # it reads EOF and exits; SIGKILL makes sure
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def find() -> Warm | None:
    """The warm process pid1 left for the agent, if any (and forget it: it is used once)."""
    value = os.environ.pop(ENV, "")
    try:
        pid, fd = (int(n) for n in value.split(","))
    except ValueError:
        return None
    return Warm(pid, socket.socket(fileno=fd))


def _become(launch: dict) -> None:
    """Everything `subprocess.Popen(..., user=, group=, extra_groups=[], umask=0o077,
    start_new_session=True, cwd=, env=, preexec_fn=limit)` and the exec do in agent.py
    (except that the folder is entered as the kernel's user, not as root: where only
    root may enter, this fails and the agent starts a fresh process instead)."""
    uid, gid = int(launch["uid"]), int(launch["gid"])
    if uid <= 0 or gid <= 0:
        raise ValueError(f"the kernel may not run as uid {uid}, gid {gid}")
    os.umask(0o077)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc = ctypes.CDLL(None, use_errno=True)
    # An exec would make it dumpable again (its user may debug it, read its /proc): do so.
    for option in (PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS):
        if libc.prctl(option, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl {option}")
    import locale
    import resource
    import time

    for which, value in launch["rlimits"]:
        resource.setrlimit(int(which), (int(value), int(value)))
    os.chdir(launch["cwd"])
    os.environ.clear()
    os.environ.update(launch["env"])
    time.tzset()  # TZ, read when `time` was imported
    with contextlib.suppress(locale.Error):  # as Python's start: C.UTF-8 if not there
        locale.setlocale(locale.LC_CTYPE, "")


def _run_kernel(connection_file: str) -> None:
    """What `python -m ipykernel_launcher -f FILE` does from here on."""
    import random
    import runpy

    # What took randomness at import took the snapshot's, the same in every VM.
    random.seed()
    if "multiprocessing" in sys.modules:
        sys.modules["multiprocessing"].current_process().authkey = os.urandom(32)
    if "ssl" in sys.modules:
        sys.modules["ssl"].RAND_add(os.urandom(32), 32)
    # As `python -m` (ipykernel_launcher takes "" out, IPython puts it back). The venv
    # has no user site-packages (`accepts`: only its Python), so none to look for.
    sys.path[0] = ""
    sys.argv = ["ipykernel_launcher", "-f", connection_file]
    runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)


def main() -> None:
    import importlib

    os.setsid()
    control = socket.socket(fileno=int(os.environ["JSB_WARM_FD"]))  # pid1's end: the agent's
    for module in MODULES:
        importlib.import_module(module)
    control.sendall(b"warm\n")
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_LAUNCH:
        chunk = control.recv(65536)
        if not chunk:
            sys.exit(0)  # not wanted
        data += chunk
    try:
        launch = json.loads(data)
        _become(launch)
    except (OSError, KeyError, TypeError, ValueError) as e:
        control.sendall(f"cannot start the kernel: {e}".encode()[:4000])
        sys.exit(127)
    control.sendall(b"ok")
    control.close()
    _run_kernel(launch["connection_file"])


if __name__ == "__main__":
    main()
