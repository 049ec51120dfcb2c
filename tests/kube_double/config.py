"""The double's configuration: one JSON file, read once at start.

What a real cluster would get from its operator (namespaces, RuntimeClasses, the
caller's RBAC) and from its registries and storage (images as root filesystem
folders on this host, claims as host folders). Every key but `token` is optional:

    {
      "token": "secret bearer token",
      "admin_token": "another token: a cluster admin's (no RBAC applies to it)",
      "user": "system:serviceaccount:jupyter-sandbox:sandbox",
      "namespaces": {"kernels": {"pod-security.kubernetes.io/enforce": "restricted"}},
      "runtime_classes": {"gvisor": "runsc"},
      "images": {"registry.local/python3:1": "/var/lib/jupyter-sandbox/images/python3/rootfs"},
      "claims": {"claim-alice": "/srv/alice", "kernels/claim-bob": "/srv/bob"},
      "rules": [{"namespace": "kernels", "apiGroups": [""], "resources": ["pods"],
                 "verbs": ["get", "list", "watch", "create", "delete"]}],
      "node": "node-1",
      "bridge": "jsbkd0",
      "subnet": "10.250.0.0/16",
      "host_pod_labels": {"app": "jupyterhub", "component": "singleuser-server"},
      "host_pod_namespace": "hub",
      "runsc": "runsc",
      "platform": "systrap",
      "bookmark_seconds": 10,
      "watch_history": 5000
    }

- `namespaces`: name -> labels (each also gets `kubernetes.io/metadata.name`).
- `runtime_classes`: name -> handler. Only the handler `runsc` can run pods here.
- `images`: image reference (exact string of `spec.containers[].image`) -> rootfs folder,
  used read-only (each container writes to an overlay of its own).
- `claims`: `claim` (any namespace) or `namespace/claim` -> host folder.
- `rules`: the caller's RBAC (Role rules with a `namespace`, ClusterRole rules without),
  enforced on every request and answered by access reviews. Absent: everything allowed.
- `watch_history`: events kept for watches resuming from a resourceVersion (older: 410).
- `host_pod_labels`: the host itself (the bridge's address) counts as a pod with these
  labels in `host_pod_namespace` when NetworkPolicies are enforced.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_USER = "system:serviceaccount:jupyter-sandbox:sandbox-service"
BRIDGE_NAME = re.compile(r"^[a-z][a-z0-9]{1,5}$")
"""At most 6 characters: the pods' host-end links are named `<bridge>v<8 hex>` (<= 15)."""
MAX_CONFIG_BYTES = 1 << 20
DEFAULT_SUBNET = ipaddress.IPv4Network("10.250.0.0/16")
AVOID = ipaddress.IPv4Network("10.223.0.0/16")
"""The project's own sandbox links (provisioner/network/spec.py POOL): never overlap it."""


@dataclass(frozen=True)
class Rule:
    """One RBAC policy rule: a Role's (namespace set) or a ClusterRole's (namespace None)."""

    verbs: tuple[str, ...]
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()
    namespace: str | None = None


