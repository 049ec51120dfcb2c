"""The Kubernetes backend end to end: a real JupyterHub, the real service, the cluster double.

What runs for real: JupyterHub and its single-user servers (jupyter_server, over HTTP
and websockets through configurable-http-proxy); `jupyter sandbox kubernetes serve`
as a process holding the deploy folder's RBAC (deploy/kubernetes/rbac.yaml, enforced
by the double on every request); the real `kubernetes_asyncio` client; and each
kernel pod's containers under runsc, from the manifest the service made: the agent
image's init container (the image `jupyter sandbox kubernetes agent-image` builds,
unpacked by the project's importer), then the kernel image with the agent on its
own Python, reached over TLS at the pod's IP. What stands in for a cluster is the
double (tests/kube_double): the API server and one kubelet. docs/kubernetes.md says
what that leaves unverified.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
import requests
from conftest import require_sandbox
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from kube_kit import KERNELSPEC, NAMESPACE, Cluster, kube_cluster, wait_until
from kube_schemas import restricted_violations, validate
from nbclient import NotebookClient
from test_server import KernelSocket

from provisioner.kubernetes import credentials
from provisioner.kubernetes.manifests import AGENT_PORT

REPO = Path(__file__).resolve().parent.parent
POLICY = """
[default]
memory_limit = "1G"
cpu_limit = 1.0
max_kernels = 3

[users.ben]
max_kernels = 1
"""

pytestmark = pytest.mark.usefixtures("sandbox_host")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_sandbox()
    folder = tmp_path_factory.mktemp("k8s")
    volume = folder / "claim-amy"
    volume.mkdir()
    (volume / "notes.txt").write_text("amy's notes\n")
    for path in (volume, volume / "notes.txt"):
        os.chown(path, 1000, 1000)  # the user's files, as the kernel's uid sees them
    with kube_cluster(folder, POLICY, servers=("amy", "ben"),
                      claims={"claim-amy": volume}) as env:  # fmt: skip
        yield env


@pytest.fixture
def as_user(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make this test process a server of `user`: its hub token in the environment."""

    def become(user: str) -> str:
        token = cluster.hub.token(user)
        monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)
        return token

    return become


def kernel_manager(cluster: Cluster, kernelspec: str = KERNELSPEC) -> AsyncKernelManager:
    ksm = KernelSpecManager(kernel_dirs=[str(cluster.kernelspecs / "kernels")])
    return AsyncKernelManager(kernel_name=kernelspec, kernel_spec_manager=ksm)


