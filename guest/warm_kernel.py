"""A kernel process started before anyone asked for it: its modules imported.

Two places start it. A microVM's PID 1 (guest/microvm/pid1.py) starts it as root
before the VM is snapshotted (provisioner/backends/microvm_snapshot.py), and every VM
restored from that snapshot finds it there, warm; the agent hands it the launch
(`Warm.hand_over`). In a gVisor sandbox of a warm pool (provisioner/pool.py)
kernel_init starts it in the kernel's own PID and mount namespaces, as the kernel's user
(part of the pool's shape), and hands it the launch at the claim.

Either way it imports what ipykernel's start imports and parses its command line
(`_prepare`), says "warm", and waits. When the kernel asked for is exactly
`python -m ipykernel_launcher -f {connection_file}` of this Python (`wanted`), it
becomes (or checks that it is) the kernel's user with the kernel's rlimits and says
"user"; told "go" (the kernel's folders are mounted by then, never before), it takes
the kernel's folder,
environment, time zone and locale, says "ok", and runs the rest of ipykernel's start as
that user (`_run_kernel`), as `subprocess` and the exec would have made it. Anything
else (another argv; PYTHON* or LD_* variables, which act when a process starts) gets a
fresh process, and this one is killed.

Run as a script with the image's Python, its command line the kernel's to be
(`warm_kernel.py -m ipykernel_launcher -f /run/kernel/connection.json`), its control
socket in $JSB_WARM_FD. The agent uses `find`, `wanted` and `Warm` (stdlib only, as the
agent).
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
from typing import Any

ENV = "JSB_WARM"
"""Where pid1 tells the agent about the warm process: "PID,FD" (FD: its control socket)."""
MODULES = (
    "ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell",
    # Imported on the way to the first kernel_info_reply, after ipykernel's own modules:
    # measured, most of a warm start's time if left for the claim (the debugger's debugpy
    # above all; the history's sqlite3; the shell's pdb, completer and magics).
    "ipykernel.debugger", "IPython.core.debugger", "IPython.core.completerlib",
    "IPython.extensions.storemagic", "sqlite3", "pdb", "pydoc", "tornado.queues",
    "tornado.locks", "tornado.platform.asyncio", "http.server", "xmlrpc.client",
    "xmlrpc.server", "faulthandler", "gzip", "mimetypes", "encodings.idna",
)  # fmt: skip
"""What ipykernel_launcher imports on its way to the first kernel_info_reply; those an
image's ipykernel does not have are skipped."""
MAX_LAUNCH = 2 << 20
"""Bound of the launch message (a LAUNCH is at most 1 MiB, protocol.py)."""
AT_START = ("PYTHON", "LD_", "GLIBC_TUNABLES", "MALLOC_", "PYDEVD_", "DEBUGPY_", "TORNADO_",
            "PYZMQ_", "IPYTHON_SUPPRESS_CONFIG_ERRORS", "JUPYTER_ALLOW_INSECURE_WRITES",
            "TRAITLETS_APPLICATION_RAISE_CONFIG_FILE_ERROR")  # fmt: skip
"""Environment variables that act only when a process starts, or that the kernel's
modules read when imported (which the warm process did before the claim): a kernel that
has any gets a fresh process."""
HAND_OVER_TIMEOUT = 30.0
PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
"""Seconds the warm process gets to become the kernel's user (it needs milliseconds)."""


