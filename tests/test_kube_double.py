"""The cluster double (tests/kube_double) against the real client library and real runsc.

Everything goes through kubernetes_asyncio as a backend would use it (typed
calls, `watch.Watch().stream`), and every pod really runs under gVisor from its
manifest: the checks are on what the pod itself sees and does (its uid, its
root, its volumes, a TCP server reached at its IP) and on the status and events
a real kubelet and API server would give. Each double, on exit, asserts that
nothing of it is left on the host (`running_double`).

Needs root, runsc and the default image: skipped without them, failed under CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import require_sandbox
from kube_double import Double, policy, running_double, selectors
from kube_double.admission import pod_security
from kube_double.meta import ApiError
from kube_double.patch import apply_patch
from kubernetes_asyncio import client, watch
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client.exceptions import ApiException

from provisioner.images.store import find_image

IMAGE = "registry.test/jupyter-sandbox/python3:1"
NS = "kernels"
SECOND = {"bridge": "jsbkd1", "subnet": "10.251.0.0/16"}
"""Config of a second double, alive beside the module's own."""
SLEEP = ["/bin/sh", "-c", "trap 'exit 0' TERM; echo ready; while :; do sleep 0.2; done"]
"""Says "ready" once it has its trap, then runs until SIGTERM and exits 0 (before its trap,
a shell as PID 1 ignores SIGTERM, as any PID 1 without a handler)."""


@pytest.fixture(scope="module")
def gvisor_host() -> None:
    """What every double needs: root, runsc, the default image (else skip; under CI fail)."""
    require_sandbox("gvisor")


@pytest.fixture(scope="module")
def claim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("claim")
    os.chown(folder, 1000, 1000)
    return folder


@pytest.fixture(scope="module")
def double(
    tmp_path_factory: pytest.TempPathFactory, claim: Path, gvisor_host: None
) -> Iterator[Double]:
    with running_double(
        tmp_path_factory.mktemp("double"),
        images={IMAGE: find_image()},
        claims={"claim-alice": claim},
        namespaces={NS: {"team": "kernels"}, "default": {}},
        bookmark_seconds=0.5,
    ) as running:
        yield running


@pytest.fixture
async def v1(double: Double) -> AsyncIterator[client.CoreV1Api]:
    async with client.ApiClient(double.configuration()) as api:
        yield client.CoreV1Api(api)


def pod(
    name: str,
    command: list[str],
    *,
    labels: dict[str, str] | None = None,
    image: str = IMAGE,
    **spec: Any,
) -> dict[str, Any]:
    """A pod as the backend makes them: restartPolicy Never, the gvisor class."""
    container = {"name": "main", "image": image, "command": command, **spec.pop("container", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "runtimeClassName": "gvisor",
            "containers": [container],
            **spec,
        },
    }


async def until(
    v1: client.CoreV1Api, name: str, check: Callable[[Any], bool], timeout: float = 30
) -> Any:
    """The pod once `check(pod)` holds (polled, as a test may)."""
    deadline = time.monotonic() + timeout
    while True:
        current = await v1.read_namespaced_pod(name, NS)
        if check(current):
            return current
        assert time.monotonic() < deadline, f"pod {name} never got there: {current.status}"
        await asyncio.sleep(0.1)


async def ready(v1: client.CoreV1Api, name: str, timeout: float = 30) -> Any:
    """The pod once it runs and its container said "ready" (SLEEP's trap is set)."""
    up = await until(v1, name, running, timeout)
    deadline = time.monotonic() + timeout
    while "ready" not in await v1.read_namespaced_pod_log(name, NS):
        assert time.monotonic() < deadline, f"pod {name} never said it was ready"
        await asyncio.sleep(0.05)
    return up


def running(p: Any) -> bool:
    return p.status.phase == "Running"


def ended(p: Any) -> bool:
    return p.status.phase in ("Succeeded", "Failed")


async def gone(v1: client.CoreV1Api, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await v1.read_namespaced_pod(name, NS)
        except ApiException as e:
            assert e.status == 404
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"pod {name} is still there")


