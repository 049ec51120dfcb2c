"""A real JupyterHub and the Kubernetes sandbox service, as the Kubernetes tests run them.

The hub is JupyterHub itself (this venv's), with configurable-http-proxy (deploy/
install-hub.sh), users made through its REST API, and single-user servers it spawns
for real (jupyterhub-singleuser, as this test's user). The service is
`jupyter sandbox kubernetes serve` as a process, registered with the hub as
`jupyter-sandbox` with the role deploy/kubernetes/z2jh-values.yaml gives it, and
pointed at a cluster (the double, tests/kube_double). Tokens are made by an admin
service of the test's own; nothing here mocks the hub or the service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import skip_or_fail
from helpers import free_port
from kube_double import Double, running_double

from provisioner.images.oci import unpack_image
from provisioner.images.store import find_image
from provisioner.kubernetes.agent_image import build_agent_image
from provisioner.kubernetes.manifests import SELECTOR

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PROXY = Path("/opt/jupyter-sandbox/proxy/node_modules/.bin/configurable-http-proxy")
KERNELSPEC = "python3-kubernetes"
NAMESPACE = "jupyter-sandbox-kernels"
KERNEL_IMAGE = "registry.test/jupyter-sandbox-python3:1"
AGENT_IMAGE = "registry.test/jupyter-sandbox-agent:1"
SERVICE = "jupyter-sandbox"
SERVICE_SCOPES = ["read:users:name", "read:users:groups", "read:servers"]
"""As deploy/kubernetes/z2jh-values.yaml's role for the service."""


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)


