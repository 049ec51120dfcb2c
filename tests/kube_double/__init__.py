"""A cluster double: a process that speaks the Kubernetes API and runs pods under runsc.

For tests that need "a cluster" where none can be installed: the real client
library talks to it over HTTP as to an API server (REST, watch), and each pod's
containers really run, from the manifest, under gVisor on this host, in a
network namespace of their own that the test reaches at the pod's IP. See
`config.py` for the config file, `api.py` for the API it serves, `kubelet.py`
for how pods run, and `running_double` for the way a test starts one:

    with running_double(tmp_path, images={"python:3": find_image()}) as double:
        async with ApiClient(double.configuration()) as api:
            await CoreV1Api(api).create_namespaced_pod("default", pod)
        await double.evict("default", "kernel-1", "The node was low on resource: memory.")

It runs as root (it makes network namespaces, mounts, cgroups), one per state
folder and per bridge name at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio.client import Configuration

from . import config as config_file
from .cleanup import leftovers

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
START_SECONDS = 30.0
STOP_SECONDS = 60.0


CONNECT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
except OSError as e:
    sys.stderr.write(str(e))
    sys.exit(1)
with s:
    try:  # a server that waits for its client to speak first (TLS) says nothing: ""
        sys.stdout.write(s.recv(65536).decode(errors="replace"))
    except OSError:
        pass
"""


