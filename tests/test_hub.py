"""A real JupyterHub, set up as the deployment guide (docs/hubs.md) sets it up.

JupyterHub and configurable-http-proxy from /opt/jupyter-sandbox (deploy/install-hub.sh),
the guide's own deploy/jupyterhub_config.py (PAM logins, LocalProcessSpawner running each
single-user server as its user), the sandbox service as root under an operator's policy
that gives two local users, made here, different limits. Everything is spoken to over
HTTP and websockets, as a browser would: log in, start a server, start a kernel, run code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import requests
from conftest import skip_or_fail
from helpers import free_port
from service_kit import (
    REPO,
    USER_PYTHON,
    USER_VENV,
    Caller,
    Service,
    as_user,
    connect_as,
    memory_limit_of,
    require_user_venv,
    service_records,
    system_users,
    wait_until,
)
from test_server import KernelSocket, stdout

from provisioner.state import records

PROXY = Path("/opt/jupyter-sandbox/proxy/node_modules/.bin/configurable-http-proxy")
GROUP = "jsbh-hub-users"
PASSWORDS = {"jsbh-amy": "amy-Pa55-word", "jsbh-ben": "ben-Pa55-word"}
LIMITS = {"jsbh-amy": ("512M", 128), "jsbh-ben": ("768M", 256)}
POLICY = """
[default]
memory_limit = "768M"
cpu_limit = 1.0
pids_limit = 256
max_kernels = 3
kernelspecs = ["python3-gvisor"]