async def run(km: AsyncKernelManager, code: str, timeout: float = 60) -> tuple[str, dict]:
    """Execute `code`; its stdout and the reply's content."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out: list[str] = []

        def keep(msg: dict) -> None:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])

        reply = await kc.execute_interactive(code, timeout=timeout, output_hook=keep)
        return "".join(out), reply["content"]
    finally:
        kc.stop_channels()


def test_a_notebook_runs_in_a_kernel_pod_that_is_gone_after(cluster: Cluster, as_user: Any) -> None:
    as_user("amy")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os, socket; print(os.getuid(), os.getgid())"),
        nbformat.v4.new_code_cell("print(open('/proc/version').read())"),
        nbformat.v4.new_code_cell("print(sorted(k for k in os.environ if 'TOKEN' in k))"),
        nbformat.v4.new_code_cell("print(socket.gethostname())"),
    ]
    seen: dict[str, Any] = {}

    async def go() -> None:
        km = kernel_manager(cluster)
        notebook = NotebookClient(nb, km=km, timeout=120)
        try:
            async with notebook.async_setup_kernel():
                [pod] = cluster.kernel_pods()
                seen["pod"] = pod
                for index, cell in enumerate(nb.cells):
                    await notebook.async_execute_cell(cell, index)
        finally:
            await km.shutdown_kernel()  # nbclient leaves a kernel manager it was given

    asyncio.run(go())
    outputs = ["".join(o.get("text", "") for o in cell.outputs) for cell in nb.cells]
    assert outputs[0].split() == ["1000", "1000"]
    assert "4.4.0" in outputs[1]  # gVisor's kernel, not this host's
    assert outputs[2].strip() == "[]"  # JUPYTERHUB_API_TOKEN stays in the server
    pod = seen["pod"]
    assert outputs[3].strip() == pod["metadata"]["name"]
    assert pod["spec"]["runtimeClassName"] == "gvisor"
    assert pod["metadata"]["annotations"]["jupyter-sandbox/user"] == "amy"
    # The pod as the cluster stored it: valid in every supported release, restricted.
    for key in ("status",):
        pod.pop(key, None)
    validate({"apiVersion": "v1", "kind": "Pod", **pod})
    assert restricted_violations(pod["spec"]) == []
    cluster.until_nothing_left()


def test_interrupt_restart_and_shutdown(cluster: Cluster, as_user: Any) -> None:
    as_user("amy")

    async def go() -> None:
        km = kernel_manager(cluster)
        await km.start_kernel()
        try:
            [first] = [p["metadata"]["name"] for p in cluster.kernel_pods()]
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            msg_id = kc.execute("import time; time.sleep(120)")
            await asyncio.sleep(2)
            await km.interrupt_kernel()
            reply = await kc.get_shell_msg(timeout=30)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = await kc.get_shell_msg(timeout=30)
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            kc.stop_channels()
            await km.restart_kernel()
            names = [p["metadata"]["name"] for p in cluster.kernel_pods()]
            assert first not in names and len(names) == 1  # a new pod, the old one gone
            out, content = await run(km, "print(6 * 7)")
            assert (out.strip(), content["status"]) == ("42", "ok")
        finally:
            await km.shutdown_kernel()

    asyncio.run(go())
    cluster.until_nothing_left()


def test_tokens_and_tenants(cluster: Cluster, as_user: Any) -> None:
    """A forged or expired token is refused; one user never sees, signals or deletes
    another's kernel, through the service or over the pod network."""
    amy = as_user("amy")
    ben = cluster.hub.token("ben")
    expired = cluster.hub.token("ben", expires_in=1)

    async def go() -> None:
        km = kernel_manager(cluster)
        await km.start_kernel()
        try:
            [pod] = cluster.kernel_pods()
            name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
            assert cluster.ask("GET", f"/kernels/{name}", amy).json()["name"] == name
            for verb in ("GET", "DELETE"):
                answer = cluster.ask(verb, f"/kernels/{name}", ben)
                assert answer.status_code == 404, answer.text  # as for no kernel at all
            assert cluster.ask("GET", "/kernels", ben).json()["kernels"] == []
            assert cluster.ask("GET", "/kernels", "forged-" + amy[7:]).status_code == 401
            time.sleep(2)
            assert cluster.ask("GET", "/kernels", expired).status_code == 401
            assert cluster.ask("GET", "/kernels", cluster.hub.admin_token).status_code == 403
            # amy's tokens that may act for none of her servers, or another one only
            reader = cluster.hub.token("amy", scopes=["read:users:name!user=amy"])
            assert cluster.ask("GET", "/kernels", reader).status_code == 403
            collab = cluster.hub.token("amy", scopes=["access:servers!server=amy/collab"])
            assert cluster.ask("GET", f"/kernels/{name}", collab).status_code == 404
            assert cluster.ask("DELETE", f"/kernels/{name}", collab).status_code == 404
            assert cluster.ask("GET", "/kernels", collab).json()["kernels"] == []
            # Once its owner's server is connected, the agent takes no other connection.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(ip, AGENT_PORT)
            out, _ = await run(km, "print('still mine')")
            assert out.strip() == "still mine"
        finally:
            await km.shutdown_kernel()

    asyncio.run(go())
    cluster.until_nothing_left()