@dataclass(frozen=True)
class Config:
    token: str
    admin_token: str = ""
    """A cluster admin's token (a test's kubectl): allowed everything, RBAC aside."""
    user: str = DEFAULT_USER
    namespaces: dict[str, dict[str, str]] = field(default_factory=lambda: {"default": {}})
    runtime_classes: dict[str, str] = field(default_factory=lambda: {"gvisor": "runsc"})
    images: dict[str, Path] = field(default_factory=dict)
    claims: dict[str, Path] = field(default_factory=dict)
    rules: tuple[Rule, ...] | None = None
    node: str = "node-1"
    bridge: str = "jsbkd0"
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET
    host_pod_labels: dict[str, str] = field(default_factory=dict)
    host_pod_namespace: str = "default"
    runsc: str = "runsc"
    platform: str = "systrap"
    bookmark_seconds: float = 10.0
    watch_history: int = 5000

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: the node's IP, and every pod's `hostIP`."""
        return str(self.subnet[1])

    def claim(self, namespace: str, name: str) -> Path | None:
        """The host folder of claim `name` in `namespace`, or None if there is none."""
        return self.claims.get(f"{namespace}/{name}", self.claims.get(name))


def _strings(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what}: expected an object of strings")
    return dict(value)


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what}: expected a list of strings")
    return tuple(value)


def _rule(raw: Any, index: int) -> Rule:
    what = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: expected an object")
    known = {"verbs", "apiGroups", "resources", "resourceNames", "nonResourceURLs", "namespace"}
    if unknown := set(raw) - known:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}")
    namespace = raw.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise ValueError(f"{what}.namespace: expected a string")
    return Rule(
        verbs=_names(raw.get("verbs"), f"{what}.verbs"),
        api_groups=_names(raw.get("apiGroups", []), f"{what}.apiGroups"),
        resources=_names(raw.get("resources", []), f"{what}.resources"),
        resource_names=_names(raw.get("resourceNames", []), f"{what}.resourceNames"),
        non_resource_urls=_names(raw.get("nonResourceURLs", []), f"{what}.nonResourceURLs"),
        namespace=namespace,
    )


def parse(raw: Any) -> Config:
    """A Config from the file's decoded JSON; ValueError naming the key that is wrong."""
    if not isinstance(raw, dict):
        raise ValueError("the config must be a JSON object")
    known = {f for f in Config.__dataclass_fields__}
    if unknown := set(raw) - known:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    token = raw.get("token")
    if not isinstance(token, str) or len(token) < 16:
        raise ValueError("token: expected a string of at least 16 characters")
    values: dict[str, Any] = {"token": token}
    if "admin_token" in raw:
        admin = raw["admin_token"]
        if not isinstance(admin, str) or len(admin) < 16 or admin == token:
            raise ValueError("admin_token: expected another string of at least 16 characters")
        values["admin_token"] = admin
    for key in ("user", "node", "host_pod_namespace", "runsc", "platform"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise ValueError(f"{key}: expected a non-empty string")
            values[key] = raw[key]
    if "namespaces" in raw:
        if not isinstance(raw["namespaces"], dict) or not raw["namespaces"]:
            raise ValueError("namespaces: expected an object of namespace -> labels")
        values["namespaces"] = {
            name: _strings(labels, f"namespaces.{name}")
            for name, labels in raw["namespaces"].items()
        }
    if "runtime_classes" in raw:
        values["runtime_classes"] = _strings(raw["runtime_classes"], "runtime_classes")
    for key in ("images", "claims"):
        folders = _strings(raw.get(key, {}), key)
        for ref, folder in folders.items():
            if not Path(folder).is_absolute() or not Path(folder).is_dir():
                raise ValueError(f"{key}.{ref}: {folder!r} is not an absolute path to a folder")
        values[key] = {ref: Path(folder) for ref, folder in folders.items()}
    if "rules" in raw:
        if not isinstance(raw["rules"], list):
            raise ValueError("rules: expected a list of rules")
        values["rules"] = tuple(_rule(r, i) for i, r in enumerate(raw["rules"]))
    if "bridge" in raw:
        if not isinstance(raw["bridge"], str) or not BRIDGE_NAME.match(raw["bridge"]):
            raise ValueError(f"bridge: expected a name matching {BRIDGE_NAME.pattern}")
        values["bridge"] = raw["bridge"]
    if "subnet" in raw:
        try:
            subnet = ipaddress.IPv4Network(raw["subnet"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"subnet: {e}") from None
        if subnet.prefixlen > 24 or subnet.overlaps(AVOID) or not subnet.is_private:
            raise ValueError(f"subnet: expected a private /24 or larger, clear of {AVOID}")
        values["subnet"] = subnet
    if "host_pod_labels" in raw:
        values["host_pod_labels"] = _strings(raw["host_pod_labels"], "host_pod_labels")
    if "bookmark_seconds" in raw:
        seconds = raw["bookmark_seconds"]
        if not isinstance(seconds, (int, float)) or not 0.1 <= seconds <= 3600:
            raise ValueError("bookmark_seconds: expected a number from 0.1 to 3600")
        values["bookmark_seconds"] = float(seconds)
    if "watch_history" in raw:
        history = raw["watch_history"]
        if not isinstance(history, int) or not 10 <= history <= 1_000_000:
            raise ValueError("watch_history: expected a whole number from 10 to 1000000")
        values["watch_history"] = history
    return Config(**values)


def load(path: Path) -> Config:
    """Read and check the config file (ValueError says what is wrong, OSError if unreadable)."""
    with open(path, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return parse(json.loads(data))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
