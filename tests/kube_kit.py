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

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import skip_or_fail
from helpers import free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PROXY = Path("/opt/jupyter-sandbox/proxy/node_modules/.bin/configurable-http-proxy")
KERNELSPEC = "python3-kubernetes"
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
