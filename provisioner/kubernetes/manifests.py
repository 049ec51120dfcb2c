"""The Kubernetes objects of one kernel: its Pod, its NetworkPolicy and its Secret.

Pure functions of a `KernelPlan` (what the service decided for one kernel start),
so that `jupyter sandbox kubernetes render` prints exactly what a start would
create, without a cluster, and the tests validate it against the official schemas.

What every kernel pod is, whatever the plan:
- its own sandbox: `runtimeClassName` (gVisor, Kata...), never the node's kernel unless
  the operator allowed an unsandboxed class for development (`KernelPlan.runtime_class`
  is then None, and the service said so when it started);
- Pod Security `restricted`: non-root uid/gid, no privilege escalation, every capability
  dropped, RuntimeDefault seccomp, read-only root filesystem, no host namespace, no
  hostPath, no service account token, no service links in its environment;
- the agent comes from the project's agent image through an init container and an
  emptyDir (the user's image need not carry it); the kernel's writable folders are one
  sized emptyDir; the kernel's TLS identity is its Secret, mounted read-only;
- reachable on `AGENT_PORT` only from its owner's server pod (its NetworkPolicy), and
  reaching out only as its network mode says.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..guest.layout import (
    AGENT_IN_RUNTIME,
    AGENT_OPENSSL_CONF,
    AGENT_PYTHON,
    AGENT_RUNTIME,
    KERNEL_HOME,
    KERNEL_UID,
)
from ..limits import Limits
from ..network.spec import NetworkSpec

AGENT_PORT = 8470
"""Where a kernel pod's agent listens (TLS); the only port its NetworkPolicy opens."""
TLS_DIR = "/run/jupyter-sandbox/tls"
"""Where the kernel's Secret (its certificate, key and token) is mounted."""
KERNEL_RUNTIME_DIR = "/run/kernel"
"""The agent's folder for the kernel's connection file and ipc sockets (agent.RUNTIME_DIR)."""
GRACE_SECONDS = 5
"""Seconds a kernel pod gets after SIGTERM (a shutdown): the kernel has said goodbye by then."""
WRITABLE = {"tmp": "/tmp", "var-tmp": "/var/tmp", "home": KERNEL_HOME, "run": KERNEL_RUNTIME_DIR}
"""What the kernel may write (its root is read-only), by volume name: the same folders as
the local backends' (layout.KERNEL_WRITABLE) and the agent's run folder."""
AGENT_VOLUME_SIZE = "256Mi"
"""Room for the agent's runtime (about 45 MB) in its emptyDir."""
INSTALL_ARGV = (AGENT_PYTHON, "-S", "-s", "-E", "-B", f"{AGENT_IN_RUNTIME}/install_agent.py")
"""The agent image's entrypoint (guest/install_agent.py): the init container adds the
volume's mount point."""
AGENT_VOLUME = "/agent"
"""Where the init container mounts the kernel's agent volume (its copy's destination)."""
MANAGED_BY = "jupyter-sandbox"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_USER = "jupyter-sandbox/user"
LABEL_SERVER = "jupyter-sandbox/server"
LABEL_KERNEL = "jupyter-sandbox/kernel-id"
LABEL_INSTANCE = "jupyter-sandbox/instance"
ANNOTATION_USER = "jupyter-sandbox/user"
"""The owner's exact name (a label holds only `label_value` of it): what the service checks."""
ANNOTATION_SERVER = "jupyter-sandbox/server"
ANNOTATION_KERNELSPEC = "jupyter-sandbox/kernelspec"
ANNOTATION_KERNEL = "jupyter-sandbox/kernel-id"
"""The kernel's exact id (its label is `label_value` of it)."""
ANNOTATION_MEMORY = "jupyter-sandbox/memory"
"""Bytes of memory the kernel was granted: what the user's `max_memory` quota counts."""
KERNEL_POD = "jupyter-sandbox-kernel"
"""The pods' `app.kubernetes.io/name`: what the service's one watch selects."""
SELECTOR = f"{LABEL_MANAGED}={MANAGED_BY},{LABEL_NAME}={KERNEL_POD}"
"""The label selector of every object the service makes for kernels."""

_LABEL_VALUE = re.compile(r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^a-z0-9]+")


