"""`jupyter sandbox doctor --kubernetes`: what a real cluster must give the service.

Run with the service's own credentials (in its pod, or a kubeconfig for its
ServiceAccount). Each check tries the thing itself rather than reading a setting:

- the API answers;
- RBAC is enough (every verb the service uses, by SelfSubjectAccessReview) and not
  more (nothing it does not use: exec, attach, port-forward, other namespaces' pods,
  secrets cluster-wide, nodes);
- the RuntimeClass exists, names a sandboxing handler, and really sandboxes: a probe pod
  under it reports its /proc/version through its termination message (no pods/log
  right needed), which must be gVisor's or another kernel than the one this process
  runs on;
- NetworkPolicy is enforced: a probe server pod and a probe client pod in the kernels'
  namespace, whose default-deny must stop the client (and a policy admitting it must
  let it through, so that a failure to connect is the policy's doing).

Probe pods pass Pod Security `restricted` and are deleted whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ..checks import Check
from ..guest.layout import AGENT_PYTHON, KERNEL_UID
from . import manifests
from .service import SANDBOXING_HANDLERS, KubernetesService

PROBE_TIMEOUT = 180.0
"""Seconds a probe pod may take to end (an image pull included)."""
PROBE_PORT = 8470
NEEDED = (
    ("", "pods", ("create", "get", "list", "watch", "delete")),
    ("", "secrets", ("create",)),
    ("networking.k8s.io", "networkpolicies", ("create", "delete")),
)
"""(group, resource, verbs) the service uses in the kernels' namespace."""
NOT_NEEDED = (
    ("", "pods", "exec", "create", True),
    ("", "pods", "attach", "create", True),
    ("", "pods", "portforward", "create", True),
    ("", "pods", "", "patch", True),
    ("", "secrets", "", "get", True),
    ("", "secrets", "", "list", False),
    ("", "pods", "", "list", False),
    ("", "nodes", "", "list", False),
    ("rbac.authorization.k8s.io", "roles", "", "create", True),
    ("", "serviceaccounts", "token", "create", True),
)
"""(group, resource, subresource, verb, in the kernels' namespace or cluster-wide) the
service must NOT be able to do: what an attacker holding its token would want."""


async def _allowed(api: client.ApiClient, namespace: str | None, group: str, resource: str,
                   subresource: str, verb: str) -> bool:  # fmt: skip
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "group": group, "resource": resource, "verb": verb,
                **({"subresource": subresource} if subresource else {}),
                **({"namespace": namespace} if namespace else {}),
            }
        },
    }  # fmt: skip
    answer = await client.AuthorizationV1Api(api).create_self_subject_access_review(review)
    return bool(answer.status.allowed)


async def check_rbac(api: client.ApiClient, namespace: str) -> list[Check]:
    missing = [
        f"{verb} {resource}"
        for group, resource, verbs in NEEDED
        for verb in verbs
        if not await _allowed(api, namespace, group, resource, "", verb)
    ]
    extra = [
        f"{verb} {resource}{'/' + sub if sub else ''}"
        f"{' in ' + namespace if in_namespace else ' cluster-wide'}"
        for group, resource, sub, verb, in_namespace in NOT_NEEDED
        if await _allowed(api, namespace if in_namespace else None, group, resource, sub, verb)
    ]
    return [
        Check("RBAC: enough", not missing, "every verb the service uses" if not missing
              else f"missing: {', '.join(missing)}",
              "apply deploy/kubernetes/rbac.yaml to the service's ServiceAccount"),
        Check("RBAC: not more", not extra, "nothing beyond pods, secrets and network "
              "policies in the kernels' namespace" if not extra
              else f"also allowed: {', '.join(extra)}",
              "bind the service's ServiceAccount to deploy/kubernetes/rbac.yaml's Role only"),
    ]  # fmt: skip