class Warm:
    """The agent's handle on the warm process."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self.control = control

    def accepts(self, argv: list[str], env: dict[str, str]) -> bool:
        """Whether this process can be the kernel `argv` asks for, in `env`."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                python = f.read().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            return False
        return wanted(python, argv, env)

    def hand_over(self, launch: dict) -> None:
        """Make the process the kernel `launch` describes; OSError if it could not (see
        `main` for the two steps)."""
        self.control.settimeout(HAND_OVER_TIMEOUT)
        self.control.sendall(json.dumps(launch).encode() + b"\n")
        if self.control.recv(16) != b"user\n":
            raise OSError("the warm kernel process could not become the kernel's user")
        self.control.sendall(b"go\n")
        self.control.shutdown(socket.SHUT_WR)
        answer = self.control.recv(4096).decode(errors="replace")
        self.control.close()
        if answer != "ok":
            raise OSError(answer or "the warm kernel process ended")

    def discard(self) -> None:
        self.control.close()  # it reads EOF and exits; SIGKILL makes sure
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def wanted(python: str, argv: list[str], env: dict[str, str]) -> bool:
    """Whether a warm process of `python` can be the kernel `argv` asks for, in `env`: the
    same interpreter of the same environment (a venv's bin folder), running
    ipykernel_launcher on the connection file; nothing that acts only when a process starts
    (this one has started); a UTF-8 locale, as this one's (another codeset would change
    Python's encodings)."""
    if len(argv) != 5 or argv[1:] != ["-m", "ipykernel_launcher", "-f", "{connection_file}"]:
        return False
    asked, warm = Path(argv[0]), Path(python)
    same = bool(python) and asked.parent == warm.parent and asked.resolve() == warm.resolve()
    ctype = env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG") or "C.UTF-8"
    utf8 = ctype.lower().replace("-", "").endswith("utf8")
    return same and utf8 and not any(name.startswith(AT_START) for name in env)


def find() -> Warm | None:
    """The warm process pid1 left for the agent, if any (and forget it: it is used once)."""
    value = os.environ.pop(ENV, "")
    try:
        pid, fd = (int(n) for n in value.split(","))
    except ValueError:
        return None
    return Warm(pid, socket.socket(fileno=fd))


def _become_user(launch: dict) -> None:
    """Become the kernel's user, with its rlimits, as `subprocess.Popen(..., user=, group=,
    extra_groups=[], umask=0o077, preexec_fn=limit)` and the exec do in agent.py.

    A microVM's warm process is root until here (its snapshot is every user's): it drops
    to the user, and its last capabilities go with root. A gVisor pool's runs as the
    kernel's user from its start (kernel_init.start_warm: the user is part of the pool's
    shape), so that the image's code never runs as root before the claim: it only checks
    that it is that user (kernel_init checks it again from /proc)."""
    uid, gid = int(launch["uid"]), int(launch["gid"])
    if uid <= 0 or gid <= 0:
        raise ValueError(f"the kernel may not run as uid {uid}, gid {gid}")
    os.umask(0o077)
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        libc = ctypes.CDLL(None, use_errno=True)
        # An exec would make it dumpable again (its user may debug it, read its /proc).
        for option in (PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS):
            if libc.prctl(option, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"prctl {option}")
    elif (os.getresuid(), os.getresgid()) != ((uid,) * 3, (gid,) * 3):
        raise ValueError(f"this process is not uid {uid}, gid {gid}")
    import resource

    for which, value in launch["rlimits"]:
        resource.setrlimit(int(which), (int(value), int(value)))


def _enter(launch: dict, set_by_imports: dict[str, str]) -> None:
    """Take the kernel's folder, environment, time zone and locale, as the exec into the
    kernel's command would (the folder entered as the kernel's user, not as root: where
    only root may enter, this fails and kernel_init starts a fresh process instead)."""
    import locale
    import time

    os.chdir(launch["cwd"])
    os.environ.clear()
    os.environ.update(launch["env"])
    for name, value in set_by_imports.items():  # as the imports would have, after the launch
        os.environ.setdefault(name, value)
    time.tzset()  # TZ, read when `time` was imported
    with contextlib.suppress(locale.Error):  # as Python's start: C.UTF-8 if not there
        locale.setlocale(locale.LC_CTYPE, "")
    import site
    import tempfile

    # Worked out from the environment before the claim: let them be worked out again.
    site.USER_BASE = site.USER_SITE = None
    tempfile.tempdir = None
    sys.dont_write_bytecode = bool(sys.flags.dont_write_bytecode)