def label_value(name: str) -> str:
    """`name` as a label value (63 characters of [a-z0-9-], unique per name): the name
    itself when it is already one, else a readable part and a digest of the whole. User
    names are not label values in general (e-mail addresses, upper case, 100 characters);
    labels only select, the annotation holds the exact name."""
    if _LABEL_VALUE.match(name) and name == name.lower():
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    readable = _UNSAFE.sub("-", name.lower()).strip("-")[:50].strip("-")
    return f"{readable}-{digest}" if readable else digest


def object_name(kernel_id: str, instance: str) -> str:
    """The Pod, Secret and NetworkPolicy name of one start of a kernel:
    `jsb-<kernel id>-<instance>` (a DNS label). A restart keeps the kernel's id; the
    instance tells its new objects from the old ones, which Kubernetes' garbage
    collector may still be deleting."""
    return f"jsb-{label_value(kernel_id)[:50]}-{instance}"


@dataclass(frozen=True)
class Workspace:
    """The user's volume in the kernel pod (zero-to-jupyterhub's `claim-{username}`)."""

    claim: str
    mount_path: str
    read_only: bool
    server_labels: Mapping[str, str] = field(default_factory=dict)
    """Labels of the owner's server pod: a ReadWriteOnce volume can be mounted only on one
    node, so the kernel pod is scheduled where that pod runs (pod affinity). Empty: no
    affinity (ReadWriteMany volumes)."""