async def connect(
    ip: str, port: int, timeout: float = 15
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to a server in a pod that may not listen yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.open_connection(ip, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def status_of(error: ApiException) -> dict[str, Any]:
    body = json.loads(error.body)
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == error.status
    return body


async def refused(call: Awaitable[Any], code: int, reason: str) -> dict[str, Any]:
    with pytest.raises(ApiException) as caught:
        await call
    assert caught.value.status == code, caught.value.body
    body = status_of(caught.value)
    assert body["reason"] == reason, body
    return body


# -- the pure parts (no sandbox) --------------------------------------------------------


def test_label_and_field_selectors_parse_as_on_the_api_server() -> None:
    labels = {"app": "kernel", "user": "alice"}
    for text, expected in [
        ("app=kernel,user", True),
        ("app==kernel,!team", True),
        ("user in (bob,alice)", True),
        ("user notin (alice)", False),
        ("app!=kernel", False),
        ("", True),
    ]:
        assert selectors.parse_labels(text).matches(labels) is expected, text
    for bad in ("app in (a", "=x", "a b"):
        with pytest.raises(ApiError) as caught:
            selectors.parse_labels(bad)
        assert caught.value.code == 400
    chosen = selectors.from_object(
        {
            "matchLabels": {"app": "kernel"},
            "matchExpressions": [{"key": "team", "operator": "DoesNotExist"}],
        }
    )
    assert chosen.matches(labels) and not selectors.from_object(None).matches(labels)
    fields = selectors.parse_fields("metadata.name=p,status.phase!=Failed", "pods")
    assert fields.matches({"metadata": {"name": "p"}, "status": {"phase": "Running"}})
    with pytest.raises(ApiError):
        selectors.parse_fields("spec.image=x", "pods")


def test_patches_apply_as_on_the_api_server() -> None:
    pod_ = {
        "metadata": {"labels": {"a": "1", "b": "2"}},
        "spec": {"containers": [{"name": "main", "image": "x"}, {"name": "side", "image": "y"}]},
    }
    merged = apply_patch(
        pod_, {"metadata": {"labels": {"a": None, "c": "3"}}}, "application/merge-patch+json"
    )
    assert merged["metadata"]["labels"] == {"b": "2", "c": "3"}
    strategic = apply_patch(
        pod_,
        {"spec": {"containers": [{"name": "side", "image": "z"}]}},
        "application/strategic-merge-patch+json",
    )
    assert [c["image"] for c in strategic["spec"]["containers"]] == ["x", "z"]
    ops = [
        {"op": "add", "path": "/metadata/labels/d", "value": "4"},
        {"op": "remove", "path": "/metadata/labels/a"},
    ]
    assert apply_patch(pod_, ops, "application/json-patch+json")["metadata"]["labels"] == {
        "b": "2",
        "d": "4",
    }
    with pytest.raises(ApiError) as caught:
        apply_patch(
            pod_,
            [{"op": "test", "path": "/metadata/labels/a", "value": "9"}],
            "application/json-patch+json",
        )
    assert caught.value.code == 422
    assert pod_["metadata"]["labels"] == {"a": "1", "b": "2"}  # never changed in place


def test_pod_security_restricted_is_worded_as_the_admission_plugin() -> None:
    bare = pod("bare", SLEEP)
    found = pod_security(bare, "restricted")
    assert found[0].startswith('allowPrivilegeEscalation != false (container "main" must set')
    assert any(f.startswith("runAsNonRoot != true") for f in found)
    hardened = pod(
        "hard",
        SLEEP,
        securityContext={"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        container={
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }
        },
    )
    assert pod_security(hardened, "restricted") == []
    assert pod_security(bare, "baseline") == []


def test_network_policy_rules() -> None:
    target = pod(
        "k",
        SLEEP,
        labels={"kernel": "1"},
        container={"ports": [{"name": "kernel", "containerPort": 8888}]},
    )
    target["metadata"]["namespace"] = NS
    allow = {
        "metadata": {"namespace": NS, "name": "k"},
        "spec": {
            "podSelector": {"matchLabels": {"kernel": "1"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": "hub"}},
                            "podSelector": {"matchLabels": {"user": "alice"}},
                        },
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}},
                    ],
                    "ports": [{"port": "kernel"}],
                }
            ],
        },
    }
    endpoints = [
        policy.Endpoint("hub", {"user": "alice"}, "10.250.0.7"),
        policy.Endpoint("hub", {"user": "bob"}, "10.250.0.8"),
        policy.Endpoint(NS, {"user": "alice"}, "10.250.0.9"),
    ]
    spaces = {"hub": {"team": "hub"}, NS: {}}
    rules = policy.ruleset(target, [allow], spaces, endpoints, None)
    assert "ip saddr 10.250.0.7 tcp dport 8888 accept" in rules
    assert "ip saddr 10.0.0.0/8 ip saddr != { 10.9.0.0/16 } tcp dport 8888 accept" in rules
    assert "10.250.0.8" not in rules and "10.250.0.9" not in rules
    assert "chain egress" not in rules and "policy drop" in rules
    assert policy.ruleset(target, [], spaces, endpoints, None) == ""


# -- the API ----------------------------------------------------------------------------