def _prepare(connection_file: str) -> tuple[Any, dict[str, str]]:
    """Everything of the kernel's start that holds nothing of its user: its modules, and
    its command line parsed; and the environment variables the imports set (debugpy sets
    one), for the kernel's environment. The rest (its profile, history, sockets, config:
    all of them the user's, under the user's HOME) is done at the claim, by the kernel's
    user."""
    had_gc = "gc" in sys.modules
    import gc
    import importlib

    before = dict(os.environ)

    sys.dont_write_bytecode = True  # nothing of root's in the sandbox's layer (__pycache__)
    for module in MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.parse_command_line(["-f", connection_file])
    # What the imports left is collected now, not in the kernel's start, and what they
    # made is never looked at again by the collector (measured: half of `initialize`).
    gc.collect()
    gc.freeze()
    if not had_gc:  # a fresh kernel has not imported it: neither has this one, to its code
        del sys.modules["gc"]
    return app, {k: v for k, v in os.environ.items() if before.get(k) != v}


def _run_kernel(app: Any, connection_file: str) -> None:
    """What `python -m ipykernel_launcher -f FILE` does from here on."""
    import importlib.util
    import random
    import runpy  # noqa: F401 (`python -m` imports it: so does this one, for the kernel's code)

    # What took randomness at import took the snapshot's, the same in every VM.
    random.seed()
    if "multiprocessing" in sys.modules:
        sys.modules["multiprocessing"].current_process().authkey = os.urandom(32)
    if "ssl" in sys.modules:
        sys.modules["ssl"].RAND_add(os.urandom(32), 32)
    # As `python -m ipykernel_launcher`: this script's folder out of sys.path, as the
    # launcher takes the working folder out (IPython puts "" back), and its argv.
    del sys.path[0]
    launcher = importlib.util.find_spec("ipykernel_launcher")
    sys.argv = [launcher.origin if launcher and launcher.origin else "", "-f", connection_file]
    app.parse_command_line = lambda argv=None: None  # done before the claim
    app.initialize(sys.argv[1:])
    if "username" not in app.config.get("Session", {}):  # read from $USER at import
        app.session.username = os.environ.get("USER", "username")
    app.start()


def main() -> None:
    """Prepare, say "warm", and wait for the launch; then, in two steps: become the
    kernel's user and say "user"; once told "go" (the kernel's folders are mounted by
    then, never before: kernel_init.hand_over), enter them, say "ok" and run the kernel."""
    if os.getsid(0) != os.getpid():  # kernel_init made it a session leader already
        os.setsid()
    control = socket.socket(fileno=int(os.environ["JSB_WARM_FD"]))  # the agent's is the other end
    connection_file = sys.argv[-1]
    app, set_by_imports = _prepare(connection_file)
    import site

    if site.ENABLE_USER_SITE:
        # Outside a venv, the user's own site-packages (`pip install --user`) belong on
        # sys.path, found under a HOME this process does not have yet: a fresh process
        # (in this sandbox still) is the kernel, as kernel_init does when this one ends.
        sys.exit(0)
    control.sendall(b"warm\n")
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_LAUNCH:
        chunk = control.recv(65536)
        if not chunk:
            sys.exit(0)  # not wanted
        data += chunk
    try:
        launch = json.loads(data)
        if launch["connection_file"] != connection_file:
            raise ValueError(f"expected the connection file {connection_file}")
        _become_user(launch)
        control.sendall(b"user\n")
        if control.recv(16) != b"go\n":
            sys.exit(0)  # not wanted after all
        _enter(launch, set_by_imports)
    except (OSError, KeyError, TypeError, ValueError) as e:
        control.sendall(f"cannot start the kernel: {e}".encode()[:4000])
        sys.exit(127)
    control.sendall(b"ok")
    control.close()
    _run_kernel(app, connection_file)


if __name__ == "__main__":
    main()
