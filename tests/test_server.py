"""A real `jupyter server` with sandboxed kernels: REST, websockets, restart, shutdown.

Each test starts its own server process on a free port, talks to it over real
HTTP and a real websocket (Jupyter message protocol v5, JSON frames with a
"channel" field), and stops it in a finally block; `no_leftovers` then checks
that no sandbox, bundle or cgroup outlived it.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import requests
import websocket
from conftest import KERNEL
from helpers import bundles_of, free_port, port_open, sandboxes_of

from provisioner.state import records

JUPYTER = Path(sys.executable).with_name("jupyter")
KERNELSPEC_JSON = Path(__file__).parent.parent / "kernelspecs" / KERNEL / "kernel.json"


class JupyterServer:
    """A `jupyter server` subprocess and an authenticated HTTP session to it."""

    def __init__(self, root: Path, home: Path, env: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.runtime_dir = home / "runtime"
        self.log_path = home / "server.log"
        config_dir = home / "config"
        config_dir.mkdir(parents=True)
        self.env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(config_dir),  # no user config from this machine
            "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
            **env,
        }
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"token {self.token}"
        self.process: subprocess.Popen | None = None
        self.argv = [
            str(JUPYTER),
            "server",
            "--no-browser",
            f"--port={self.port}",
            f"--ServerApp.token={self.token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            "--allow-root",
        ]

    def start(self, timeout: float = 30) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"jupyter server exited:\n{self.log()}"
            with suppress(requests.ConnectionError):
                if self.get("/api/status").status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"jupyter server not up within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, as an init system would; SIGKILL (and fail) if it does not exit."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"jupyter server did not exit on SIGTERM within {timeout} s:\n{self.log()}"
                ) from None
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, body: dict | None = None) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=120)

    def delete(self, path: str) -> requests.Response:
        return self.http.delete(self.url + path, timeout=60)

    def start_kernel(self, name: str = KERNEL, path: str = "") -> str:
        """Start a kernel as JupyterLab does: with a path, relative to the server's root."""
        response = self.post("/api/kernels", {"name": name, "path": path})
        assert response.status_code == 201, (response.status_code, response.text, self.log())
        model = response.json()
        assert model["name"] == name
        return model["id"]

    def connection(self, kernel_id: str) -> dict:
        """The kernel's connection file, as the server wrote it."""
        return json.loads((self.runtime_dir / f"kernel-{kernel_id}.json").read_text())


@contextmanager
def jupyter_server(root: Path, home: Path, **env: str) -> Iterator[JupyterServer]:
    server = JupyterServer(root, home, env)
    try:
        server.start()
        yield server
    finally:
        if server.process is not None:
            server.stop()
            assert not port_open(server.port), "the server's port is still open"


SECRET = f"secret-{secrets.token_hex(8)}"


@pytest.fixture
def server(no_leftovers: None, workspace: Path, tmp_path: Path) -> Iterator[JupyterServer]:
    """A server whose environment holds secrets that must not reach any kernel."""
    with jupyter_server(
        workspace,
        tmp_path / "server",
        JUPYTERHUB_API_TOKEN=SECRET,
        AWS_SECRET_ACCESS_KEY=SECRET + "-aws",
        TZ="Europe/Paris",  # allowlisted: must reach the kernel
    ) as s:
        yield s


