"""The resource types the double serves: what discovery lists and the URL paths name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One resource type. `verbs` are what the double answers (discovery says the same)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    verbs: tuple[str, ...]
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Its name in the store and in messages: `pods`, `networkpolicies.networking.k8s.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


STORED = ("create", "delete", "get", "list", "patch", "update", "watch")
READ = ("get", "list", "watch")
REVIEW = ("create",)

POD = Kind("", "v1", "pods", "Pod", True, STORED, ("log", "status", "eviction"))
SECRET = Kind("", "v1", "secrets", "Secret", True, STORED)
CONFIG_MAP = Kind("", "v1", "configmaps", "ConfigMap", True, STORED)
NAMESPACE = Kind("", "v1", "namespaces", "Namespace", False, READ)
NODE = Kind("", "v1", "nodes", "Node", False, READ)
NETWORK_POLICY = Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, STORED)
RUNTIME_CLASS = Kind("node.k8s.io", "v1", "runtimeclasses", "RuntimeClass", False, READ)
ACCESS_REVIEW = Kind(
    "authorization.k8s.io",
    "v1",
    "selfsubjectaccessreviews",
    "SelfSubjectAccessReview",
    False,
    REVIEW,
)
RULES_REVIEW = Kind(
    "authorization.k8s.io", "v1", "selfsubjectrulesreviews", "SelfSubjectRulesReview", False, REVIEW
)

KINDS = (
    POD,
    SECRET,
    CONFIG_MAP,
    NAMESPACE,
    NODE,
    NETWORK_POLICY,
    RUNTIME_CLASS,
    ACCESS_REVIEW,
    RULES_REVIEW,
)
GROUP_VERSIONS = sorted({(k.group, k.version) for k in KINDS})


def find(group: str, version: str, plural: str) -> Kind | None:
    for kind in KINDS:
        if (kind.group, kind.version, kind.plural) == (group, version, plural):
            return kind
    return None
