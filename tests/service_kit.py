"""What the sandbox service's tests share: system users, the service as a process of its
own, and callers that really are those users (the kernel tells the service who they are).

Users' code runs with the venv `deploy/install-hub.sh` makes (Debian's Python under
/opt, readable by every user), as a real deployment's servers do.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import skip_or_fail

from provisioner import cgroups
from provisioner.backends.gvisor import runsc_root
from provisioner.service.wire import MAX_FDS, MAX_MESSAGE
from provisioner.state import records

USER_VENV = Path("/opt/jupyter-sandbox/venv")
USER_PYTHON = USER_VENV / "bin" / "python"
REPO = Path(__file__).resolve().parents[1]


def require_user_venv() -> None:
    if not (USER_VENV / "bin" / "jupyterhub-singleuser").exists():
        skip_or_fail(f"{USER_VENV} is missing: run `bash deploy/install-hub.sh` (make test does)")


@contextlib.contextmanager
def system_users(*names: str, group: str = "") -> Iterator[dict[str, pwd.struct_passwd]]:
    """Local users with homes (and a shared extra group), removed afterwards with their homes."""
    if group:
        subprocess.run(["groupadd", "-f", group], check=True)
    made = {}
    try:
        for name in names:
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True, check=False)
            extra = ["-G", group] if group else []
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", *extra, name], check=True)
            made[name] = pwd.getpwnam(name)
        yield made
    finally:
        for name in names:
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True, check=False)
        if group:
            subprocess.run(["groupdel", group], capture_output=True, check=False)


def as_user(user: pwd.struct_passwd, argv: list[str], **kwargs) -> subprocess.Popen:
    """Run `argv` as `user` (no groups but the user's), in its home, with a clean env."""
    env = {
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "PATH": f"{USER_VENV}/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        **kwargs.pop("env", {}),
    }
    return subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *argv],
        cwd=user.pw_dir,
        env=env,
        **kwargs,
    )


_CONNECT = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"s"], [s.fileno()])
"""


def connect_as(user: pwd.struct_passwd, path: Path) -> socket.socket:
    """A connection to the service that `user` made (a process of the user connects, and
    passes the socket here): the service sees `user`, whatever this process is."""
    here, there = socket.socketpair()
    with here, there:
        proc = as_user(user, ["/usr/bin/python3", "-c", _CONNECT, str(path), str(there.fileno())],
                       pass_fds=[there.fileno()])  # fmt: skip
        assert proc.wait(timeout=30) == 0
        _, fds, _, _ = socket.recv_fds(here, 1, 1)
    return socket.socket(fileno=fds[0])


class Caller:
    """A blocking client of the service's wire, for tests that speak it themselves."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(120)
        self.events: list[dict] = []
        self.next_id = 0

    def send(self, message: dict | bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)

    def recv(self) -> tuple[dict, list[int]]:
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE + 1, MAX_FDS)
        assert data, "the service closed the connection"
        return json.loads(data), fds

    def reply(self, rid: int | None) -> tuple[dict, list[int]]:
        """The reply to request `rid`; events that come first are kept in `events`."""
        while True:
            message, fds = self.recv()
            if "event" in message:
                self.events.append(message)
                continue
            assert message.get("id") == rid, message
            return message, fds

    def call(self, op: str, **fields) -> tuple[dict, list[int]]:
        self.next_id += 1
        self.send({"id": self.next_id, "op": op, **fields})
        return self.reply(self.next_id)

    def create(self, cwd: str, **settings) -> tuple[dict, list[int]]:
        return self.call(
            "create",
            kernel_id=f"k{time.monotonic_ns()}",
            kernel_name="python3-gvisor",
            settings=settings,
            cwd=cwd,
        )

    def close(self) -> None:
        self.sock.close()


class Service:
    """`jupyter sandbox serve` as its own root process, on a socket of the test's."""

    def __init__(self, folder: Path, policy: str, grace: float = 3.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        self.socket = folder / "service.sock"
        self.policy = folder / "policy.toml"
        self.policy.write_text(policy)
        self.log = folder / "service.log"
        self.grace = grace
        self.proc: subprocess.Popen | None = None

    def start(self) -> Service:
        skip = len(self.log_text())  # what an earlier run wrote
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "jupyter-sandbox"), "serve",
                 f"--socket={self.socket}", f"--policy={self.policy}",
                 f"--grace-period={self.grace}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while "listening on" not in self.log_text()[skip:]:
            assert self.proc.poll() is None, f"the service ended:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"the service did not start:\n{self.log_text()}"
            time.sleep(0.05)
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def caller(self, user: pwd.struct_passwd) -> Caller:
        return Caller(connect_as(user, self.socket))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def service_records(uids: set[int]) -> list:
    """The recorded sandboxes of these callers."""
    return [r for r in records() if r.uid in uids]


def containers() -> set[str]:
    found = subprocess.run(
        ["runsc", f"--root={runsc_root()}", "list", "--quiet"], capture_output=True, text=True
    )
    return set(found.stdout.split())


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def memory_limit_of(record) -> int:
    """The host's memory limit on a sandbox's cgroup (cgroup v1 or v2)."""
    rel = record.cgroup.strip("/")
    if cgroups.is_v2():
        return int((cgroups.ROOT / rel / "memory.max").read_text())
    return int((cgroups.ROOT / "memory" / rel / "memory.limit_in_bytes").read_text())


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