def test_a_pod_takes_only_its_owners_server_with_its_certificate_and_token(
    cluster: Cluster, as_user: Any
) -> None:
    """Before its owner connects, the agent answers neither plain TCP, nor TLS pinned to
    another kernel's certificate, nor its own certificate without its token; with both,
    its first frame (HELLO) comes. Its NetworkPolicy admits its owner's server pod only:
    another tenant's server pod and another kernel pod cannot connect at all."""
    amy = as_user("amy")
    answer = cluster.ask("POST", "/kernels", amy, json={
        "kernel_id": "0c0ffee0-0000-4000-8000-000000000002", "kernel_name": KERNELSPEC,
        "server": "", "settings": {}, "cwd": "",
    })  # fmt: skip
    assert answer.status_code == 201, answer.text
    made = answer.json()
    ip, creds = made["host"], credentials.from_public(made["credentials"])

    async def go() -> None:
        # plain TCP (once the agent listens: a moment after its container started): no
        # TLS handshake, no frame; the agent drops the connection
        deadline = time.monotonic() + 30
        while True:
            try:
                reader, writer = await asyncio.open_connection(ip, AGENT_PORT)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the agent never listened"
                await asyncio.sleep(0.1)
        writer.write(b"\x00" * 64)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(1024), 30) == b""
        writer.close()
        # TLS pinned to another kernel's certificate: this one's does not verify
        other = credentials.make("jsb-other")
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(ip, AGENT_PORT, ssl=other.client_context(),
                                          server_hostname=other.server_name)  # fmt: skip
        # its own certificate (as if stolen), a wrong token: closed without a word
        reader, writer = await asyncio.open_connection(
            ip, AGENT_PORT, ssl=creds.client_context(), server_hostname=creds.server_name
        )
        writer.write(b"\x01" * credentials.TOKEN_BYTES)
        assert await asyncio.wait_for(reader.read(1024), 30) == b""
        writer.close()
        # Over the network (the double enforces NetworkPolicy): another tenant's server pod
        # cannot even connect; amy's can (its TLS then needs the kernel's token anyway).
        mallory = await cluster.double.add_peer(
            "jhub", "jupyter-mallory", {"component": "singleuser-server",
                                        "hub.jupyter.org/username": "mallory"})  # fmt: skip
        assert await mallory.connect(ip, AGENT_PORT) is None
        outsider = await cluster.double.add_peer(NAMESPACE, "other-kernel", {"app": "x"})
        assert await outsider.connect(ip, AGENT_PORT) is None  # another kernel pod: no
        owner = await cluster.double.add_peer(
            "jhub", "jupyter-amy", {"component": "singleuser-server",
                                    "hub.jupyter.org/username": "amy"})  # fmt: skip
        assert await owner.connect(ip, AGENT_PORT) is not None
        # certificate and token: the agent speaks (a HELLO frame)
        reader, writer = await asyncio.open_connection(
            ip, AGENT_PORT, ssl=creds.client_context(), server_hostname=creds.server_name
        )
        writer.write(creds.token)
        hello = await asyncio.wait_for(reader.read(4096), 30)
        assert b'"version"' in hello
        writer.close()

    try:
        asyncio.run(go())
    finally:
        deleted = cluster.ask("DELETE", f"/kernels/{made['name']}?wait=true", amy)
        assert deleted.status_code == 200, deleted.text
    cluster.until_nothing_left()


def test_a_user_over_quota_is_refused(cluster: Cluster, as_user: Any) -> None:
    as_user("ben")

    async def go() -> None:
        first, second = kernel_manager(cluster), kernel_manager(cluster)
        await first.start_kernel()
        try:
            with pytest.raises(Exception, match="kernel quota: ben already runs 1 of at most 1"):
                await second.start_kernel()
        finally:
            await first.shutdown_kernel()

    asyncio.run(go())
    cluster.until_nothing_left()


def test_a_restarted_service_adopts_its_kernels(cluster: Cluster, as_user: Any) -> None:
    as_user("amy")

    async def go() -> None:
        km = kernel_manager(cluster)
        await km.start_kernel()
        try:
            out, _ = await run(km, "x = 41; print('set')")
            cluster.stop_service()
            out, _ = await run(km, "print(x + 1)")  # the service is not in the channel
            assert out.strip() == "42"
            cluster.start_service()
            token = os.environ["JUPYTERHUB_API_TOKEN"]
            mine = cluster.ask("GET", "/kernels", token).json()["kernels"]
            assert [k["name"] for k in mine] == [
                p["metadata"]["name"] for p in cluster.kernel_pods()
            ]
        finally:
            await km.shutdown_kernel()  # deleted through the new service

    asyncio.run(go())
    cluster.until_nothing_left()


def test_gc_deletes_the_kernels_of_a_server_that_is_gone(cluster: Cluster) -> None:
    """carol runs no server: a kernel started with her token is collected."""
    carol = cluster.hub.token("carol")
    answer = cluster.ask("POST", "/kernels", carol, json={
        "kernel_id": "0c0ffee0-0000-4000-8000-000000000001", "kernel_name": KERNELSPEC,
        "server": "", "settings": {}, "cwd": "",
    })  # fmt: skip
    assert answer.status_code == 201, answer.text  # it ran: gc never takes a start in flight
    cluster.until_nothing_left(timeout=60)
    assert "gc: deleting kernel pod " + answer.json()["name"] in cluster.service_log()