@dataclass(frozen=True)
class KernelPlan:
    """Everything one kernel pod is made of; decided by the service for each start."""

    kernel_id: str
    user: str
    server: str
    """The owner's server name ("" for the default server)."""
    instance: str
    """This start's own part of the objects' names (a restart keeps the kernel id)."""
    kernelspec: str
    namespace: str
    image: str
    """The kernel's image reference, as the cluster pulls it."""
    agent_image: str
    runtime_class: str | None
    """None only where the operator allowed unsandboxed kernels (development)."""
    limits: Limits
    network: NetworkSpec
    egress_addresses: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """`egress_allow` host names resolved by the service at the start (network policies
    take addresses only): name -> IPv4 addresses, pinned in the pod's /etc/hosts."""
    blocked_networks: Sequence[str] = ()
    """What no kernel reaches, in `open` or `egress` mode: the cluster's pod, service and
    node ranges, link-local and metadata addresses (the service's `blocked_networks` and
    `ALWAYS_BLOCKED`)."""
    hub_namespace: str = "jhub"
    server_labels: Mapping[str, str] = field(default_factory=dict)
    """Labels that select the owner's server pod in `hub_namespace`: the only pod the
    kernel's NetworkPolicy admits."""
    dns_namespace: str = "kube-system"
    dns_labels: Mapping[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    workspace: Workspace | None = None
    cwd: str = KERNEL_HOME
    image_pull_policy: str = "IfNotPresent"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    grace_seconds: int = GRACE_SECONDS

    @property
    def name(self) -> str:
        return object_name(self.kernel_id, self.instance)

    def labels(self) -> dict[str, str]:
        return {
            LABEL_NAME: KERNEL_POD,
            LABEL_MANAGED: MANAGED_BY,
            LABEL_USER: label_value(self.user),
            LABEL_SERVER: label_value(self.server) if self.server else "default",
            LABEL_KERNEL: label_value(self.kernel_id),
            LABEL_INSTANCE: self.instance,
        }

    def annotations(self) -> dict[str, str]:
        return {
            ANNOTATION_USER: self.user,
            ANNOTATION_SERVER: self.server,
            ANNOTATION_KERNELSPEC: self.kernelspec,
            ANNOTATION_KERNEL: self.kernel_id,
            ANNOTATION_MEMORY: str(self.limits.memory or 0),
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "labels": self.labels(),
            "annotations": self.annotations(),
        }


def kernel_user_env(limits: Limits) -> str:
    """JSB_KERNEL for the agent (agent.kernel_user): uid, gid, process and file limits."""
    return f"{KERNEL_UID},{KERNEL_UID},{limits.pids or 0},{limits.open_files}"


def _quantity_cpu(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def _resources(limits: Limits) -> dict[str, dict[str, str]]:
    """Requests equal to limits (Guaranteed QoS where cpu and memory are both set): a
    kernel's memory is never overcommitted on the node, so it is not the first evicted."""
    amounts: dict[str, str] = {"ephemeral-storage": str(limits.disk)}
    if limits.memory:
        amounts["memory"] = str(limits.memory)
    if limits.cpu:
        amounts["cpu"] = _quantity_cpu(limits.cpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}


_CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "privileged": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": KERNEL_UID,
    "runAsGroup": KERNEL_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod(plan: KernelPlan) -> dict[str, Any]:
    """The kernel's Pod."""
    # One emptyDir per writable folder, not subPaths of one: a kubelet makes subPath
    # folders root's 0755, which a non-root kernel cannot write. Each is bounded by
    # disk_limit, and all of them together by the container's ephemeral-storage limit.
    mounts = [
        {"name": "agent", "mountPath": AGENT_RUNTIME, "readOnly": True},
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
        *({"name": name, "mountPath": path} for name, path in WRITABLE.items()),
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "agent", "emptyDir": {"sizeLimit": AGENT_VOLUME_SIZE}},
        {"name": "tls", "secret": {"secretName": plan.name, "defaultMode": 0o440}},
        *({"name": name, "emptyDir": {"sizeLimit": str(plan.limits.disk)}} for name in WRITABLE),
    ]
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": plan.grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": KERNEL_UID,
            "runAsGroup": KERNEL_UID,
            "fsGroup": KERNEL_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [
            {
                "name": "agent",
                "image": plan.agent_image,
                "imagePullPolicy": plan.image_pull_policy,
                "command": [
                    AGENT_PYTHON,
                    "-S",
                    "-s",
                    "-E",
                    "-B",
                    f"{AGENT_IN_RUNTIME}/install_agent.py",
                    "/agent",
                ],
                "volumeMounts": [{"name": "agent", "mountPath": AGENT_VOLUME}],
                "resources": {
                    "requests": {"cpu": "100m", "memory": "64Mi"},
                    "limits": {"cpu": "500m", "memory": "64Mi"},
                },
                "securityContext": dict(_CONTAINER_SECURITY),
            }
        ],
        "containers": [
            {
                "name": "kernel",
                "image": plan.image,
                "imagePullPolicy": plan.image_pull_policy,
                "command": [AGENT_PYTHON, "-S", "-s", "-E", "-B", f"{AGENT_IN_RUNTIME}/agent.py"],
                "env": [
                    {"name": "JSB_LISTEN", "value": str(AGENT_PORT)},
                    {"name": "JSB_TLS_DIR", "value": TLS_DIR},
                    {"name": "JSB_KERNEL", "value": kernel_user_env(plan.limits)},
                    {"name": "OPENSSL_CONF", "value": AGENT_OPENSSL_CONF},
                ],
                "ports": [{"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"}],
                "resources": _resources(plan.limits),
                "securityContext": dict(_CONTAINER_SECURITY),
                "volumeMounts": mounts,
                "workingDir": "/",
            }
        ],
        "volumes": volumes,
    }
    if plan.runtime_class is not None:
        spec["runtimeClassName"] = plan.runtime_class
    if plan.workspace is not None:
        _add_workspace(spec, plan.workspace)
    _add_name_resolution(spec, plan)
    if plan.node_selector:
        spec["nodeSelector"] = dict(plan.node_selector)
    if plan.tolerations:
        spec["tolerations"] = [dict(t) for t in plan.tolerations]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": plan.metadata(), "spec": spec}


def _add_workspace(spec: dict[str, Any], workspace: Workspace) -> None:
    spec["volumes"].append({
        "name": "workspace",
        "persistentVolumeClaim": {"claimName": workspace.claim, "readOnly": workspace.read_only},
    })  # fmt: skip
    spec["containers"][0]["volumeMounts"].append(
        {"name": "workspace", "mountPath": workspace.mount_path, "readOnly": workspace.read_only}
    )
    if workspace.server_labels:
        spec["affinity"] = {
            "podAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [{
                    "labelSelector": {"matchLabels": dict(workspace.server_labels)},
                    "namespaceSelector": {},
                    "topologyKey": "kubernetes.io/hostname",
                }]
            }
        }  # fmt: skip