class Hub:
    """JupyterHub on loopback, with the service registered and an admin service's token."""

    def __init__(self, folder: Path, kernelspecs: Path, service_url: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/hub/api"
        self.admin_token = secrets.token_hex(32)
        self.service_token = secrets.token_hex(32)
        self.config = folder / "jupyterhub_config.py"
        roles = [
            {"name": "jupyter-sandbox", "scopes": SERVICE_SCOPES, "services": [SERVICE]},
            {"name": "test-admin", "scopes": ["admin:users", "admin:servers", "tokens",
                                              "admin:groups", "read:users"],
             "services": ["test-admin"]},
        ]  # fmt: skip
        self.config.write_text(f"""
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{self.port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.command = [{str(PROXY)!r}]
c.ConfigurableHTTPProxy.pid_file = {str(folder / "proxy.pid")!r}
c.JupyterHub.db_url = "sqlite:///{folder}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = {str(folder / "cookie_secret")!r}
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.Spawner.cmd = [{str(VENV_BIN / "jupyterhub-singleuser")!r}]
c.Spawner.args = ["--allow-root", "--ServerApp.kernel_manager_class="
                  "jupyter_server.services.kernels.kernelmanager.AsyncMappingKernelManager"]
c.Spawner.environment = {{
    "JUPYTER_PATH": {str(kernelspecs)!r},
    "JUPYTER_SANDBOX_SERVICE_URL": {service_url!r},
}}
c.Spawner.notebook_dir = {str(folder / "home")!r}
c.Spawner.default_url = "/tree"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.JupyterHub.services = [
    {{"name": "{SERVICE}", "api_token": {self.service_token!r}}},
    {{"name": "test-admin", "api_token": {self.admin_token!r}}},
]
c.JupyterHub.load_roles = {json.dumps(roles)}
c.JupyterHub.load_groups = {{"instructors": {{"users": ["carol"]}}}}
""")
        (folder / "home").mkdir(exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.folder / "hub.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "jupyterhub"), "-f", str(self.config)],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"JupyterHub exited:\n{self.log()[-3000:]}")
            try:
                return requests.get(f"{self.api_url}/", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(up, 90, "JupyterHub answers")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log(self) -> str:
        return (self.folder / "hub.log").read_text(errors="replace")

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        return requests.request(
            method, f"{self.api_url}{path}",
            headers={"Authorization": f"token {token or self.admin_token}"}, timeout=60, **kw,
        )  # fmt: skip

    def add_user(self, name: str) -> None:
        answer = self.api("POST", f"/users/{name}")
        assert answer.status_code in (201, 409), answer.text

    def token(
        self, user: str, expires_in: int | None = None, scopes: list[str] | None = None
    ) -> str:
        body: dict[str, Any] = {"note": "test"}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if scopes is not None:
            body["scopes"] = scopes
        answer = self.api("POST", f"/users/{user}/tokens", json=body)
        assert answer.status_code == 201, answer.text
        return answer.json()["token"]

    def start_server(self, user: str) -> None:
        answer = self.api("POST", f"/users/{user}/server")
        assert answer.status_code in (201, 202, 400), answer.text

        def ready() -> bool:
            model = self.api("GET", f"/users/{user}").json()
            return bool(model.get("servers", {}).get("", {}).get("ready"))

        wait_until(ready, 120, f"{user}'s server is ready", interval=0.5)

    def stop_server(self, user: str) -> None:
        self.api("DELETE", f"/users/{user}/server")

        def stopped() -> bool:
            return "" not in self.api("GET", f"/users/{user}").json().get("servers", {})

        wait_until(stopped, 120, f"{user}'s server stopped", interval=0.5)


def started_hub(folder: Path, kernelspecs: Path, service_url: str) -> Hub:
    """A running JupyterHub in `folder` with users amy, ben and carol (carol in group
    instructors); its single-user servers find kernelspecs in `kernelspecs` and the
    service at `service_url`. The caller stops it."""
    if not PROXY.exists():
        skip_or_fail(f"{PROXY} is missing: run `bash deploy/install-hub.sh` (make test does)")
    folder.mkdir(parents=True, exist_ok=True)
    hub = Hub(folder, kernelspecs, service_url)
    hub.start()
    try:
        for user in ("amy", "ben", "carol"):
            hub.add_user(user)
    except BaseException:
        hub.stop()
        raise
    return hub


@pytest.fixture(scope="module")
def jupyterhub() -> Iterator[Hub]:
    """A running JupyterHub (module scope) for tests of the hub alone (no service)."""
    with tempfile.TemporaryDirectory(prefix="jsb-k8s-hub-") as folder:
        hub = started_hub(Path(folder), Path(folder) / "share", service_url="")
        try:
            yield hub
        finally:
            hub.stop()


def deploy_documents(name: str) -> list[dict[str, Any]]:
    with open(REPO / "deploy" / "kubernetes" / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def deploy_rules() -> list[dict[str, Any]]:
    """The service's RBAC exactly as deploy/kubernetes/rbac.yaml grants it."""
    rules = []
    for doc in deploy_documents("rbac.yaml"):
        if doc["kind"] == "Role":
            rules += [{**r, "namespace": NAMESPACE} for r in doc["rules"]]
        elif doc["kind"] == "ClusterRole":
            rules += doc["rules"]
    return rules


def namespace_labels() -> dict[str, str]:
    [ns] = [d for d in deploy_documents("namespace.yaml") if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == NAMESPACE
    return dict(ns["metadata"]["labels"])


@dataclass
class Cluster:
    """The double, the hub and the service, as one test module uses them."""

    double: Double
    hub: Hub
    service_url: str
    kernelspecs: Path
    config: Path
    folder: Path
    process: subprocess.Popen | None = None

    def start_service(self) -> None:
        log = open(self.folder / "service.log", "ab")  # noqa: SIM115 (the process holds it)
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyter-sandbox"), "kubernetes", "serve",
             "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited:\n{self.service_log()[-3000:]}")
            try:
                return requests.get(f"{self.service_url}/health", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_until(up, 60, "the Kubernetes sandbox service answers")

    def stop_service(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)

    def service_log(self) -> str:
        return (self.folder / "service.log").read_text(errors="replace")

    def ask(self, method: str, path: str, token: str, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"token {token}"}
        return requests.request(method, f"{self.service_url}{path}", headers=headers,
                                timeout=120, **kw)  # fmt: skip

    def kube(self, method: str, path: str, as_service: bool = False,
             **kw: Any) -> requests.Response:  # fmt: skip
        """One request to the double's API as the cluster's admin (an operator's kubectl), or
        with the service's own credentials (`as_service`: its RBAC applies). Plain HTTP:
        usable from inside a test's event loop too."""
        token = self.double.token if as_service else self.double.admin_token
        headers = {"Authorization": f"Bearer {token}"}
        return requests.request(method, f"{self.double.url}{path}", timeout=60,
                                headers=headers, **kw)  # fmt: skip

    def listed(self, path: str) -> list[dict[str, Any]]:
        answer = self.kube("GET", path, params={"labelSelector": SELECTOR})
        assert answer.status_code == 200, answer.text
        return list(answer.json()["items"])

    def kernel_pods(self) -> list[dict[str, Any]]:
        return self.listed(f"/api/v1/namespaces/{NAMESPACE}/pods")

    def objects_left(self) -> dict[str, list[str]]:
        """Every kernel Pod, Secret and NetworkPolicy in the kernels' namespace."""
        paths = {
            "pods": f"/api/v1/namespaces/{NAMESPACE}/pods",
            "secrets": f"/api/v1/namespaces/{NAMESPACE}/secrets",
            "policies": f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies",
        }
        return {kind: [o["metadata"]["name"] for o in self.listed(path)]
                for kind, path in paths.items()}  # fmt: skip

    def until_nothing_left(self, timeout: float = 60) -> None:
        wait_until(lambda: not any(self.objects_left().values()), timeout,
                   f"every kernel object is gone: {self.objects_left()}")  # fmt: skip


def agent_rootfs(folder: Path) -> Path:
    """The agent image as `kubernetes agent-image` builds it, unpacked by the project's own
    importer into `folder`/rootfs (what the double's kubelet runs for the init container)."""
    folder.mkdir(parents=True, exist_ok=True)
    build_agent_image(folder / "layout", "1")
    rootfs = folder / "rootfs"
    rootfs.mkdir()
    unpack_image(f"oci:{folder / 'layout'}:1", rootfs, max_bytes=1 << 30,
                 log=logging.getLogger("kube_kit"))  # fmt: skip
    return rootfs


@contextlib.contextmanager
def kube_cluster(folder: Path, policy: str, servers: tuple[str, ...] = (),
                 claims: dict[str, Path] | None = None) -> Iterator[Cluster]:  # fmt: skip
    """The double (deploy/kubernetes/'s namespace labels and RBAC), a hub, and the service
    as a process, in `folder`; `servers`: users whose single-user servers run (a test
    process acting as their server needs the hub to see one, or gc takes its kernels);
    `claims`: PersistentVolumeClaims of the kernels' namespace, by name, as host folders
    (kernelspecs `python3-kubernetes-rw` and `-ro` mount the user's). On the way out all
    of it stops, and no kernel object may be left."""
    with running_double(
        folder,
        images={KERNEL_IMAGE: find_image(), AGENT_IMAGE: agent_rootfs(folder / "agent")},
        namespaces={NAMESPACE: namespace_labels(), "jhub": {}},
        runtime_classes={"gvisor": "runsc"},
        rules=deploy_rules(),
        claims={f"{NAMESPACE}/{name}": path for name, path in (claims or {}).items()},
    ) as double:
        port = free_port()
        service_url = f"http://127.0.0.1:{port}"
        kernelspecs = folder / "share"
        spec_dir = kernelspecs / "kernels" / KERNELSPEC
        spec_dir.mkdir(parents=True)
        spec = json.loads((REPO / "kernelspecs" / KERNELSPEC / "kernel.json").read_text())
        spec["metadata"]["kernel_provisioner"]["config"]["service_url"] = service_url
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        for mode in ("rw", "ro"):  # the same kernel with the user's volume mounted
            spec["metadata"]["kernel_provisioner"]["config"]["workspace"] = mode
            (kernelspecs / "kernels" / f"{KERNELSPEC}-{mode}").mkdir()
            (kernelspecs / "kernels" / f"{KERNELSPEC}-{mode}" / "kernel.json").write_text(
                json.dumps(spec)
            )
        hub = started_hub(folder / "hub", kernelspecs, service_url)
        token_file = folder / "kube-token"
        token_file.write_text(double.token)
        (folder / "policy.toml").write_text(policy)
        config = folder / "jupyter_sandbox_config.py"
        config.write_text(f"""
c.KubernetesService.ip = "127.0.0.1"
c.KubernetesService.port = {port}
c.KubernetesService.namespace = {NAMESPACE!r}
c.KubernetesService.agent_image = {AGENT_IMAGE!r}
c.KubernetesService.images = {{"python3": {KERNEL_IMAGE!r}}}
c.KubernetesService.api_url = {double.url!r}
c.KubernetesService.api_token_file = {str(token_file)!r}
c.KubernetesService.hub_api_url = {hub.api_url!r}
c.KubernetesService.hub_api_token = {hub.service_token!r}
c.KubernetesService.policy_file = {str(folder / "policy.toml")!r}
c.KubernetesService.token_ttl = 1.0
c.KubernetesService.gc_interval = 2.0
c.KubernetesService.ended_grace = 5.0
""")
        env = Cluster(double, hub, service_url, kernelspecs, config, folder)
        try:
            # The kernels' namespace as deploy/kubernetes/ leaves it: default deny.
            for policy in deploy_documents("network-policies.yaml"):
                if policy["metadata"]["namespace"] == NAMESPACE:
                    path = f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies"
                    made = env.kube("POST", path, json=policy)
                    assert made.status_code == 201, made.text
            env.start_service()
            for user in servers:
                hub.start_server(user)
            yield env
        finally:
            env.stop_service()
            hub.stop()
            sys.stderr.write(env.service_log()[-3000:])  # shown by pytest on failure
        assert env.objects_left() == {"pods": [], "secrets": [], "policies": []}