async def test_pods_are_created_listed_by_labels_and_deleted(v1: client.CoreV1Api) -> None:
    labels = {
        "a": {"app": "kernel", "user": "alice"},
        "b": {"app": "kernel", "user": "bob"},
        "c": {"app": "other"},
    }
    for name, tags in labels.items():
        made = await v1.create_namespaced_pod(NS, pod(f"sel-{name}", SLEEP, labels=tags))
        assert made.metadata.uid and made.metadata.resource_version
        assert made.status.phase == "Pending" and made.spec.termination_grace_period_seconds == 30

    async def names(**query: Any) -> list[str]:
        listed = await v1.list_namespaced_pod(NS, **query)
        assert int(listed.metadata.resource_version) > 0
        return sorted(p.metadata.name for p in listed.items if p.metadata.name.startswith("sel-"))

    assert await names(label_selector="app=kernel") == ["sel-a", "sel-b"]
    assert await names(label_selector="app=kernel,user!=alice") == ["sel-b"]
    assert await names(label_selector="user") == ["sel-a", "sel-b"]
    assert await names(label_selector="!user") == ["sel-c"]
    assert await names(label_selector="user in (bob, carol)") == ["sel-b"]
    assert await names(field_selector="metadata.name=sel-c") == ["sel-c"]
    everywhere = await v1.list_pod_for_all_namespaces(label_selector="app=kernel")
    assert {p.metadata.name for p in everywhere.items} >= {"sel-a", "sel-b"}
    got = await ready(v1, "sel-a")
    for name in ("sel-b", "sel-c"):
        await ready(v1, name)
    assert got.spec.node_name == "node-1" and got.status.pod_ip.startswith("10.250.")
    for name in labels:
        await v1.delete_namespaced_pod(f"sel-{name}", NS, grace_period_seconds=5)
    for name in labels:
        await gone(v1, f"sel-{name}")
    assert await names(label_selector="app") == []


async def test_a_watch_sees_a_pod_added_running_and_deleted_in_order(v1: client.CoreV1Api) -> None:
    start = (await v1.list_namespaced_pod(NS)).metadata.resource_version
    events: list[tuple[str, Any]] = []

    async def follow() -> None:
        async with watch.Watch() as stream:
            async for event in stream.stream(
                v1.list_namespaced_pod,
                NS,
                label_selector="w=1",
                resource_version=start,
                timeout_seconds=60,
            ):
                events.append((event["type"], event["object"]))
                if event["type"] == "DELETED":
                    return

    follower = asyncio.create_task(follow())
    await v1.create_namespaced_pod(NS, pod("watched", SLEEP, labels={"w": "1"}))
    await ready(v1, "watched")
    await v1.delete_namespaced_pod("watched", NS)
    await asyncio.wait_for(follower, 30)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "ADDED" and kinds[-1] == "DELETED"
    assert set(kinds[1:-1]) == {"MODIFIED"}
    versions = [int(obj.metadata.resource_version) for _, obj in events]
    assert versions == sorted(set(versions)) and versions[0] > int(start)
    first_running = next(i for i, (_, obj) in enumerate(events) if obj.status.phase == "Running")
    assert events[first_running][1].status.pod_ip
    deleting = [i for i, (_, obj) in enumerate(events) if obj.metadata.deletion_timestamp]
    assert deleting and deleting[0] > first_running
    terminated = events[-1][1].status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0 and terminated.reason == "Completed"  # its SIGTERM trap
    # Resumed from the ADDED event's resourceVersion: what came after, nothing before.
    again: list[str] = []
    async with watch.Watch() as stream:
        async for event in stream.stream(
            v1.list_namespaced_pod,
            NS,
            label_selector="w=1",
            resource_version=str(versions[0]),
            allow_watch_bookmarks=True,
            timeout_seconds=3,
        ):
            again.append(event["type"])
            if event["type"] == "BOOKMARK":
                break
    assert again[: len(kinds) - 1] == kinds[1:] and again[-1] == "BOOKMARK"


async def test_a_watch_from_a_forgotten_version_is_gone(tmp_path: Path, gvisor_host: None) -> None:
    with running_double(tmp_path, watch_history=10, **SECOND) as small:
        async with client.ApiClient(small.configuration()) as api:
            v1 = client.CoreV1Api(api)
            first = await v1.create_namespaced_secret("default", {"metadata": {"name": "s0"}})
            for i in range(1, 15):
                await v1.create_namespaced_secret("default", {"metadata": {"name": f"s{i}"}})
            with pytest.raises(ApiException) as caught:
                async with watch.Watch() as stream:
                    async for _ in stream.stream(
                        v1.list_namespaced_secret,
                        "default",
                        resource_version=first.metadata.resource_version,
                        timeout_seconds=5,
                    ):
                        pass
            assert caught.value.status == 410 and "too old resource version" in caught.value.reason