def _add_name_resolution(spec: dict[str, Any], plan: KernelPlan) -> None:
    """How the kernel resolves names. `open`: the cluster's DNS. Otherwise no DNS at all
    (a DNS server reached is a way out: names can carry data), and `egress` names come
    pinned in /etc/hosts to the addresses its NetworkPolicy admits."""
    if plan.network.mode == "open":
        return
    spec["dnsPolicy"] = "None"
    spec["dnsConfig"] = {"nameservers": ["127.0.0.1"], "searches": [], "options": []}
    if plan.egress_addresses:
        by_ip: dict[str, list[str]] = {}
        for host, addresses in sorted(plan.egress_addresses.items()):
            for ip in addresses:
                by_ip.setdefault(ip, []).append(host)
        spec["hostAliases"] = [{"ip": ip, "hostnames": hosts} for ip, hosts in by_ip.items()]


def _peer_port(port: int | None) -> list[dict[str, Any]]:
    if port is None:
        return []
    return [{"protocol": "TCP", "port": port}, {"protocol": "UDP", "port": port}]


def _egress_rules(plan: KernelPlan) -> list[dict[str, Any]]:
    mode = plan.network.mode
    if mode == "none":
        return []
    if mode == "open":
        rules: list[dict[str, Any]] = [
            {
                "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(plan.blocked_networks)}}],
            },
            {
                "to": [{
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": plan.dns_namespace}
                    },
                    "podSelector": {"matchLabels": dict(plan.dns_labels)},
                }],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            },
        ]  # fmt: skip
        return rules
    rules = []
    blocked = [ipaddress.ip_network(n) for n in plan.blocked_networks]
    for destination in plan.network.allow:
        if destination.net is not None:
            nets = [destination.net]
        else:
            nets = [ipaddress.ip_network(f"{ip}/32")
                    for ip in plan.egress_addresses.get(destination.host, ())]  # fmt: skip
        peers = [_allowed_block(net, blocked) for net in nets]
        if not any(peers):
            continue  # resolved to nothing, or to blocked addresses only: nothing to admit
        rule: dict[str, Any] = {"to": [{"ipBlock": peer} for peer in peers if peer]}
        if destination.port is not None:
            rule["ports"] = _peer_port(destination.port)
        rules.append(rule)
    return rules


def _allowed_block(net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                   blocked: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
                   ) -> dict[str, Any] | None:  # fmt: skip
    """The ipBlock admitting `net` but none of `blocked` (no kernel reaches those in any
    mode: `egress_allow` cannot name around them, "0.0.0.0/0" included); None if all of
    `net` is blocked."""
    if any(net.version == b.version and net.subnet_of(b) for b in blocked):  # type: ignore[arg-type]
        return None
    inside = sorted(str(b) for b in blocked
                    if b.version == net.version and b != net and b.subnet_of(net))  # type: ignore[arg-type]  # fmt: skip
    return {"cidr": str(net), **({"except": inside} if inside else {})}


def network_policy(plan: KernelPlan) -> dict[str, Any]:
    """The kernel's NetworkPolicy: ingress on the agent's port from its owner's server pod
    only; egress as its network mode says (`none`: nothing at all)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": plan.metadata(),
        "spec": {
            "podSelector": {
                "matchLabels": {
                    LABEL_KERNEL: label_value(plan.kernel_id),
                    LABEL_INSTANCE: plan.instance,
                }
            },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": plan.hub_namespace}
                            },
                            "podSelector": {"matchLabels": dict(plan.server_labels)},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": AGENT_PORT}],
                }
            ],
            "egress": _egress_rules(plan),
        },
    }


def secret(plan: KernelPlan, data: Mapping[str, str]) -> dict[str, Any]:
    """The kernel's Secret: `data` (its certificate, key and token, base64) for the agent."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": plan.metadata(),
        "type": "Opaque",
        "immutable": True,
        "data": dict(data),
    }


ALWAYS_BLOCKED = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3",
                  "100.100.100.200/32", "168.63.129.16/32")  # fmt: skip
"""Blocked whatever the operator's `blocked_networks` say: loopback, link-local (cloud
metadata services), multicast, Alibaba's and Azure's metadata addresses."""


def check_blocked(networks: Sequence[str]) -> list[str]:
    """`networks` and `ALWAYS_BLOCKED` as CIDRs, each once, none inside another (ValueError
    naming a bad one): what no kernel reaches."""
    nets = {ipaddress.ip_network(n, strict=False) for n in (*networks, *ALWAYS_BLOCKED)}
    kept = [n for n in nets if not any(n != o and n.version == o.version and n.subnet_of(o)  # type: ignore[arg-type]
                                       for o in nets)]  # fmt: skip
    return sorted(str(n) for n in kept)