def _probe_pod(service: KubernetesService, name: str, code: str,
               labels: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """A restricted pod of the agent image that runs `code` on the agent's Python and
    ends; what it writes to /dev/termination-log is its report."""
    security = {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True, "runAsNonRoot": True, "runAsUser": KERNEL_UID,
        "runAsGroup": KERNEL_UID, "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "probe", "image": service.agent_image,
            "command": [AGENT_PYTHON, "-S", "-c", code],
            "securityContext": security,
            "resources": {"limits": {"cpu": "200m", "memory": "64Mi"},
                          "requests": {"cpu": "50m", "memory": "64Mi"}},
        }],
    }  # fmt: skip
    if service.runtime_class:
        spec["runtimeClassName"] = service.runtime_class
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": service.namespace,
                     "labels": {manifests.LABEL_MANAGED: manifests.MANAGED_BY,
                                "jupyter-sandbox/probe": "doctor", **labels}},
        "spec": spec,
    }  # fmt: skip


REPORT = "open('/dev/termination-log', 'w').write({})"


async def _run_probe(
    core: client.CoreV1Api, pod: dict[str, Any], until: Callable[[Any], bool] | None = None
) -> Any:
    """Create `pod` and wait (polling one pod for a few minutes: a doctor, not the service)
    until it ended, or until `until` says; the last state. TimeoutError if not in time."""
    namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    await core.create_namespaced_pod(namespace, pod)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_TIMEOUT
    while True:
        state = await core.read_namespaced_pod(name, namespace)
        if state.status.phase in ("Succeeded", "Failed") or (until and until(state)):
            return state
        if loop.time() > deadline:
            raise TimeoutError(f"probe pod {name} did not finish in {PROBE_TIMEOUT:.0f} s")
        await asyncio.sleep(1)


def _report(pod: client.V1Pod) -> str:
    for status in pod.status.container_statuses or ():
        if status.state and status.state.terminated:
            return status.state.terminated.message or ""
    return ""


async def _deleted(core: client.CoreV1Api, namespace: str, *names: str) -> None:
    for name in names:
        with contextlib.suppress(ApiException):
            await core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


async def check_sandboxing(api: client.ApiClient, service: KubernetesService) -> list[Check]:
    """The RuntimeClass, and a probe pod's view of its kernel."""
    try:
        await service.check_runtime_class(api)
    except Exception as e:
        fix = "install the runtime, then deploy/kubernetes/runtimeclasses.yaml"
        return [Check("RuntimeClass", False, str(e), fix)]
    what = service.runtime_class or "(none: unsandboxed)"
    handlers = ", ".join(SANDBOXING_HANDLERS[:3])
    checks = [Check("RuntimeClass", True, f"{what}, a sandboxing handler ({handlers}...)")]
    core = client.CoreV1Api(api)
    name = f"jsb-doctor-kernel-{uuid.uuid4().hex[:8]}"
    code = REPORT.format("open('/proc/version').read()")
    try:
        probe = await _run_probe(core, _probe_pod(service, name, code, {}))
        seen = _report(probe).strip()
    except Exception as e:
        return [*checks, Check("sandboxing", False, f"the probe pod did not report: {e}",
                               "see `kubectl -n NAMESPACE describe pod`")]  # fmt: skip
    finally:
        await _deleted(core, service.namespace, name)
    ours = Path("/proc/version").read_text().strip()
    gvisor = "gVisor" in seen or seen.startswith("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54")
    other = bool(seen) and seen != ours
    detail = (
        "the probe pod runs on gVisor" if gvisor else
        f"the probe pod runs its own kernel ({seen[:80]})" if other else
        f"the probe pod runs on this node's kernel ({seen[:80] or 'no report'})"
    )  # fmt: skip
    return [*checks, Check("sandboxing", gvisor or other, detail,
                           "the RuntimeClass's handler is not a sandbox on this node")]  # fmt: skip