async def test_a_kubeconfig_reaches_the_double(double: Double, tmp_path: Path) -> None:
    loaded = client.Configuration()
    await kube_config.load_kube_config(
        str(double.kubeconfig(tmp_path / "kubeconfig")), client_configuration=loaded
    )
    async with client.ApiClient(loaded) as api:
        assert (await client.VersionApi(api).get_code()).git_version.endswith("kube-double")
        assert NS in {n.metadata.name for n in (await client.CoreV1Api(api).list_namespace()).items}


async def test_errors_are_status_objects(double: Double, v1: client.CoreV1Api) -> None:
    url = f"{double.url}/api/v1/namespaces/{NS}/pods"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            async with session.get(url, headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["reason"] == "Unauthorized"
    body = await refused(v1.read_namespaced_pod("nobody", NS), 404, "NotFound")
    assert body["message"] == 'pods "nobody" not found' and body["details"]["name"] == "nobody"
    lost = pod("pending", SLEEP, image="registry.test/nowhere:1")
    await v1.create_namespaced_pod(NS, lost)
    body = await refused(v1.create_namespaced_pod(NS, lost), 409, "AlreadyExists")
    assert body["message"] == 'pods "pending" already exists'
    await v1.delete_namespaced_pod("pending", NS, grace_period_seconds=0)
    await gone(v1, "pending")
    body = await refused(v1.create_namespaced_pod("nowhere", lost), 404, "NotFound")
    assert body["message"] == 'namespaces "nowhere" not found'
    no_command = pod("no-command", [])
    del no_command["spec"]["containers"][0]["command"]
    body = await refused(v1.create_namespaced_pod(NS, no_command), 422, "Invalid")
    assert body["details"]["causes"][0]["field"] == "spec.containers[0].command"
    body = await refused(
        v1.create_namespaced_pod(NS, pod("always", SLEEP, restartPolicy="Always")), 422, "Invalid"
    )
    assert "spec.restartPolicy" in body["message"]
    kata = pod("kata", SLEEP, runtimeClassName="kata")
    body = await refused(v1.create_namespaced_pod(NS, kata), 403, "Forbidden")
    assert (
        body["message"] == 'pods "kata" is forbidden: pod rejected: RuntimeClass "kata" not found'
    )
    await refused(v1.list_namespaced_pod(NS, label_selector="a in (b"), 400, "BadRequest")
    typo = pod("typo", SLEEP, securityContext={"runAsUser": "root"})
    body = await refused(v1.create_namespaced_pod(NS, typo), 400, "BadRequest")
    assert "spec.securityContext.runAsUser" in body["message"]


async def test_secrets_config_maps_policies_and_the_operator_s_objects(
    v1: client.CoreV1Api, double: Double
) -> None:
    async with client.ApiClient(double.configuration()) as api:
        net = client.NetworkingV1Api(api)
        node = client.NodeV1Api(api)
        made = await v1.create_namespaced_secret(
            NS, {"metadata": {"name": "agent-key"}, "stringData": {"key": "k3y"}}
        )
        assert made.data == {"key": "azN5"} and made.type == "Opaque"
        assert [s.metadata.name for s in (await v1.list_namespaced_secret(NS)).items] == [
            "agent-key"
        ]
        assert (await v1.delete_namespaced_secret("agent-key", NS)).status == "Success"
        await refused(v1.read_namespaced_secret("agent-key", NS), 404, "NotFound")
        policy = await net.create_namespaced_network_policy(
            NS,
            {
                "metadata": {"name": "kernel-1"},
                "spec": {
                    "podSelector": {"matchLabels": {"kernel": "1"}},
                    "ingress": [
                        {
                            "from": [{"podSelector": {"matchLabels": {"app": "hub"}}}],
                            "ports": [{"port": 8888}],
                        }
                    ],
                },
            },
        )
        assert policy.spec.policy_types == ["Ingress"]
        assert policy.spec.ingress[0].ports[0].protocol == "TCP"
        listed = await net.list_namespaced_network_policy(NS, label_selector="")
        assert [p.metadata.name for p in listed.items] == ["kernel-1"]
        await net.delete_namespaced_network_policy("kernel-1", NS)
        namespaces = {n.metadata.name: n for n in (await v1.list_namespace()).items}
        assert namespaces[NS].metadata.labels == {
            "kubernetes.io/metadata.name": NS,
            "team": "kernels",
        }
        classes = (await node.list_runtime_class()).items
        assert [(c.metadata.name, c.handler) for c in classes] == [("gvisor", "runsc")]
        assert (await v1.read_node("node-1")).status.conditions[0].status == "True"


async def test_access_reviews_and_rbac(tmp_path: Path, gvisor_host: None) -> None:
    rules = [
        {
            "namespace": NS,
            "apiGroups": [""],
            "resources": ["pods"],
            "verbs": ["get", "list", "watch", "create", "delete"],
        },
        {"namespace": NS, "apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]
    with running_double(tmp_path, namespaces={NS: {}}, rules=rules, **SECOND) as small:
        async with client.ApiClient(small.configuration()) as api:
            v1 = client.CoreV1Api(api)
            auth = client.AuthorizationV1Api(api)
            assert (await v1.list_namespaced_pod(NS)).items == []
            body = await refused(v1.list_namespaced_secret(NS), 403, "Forbidden")
            assert body["message"].startswith('secrets is forbidden: User "system:serviceaccount:')
            await refused(v1.list_pod_for_all_namespaces(), 403, "Forbidden")

            async def may(verb: str, resource: str, sub: str = "") -> bool:
                review = await auth.create_self_subject_access_review(
                    {
                        "spec": {
                            "resourceAttributes": {
                                "namespace": NS,
                                "verb": verb,
                                "resource": resource,
                                "subresource": sub,
                            }
                        }
                    }
                )
                return review.status.allowed

            assert await may("create", "pods") and await may("get", "pods", "log")
            assert not await may("patch", "pods") and not await may("get", "secrets")
            review = await auth.create_self_subject_rules_review({"spec": {"namespace": NS}})
            granted = {(tuple(r.resources), tuple(r.verbs)) for r in review.status.resource_rules}
            assert (("pods",), ("get", "list", "watch", "create", "delete")) in granted
            assert not review.status.incomplete
            elsewhere = await auth.create_self_subject_rules_review({"spec": {"namespace": "x"}})
            assert all("pods" not in r.resources for r in elsewhere.status.resource_rules)


# -- the kubelet ------------------------------------------------------------------------

REPORT = r"""
import ctypes, json, os, socket
lines = open("/proc/self/status").read().splitlines()
status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
report = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd(),
    "greeting": os.environ.get("GREETING"), "pod_ip": os.environ.get("POD_IP"),
    "pod_name": os.environ.get("POD_NAME"), "cap_eff": status["CapEff"].strip(),
    "cap_bnd": status["CapBnd"].strip(),
    "no_new_privs": ctypes.CDLL(None).prctl(39, 0, 0, 0, 0),
    "from_init": open("/work/from-init").read(),
    "secret": open("/secret/token").read(),
    "secret_mode": os.stat("/secret/token").st_mode & 0o7777,
    "secret_gid": os.stat("/secret/token").st_gid,
    "work_mode": os.stat("/work").st_mode & 0o7777,
    "sub": sorted(os.listdir("/sub")),
}
for path in ("/work/file", "/home/alice/file", "/readonly/file"):
    try:
        open(path, "w").write("written")
        report[path] = "ok"
    except OSError as e:
        report[path] = e.errno
server = socket.socket()
server.bind(("0.0.0.0", 8080))
server.listen()
conn, peer = server.accept()
report["peer"] = peer[0]
conn.sendall(json.dumps(report).encode())
conn.close()
"""


async def test_a_pod_runs_its_manifest_and_serves_on_its_ip(
    v1: client.CoreV1Api, claim: Path
) -> None:
    await v1.create_namespaced_secret(
        NS, {"metadata": {"name": "token"}, "stringData": {"token": "s3cret"}}
    )
    manifest = pod(
        "served",
        ["python3", "-c", REPORT],
        securityContext={
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 2000,
            "runAsNonRoot": True,
        },
        initContainers=[
            {
                "name": "init",
                "image": IMAGE,
                "command": ["/bin/sh", "-c", "echo hello > /work/from-init; mkdir -p /work/sub/x"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }
        ],
        volumes=[
            {"name": "work", "emptyDir": {}},
            {"name": "secret", "secret": {"secretName": "token", "defaultMode": 0o400}},
            {"name": "home", "persistentVolumeClaim": {"claimName": "claim-alice"}},
            {"name": "ro", "persistentVolumeClaim": {"claimName": "claim-alice", "readOnly": True}},
        ],
        container={
            "workingDir": "/work",
            "env": [
                {"name": "GREETING", "value": "hi $(POD_NAME)"},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "securityContext": {
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "work", "mountPath": "/work"},
                {"name": "secret", "mountPath": "/secret"},
                {"name": "home", "mountPath": "/home/alice"},
                {"name": "ro", "mountPath": "/readonly"},
                {"name": "work", "mountPath": "/sub", "subPath": "sub"},
            ],
            "resources": {"limits": {"memory": "256Mi", "cpu": "1"}},
        },
    )
    await v1.create_namespaced_pod(NS, manifest)
    up = await until(v1, "served", running)
    reader, writer = await connect(up.status.pod_ip, 8080)
    report = json.loads(await asyncio.wait_for(reader.read(), 15))
    writer.close()
    assert (report["uid"], report["gid"], report["cwd"]) == (1000, 1000, "/work")
    assert 2000 in report["groups"]
    assert report["greeting"] == "hi $(POD_NAME)"  # defined later: left as written
    assert (report["pod_ip"], report["pod_name"]) == (up.status.pod_ip, "served")
    assert report["cap_eff"] == report["cap_bnd"] == "0000000000000000"
    assert report["no_new_privs"] == 1
    assert report["from_init"] == "hello\n" and report["sub"] == ["x"]
    assert report["secret"] == "s3cret" and report["secret_mode"] == 0o440
    assert report["secret_gid"] == 2000 and report["work_mode"] == 0o2777
    assert report["/readonly/file"] == 30  # EROFS
    assert report["/work/file"] == report["/home/alice/file"] == "ok"
    assert report["peer"] == up.status.host_ip == "10.250.0.1"
    done = await until(v1, "served", ended)
    assert done.status.phase == "Succeeded"
    assert (claim / "file").read_text() == "written"
    assert [s.state.terminated.reason for s in done.status.init_container_statuses] == ["Completed"]
    assert {c.type: c.status for c in done.status.conditions}["Initialized"] == "True"
    assert await v1.read_namespaced_pod_log("served", NS, container="init") == ""
    await v1.delete_namespaced_pod("served", NS)
    await v1.delete_namespaced_secret("token", NS)
    await gone(v1, "served")


async def test_the_root_is_read_only_or_a_layer_of_the_container_s_own(
    v1: client.CoreV1Api,
) -> None:
    write = ["/bin/sh", "-c", "echo x > /var/tmp/file && echo written; cat /var/tmp/file"]
    manifest = pod(
        "roots",
        write,
        container={"name": "ro", "securityContext": {"readOnlyRootFilesystem": True}},
    )
    manifest["spec"]["containers"].append({"name": "rw", "image": IMAGE, "command": write})
    await v1.create_namespaced_pod(NS, manifest)
    done = await until(v1, "roots", ended)
    codes = {s.name: s.state.terminated.exit_code for s in done.status.container_statuses}
    assert codes == {"ro": 1, "rw": 0}
    assert "Read-only file system" in await v1.read_namespaced_pod_log("roots", NS, container="ro")
    assert await v1.read_namespaced_pod_log("roots", NS, container="rw") == "written\nx\n"
    assert not (find_image() / "var/tmp/file").exists()
    await v1.delete_namespaced_pod("roots", NS)
    await gone(v1, "roots")


async def test_a_memory_hog_is_oom_killed(v1: client.CoreV1Api) -> None:
    hog = "x = []\nwhile True:\n    x.append(b'x' * (1 << 20))"
    manifest = pod(
        "hog", ["python3", "-c", hog], container={"resources": {"limits": {"memory": "64Mi"}}}
    )
    created = await v1.create_namespaced_pod(NS, manifest)
    assert created.status.qos_class == "Burstable"
    done = await until(v1, "hog", ended)
    terminated = done.status.container_statuses[0].state.terminated
    assert (done.status.phase, terminated.reason, terminated.exit_code) == (
        "Failed",
        "OOMKilled",
        137,
    )
    await v1.delete_namespaced_pod("hog", NS)
    await gone(v1, "hog")


async def test_a_failing_init_container_fails_the_pod(v1: client.CoreV1Api) -> None:
    manifest = pod(
        "init-fails",
        SLEEP,
        initContainers=[
            {"name": "setup", "image": IMAGE, "command": ["/bin/sh", "-c", "echo no agent; exit 3"]}
        ],
    )
    await v1.create_namespaced_pod(NS, manifest)
    done = await until(v1, "init-fails", ended)
    init = done.status.init_container_statuses[0].state.terminated
    assert (done.status.phase, init.exit_code, init.reason) == ("Failed", 3, "Error")
    assert done.status.container_statuses[0].state.waiting.reason == "PodInitializing"
    conditions = {c.type: c for c in done.status.conditions}
    assert conditions["Initialized"].reason == "ContainersNotInitialized"
    assert await v1.read_namespaced_pod_log("init-fails", NS, container="setup") == "no agent\n"
    await v1.delete_namespaced_pod("init-fails", NS)
    await gone(v1, "init-fails")


async def test_an_unknown_image_is_not_pulled(v1: client.CoreV1Api) -> None:
    await v1.create_namespaced_pod(NS, pod("no-image", SLEEP, image="registry.test/absent:2"))

    def backing_off(p: Any) -> bool:
        waiting = (p.status.container_statuses or [None])[0]
        return bool(
            waiting and waiting.state.waiting and waiting.state.waiting.reason == "ImagePullBackOff"
        )

    waiting = await until(v1, "no-image", backing_off)
    assert waiting.status.phase == "Pending"
    assert "registry.test/absent:2" in waiting.status.container_statuses[0].state.waiting.message
    await v1.delete_namespaced_pod("no-image", NS)
    await gone(v1, "no-image", timeout=5)


async def test_a_grace_period_ends_in_sigkill(v1: client.CoreV1Api) -> None:
    stubborn = pod("stubborn", ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"])
    await v1.create_namespaced_pod(NS, stubborn)
    await until(v1, "stubborn", running)
    started = time.monotonic()
    marked = await v1.delete_namespaced_pod("stubborn", NS, grace_period_seconds=2)
    assert marked.metadata.deletion_timestamp and marked.metadata.deletion_grace_period_seconds == 2
    await gone(v1, "stubborn")
    assert 2 <= time.monotonic() - started < 10


async def test_eviction(double: Double, v1: client.CoreV1Api) -> None:
    await v1.create_namespaced_pod(NS, pod("evicted", SLEEP))
    await ready(v1, "evicted")
    await double.evict(NS, "evicted", "The node was low on resource: memory.")
    done = await until(v1, "evicted", ended)
    assert (done.status.phase, done.status.reason) == ("Failed", "Evicted")
    assert done.status.message == "The node was low on resource: memory."
    disruption = {c.type: c for c in done.status.conditions}["DisruptionTarget"]
    assert (disruption.status, disruption.reason) == ("True", "TerminationByKubelet")
    assert done.status.container_statuses[0].state.terminated.exit_code == 137
    await v1.delete_namespaced_pod("evicted", NS)
    await gone(v1, "evicted")


async def test_a_lost_node_cuts_its_pods_off_and_deletes_them(
    tmp_path: Path, gvisor_host: None
) -> None:
    serve = (
        "import socket, time\ns = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen()\n"
        "c, _ = s.accept(); c.sendall(b'hello\\n')\ntime.sleep(3600)"
    )
    with running_double(
        tmp_path, images={IMAGE: find_image()}, namespaces={NS: {}}, **SECOND
    ) as small:
        async with client.ApiClient(small.configuration()) as api:
            v1 = client.CoreV1Api(api)
            await v1.create_namespaced_pod(NS, pod("on-node", ["python3", "-c", serve]))
            up = await until(v1, "on-node", running)
            reader, writer = await connect(up.status.pod_ip, 8080)
            assert await asyncio.wait_for(reader.readline(), 15) == b"hello\n"
            events: list[Any] = []

            async def follow() -> None:
                async with watch.Watch() as stream:
                    async for event in stream.stream(
                        v1.list_namespaced_pod,
                        NS,
                        resource_version=up.metadata.resource_version,
                        timeout_seconds=30,
                    ):
                        events.append(event)
                        if event["type"] == "DELETED":
                            return

            follower = asyncio.create_task(follow())
            assert await small.lose_node() == [f"{NS}/on-node"]
            with pytest.raises(asyncio.TimeoutError):  # neither FIN nor RST: silence
                await asyncio.wait_for(reader.read(1), 2)
            writer.close()
            await asyncio.wait_for(follower, 30)
            conditions = [{c.type: c for c in e["object"].status.conditions} for e in events]
            assert conditions[0]["Ready"].status == "False"
            disruption = conditions[1]["DisruptionTarget"]
            assert (disruption.reason, disruption.status) == ("DeletionByTaintManager", "True")
            assert events[2]["object"].metadata.deletion_timestamp
            assert [e["type"] for e in events] == ["MODIFIED"] * 3 + ["DELETED"]


async def test_nothing_is_left_after_a_stop_or_a_crash(tmp_path: Path, gvisor_host: None) -> None:
    for crash in (False, True):
        (tmp_path / str(crash)).mkdir()
        with running_double(
            tmp_path / str(crash), images={IMAGE: find_image()}, namespaces={NS: {}}, **SECOND
        ) as small:
            async with client.ApiClient(small.configuration()) as api:
                v1 = client.CoreV1Api(api)
                await v1.create_namespaced_pod(
                    NS,
                    pod(
                        "left",
                        SLEEP,
                        volumes=[
                            {"name": "m", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
                        ],
                        container={"volumeMounts": [{"name": "m", "mountPath": "/m"}]},
                    ),
                )
                await until(v1, "left", running)
            (described,) = await small.pods()
            left = small.leftovers()
            assert f"netns {described['netns']}" in left and f"link {described['veth']}" in left
            assert any(line.startswith("runsc container") for line in left), left
            assert any(line.startswith("mount ") and line.endswith("/volumes/m") for line in left)
            if crash:
                small.crash()
        assert not small.leftovers()
        assert not Path("/run/netns", described["netns"]).exists()
        assert not Path("/sys/class/net", described["veth"]).exists()
        cid = described["containers"]["main"]
        assert not any(Path("/sys/fs/cgroup/memory/kube-double").glob(f"*/{cid}"))


# -- NetworkPolicy --------------------------------------------------------------------

SERVE_OK = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8888))
server.listen()
while True:
    conn, _ = server.accept()
    conn.sendall(b"ok")
    conn.close()
"""
CALL_HOME = """
import socket, sys, time
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
    except OSError:
        pass
    time.sleep(0.1)
"""


async def read_from(ip: str, port: int, timeout: float = 1.0) -> str | None:
    """What a server at `ip`:`port` sends first, connecting from the host; None if the
    connection cannot be made in time."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        return (await asyncio.wait_for(reader.read(), timeout)).decode()
    finally:
        writer.close()


async def settles(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the policy never took effect"
        await asyncio.sleep(0.1)


async def test_network_policies_are_enforced(tmp_path: Path, gvisor_host: None) -> None:
    owner = {"component": "singleuser-server", "hub.jupyter.org/username": "alice"}
    with running_double(
        tmp_path,
        images={IMAGE: find_image()},
        namespaces={NS: {}, "hub": {}},
        host_pod_labels=owner,
        host_pod_namespace="hub",
        **SECOND,
    ) as small:
        host = small.config.gateway
        calls = 0

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal calls
            calls += 1
            writer.close()

        listener = await asyncio.start_server(count, host, 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, client.ApiClient(small.configuration()) as api:
            v1, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
            kernel = pod(
                "guarded",
                ["python3", "-c", SERVE_OK],
                labels={"kernel": "k1"},
                container={"ports": [{"name": "kernel", "containerPort": 8888}]},
            )
            caller = pod(
                "caller", ["python3", "-c", CALL_HOME, host, str(port)], labels={"kernel": "k2"}
            )
            for manifest in (kernel, caller):
                await v1.create_namespaced_pod(NS, manifest)
            ip = (await until(v1, "guarded", running)).status.pod_ip
            bob = await small.add_peer(
                "hub", "jupyter-bob", {**owner, "hub.jupyter.org/username": "bob"}
            )

            async def host_in() -> bool:
                return await read_from(ip, 8888) == "ok"

            async def bob_in() -> bool:
                return await bob.connect(ip, 8888, 1.0) == "ok"

            await settles(host_in)
            assert await bob_in()
            await settles(lambda: asyncio.sleep(0.3, calls > 0))
            # Only the owner's server, from its namespace, on the kernel's named port.
            await net.create_namespaced_network_policy(
                NS,
                {
                    "metadata": {"name": "kernel-k1"},
                    "spec": {
                        "podSelector": {"matchLabels": {"kernel": "k1"}},
                        "ingress": [
                            {
                                "from": [
                                    {
                                        "namespaceSelector": {
                                            "matchLabels": {"kubernetes.io/metadata.name": "hub"}
                                        },
                                        "podSelector": {
                                            "matchLabels": {"hub.jupyter.org/username": "alice"}
                                        },
                                    }
                                ],
                                "ports": [{"port": "kernel"}],
                            }
                        ],
                    },
                },
            )
            await settles(lambda: _not(bob_in()))
            assert await host_in()
            # Default deny in the namespace, ingress and egress: nothing in, nothing out.
            await net.delete_namespaced_network_policy("kernel-k1", NS)
            await net.create_namespaced_network_policy(
                NS,
                {
                    "metadata": {"name": "deny"},
                    "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
                },
            )
            await settles(lambda: _not(host_in()))
            assert not await bob_in()
            await asyncio.sleep(0.5)
            before = calls
            await asyncio.sleep(1.0)
            assert calls == before
            await net.delete_namespaced_network_policy("deny", NS)
            await settles(host_in)
            assert await bob_in()
            await settles(lambda: asyncio.sleep(0.3, calls > before))


async def _not(check: Awaitable[bool]) -> bool:
    return not await check