class KernelSocket:
    """A client on /api/kernels/<id>/channels speaking the JSON websocket protocol.

    `server`: anything with the server's `ws_url` (ws://host:port/base) and a `token`.
    """

    def __init__(self, server: JupyterServer, kernel_id: str) -> None:
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"{server.ws_url}/api/kernels/{kernel_id}/channels?session_id={self.session}",
            header={"Authorization": f"token {server.token}"},
            timeout=60,
        )

    def close(self) -> None:
        self.ws.close()

    def send(self, msg_type: str, content: dict, channel: str = "shell") -> str:
        msg_id = uuid.uuid4().hex
        self.ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": msg_type,
                        "username": "test",
                        "session": self.session,
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": channel,
                    "buffers": [],
                }
            )
        )
        return msg_id

    def execute(
        self, code: str, timeout: float = 60, on_input: Callable[[], None] | None = None
    ) -> tuple[dict, list[dict]]:
        """Run `code`; return the execute_reply content and the iopub messages it caused.

        Waits for both the reply (shell) and the kernel going idle (iopub), so
        no output of this request can still be on its way.
        """
        msg_id = self.send(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        reply, idle, iopub = None, False, []
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                raise AssertionError(f"no reply to {code!r} within {timeout} s") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell":
                assert msg["msg_type"] == "execute_reply"
                reply = msg["content"]
            elif msg["channel"] == "iopub":
                if msg["msg_type"] == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                else:
                    iopub.append(msg)
                    if msg["msg_type"] == "execute_input" and on_input is not None:
                        on_input()
        return reply, iopub


def stdout(iopub: list[dict]) -> str:
    return "".join(
        m["content"]["text"]
        for m in iopub
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )


def test_kernelspecs_list_the_sandboxed_kernel(server: JupyterServer):
    specs = server.get("/api/kernelspecs").json()["kernelspecs"]
    assert KERNEL in specs
    spec = specs[KERNEL]["spec"]
    assert spec["display_name"] == "Python 3 (gVisor sandbox)"
    assert spec["language"] == "python"
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "gvisor-provisioner"
    logo = server.get(specs[KERNEL]["resources"]["logo-64x64"])
    assert logo.status_code == 200
    assert logo.content.startswith(b"\x89PNG")


def test_execute_over_websocket_in_the_sandbox(
    server: JupyterServer, workspace: Path, kernel_name: str
):
    kernel_id = server.start_kernel(kernel_name)
    ws = KernelSocket(server, kernel_id)
    try:
        assert len(sandboxes_of(kernel_id)) == 1
        reply, iopub = ws.execute(
            "import os, socket\n"
            "with open('from-kernel.txt', 'w') as f:\n"
            "    f.write(f'written by uid {os.getuid()}')\n"
            "print(socket.gethostname(), os.getuid(), os.getcwd())\n"
        )
        assert reply["status"] == "ok", reply
        hostname, uid, cwd = stdout(iopub).split()
        assert hostname == "sandbox" != socket.gethostname()
        assert uid == "1000"
        assert cwd == str(workspace)
        written = workspace / "from-kernel.txt"
        assert written.read_text() == "written by uid 1000"
        assert written.stat().st_uid == 1000

        # the server tracks state from its own iopub subscription, which may
        # see the closing "idle" a moment after this websocket did
        deadline = time.monotonic() + 10
        model = server.get(f"/api/kernels/{kernel_id}").json()
        while model["execution_state"] != "idle" and time.monotonic() < deadline:
            time.sleep(0.1)
            model = server.get(f"/api/kernels/{kernel_id}").json()
        assert model["execution_state"] == "idle"
        assert model["connections"] == 1
    finally:
        ws.close()
        assert server.delete(f"/api/kernels/{kernel_id}").status_code == 204
    assert sandboxes_of(kernel_id) == []


def test_interrupt_restart_and_delete(server: JupyterServer):
    kernel_id = server.start_kernel()
    ports = [v for k, v in server.connection(kernel_id).items() if k.endswith("_port")]
    assert len(ports) == 5
    assert all(port_open(p) for p in ports)
    ws = KernelSocket(server, kernel_id)
    deleted = False
    try:
        # interrupt: a long sleep ends at once with a KeyboardInterrupt
        interrupted_at: list[float] = []

        def interrupt() -> None:
            time.sleep(0.5)  # let the kernel get into the sleep
            assert server.post(f"/api/kernels/{kernel_id}/interrupt").status_code == 204
            interrupted_at.append(time.monotonic())

        reply, iopub = ws.execute("import time\ntime.sleep(100)", on_input=interrupt)
        assert interrupted_at, "the request never started"
        assert time.monotonic() - interrupted_at[0] < 10
        assert reply["status"] == "error"
        assert reply["ename"] == "KeyboardInterrupt"
        errors = [m["content"] for m in iopub if m["msg_type"] == "error"]
        assert [e["ename"] for e in errors] == ["KeyboardInterrupt"]

        # the kernel survived the interrupt, state and all
        reply, iopub = ws.execute("x = 41\nprint(x + 1)")
        assert reply["status"] == "ok"
        assert stdout(iopub) == "42\n"

        # restart: a fresh kernel in a fresh sandbox, same kernel id, same websocket
        (before,) = sandboxes_of(kernel_id)
        response = server.post(f"/api/kernels/{kernel_id}/restart")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == kernel_id
        (after,) = sandboxes_of(kernel_id)
        assert after != before
        assert bundles_of(kernel_id) == [after]
        reply, iopub = ws.execute("print(x)")
        assert reply["status"] == "error"
        assert reply["ename"] == "NameError"
        reply, iopub = ws.execute("import socket\nprint(socket.gethostname())")
        assert reply["status"] == "ok"
        assert stdout(iopub) == "sandbox\n"

        # delete: sandbox, bundle, connection file and ports all go
        assert server.delete(f"/api/kernels/{kernel_id}").status_code == 204
        deleted = True
        assert sandboxes_of(kernel_id) == []
        assert bundles_of(kernel_id) == []
        assert server.get(f"/api/kernels/{kernel_id}").status_code == 404
        assert server.get("/api/kernels").json() == []
        assert not (server.runtime_dir / f"kernel-{kernel_id}.json").exists()
        assert not any(port_open(p) for p in ports)
        # it was a polite shutdown: the kernel answered through the tunnel
        ws.ws.settimeout(10)
        while (msg := json.loads(ws.ws.recv()))["msg_type"] != "shutdown_reply":
            pass
        assert msg["content"] == {"status": "ok", "restart": False}
    finally:
        ws.close()
        if not deleted:
            server.delete(f"/api/kernels/{kernel_id}")


def test_server_environment_does_not_reach_the_kernel(server: JupyterServer):
    kernel_id = server.start_kernel()
    ws = KernelSocket(server, kernel_id)
    try:
        # Every environment the kernel can read: its own, and any other process's.
        reply, iopub = ws.execute(
            "import glob, json, os\n"
            "environs = {}\n"
            "for path in glob.glob('/proc/[0-9]*/environ'):\n"
            "    try:\n"
            "        environs[path] = open(path, 'rb').read().decode(errors='replace')\n"
            "    except OSError:\n"
            "        pass\n"
            "print(json.dumps({'env': dict(os.environ), 'environs': environs}))\n"
        )
        assert reply["status"] == "ok", reply
        text = stdout(iopub)
        seen = json.loads(text)
        env = seen["env"]
        assert "JUPYTERHUB_API_TOKEN" not in env
        assert "AWS_SECRET_ACCESS_KEY" not in env
        assert any("HOME=/home/sandbox" in e for e in seen["environs"].values())
        assert SECRET not in text
        # the allowlist works: an allowed variable of the server's does arrive
        assert env["TZ"] == "Europe/Paris"
        assert env["HOME"] == "/home/sandbox"
        # and the server really had the secret
        server_env = Path(f"/proc/{server.process.pid}/environ").read_bytes()
        assert f"JUPYTERHUB_API_TOKEN={SECRET}".encode() in server_env
    finally:
        ws.close()
        assert server.delete(f"/api/kernels/{kernel_id}").status_code == 204


def bad_kernelspec(jupyter_path: Path, name: str, config: dict) -> None:
    spec = json.loads(KERNELSPEC_JSON.read_text())
    spec["display_name"] = f"{name} (bad setting)"
    spec["metadata"]["kernel_provisioner"]["config"] = config
    folder = jupyter_path / "kernels" / name
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture
def bad_server(no_leftovers: None, workspace: Path, tmp_path: Path) -> Iterator[JupyterServer]:
    """A server that also has a kernelspec asking for memory_limit "2 GB"."""
    jupyter_path = tmp_path / "jupyter-path"
    bad_kernelspec(jupyter_path, "python3-gvisor-badmem", {"memory_limit": "2 GB"})
    with jupyter_server(workspace, tmp_path / "server", JUPYTER_PATH=str(jupyter_path)) as s:
        yield s


def test_bad_memory_limit_is_refused_and_leaves_nothing(bad_server: JupyterServer):
    specs = bad_server.get("/api/kernelspecs").json()["kernelspecs"]
    assert "python3-gvisor-badmem" in specs

    response = bad_server.post("/api/kernels", {"name": "python3-gvisor-badmem"})

    assert 400 <= response.status_code < 600, response.text
    assert bad_server.get("/api/kernels").json() == []
    # refused before any sandbox was made: nothing recorded for this server at all
    assert [r for r in records() if r.owner_pid == bad_server.process.pid] == []
    assert "starting kernel" not in bad_server.log()
    # the operator sees why, and what to write instead, in the server's log
    log = bad_server.log()
    assert "invalid memory_limit" in log
    assert "'2 GB'" in log
    assert '"512M", "2G"' in log
    # the server is fine afterwards
    assert bad_server.get("/api/status").status_code == 200


def test_bad_memory_limit_error_reaches_the_client(bad_server: JupyterServer):
    response = bad_server.post("/api/kernels", {"name": "python3-gvisor-badmem"})
    assert response.status_code == 400
    message = response.json()["message"]
    assert "memory_limit" in message
    assert '"512M"' in message


def test_server_shutdown_takes_its_sandboxes_along(
    no_leftovers: None, workspace: Path, tmp_path: Path
):
    with jupyter_server(workspace, tmp_path / "server") as server:
        kernel_ids = [server.start_kernel(), server.start_kernel()]
        ports = [
            v
            for kernel_id in kernel_ids
            for k, v in server.connection(kernel_id).items()
            if k.endswith("_port")
        ]
        assert all(len(sandboxes_of(k)) == 1 for k in kernel_ids)
        assert all(port_open(p) for p in ports)
        returncode = server.stop()  # the server's own SIGTERM handling, kernels running
    assert returncode == 0, server.log()
    assert "Shutting down 2 kernels" in server.log()
    for kernel_id in kernel_ids:
        assert sandboxes_of(kernel_id) == []
        assert bundles_of(kernel_id) == []
    assert not any(port_open(p) for p in ports)
