"""The user's groups come from a real JupyterHub, asked with the server's own token.

A JupyterHub subprocess (its own REST API, a no-op proxy, a sqlite db in a tmp
folder) with JupyterHub's *default* `server` role spawns a real single-user
server for `ta1` (group `tas`); the token the Hub gave that server (read from its
/proc/PID/environ) is what `policy.current_identity` uses, exactly as the
provisioner does inside that server. `student1` (no groups) gets a token with
the `server` role's scopes from the REST API. Only environment variables are
monkeypatched.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from conftest import KERNEL, execute
from helpers import free_port
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from provisioner import policy

BIN = Path(sys.executable).parent
HUB_ENV = ("JUPYTERHUB_USER", "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN")
log = logging.getLogger("test-identity")

HUB_CONFIG = '''
from jupyterhub.proxy import Proxy
from jupyterhub.spawner import SimpleLocalProcessSpawner


class NoProxy(Proxy):
    """Routes nothing: only the Hub's own REST API is under test."""

    should_start = False

    async def add_route(self, routespec, target, data):
        pass

    async def delete_route(self, routespec):
        pass

    async def get_all_routes(self):
        return {}


c.JupyterHub.proxy_class = NoProxy
c.JupyterHub.authenticator_class = "null"
c.JupyterHub.spawner_class = SimpleLocalProcessSpawner
c.Spawner.args = ["--allow-root"]
c.Spawner.interrupt_timeout = 2
# No `server` role here: the single-user servers get JupyterHub's default one.
'''


@dataclass
class Hub:
    """A running JupyterHub subprocess and an admin session to its REST API."""

    process: subprocess.Popen
    api_url: str
    admin: requests.Session
    log_path: Path
    servers: dict[str, dict[str, str]] = field(default_factory=dict)
    """The JUPYTERHUB_* environment of each user's single-user server."""
    server_pids: dict[str, int] = field(default_factory=dict)

    def api(self, method: str, path: str, body: object = None, ok: tuple = (200,)) -> object:
        response = self.admin.request(method, f"{self.api_url}{path}", json=body, timeout=30)
        assert response.status_code in ok, (
            f"{method} {path}: {response.status_code} {response.text}\n{self.log()}"
        )
        return response.json() if response.content else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def token(self, user: str, **body: object) -> tuple[str, str]:
        """A new API token of `user`'s, issued by the admin service: (token, its id)."""
        model = self.api("POST", f"/users/{user}/tokens", body, ok=(201,))
        return model["token"], model["id"]

    def set_groups(self, user: str, groups: list[str]) -> None:
        model = self.api("GET", f"/users/{user}")
        for group in set(model["groups"]) - set(groups):
            self.api("DELETE", f"/groups/{group}/users", {"users": [user]})
        for group in set(groups) - set(model["groups"]):
            if self.admin.get(f"{self.api_url}/groups/{group}", timeout=30).status_code == 404:
                self.api("POST", f"/groups/{group}", ok=(201,))
            self.api("POST", f"/groups/{group}/users", {"users": [user]})


def process_alive(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return state != "Z" and name.encode() in cmdline.read()
    except OSError:
        return False


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().decode().split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


def spawn(hub: Hub, user: str) -> None:
    """Start `user`'s real single-user server; remember its pid and environment."""
    hub.api("POST", f"/users/{user}/server", ok=(201, 202))  # 202: still starting
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        server = hub.api("GET", f"/users/{user}")["servers"].get("")
        if server and server.get("state", {}).get("pid"):
            hub.server_pids[user] = server["state"]["pid"]
        if server and server["ready"]:
            env = environ_of(hub.server_pids[user])
            hub.servers[user] = {name: env[name] for name in HUB_ENV}
            return
        time.sleep(0.2)
    pytest.fail(f"{user}'s single-user server did not start\n{hub.log()}")


def stop_hub(hub: Hub) -> None:
    """Stop the Hub (it stops the servers it spawned); kill whatever is left, and say so."""
    hub.process.send_signal(signal.SIGTERM)
    try:
        hub.process.wait(30)
    except subprocess.TimeoutExpired:
        hub.process.kill()
        hub.process.wait()
        pytest.fail(f"JupyterHub did not stop on SIGTERM\n{hub.log()}")
    left = [pid for pid in hub.server_pids.values() if process_alive(pid, "jupyterhub-singleuser")]
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"single-user servers outlived the Hub: {left}\n{hub.log()}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    home = tmp_path_factory.mktemp("hub")
    hub_port, public_port = free_port(), free_port()
    admin_token = secrets.token_hex(32)
    config = home / "jupyterhub_config.py"
    config.write_text(
        HUB_CONFIG
        + f"""
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.JupyterHub.bind_url = "http://127.0.0.1:{public_port}"
c.JupyterHub.db_url = {f"sqlite:///{home}/jupyterhub.sqlite"!r}
c.JupyterHub.cookie_secret_file = {str(home / "cookie_secret")!r}
c.SimpleLocalProcessSpawner.home_dir_template = {str(home / "users" / "{username}")!r}
c.JupyterHub.services = [{{"name": "test-admin", "api_token": {admin_token!r}}}]
c.JupyterHub.load_roles = [
    {{
        "name": "test-admin",
        "scopes": ["admin:users", "admin:groups", "admin:servers", "tokens"],
        "services": ["test-admin"],
    }},
]
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    log_path = home / "jupyterhub.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "jupyterhub"), "-f", str(config)],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    admin = requests.Session()
    admin.headers["Authorization"] = f"token {admin_token}"
    hub = Hub(process, f"http://127.0.0.1:{hub_port}/hub/api", admin, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"JupyterHub exited\n{hub.log()}"
            with suppress(requests.ConnectionError):
                if admin.get(f"{hub.api_url}/", timeout=5).ok:
                    break
            assert time.monotonic() < deadline, f"JupyterHub did not answer\n{hub.log()}"
            time.sleep(0.1)
        hub.api("POST", "/users", {"usernames": ["ta1", "student1"]}, ok=(201,))
        hub.api("POST", "/groups/tas", {"users": ["ta1"]}, ok=(201,))
        spawn(hub, "ta1")
        token, _ = hub.token("student1", roles=["server"])
        hub.servers["student1"] = {
            "JUPYTERHUB_USER": "student1",
            "JUPYTERHUB_API_URL": hub.api_url,
            "JUPYTERHUB_API_TOKEN": token,
        }
        yield hub
    finally:
        stop_hub(hub)


@pytest.fixture(autouse=True)
def no_cached_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    policy._hub_groups.clear()
    yield
    policy._hub_groups.clear()


def run_as(monkeypatch: pytest.MonkeyPatch, user: str, api_url: str, token: str) -> None:
    """The environment JupyterHub gives a single-user server."""
    monkeypatch.setenv("JUPYTERHUB_USER", user)
    monkeypatch.setenv("JUPYTERHUB_API_URL", api_url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)


def run_as_server_of(monkeypatch: pytest.MonkeyPatch, hub: Hub, user: str) -> str:
    """Run as `user`'s single-user server, with its own token; return the token."""
    env = hub.servers[user]
    run_as(
        monkeypatch, env["JUPYTERHUB_USER"], env["JUPYTERHUB_API_URL"], env["JUPYTERHUB_API_TOKEN"]
    )
    return env["JUPYTERHUB_API_TOKEN"]


def os_groups(user: str, monkeypatch: pytest.MonkeyPatch) -> frozenset[str]:
    """`user`'s groups without the Hub: the OS's only."""
    with monkeypatch.context() as m:
        m.delenv("JUPYTERHUB_API_TOKEN", raising=False)
        m.setenv("JUPYTERHUB_USER", user)
        return policy.current_identity(log).groups


def test_the_default_server_token_tells_the_users_hub_groups(hub, monkeypatch, caplog):
    run_as_server_of(monkeypatch, hub, "ta1")
    with caplog.at_level(logging.WARNING, logger=log.name):
        who = policy.current_identity(log)
    assert who.user == "ta1"
    assert "tas" in who.groups
    assert who.groups == os_groups("ta1", monkeypatch) | {"tas"}
    assert not caplog.records

    policy._hub_groups.clear()
    run_as_server_of(monkeypatch, hub, "student1")
    with caplog.at_level(logging.WARNING, logger=log.name):
        who = policy.current_identity(log)
    assert who.user == "student1"
    assert who.groups == os_groups("student1", monkeypatch)  # no Hub groups
    assert not caplog.records


def test_even_a_token_with_no_scopes_may_tell_its_owners_groups(hub, monkeypatch, caplog):
    """JupyterHub gives every token its owner's identify scopes, groups included: the
    server token needs no extra scope, whatever the operator did to the `server` role."""
    token, _ = hub.token("ta1", scopes=[])
    run_as(monkeypatch, "ta1", hub.api_url, token)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert "tas" in policy.current_identity(log).groups
    assert not caplog.records


def revoked_token(hub: Hub) -> str:
    token, token_id = hub.token("ta1")
    hub.api("DELETE", f"/users/ta1/tokens/{token_id}", ok=(204,))
    return token


@pytest.mark.parametrize(
    "user, token_of, says",
    [
        # student1's server holding a TA's token must not get the TA's groups.
        ("student1", lambda hub: hub.servers["ta1"]["JUPYTERHUB_API_TOKEN"], "Hub"),
        ("ta1", revoked_token, "403"),
    ],
    ids=["another-users-token", "revoked-token"],
)
def test_when_the_hub_does_not_tell_the_groups_are_none(
    hub, monkeypatch, caplog, user, token_of, says
):
    run_as(monkeypatch, user, hub.api_url, token_of(hub))
    with caplog.at_level(logging.WARNING, logger=log.name):
        who = policy.current_identity(log)
    assert who.user == user
    assert who.groups == os_groups(user, monkeypatch)
    assert "tas" not in who.groups
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert user in warning.getMessage()
    assert says in warning.getMessage()


def test_an_unreachable_hub_gives_no_groups_at_once(hub, monkeypatch, caplog):
    token = run_as_server_of(monkeypatch, hub, "ta1")
    nobody = free_port()  # bound then closed: nobody listens there
    run_as(monkeypatch, "ta1", f"http://127.0.0.1:{nobody}/hub/api", token)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=log.name):
        who = policy.current_identity(log)
    assert time.monotonic() - started < 2
    assert who.groups == os_groups("ta1", monkeypatch)
    [warning] = caplog.records
    assert "could not ask the Hub" in warning.getMessage()


def test_a_hung_hub_gives_no_groups_within_six_seconds(hub, monkeypatch, caplog):
    """A stopped (SIGSTOP) Hub accepts the connection and never answers."""
    run_as_server_of(monkeypatch, hub, "ta1")
    hub.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=log.name):
            who = policy.current_identity(log)
        took = time.monotonic() - started
    finally:
        hub.process.send_signal(signal.SIGCONT)
    assert took < 6.5
    assert who.groups == os_groups("ta1", monkeypatch)
    [warning] = caplog.records
    assert "could not ask the Hub" in warning.getMessage()
    assert "timed out" in warning.getMessage()


def test_groups_are_cached_for_the_ttl_then_asked_again(hub, monkeypatch):
    assert policy.HUB_GROUPS_TTL == 60  # what docs/policy.md promises
    run_as_server_of(monkeypatch, hub, "ta1")
    assert "tas" in policy.current_identity(log).groups
    hub.set_groups("ta1", ["graders"])
    try:
        assert hub.api("GET", "/users/ta1")["groups"] == ["graders"]
        cached = policy.current_identity(log).groups  # within the TTL: not asked again
        assert "tas" in cached
        assert "graders" not in cached
        monkeypatch.setattr(policy, "HUB_GROUPS_TTL", 0.0)  # the entry is now too old
        fresh = policy.current_identity(log).groups
        assert "graders" in fresh
        assert "tas" not in fresh
    finally:
        hub.set_groups("ta1", ["tas"])


def test_an_expired_answer_is_not_used_once_the_hub_refuses_the_token(hub, monkeypatch):
    token, token_id = hub.token("ta1")
    run_as(monkeypatch, "ta1", hub.api_url, token)
    assert "tas" in policy.current_identity(log).groups
    hub.api("DELETE", f"/users/ta1/tokens/{token_id}", ok=(204,))
    monkeypatch.setattr(policy, "HUB_GROUPS_TTL", 0.0)
    assert policy.current_identity(log).groups == os_groups("ta1", monkeypatch)


def test_hub_groups_do_not_go_through_an_http_proxy(hub, monkeypatch):
    """A server whose environment names an HTTP proxy asks the Hub directly, as
    JupyterHub's own single-user code does: the proxy must not see the token.

    In a fresh process: urllib reads the proxy variables once, at its first request."""
    run_as_server_of(monkeypatch, hub, "ta1")
    env = {**os.environ, "http_proxy": f"http://127.0.0.1:{free_port()}"}  # nobody there
    env = {k: v for k, v in env.items() if k.lower() not in ("no_proxy", "https_proxy")}
    code = (
        "import logging\n"
        "from provisioner import policy\n"
        "print(' '.join(sorted(policy.current_identity(logging.getLogger()).groups)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "tas" in result.stdout.split(), result.stderr


POLICY = """
[default]
memory_limit = "512M"

[groups.tas]
memory_limit = "768M"
"""

LOOK_INSIDE = """
import json, os
environs = {}
for pid in ["self", *sorted(p for p in os.listdir("/proc") if p.isdigit())]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environs[pid] = f.read().decode("latin-1")
    except OSError:
        environs[pid] = None  # not readable by the kernel's user
print(json.dumps({
    "memory": int(open("/proc/meminfo").readline().split()[1]),
    "has_token_variable": "JUPYTERHUB_API_TOKEN" in os.environ,
    "os_environ": dict(os.environ),
    "environs": environs,
}))
"""


async def test_a_kernel_gets_its_hub_groups_tier_and_never_the_token(
    hub, no_leftovers, workspace, tmp_path, monkeypatch
):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    monkeypatch.setenv(policy.POLICY_ENV, str(path))
    token = run_as_server_of(monkeypatch, hub, "ta1")
    km = AsyncIOLoopKernelManager(kernel_name=KERNEL)
    await km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        assert km.provisioner.user == "ta1"
        assert km.provisioner.memory_limit == "768M"
        _, text, _ = await execute(kc, LOOK_INSIDE)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    inside = json.loads(text)
    assert inside["memory"] == 768 * 1024  # /proc/meminfo, in kB
    assert not inside["has_token_variable"]
    assert token not in json.dumps(inside["os_environ"])
    assert inside["environs"]["self"] is not None
    log.info("environ readable in the sandbox: %s", [p for p, e in inside["environs"].items() if e])
    for pid, environ in inside["environs"].items():
        assert environ is None or token not in environ, f"the token is in /proc/{pid}/environ"