[users.jsbh-amy]
memory_limit = "512M"
pids_limit = 128
"""
GRACE = 5.0

pytestmark = pytest.mark.usefixtures("sandbox_host")


class UserServer:
    """One user's view of the hub: logged in with a password, then a token of its own."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.name = name
        self.http = requests.Session()
        self.http.get(f"{hub.url}/hub/login", timeout=30).raise_for_status()
        self.xsrf = self.http.cookies.get("_xsrf", path="/hub/")
        login = self.http.post(
            f"{hub.url}/hub/login",
            data={"username": name, "password": PASSWORDS[name], "_xsrf": self.xsrf},
            allow_redirects=False,
            timeout=60,
        )
        assert login.status_code == 302, (login.status_code, login.text[-2000:])
        # the XSRF token is bound to the session the login began: a page gives the new one
        self.http.get(f"{hub.url}/hub/token", timeout=30).raise_for_status()
        self.xsrf = self.http.cookies.get("_xsrf", path="/hub/")
        made = self.hub_api(
            "post", f"/users/{name}/tokens", json={"note": "test", "expires_in": 3600}
        )
        assert made.status_code == 201, made.text
        self.token = made.json()["token"]
        self.ws_url = f"ws://127.0.0.1:{hub.port}/user/{name}"

    def hub_api(self, method: str, path: str, **kw) -> requests.Response:
        """The Hub's REST API with the login cookie (and its XSRF token), as JupyterLab does."""
        headers = {"X-XSRFToken": self.xsrf, "Referer": f"{self.hub.url}/hub/"}
        return self.http.request(
            method, f"{self.hub.url}/hub/api{path}", headers=headers, timeout=60, **kw
        )

    def start_server(self) -> None:
        started = self.hub_api("post", f"/users/{self.name}/server")
        assert started.status_code in (201, 202), started.text
        wait_until(
            lambda: (
                self.hub_api("get", f"/users/{self.name}")
                .json()["servers"]
                .get("", {})
                .get("ready")
            ),
            120,
            f"{self.name}'s server is ready:\n{self.hub.log()[-3000:]}",
        )

    def stop_server(self) -> None:
        stopped = self.hub_api("delete", f"/users/{self.name}/server")
        assert stopped.status_code in (202, 204), stopped.text
        wait_until(
            lambda: not self.hub_api("get", f"/users/{self.name}").json()["servers"],
            60,
            f"{self.name}'s server stopped",
        )

    def api(self, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
        """This user's single-user server's REST API, through the proxy, with a token."""
        headers = {"Authorization": f"token {token or self.token}"}
        return requests.request(
            method, f"{self.hub.url}/user/{self.name}/api{path}", headers=headers,
            timeout=120, allow_redirects=False, **kw,
        )  # fmt: skip

    def start_kernel(self, name: str = "python3-gvisor") -> str:
        response = self.api("post", "/kernels", json={"name": name})
        assert response.status_code == 201, (response.status_code, response.text)
        return response.json()["id"]

    def run(self, kernel_id: str, code: str) -> str:
        sock = KernelSocket(self, kernel_id)
        try:
            reply, iopub = sock.execute(code, timeout=120)
        finally:
            sock.close()
        assert reply["status"] == "ok", reply
        return stdout(iopub)


class Hub:
    def __init__(self, folder: Path, service: Service) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = folder / "jupyterhub_config.py"
        self.config.write_text(
            f"""
c = get_config()  # noqa
load_subconfig({str(REPO / "deploy" / "jupyterhub_config.py")!r})  # the guide's, unchanged
# what a test on a shared machine must not take from the guide: ports, files, group
c.JupyterHub.bind_url = "http://127.0.0.1:{self.port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.pid_file = {str(folder / "proxy.pid")!r}
c.JupyterHub.db_url = "sqlite:///{folder}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = {str(folder / "cookie_secret")!r}
c.PAMAuthenticator.allowed_groups = {{{GROUP!r}}}
c.Spawner.environment = {{"JUPYTER_SANDBOX_SOCKET": {str(service.socket)!r}}}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
"""
        )
        self.log_path = folder / "hub.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(USER_VENV / "bin" / "jupyterhub"), "-f", str(self.config)],
                cwd=self.folder,
                env={"PATH": f"{USER_VENV}/bin:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def up() -> bool:
            assert self.process.poll() is None, f"the hub exited:\n{self.log()}"
            with suppress(requests.ConnectionError):
                return requests.get(f"{self.url}/hub/api", timeout=5).status_code == 200
            return False

        wait_until(up, 90, "the hub answers")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def hub() -> Iterator[tuple[Hub, dict]]:
    require_user_venv()
    if not PROXY.exists():
        skip_or_fail(f"{PROXY} is missing: run `bash deploy/install-hub.sh` (make test does)")
    folder = Path(tempfile.mkdtemp(prefix="jsb-hub-", dir="/tmp"))
    folder.chmod(0o755)  # the service's socket is in it; the hub's files are root's own
    with system_users(*PASSWORDS, group=GROUP) as users:
        subprocess.run(
            ["chpasswd"], input="".join(f"{u}:{p}\n" for u, p in PASSWORDS.items()),
            text=True, check=True,
        )  # fmt: skip
        service = Service(folder / "service", POLICY, grace=GRACE).start()
        hub_folder = folder / "hub"
        hub_folder.mkdir(mode=0o700)
        the_hub = Hub(hub_folder, service)
        uids = {u.pw_uid for u in users.values()}
        try:
            the_hub.start()
            yield the_hub, users, service
        finally:
            the_hub.stop()  # it stops the users' servers, and they their kernels
            with suppress(AssertionError):
                wait_until(lambda: not service_records(uids), GRACE + 20, "sandboxes gone")
            left = service_records(uids)
            assert service.stop() == 0
            shutil.rmtree(folder, ignore_errors=True)
            assert not left, f"sandboxes left behind by the hub's users: {left}"


@pytest.fixture(scope="module")
def logged_in(hub) -> dict[str, UserServer]:
    the_hub, _, _ = hub
    servers = {name: UserServer(the_hub, name) for name in PASSWORDS}
    for server in servers.values():
        server.start_server()
    return servers


SANDBOX_FACTS = """
import json, os, resource
print(json.dumps({
    "uid": os.getuid(),
    "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
    "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
    "cwd": os.getcwd(),
    "home_entries": sorted(os.listdir("/home")),
}))
"""


def test_each_user_gets_a_sandboxed_kernel_with_their_limits(hub, logged_in):
    _, users, _ = hub
    host_boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    for name, server in logged_in.items():
        specs = server.api("get", "/kernelspecs").json()
        assert specs["default"] == "python3-gvisor"  # the guide's config: sandboxed only
        assert set(specs["kernelspecs"]) <= {"python3-gvisor", "python3-microvm"}
        kernel_id = server.start_kernel()
        facts = json.loads(server.run(kernel_id, SANDBOX_FACTS))
        memory, pids = LIMITS[name]
        assert facts["boot_id"] != host_boot  # its own kernel: in the sandbox
        assert facts["uid"] == users[name].pw_uid  # the user's own uid, not root, not 1000
        assert facts["nproc"] == pids
        assert facts["cwd"] == users[name].pw_dir
        assert facts["home_entries"] == sorted([name, "sandbox"])  # its own, and the image's
        (record,) = [r for r in records() if r.kernel_id == kernel_id]
        assert (record.user, record.uid) == (name, users[name].pw_uid)
        assert memory_limit_of(record) == int(memory[:-1]) << 20
        assert server.api("delete", f"/kernels/{kernel_id}").status_code == 204


BEN_KERNEL = """
import json, os
with open("secret.txt", "w") as f:
    f.write("ben's secret")
os.chmod("secret.txt", 0o600)
print(os.getpid())
"""

# Amy, on the host (her own server's user, as in a terminal), goes for Ben's kernel: its
# connection file, then its shell port with a guessed key, asking it to drop a file.
AMY_ON_THE_HOST = """
import json, queue, sys
from jupyter_client import BlockingKernelClient
path, ports = sys.argv[1], json.loads(sys.argv[2])
seen = {}
try:
    open(path).read()
    seen["connection_file"] = "read"
except PermissionError:
    seen["connection_file"] = "PermissionError"
kc = BlockingKernelClient()
kc.load_connection_info({"transport": "tcp", "ip": "127.0.0.1", "key": b"a guess", **ports})
kc.start_channels()
kc.execute("open('/home/jsbh-ben/pwned', 'w').write('amy was here')")
try:
    kc.get_shell_msg(timeout=8)
    seen["reply"] = True
except queue.Empty:
    seen["reply"] = False
kc.stop_channels()
print(json.dumps(seen))
"""


def test_one_user_cannot_reach_another(hub, logged_in):
    _, users, service = hub
    amy, ben = logged_in["jsbh-amy"], logged_in["jsbh-ben"]
    amy_home, ben_home = Path(users["jsbh-amy"].pw_dir), Path(users["jsbh-ben"].pw_dir)
    ben_kernel = ben.start_kernel()
    amy_kernel = amy.start_kernel()
    ben.run(ben_kernel, BEN_KERNEL)
    assert (ben_home / "secret.txt").stat().st_uid == users["jsbh-ben"].pw_uid
    # through the hub: Amy's token opens neither Ben's server nor his kernel
    assert ben.api("get", "/kernels", token=amy.token).status_code == 403
    assert amy.api("get", f"/kernels/{ben_kernel}").status_code == 404
    # from her kernel: Ben's home is not there; her own is (the same read works on it)
    amy.run(amy_kernel, "open('mine.txt', 'w').write('amy')")
    seen = amy.run(amy_kernel, f"""
import json
def attempt(path):
    try:
        return open(path).read()
    except OSError as e:
        return type(e).__name__
print(json.dumps([attempt({str(ben_home / "secret.txt")!r}),
                  attempt({str(amy_home / "mine.txt")!r})]))
""")  # fmt: skip
    assert json.loads(seen) == ["FileNotFoundError", "amy"]
    # from her kernel: no network at all, so not Ben's kernel's ports on the host either
    (ben_record,) = [r for r in records() if r.kernel_id == ben_kernel]
    runtime = ben_home / ".local/share/jupyter/runtime" / f"kernel-{ben_kernel}.json"
    ports = {k: v for k, v in json.loads(runtime.read_text()).items() if k.endswith("_port")}
    reached = amy.run(amy_kernel, f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {ports["shell_port"]}), timeout=3)
    print("connected")
except OSError as e:
    print(type(e).__name__)
""")  # fmt: skip
    assert reached.strip() != "connected"
    # from the host, as Amy: the connection file is not hers to read, and a guessed key
    # gets nothing done (the kernel drops messages with a bad signature)
    tried = as_user(users["jsbh-amy"],
                    [str(USER_PYTHON), "-c", AMY_ON_THE_HOST, str(runtime), json.dumps(ports)],
                    stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = tried.communicate(timeout=60)
    assert json.loads(out) == {"connection_file": "PermissionError", "reply": False}
    assert not (ben_home / "pwned").exists()
    # through the sandbox service, as Amy: Ben's sandbox is not hers to kill
    caller = Caller(connect_as(users["jsbh-amy"], service.socket))
    refused, _ = caller.call("kill", sandbox_id=ben_record.sandbox_id)
    caller.close()
    assert not refused["ok"] and "no sandbox" in refused["error"]
    # and Ben's kernel carries on, untouched
    assert ben.run(ben_kernel, "print(open('secret.txt').read())") == "ben's secret\n"
    for server, kernel in ((amy, amy_kernel), (ben, ben_kernel)):
        assert server.api("delete", f"/kernels/{kernel}").status_code == 204


def test_a_user_cannot_raise_their_own_limits(hub, logged_in):
    _, users, service = hub
    amy = logged_in["jsbh-amy"]
    home = Path(users["jsbh-amy"].pw_dir)
    config = home / ".jupyter" / "jupyter_server_config.py"

    def configure(text: str) -> None:
        """Amy writes her own server's config (as herself), and restarts her server."""
        script = f"mkdir -p {config.parent} && cat > {config}"
        wrote = as_user(users["jsbh-amy"], ["/bin/sh", "-c", script], stdin=subprocess.PIPE,
                        text=True)  # fmt: skip
        wrote.communicate(text, timeout=30)
        assert wrote.returncode == 0
        amy.stop_server()
        amy.start_server()

    # Asking for more than the policy gives her is refused, with the reason.
    configure('c.GVisorProvisioner.memory_limit = "4G"\n')
    refused = amy.api("post", "/kernels", json={"name": "python3-gvisor"})
    assert refused.status_code == 403, (refused.status_code, refused.text)
    assert "memory_limit = '4G' is more than the sandbox policy allows jsbh-amy" in refused.text
    # Her own permissive policy is not the operator's: the service never reads it.
    mine = home / "my-policy.toml"
    mine.write_text('[default]\nmemory_limit = "8G"\npids_limit = 4096\n')
    os.chown(mine, users["jsbh-amy"].pw_uid, users["jsbh-amy"].pw_gid)
    configure(f'c.GVisorProvisioner.policy_file = "{home}/my-policy.toml"\n')
    kernel_id = amy.start_kernel()
    (record,) = [r for r in records() if r.kernel_id == kernel_id]
    assert memory_limit_of(record) == 512 << 20
    facts = json.loads(amy.run(kernel_id, SANDBOX_FACTS))
    assert facts["nproc"] == 128
    assert amy.api("delete", f"/kernels/{kernel_id}").status_code == 204
    # The operator's policy and the service's socket are not hers to change.
    operators = service.policy.read_text()
    tampering = as_user(users["jsbh-amy"], ["/bin/sh", "-c",
                        f"echo '[users.jsbh-amy]' >> {service.policy} || echo policy-refused; "
                        f"rm -f {service.socket} || echo socket-refused"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    out, _ = tampering.communicate(timeout=30)
    assert out.split() == ["policy-refused", "socket-refused"]
    assert service.socket.exists() and service.policy.read_text() == operators
    config.unlink()
    amy.stop_server()
    amy.start_server()


def test_quotas_and_limit_kills_work_as_in_process(hub, logged_in):
    """Through the service, a quota refuses with its reason, and a kernel killed by its
    memory limit tells its notebook why, as an in-process kernel does."""
    amy = logged_in["jsbh-amy"]
    kernels = [amy.start_kernel() for _ in range(3)]  # max_kernels = 3
    refused = amy.api("post", "/kernels", json={"name": "python3-gvisor"})
    assert refused.status_code == 403, (refused.status_code, refused.text)
    assert "kernel quota: jsbh-amy already runs 3 of at most 3" in refused.text
    sock = KernelSocket(amy, kernels[0])
    try:
        bomb = "chunks = []\nwhile True: chunks.append(b'x' * (50 << 20))"  # touches its pages
        request = sock.send("execute_request", {"code": bomb,
                                                "silent": False, "store_history": True,
                                                "user_expressions": {}, "allow_stdin": False,
                                                "stop_on_error": True})  # fmt: skip
        told = ""
        deadline = time.monotonic() + 120
        while "jupyter-sandbox" not in told and time.monotonic() < deadline:
            sock.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(sock.ws.recv())
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == request:
                told += msg["content"]["text"]
    finally:
        sock.close()
    assert "it exceeded its memory limit, memory_limit = 512M" in told
    for kernel in kernels:
        assert amy.api("delete", f"/kernels/{kernel}").status_code == 204
