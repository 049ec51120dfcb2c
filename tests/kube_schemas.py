"""Kubernetes objects checked as a cluster would take them, without a cluster.

No control plane can run on these machines, so every manifest that deploy/kubernetes/ holds
or the Kubernetes backend makes is checked here instead:

- `validate`: against the official OpenAPI schemas of the oldest and the newest supported
  Kubernetes release (PyPI `kubernetes-validate`, in strict mode: a field the API does not
  know is an error, where a cluster would drop it without a word or refuse it under
  `kubectl apply --validate=strict`);
- `restricted_violations`: against Pod Security Admission's `restricted` profile, the one the
  kernels' namespace enforces (deploy/kubernetes/namespace.yaml), written out from the
  admission's checks (k8s.io/pod-security-admission/policy, check_*.go), as strict as
  their newest version or stricter.

Objects are plain dicts in the manifests' own (camelCase) form: a kubernetes_asyncio model
is turned into one by `ApiClient().sanitize_for_serialization(model)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

KUBE_VERSIONS = ("1.28", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
"""The Kubernetes releases every object must be valid in: the oldest supported and the newest
that kubernetes-validate ships. The oldest is 1.28 because the hub's chart sets it: the
current zero-to-jupyterhub releases (4.x, 4.4.0 the latest) declare kubeVersion ">=1.28.0-0"
(its main branch has moved to 1.32 for 5.x); every API used here (RuntimeClass node.k8s.io/v1,
Pod Security Admission, NetworkPolicy) is GA well before it."""


def validate(obj: dict[str, Any]) -> None:
    """Check `obj` (one Kubernetes object) against the API schemas of each of KUBE_VERSIONS.

    Raises AssertionError naming the object, the release, the field's path and the schema's
    message; also when a release has no schema for the object's kind and apiVersion (a kind
    that release does not serve)."""
    what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            raise AssertionError(f"{what}, Kubernetes {version}: {path}: {e.message}") from None
        except kubernetes_validate.SchemaNotFoundError as e:
            raise AssertionError(f"{what}, Kubernetes {version}: {e.message}") from None


def load_yaml_documents(path: Path) -> list[Any]:
    """The documents of a YAML file, in order, empty ones left out."""
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
"""The only volume sources the restricted profile admits (check_restrictedVolumes.go)."""
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_unprivileged_port_start",
    }
)
"""The sysctls of the baseline profile's first set (check_sysctls.go, 1.0): later releases
admit more, these pass in every one."""
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
"""The SELinux types the baseline profile admits in every release (check_seLinuxOptions.go)."""
GOOD_PROFILES = frozenset({"RuntimeDefault", "Localhost"})
"""The seccomp and AppArmor profile types the restricted profile admits."""
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def _containers(pod_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{kind}[{c.get('name')}]", c)
        for kind in CONTAINER_LISTS
        for c in pod_spec.get(kind) or []
    ]


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """What in `pod_spec` (a Pod's `spec`) the Pod Security `restricted` profile forbids.

    An empty list when the Pod would be admitted. Stricter than the admission in two ways,
    both on the safe side: no relaxation for Pods in a user namespace (`hostUsers: false`),
    and only the sysctls every release admits. Windows-only exemptions do not apply (no
    kernel Pod runs on Windows). Covers the baseline checks too, as `restricted` does:
    host namespaces, privileged containers, capabilities, hostPath and other volume types,
    host ports, /proc mount, seccomp, AppArmor, SELinux, sysctls, probe and lifecycle hosts,
    Windows HostProcess, runAsNonRoot and runAsUser, privilege escalation."""
    found: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}

    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            found.append(f"spec.{field} must not be true")

    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds or not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(
                f"volume {volume.get('name')!r} has type {', '.join(sorted(kinds)) or 'none'}:"
                f" only {', '.join(sorted(RESTRICTED_VOLUME_TYPES))} are allowed"
            )

    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl.get('name')!r} is not one of the safe ones")

    # Settings a container may inherit from the Pod: the Pod's counts for a container that
    # does not set its own.
    pod_non_root = pod_sc.get("runAsNonRoot")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_non_root is False:
        found.append("spec.securityContext.runAsNonRoot must not be false")
    if pod_seccomp is not None and pod_seccomp not in GOOD_PROFILES:
        found.append(f"spec.securityContext.seccompProfile.type must not be {pod_seccomp}")
    found += _security_context_violations("spec.securityContext", pod_sc)

    for where, container in _containers(pod_spec):
        sc = container.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", pod_non_root)
        if non_root is not True:
            found.append(f"{where}: runAsNonRoot must be true (in the container or the Pod)")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in GOOD_PROFILES:
            found.append(
                f"{where}: seccompProfile.type must be RuntimeDefault or Localhost"
                f" (in the container or the Pod), not {seccomp}"
            )
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            found.append(f"{where}: privileged must not be true")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{where}: capabilities.drop must include ALL")
        extra = sorted(set(caps.get("add") or []) - {"NET_BIND_SERVICE"})
        if extra:
            found.append(f"{where}: capabilities.add may hold NET_BIND_SERVICE only, not {extra}")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount must be Default")
        found += _security_context_violations(f"{where}.securityContext", sc)
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where}: hostPort {port['hostPort']} is not allowed")
        found += _host_field_violations(where, container)
    return found


def _security_context_violations(where: str, sc: dict[str, Any]) -> list[str]:
    """The checks alike for a Pod's and a container's securityContext."""
    found = []
    if sc.get("runAsUser") == 0:
        found.append(f"{where}.runAsUser must not be 0")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        found.append(f"{where}.seLinuxOptions.type {selinux['type']!r} is not allowed")
    for field in ("user", "role"):
        if selinux.get(field):
            found.append(f"{where}.seLinuxOptions.{field} must not be set")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in GOOD_PROFILES:
        found.append(f"{where}.appArmorProfile.type must not be {apparmor}")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append(f"{where}.windowsOptions.hostProcess must not be true")
    return found


def _host_field_violations(where: str, container: dict[str, Any]) -> list[str]:
    """Probes and lifecycle handlers aimed at another host (check_hostProbesAndhostLifecycle)."""
    handlers = {p: container.get(p) for p in ("livenessProbe", "readinessProbe", "startupProbe")}
    lifecycle = container.get("lifecycle") or {}
    handlers |= {f"lifecycle.{h}": lifecycle.get(h) for h in ("postStart", "preStop")}
    return [
        f"{where}: {name}.{action}.host must not be set"
        for name, handler in handlers.items()
        for action in ("httpGet", "tcpSocket")
        if ((handler or {}).get(action) or {}).get("host")
    ]