def _server_kernel(cluster: Cluster, user: str, token: str) -> tuple[Any, str]:
    """A kernel of `user`'s single-user server (spawned by the hub), and its websocket."""

    @dataclass
    class Server:
        ws_url: str
        token: str

    base = f"{cluster.hub.url}/user/{user}"
    answer = requests.post(f"{base}/api/kernels", json={"name": KERNELSPEC},
                           headers={"Authorization": f"token {token}"}, timeout=180)  # fmt: skip
    assert answer.status_code == 201, answer.text
    kernel_id = answer.json()["id"]
    server = Server(ws_url=base.replace("http://", "ws://"), token=token)
    return KernelSocket(server, kernel_id), kernel_id  # type: ignore[arg-type]


def notice_and_restart(cluster: Cluster, socket_: KernelSocket, cause: Any, expected: str,
                       code: str = "import time; time.sleep(300)") -> None:  # fmt: skip
    """Run `code` in the kernel and `cause` (either ends the kernel's pod), then the
    notebook is told `expected` and the server's restarter gives it a new pod whose
    kernel answers."""
    [before] = [p["metadata"]["name"] for p in cluster.kernel_pods()]
    socket_.send("execute_request", {"code": code, "silent": False, "store_history": False,
                                     "user_expressions": {}, "allow_stdin": False,
                                     "stop_on_error": True})  # fmt: skip
    time.sleep(1)
    cause(before)
    told, restarting = "", False
    deadline = time.monotonic() + 120
    while not (told and restarting):
        assert time.monotonic() < deadline, f"told {told!r}, restarting {restarting}"
        socket_.ws.settimeout(5)
        try:
            msg = json.loads(socket_.ws.recv())
        except Exception:
            continue
        if msg["msg_type"] == "stream" and "[jupyter-sandbox]" in msg["content"]["text"]:
            told = msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "restarting":
            restarting = True
    assert expected in told, told

    def new_pod() -> bool:
        return any(p["metadata"]["name"] != before for p in cluster.kernel_pods())

    wait_until(new_pod, 120, "the restarter made a new kernel pod")
    wait_until(lambda: before not in [p["metadata"]["name"] for p in cluster.kernel_pods()], 60,
               "the old pod is gone")  # fmt: skip
    reply, _iopub = socket_.execute("print('back')", timeout=120)
    assert reply["status"] == "ok"


@pytest.fixture(scope="module")
def dan_server(cluster: Cluster) -> Iterator[str]:
    """dan's single-user server (jupyter_server, spawned by the hub); his token."""
    cluster.hub.add_user("dan")
    token = cluster.hub.token("dan")
    cluster.hub.start_server("dan")
    try:
        yield token
    finally:
        cluster.hub.stop_server("dan")


def test_through_the_hub_an_oom_kill_is_told_and_the_kernel_restarts(
    cluster: Cluster, dan_server: str
) -> None:
    ws, kernel_id = _server_kernel(cluster, "dan", dan_server)
    try:
        reply, _iopub = ws.execute("print(2 + 2)", timeout=120)
        assert reply["status"] == "ok"

        hog = "chunks = []\nwhile True: chunks.append(b'x' * (64 << 20))"  # pages written
        notice_and_restart(cluster, ws, lambda _: None, "memory limit", code=hog)
    finally:
        ws.close()
        requests.delete(f"{cluster.hub.url}/user/dan/api/kernels/{kernel_id}",
                        headers={"Authorization": f"token {dan_server}"}, timeout=120)  # fmt: skip
    cluster.until_nothing_left()


