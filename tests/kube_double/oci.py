"""From a container of a pod manifest to the OCI runtime config runsc runs: what containerd's
CRI plugin and the kubelet would make of it.

Pure functions of the manifest and of what the kubelet resolved (volumes on the
host, the pod's address): no I/O here but reading the image's /etc/passwd and
/etc/group for the user's group and groups. Where Kubernetes leaves a choice to
the runtime, containerd's is taken: its default capability set, no ambient or
inheritable capabilities, the image's primary group of the uid when
`runAsGroup` is unset, the image's group memberships merged with `fsGroup` and
`supplementalGroups`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .validation import quantity

Obj = dict[str, Any]

DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
"""containerd's default set (pkg/oci defaults), what a container has unless dropped."""
ALL_CAPABILITIES = (
    *DEFAULT_CAPABILITIES,
    "CAP_DAC_READ_SEARCH",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_LEASE",
    "CAP_AUDIT_CONTROL",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD = 100_000
SHM_BYTES = 64 * 1024 * 1024
"""/dev/shm of every container, as containerd's default."""
MAX_ACCOUNT_FILE = 1 << 20


def security(pod: Obj, container: Obj) -> Obj:
    """The effective security context: the container's fields over the pod's."""
    pod_sc = pod["spec"].get("securityContext") or {}
    container_sc = container.get("securityContext") or {}
    merged = {
        k: v
        for k, v in pod_sc.items()
        if k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
    }
    merged.update(container_sc)
    return merged


def capabilities(container: Obj) -> list[str]:
    """The container's capabilities: containerd's default set, less `drop`, plus `add`."""
    caps = (container.get("securityContext") or {}).get("capabilities") or {}
    drop = {_cap(c) for c in caps.get("drop") or []}
    add = [_cap(c) for c in caps.get("add") or []]
    chosen = [] if "CAP_ALL" in drop else [c for c in DEFAULT_CAPABILITIES if c not in drop]
    for cap in ALL_CAPABILITIES if "CAP_ALL" in add else add:
        if cap not in chosen:
            chosen.append(cap)
    return chosen


def _cap(name: str) -> str:
    name = name.upper()
    return name if name.startswith("CAP_") else f"CAP_{name}"


def _account_lines(root: Path, name: str) -> list[list[str]]:
    """The fields of each line of the image's /etc/<name>; [] if it has none (or it leads
    out of the image)."""
    path = root / "etc" / name
    try:
        real = path.resolve(strict=True)
        if not real.is_relative_to(root.resolve()) or not real.is_file():
            return []
        with open(real, "rb") as file:
            text = file.read(MAX_ACCOUNT_FILE).decode(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional: tuple[int, ...]

    def oci(self) -> Obj:
        user: Obj = {"uid": self.uid, "gid": self.gid}
        if self.additional:
            user["additionalGids"] = list(self.additional)
        return user


def user(pod: Obj, container: Obj, image_root: Path) -> User:
    """uid and gid from runAsUser and runAsGroup (the container's over the pod's); without
    runAsGroup, the uid's group in the image (else 0); the groups: the image's memberships
    of that user, fsGroup, supplementalGroups."""
    sc = security(pod, container)
    uid = int(sc.get("runAsUser", 0))
    passwd = [f for f in _account_lines(image_root, "passwd") if len(f) >= 4]
    entry = next((f for f in passwd if f[2] == str(uid)), None)
    gid = sc.get("runAsGroup")
    if gid is None:
        gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    groups: list[int] = []
    if entry:
        for fields in _account_lines(image_root, "group"):
            if len(fields) >= 4 and entry[0] in fields[3].split(",") and fields[2].isdigit():
                groups.append(int(fields[2]))
    pod_sc = pod["spec"].get("securityContext") or {}
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    groups += [int(g) for g in pod_sc.get("supplementalGroups") or []]
    return User(uid, int(gid), tuple(dict.fromkeys(g for g in groups if g != int(gid))))


def resources(container: Obj) -> Obj:
    """OCI resources from the container's limits (memory + swap = memory: no swap)."""
    limits = (container.get("resources") or {}).get("limits") or {}
    found: Obj = {}
    if "memory" in limits:
        memory = int(quantity(limits["memory"]))
        found["memory"] = {"limit": memory, "swap": memory}
    if "cpu" in limits:
        found["cpu"] = {
            "quota": max(1000, int(quantity(limits["cpu"]) * CPU_PERIOD)),
            "period": CPU_PERIOD,
        }
    return found


def memory_limit(container: Obj) -> int | None:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(quantity(limits["memory"])) if "memory" in limits else None


_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: a defined VAR is replaced, `$$` is `$`, an
    undefined reference stays as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)


class ConfigError(Exception):
    """CreateContainerConfigError: what the container's config refers to is missing."""


Lookup = Callable[[str, str], "dict[str, str] | None"]
"""(kind "Secret" or "ConfigMap", name) -> its data, decoded, or None if there is none."""


def _field(pod: Obj, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def environment(pod: Obj, container: Obj, lookup: Lookup, service_host: str) -> list[str]:
    """The container's environment as containerd and the kubelet make it: PATH and
    HOSTNAME, the API server's service variables (a kubelet always adds those of the
    `kubernetes` service), then `envFrom`, then `env` with `$(VAR)` expanded. ConfigError
    for a missing secret or config map key that is not optional."""
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": pod["metadata"]["name"]}
    env.update(
        {
            "KUBERNETES_SERVICE_HOST": service_host,
            "KUBERNETES_SERVICE_PORT": "443",
            "KUBERNETES_SERVICE_PORT_HTTPS": "443",
            "KUBERNETES_PORT": f"tcp://{service_host}:443",
            "KUBERNETES_PORT_443_TCP": f"tcp://{service_host}:443",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            "KUBERNETES_PORT_443_TCP_PORT": "443",
            "KUBERNETES_PORT_443_TCP_ADDR": service_host,
        }
    )
    namespace = pod["metadata"]["namespace"]
    for source in container.get("envFrom") or []:
        kind = "Secret" if "secretRef" in source else "ConfigMap"
        ref = source.get("secretRef") or source.get("configMapRef") or {}
        data = lookup(kind, ref.get("name", ""))
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
        env.update({source.get("prefix", "") + key: value for key, value in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand(str(var.get("value", "")), env)
        elif "fieldRef" in source:
            env[name] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
            ref = source.get("secretKeyRef") or source.get("configMapKeyRef") or {}
            value = (lookup(kind, ref.get("name", "")) or {}).get(ref.get("key", ""))
            if value is not None:
                env[name] = value
            elif not ref.get("optional"):
                raise ConfigError(
                    f"couldn't find key {ref.get('key')} in {kind} {namespace}/{ref.get('name')}"
                )
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
    return [f"{k}={v}" for k, v in env.items()]


@dataclass(frozen=True)
class Bind:
    """One host path bound into the container."""

    source: Path
    destination: str
    read_only: bool


def spec(
    pod: Obj,
    container: Obj,
    *,
    root: Path,
    image_root: Path,
    env: list[str],
    binds: list[Bind],
    cgroup: str,
) -> Obj:
    """The OCI config of `container`: its root (read-only when readOnlyRootFilesystem),
    command and args (`$(VAR)` expanded), env, workingDir, user, capabilities,
    noNewPrivileges, limits, and the binds (volumes and the kubelet's files)."""
    variables = dict(entry.split("=", 1) for entry in env)
    args = [expand(a, variables) for a in [*container["command"], *(container.get("args") or [])]]
    sc = security(pod, container)
    caps = capabilities(container)
    mounts: list[Obj] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={SHM_BYTES}"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    for bind in binds:
        mounts.append(
            {
                "destination": bind.destination,
                "type": "bind",
                "source": str(bind.source),
                "options": ["rbind", "ro" if bind.read_only else "rw", "nosuid", "nodev"],
            }
        )
    return {
        "ociVersion": "1.0.0",
        "process": {
            "user": user(pod, container, image_root).oci(),
            "args": args,
            "env": env,
            "cwd": container.get("workingDir") or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": sc.get("allowPrivilegeEscalation") is False,
        },
        "root": {"path": str(root), "readonly": bool(sc.get("readOnlyRootFilesystem"))},
        "hostname": pod["spec"].get("hostname") or pod["metadata"]["name"],
        "mounts": mounts,
        "annotations": {
            "io.kubernetes.cri.container-name": container["name"],
            "io.kubernetes.cri.sandbox-name": pod["metadata"]["name"],
            "io.kubernetes.cri.sandbox-namespace": pod["metadata"]["namespace"],
            "io.kubernetes.cri.sandbox-uid": pod["metadata"]["uid"],
        },
        "linux": {
            # No network namespace asked for: runsc runs inside the pod's (network.py).
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "cgroupsPath": cgroup,
            "resources": resources(container),
        },
    }
