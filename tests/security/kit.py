"""What every attack needs: a sandboxed kernel to attack from, and things worth stealing.

The attacks run from three targets (`TARGETS`): a kernel of each backend on the
default image, and a gVisor kernel on an image imported the way an operator brings
their own (`imported_image` of images_kit: the default image re-imported from a
docker-archive plus a layer, its kernelspec written by `jupyter sandbox kernelspec
install`), for an imported image must get the same guarantees. One kernel per target
serves all the attacks of a module that leave it alive (a microVM under TCG takes
half a minute to start). Before it starts, the
host is seeded with secrets an attacker would look for: a file outside any
workspace, another user's home, a server environment variable, another kernel's
connection file. Each attack runs through the ordinary execute path and prints
one JSON line of evidence, which the test checks twice: the attempt really ran,
and it failed for the reason the sandbox gives.

Attacks that could do harm if they succeeded (mounts, the clock, modules, writes)
first call `assert_sandboxed()` in the kernel: it compares the kernel's boot id
with the host's, so a broken sandbox fails the test instead of touching the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS, READY_TIMEOUT, our_sandboxes, require_sandbox
from images_kit import kernelspecs
from jupyter_client.manager import KernelManager

from provisioner.images.store import DEFAULT_IMAGE
from provisioner.provisioner import GVisorProvisioner, MicroVMProvisioner
from provisioner.request import SandboxRequest

TARGETS = {"gvisor": ("gvisor", False), "microvm": ("microvm", False),
           "gvisor-imported": ("gvisor", True)}  # fmt: skip
"""What the attacks run from, by test id: (backend, on the imported image?)."""

HOST_BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()

PRELUDE = textwrap.dedent(
    f"""
    import ctypes, ctypes.util, errno, json, os, socket, subprocess
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def assert_sandboxed():
        '''Refuse to go on unless this kernel runs under a kernel other than the host's.'''
        try:
            boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
        except OSError:
            boot_id = ""
        if boot_id == {HOST_BOOT_ID!r}:
            raise SystemExit("NOT SANDBOXED: this kernel shares the host's kernel")

    def syscall(number, *args):
        '''(result, errno name) of a raw system call.'''
        ctypes.set_errno(0)
        result = _libc.syscall(number, *args)
        code = ctypes.get_errno() if result == -1 else 0
        return result, errno.errorcode.get(code, str(code)) if code else ""

    def attempt(fn, *args, **kwargs):
        '''("ok", value) or (errno name / exception name, message).'''
        try:
            return "ok", fn(*args, **kwargs)
        except OSError as e:
            return errno.errorcode.get(e.errno, type(e).__name__), str(e)
        except Exception as e:
            return type(e).__name__, str(e)

    def report(**evidence):
        print(json.dumps(evidence, default=repr))
    """
)


class _HostileAgent:
    """Mixin: the sandbox's agent folder is `agent_dir`, a test's hostile agent (PID 1,
    root in the sandbox) in place of the installed one."""

    agent_dir: Path

    def sandbox_request(self, cwd: str, cmd: list[str] | None = None) -> SandboxRequest:
        request = super().sandbox_request(cwd, cmd)  # type: ignore[misc]
        return dataclasses.replace(request, agent_dir=self.agent_dir)


class HostileGVisor(_HostileAgent, GVisorProvisioner):
    pass


class HostileMicroVM(_HostileAgent, MicroVMProvisioner):
    pass


HOSTILE = {"gvisor": HostileGVisor, "microvm": HostileMicroVM}


@dataclass
class Target:
    """A live sandboxed kernel and what was planted on the host around it."""

    backend: str
    km: KernelManager
    kc: Any
    workspace: Path
    planted: dict[str, Any] = field(default_factory=dict)
    image: str = DEFAULT_IMAGE
    """The image the kernel runs on: attacks that start kernels of their own start them
    on it too (with `kernel_name`, and this as their provisioner's `image`)."""

    @property
    def kernel_name(self) -> str:
        """The kernelspec this kernel was started from."""
        return self.km.kernel_name

    def run(self, code: str, timeout: float = 120) -> Any:
        """Execute `code`; return the JSON it reported on its last line."""
        out: list[str] = []

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        lines = text.strip().splitlines()
        assert lines, "the attack reported nothing"
        return json.loads(lines[-1])


@contextlib.contextmanager
def planted_host() -> Iterator[dict[str, Any]]:
    """Secrets on the host where an attacker would look, all world-readable on the host
    (a kernel that could see the host's files would read them), removed afterwards."""
    token = secrets.token_hex(12)
    made: list[Path] = []
    spot = Path("/var/tmp") / f"jsb-attack-{token[:8]}"
    spot.mkdir(mode=0o755)
    (spot / "secret").write_text(f"host-secret-{token}\n")
    made.append(spot)
    home = Path("/home") / f"jsb-victim-{token[:8]}"
    home.mkdir(mode=0o755)
    (home / "notes.txt").write_text(f"victim-secret-{token}\n")
    made.append(home)
    try:
        yield {
            "token": token,
            "host_secret": str(spot / "secret"),
            "victim_home": str(home),
            "env_token": f"env-secret-{token}",
        }
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def start_kernel(kernel_name: str, workspace: Path, env_token: str) -> tuple[KernelManager, Any]:
    """A kernel started by a 'server' whose environment holds a token."""
    saved = {k: os.environ.get(k) for k in ("JUPYTERHUB_API_TOKEN", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({k: env_token for k in saved})
    try:
        km = KernelManager(kernel_name=kernel_name, autorestart=False)
        km.start_kernel(cwd=str(workspace))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=READY_TIMEOUT)
    return km, kc


@pytest.fixture(scope="session")
def imported_python(imported_image: str, kernel_prefix: Path) -> str:
    """The imported image's Python kernel installed for gVisor: its kernelspec name."""
    [name] = kernelspecs(imported_image, kernel_prefix, "--kernel", "python3",
                         "--backend", "gvisor")  # fmt: skip
    return name


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """One sandboxed kernel per target (`TARGETS`) and module, attacked by its tests in
    turn (and gone before the next module: other tests count what this process has
    running). The imported image is made only when its target runs."""
    backend, imported = TARGETS[request.param]
    require_sandbox(backend)
    if imported:
        image = request.getfixturevalue("imported_image")
        kernel_name = request.getfixturevalue("imported_python")
    else:
        image, kernel_name = DEFAULT_IMAGE, BACKENDS[backend]
    before = our_sandboxes()
    workspace = Path(tempfile.mkdtemp(prefix="jsb-attack-", dir="/tmp"))
    os.chown(workspace, 1000, 1000)
    # Beside the workspace on the host, where `..` out of its mount would lead.
    sibling = Path(f"{workspace}-sibling")
    sibling.mkdir(mode=0o755)
    (sibling / "secret").write_text("sibling-secret\n")
    try:
        with planted_host() as planted:
            # Another tenant's kernel (unsandboxed, for its live ports and its key), with
            # its connection file in a runtime directory any host user could list.
            runtime = Path(planted["host_secret"]).parent / "runtime"
            runtime.mkdir(mode=0o755)
            other = KernelManager(
                kernel_name="python3", connection_file=str(runtime / "kernel-other.json")
            )
            other.start_kernel(cwd=str(sibling))
            planted.update(
                sibling_secret=str(sibling / "secret"),
                runtime_dir=str(runtime),
                other_connection_file=other.connection_file,
                other_key=other.session.key.decode(),
                other_ports=[other.shell_port, other.iopub_port, other.hb_port],
            )
            try:
                km, kc = start_kernel(kernel_name, workspace, planted["env_token"])
                try:
                    assert km.provisioner.image == image, "the target runs another image"
                    target = Target(backend, km, kc, workspace, planted, image)
                    target.run(PRELUDE + "\nreport(ready=True)")
                    yield target
                finally:
                    kc.stop_channels()
                    km.shutdown_kernel(now=True)
            finally:
                other.shutdown_kernel(now=True)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
        shutil.rmtree(sibling, ignore_errors=True)
    assert not our_sandboxes() - before, "the attacked sandbox was left behind"