@pytest.mark.parametrize("what", ["deleted", "evicted", "node lost"])
def test_through_the_hub_a_pod_ended_from_outside_is_told_and_restarted(
    cluster: Cluster, dan_server: str, what: str
) -> None:
    ws, kernel_id = _server_kernel(cluster, "dan", dan_server)

    def end(name: str) -> None:
        if what == "deleted":
            cluster.kube("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}",
                         params={"gracePeriodSeconds": "0"})  # fmt: skip
        elif what == "evicted":
            asyncio.run(cluster.double.evict(NAMESPACE, name))
        else:
            asyncio.run(cluster.double.lose_node())

    expected = {"deleted": "its pod was deleted", "evicted": "Kubernetes evicted its pod",
                "node lost": "its node was lost"}[what]  # fmt: skip
    try:
        notice_and_restart(cluster, ws, end, expected)
    finally:
        ws.close()
        requests.delete(f"{cluster.hub.url}/user/dan/api/kernels/{kernel_id}",
                        headers={"Authorization": f"token {dan_server}"}, timeout=120)  # fmt: skip
    cluster.until_nothing_left()


def test_the_deploy_rbac_is_what_the_service_needs(cluster: Cluster) -> None:
    """The service ran every test above under deploy/kubernetes/rbac.yaml's rules only
    (the double enforces them on every request); nothing outside them is allowed."""
    assert cluster.kube("GET", "/api/v1/namespaces/jhub/pods", as_service=True).status_code == 403
    secrets = f"/api/v1/namespaces/{NAMESPACE}/secrets"
    assert cluster.kube("GET", secrets, as_service=True).status_code == 403  # create only
    assert cluster.kube("GET", "/api/v1/nodes", as_service=True).status_code == 403
    for resource, subresource, verb in (
        ("pods", "exec", "create"),
        ("pods", "attach", "create"),
        ("pods", "portforward", "create"),
        ("pods", "", "patch"),
    ):
        review = {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"namespace": NAMESPACE, "resource": resource,
                                            "subresource": subresource, "verb": verb}},
        }  # fmt: skip
        answer = cluster.kube("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                              as_service=True, json=review)  # fmt: skip
        assert answer.json()["status"]["allowed"] is False, (resource, subresource, verb)


def test_doctor_checks_the_cluster(cluster: Cluster) -> None:
    """`jupyter sandbox doctor --kubernetes` with the service's configuration and
    credentials: the API, RBAC enough and not more (deploy/kubernetes/rbac.yaml), the
    RuntimeClass, a probe pod that really runs on gVisor, NetworkPolicy enforced (the
    double enforces it; its default deny is deploy/kubernetes/network-policies.yaml's)."""
    doctor = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-sandbox"), "doctor", "--kubernetes",
         "--config", str(cluster.config)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = doctor.stdout
    assert doctor.returncode == 0, out + doctor.stderr
    for line in ("[ok] Kubernetes API", "[ok] RBAC: enough", "[ok] RBAC: not more",
                 "[ok] RuntimeClass: gvisor", "[ok] sandboxing: the probe pod runs on gVisor",
                 "[ok] NetworkPolicy: enforced"):  # fmt: skip
        assert line in out, out
    cluster.until_nothing_left()
    probes = cluster.kube("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")
    assert probes.json()["items"] == []  # its probe pods are gone too


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_the_users_volume_is_mounted_as_asked(cluster: Cluster, as_user: Any, mode: str) -> None:
    """workspace = rw or ro mounts the user's claim (zero-to-jupyterhub's claim-{username})
    at /home/jovyan, read-write or read-only; by default (none) the kernel has no volume."""
    as_user("amy")
    volume = cluster.folder / "claim-amy"
    code = (
        "import os\n"
        "print(open('/home/jovyan/notes.txt').read().strip(), os.getcwd())\n"
        "try:\n"
        f"    open('/home/jovyan/from-{mode}.txt', 'w').write('written')\n"
        "    print('written')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__, e.errno)\n"
    )

    async def go() -> str:
        km = kernel_manager(cluster, f"{KERNELSPEC}-{mode}")
        await km.start_kernel()
        try:
            out, _ = await run(km, code)
            return out
        finally:
            await km.shutdown_kernel()

    out = asyncio.run(go())
    assert out.splitlines()[0] == "amy's notes /home/jovyan"
    if mode == "rw":
        assert out.splitlines()[1] == "written"
        assert (volume / "from-rw.txt").read_text() == "written"
        assert (volume / "from-rw.txt").stat().st_uid == 1000
    else:
        assert out.splitlines()[1] == "OSError 30"  # EROFS
        assert not (volume / "from-ro.txt").exists()
    assert (volume / "notes.txt").read_text() == "amy's notes\n"
    cluster.until_nothing_left()