async def check_network_policy(api: client.ApiClient, service: KubernetesService) -> Check:
    """Whether the kernels' namespace's default-deny stops a pod from reaching another:
    a probe server, a client that must fail, then a policy admitting it and a client
    that must succeed (the connection works where it is allowed)."""
    core = client.CoreV1Api(api)
    networking = client.NetworkingV1Api(api)
    ns, tag = service.namespace, uuid.uuid4().hex[:8]
    server, blocked, admitted = (f"jsb-doctor-{role}-{tag}" for role in ("server", "deny", "allow"))
    policy_name = f"jsb-doctor-allow-{tag}"
    serve = (
        f"import socket; s = socket.socket(); s.bind(('0.0.0.0', {PROBE_PORT})); s.listen(); "
        "[s.accept()[0].close() for _ in range(100)]"
    )

    def connect(ip: str) -> str:
        return (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('{ip}', {PROBE_PORT}), 10).close()\n"
            "    result = 'ok'\n"
            "except OSError as e:\n"
            "    result = str(e)\n" + REPORT.format("result")
        )

    try:
        running = await _run_probe(
            core, _probe_pod(service, server, serve, {"jupyter-sandbox/probe-role": tag}),
            until=lambda p: bool(p.status.pod_ip) and p.status.phase == "Running",
        )  # fmt: skip
        ip = running.status.pod_ip
        denied = await _run_probe(core, _probe_pod(service, blocked, connect(ip), {}))
        for policy in _admitting(ns, policy_name, tag):
            await networking.create_namespaced_network_policy(ns, policy)
        allowed = await _run_probe(core, _probe_pod(
            service, admitted, connect(ip), {"jupyter-sandbox/probe-egress": tag}))  # fmt: skip
    except Exception as e:
        return Check("NetworkPolicy", False, f"the probes did not finish: {e}")
    finally:
        await _deleted(core, ns, server, blocked, admitted)
        for suffix in ("-in", "-out"):
            with contextlib.suppress(ApiException):
                await networking.delete_namespaced_network_policy(policy_name + suffix, ns)
    stopped = _report(denied) != "ok"
    works = _report(allowed) == "ok"
    if stopped and works:
        return Check("NetworkPolicy", True, "enforced: default-deny stopped a pod, a policy "
                     "admitting it let it through")  # fmt: skip
    if not works:
        return Check("NetworkPolicy", False, "inconclusive: even an admitted pod could not "
                     "connect (is egress denied too? the probe pods need it)")  # fmt: skip
    return Check("NetworkPolicy", False, "NOT enforced: a pod reached another through the "
                 "namespace's default-deny", "use a CNI that implements NetworkPolicy "
                 "(Calico, Cilium...); kernels are then reachable only by their owner")  # fmt: skip


def _admitting(namespace: str, name: str, tag: str) -> list[dict[str, Any]]:
    """Policies letting the `probe-egress` pod reach the `probe-role` pod on PROBE_PORT (the
    namespace denies both ingress and egress by default)."""
    port = [{"protocol": "TCP", "port": PROBE_PORT}]
    server = {"matchLabels": {"jupyter-sandbox/probe-role": tag}}
    client_pod = {"matchLabels": {"jupyter-sandbox/probe-egress": tag}}

    def policy(suffix: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name + suffix, "namespace": namespace,
                         "labels": {manifests.LABEL_MANAGED: manifests.MANAGED_BY}},
            "spec": spec,
        }  # fmt: skip

    return [
        policy("-in", {"podSelector": server, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": client_pod}], "ports": port}]}),
        policy("-out", {"podSelector": client_pod, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"podSelector": server}], "ports": port}]}),
    ]  # fmt: skip


async def run_checks(service: KubernetesService,
                     network: bool = True) -> list[Check]:  # fmt: skip
    """Every check of the cluster the service's credentials reach."""
    try:
        api = await service.connect()
    except Exception as e:
        return [Check("Kubernetes API", False, f"no credentials: {e}",
                      "run in the service's pod, or with its kubeconfig")]  # fmt: skip
    try:
        try:
            version = await client.VersionApi(api).get_code()
        except Exception as e:
            return [Check("Kubernetes API", False, f"not reachable: {e}")]
        checks = [Check("Kubernetes API", True, f"{version.git_version} at "
                        f"{api.configuration.host}")]  # fmt: skip
        steps: list[Callable[[], Awaitable[Any]]] = [
            lambda: check_rbac(api, service.namespace),
            lambda: check_sandboxing(api, service),
        ]
        for step in steps:
            checks += await step()
        if network:
            checks.append(await check_network_policy(api, service))
        return checks
    finally:
        await api.close()