@dataclass(frozen=True)
class Peer:
    """A test's stand-in for another pod: its address and network namespace."""

    ip: str
    netns: str

    async def connect(self, ip: str, port: int, timeout: float = 2.0) -> str | None:
        """Connect from this peer to `ip`:`port` and read what the server first sends: that
        text ("" if it sends nothing within `timeout`, as a TLS server waiting for its
        client), or None if the connection could not be made (refused, dropped, timed out)."""
        process = await asyncio.create_subprocess_exec(
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            "--",
            sys.executable,
            "-c",
            CONNECT,
            ip,
            str(port),
            str(timeout),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await process.communicate()
        return out.decode() if process.returncode == 0 else None


@dataclass
class Double:
    """A running double, as the test sees it."""

    url: str
    token: str
    """The caller's (the service's): its `rules` apply."""
    state: Path
    config: config_file.Config
    process: subprocess.Popen[bytes]
    log_path: Path
    crashed: bool = False
    admin_token: str = ""
    """A cluster admin's token (no RBAC applies to it): what a test inspects the cluster
    with, as an operator's kubectl would."""

    def configuration(self) -> Configuration:
        """A client configuration for the double: its URL and bearer token."""
        configuration = Configuration(host=self.url)
        configuration.api_key = {"BearerToken": self.token}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return configuration

    def kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig for the double at `path` (mode 0600) and return it: for code
        that loads its configuration as from a cluster (`config.load_kube_config`)."""
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kube-double", "cluster": {"server": self.url}}],
            "users": [{"name": "kube-double", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "kube-double",
                    "context": {"cluster": "kube-double", "user": "kube-double"},
                }
            ],
            "current-context": "kube-double",
        }
        path.touch(mode=0o600)
        path.write_text(json.dumps(document))  # JSON is YAML
        return path

    async def _hook(self, method: str, what: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, f"{self.url}/double/{what}", json=body, headers=headers
            ) as response,
        ):
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"kube double: {what}: {response.status} {answer}")
            return answer

    async def evict(
        self, namespace: str, name: str, message: str = "The node was low on resource: memory."
    ) -> None:
        """Evict a pod as the kubelet's eviction manager does: its containers are killed, it
        ends Failed with reason Evicted and `message` (the object stays)."""
        await self._hook(
            "POST", "evict", {"namespace": namespace, "name": name, "message": message}
        )

    async def lose_node(self, node: str | None = None) -> list[str]:
        """The node (the config's by default) drops off the network: its pods are cut off
        without a FIN and killed, then marked not Ready, given a DisruptionTarget condition
        (DeletionByTaintManager), and deleted. Returns their "namespace/name"."""
        answer = await self._hook("POST", "lose-node", {"node": node or self.config.node})
        return list(answer["lost"])

    async def add_peer(self, namespace: str, name: str, labels: dict[str, str]) -> Peer:
        """A network namespace on the pod network with an address and labels: another
        tenant's pod (or the owner's server pod) as NetworkPolicies see it. It has no API
        object; it goes when the double stops."""
        answer = await self._hook(
            "POST", "peers", {"namespace": namespace, "name": name, "labels": labels}
        )
        return Peer(answer["ip"], answer["netns"])

    async def requests(self) -> dict[str, int]:
        """Requests the double served so far, by "VERB resource" (WATCH for watches)."""
        return dict(await self._hook("GET", "requests"))

    async def pods(self) -> list[dict[str, Any]]:
        """What runs where: per pod its netns, host link, IP and runsc container ids."""
        return list(await self._hook("GET", "pods"))

    def crash(self) -> None:
        """Kill the double at once (SIGKILL), as a crash would: its pods keep running until
        the cleanup that `running_double` then runs (`--cleanup`) removes them."""
        self.crashed = True
        self.process.kill()
        self.process.wait()

    def leftovers(self) -> list[str]:
        """What of this double is on the host now (after it stopped: must be [])."""
        return leftovers(self.config, self.state)

    def log(self, size: int = 20000) -> str:
        """The end of the double's own log."""
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    return env


def _wait_ready(process: subprocess.Popen[bytes], state: Path, log_path: Path) -> int:
    """The port the double listens on, once it answers; RuntimeError if it does not."""
    deadline = time.monotonic() + START_SECONDS
    ready = state / "ready.json"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_bytes()[-4000:].decode(errors="replace")
            raise RuntimeError(f"kube double exited with status {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError, ValueError):
            return int(json.loads(ready.read_text())["port"])
        time.sleep(0.05)
    raise RuntimeError(f"kube double did not start within {START_SECONDS} s")


def _stop(process: subprocess.Popen[bytes], args: list[str]) -> int:
    """SIGTERM; SIGKILL if it does not end. Its exit status; after a kill (here or by
    `Double.crash`) a cleanup run has removed what it left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.returncode == -signal.SIGKILL:
        cleanup = [*args, "--cleanup"]
        subprocess.run(
            cleanup,
            env=_environment(),
            cwd=TESTS,
            capture_output=True,
            timeout=STOP_SECONDS,
            check=False,
        )
    return process.returncode


@contextlib.contextmanager
def running_double(
    tmp_path: Path,
    *,
    images: dict[str, Path] | None = None,
    claims: dict[str, Path] | None = None,
    namespaces: dict[str, dict[str, str]] | None = None,
    rules: list[dict[str, Any]] | None = None,
    runtime_classes: dict[str, str] | None = None,
    **more: Any,
) -> Iterator[Double]:
    """Start a double with its state in `tmp_path`/kube-double and yield it once its API
    answers. On exit it stops (SIGTERM: every pod killed and removed), and this asserts that
    it exited cleanly and that nothing of it is left on the host: no runsc container, mount,
    pod folder, network namespace, link or cgroup.

    `images`: image reference -> rootfs folder; `claims`: claim name (or "namespace/name")
    -> host folder; `namespaces`: name -> labels (default: `default`); `rules`: the
    caller's RBAC rules (default: everything allowed); `runtime_classes`: name -> handler
    (default: gvisor -> runsc); `more`: any other key of the config file (`config.py`).
    """
    state = tmp_path / "kube-double"
    settings: dict[str, Any] = {
        "token": secrets.token_urlsafe(24),
        "admin_token": secrets.token_urlsafe(24),
        "images": {ref: str(path) for ref, path in (images or {}).items()},
        "claims": {name: str(path) for name, path in (claims or {}).items()},
        "namespaces": namespaces or {"default": {}},
        "runtime_classes": runtime_classes if runtime_classes is not None else {"gvisor": "runsc"},
        **({"rules": rules} if rules is not None else {}),
        **more,
    }
    config = config_file.parse(settings)
    config_path = tmp_path / "kube-double.json"
    config_path.write_text(json.dumps(settings))
    config_path.chmod(0o600)
    log_path = tmp_path / "kube-double.log"
    (state / "ready.json").unlink(missing_ok=True)  # a crashed run's: not this one's port
    args = [
        sys.executable,
        "-m",
        "kube_double",
        "--state",
        str(state),
        "--config",
        str(config_path),
    ]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [*args, "--port", "0"],
            env=_environment(),
            cwd=TESTS,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    double = None
    try:
        port = _wait_ready(process, state, log_path)
        double = Double(f"http://127.0.0.1:{port}", config.token, state, config, process, log_path)
        double.admin_token = config.admin_token
        _wait_answers(double)
        yield double
    finally:
        status = _stop(process, args)
    left = leftovers(config, state)
    tail = log_path.read_bytes()[-4000:].decode(errors="replace")
    expected = (0, -signal.SIGKILL) if double is not None and double.crashed else (0,)
    assert status in expected and not left, (
        f"kube double exited with status {status}, left: {left}\n{tail}"
    )


def _wait_answers(double: Double) -> None:
    request = urllib.request.Request(
        f"{double.url}/version", headers={"Authorization": f"Bearer {double.token}"}
    )
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)
