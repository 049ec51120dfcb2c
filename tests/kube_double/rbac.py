"""The caller's RBAC: deciding requests, and answering access and rules reviews.

The rules come from the config (a Role's in one namespace, a ClusterRole's in
all). Like on a real cluster, every authenticated user also has the rules of
`system:basic-user`, `system:discovery` and `system:public-info-viewer`
(`BUILT_IN`), and a rules review lists them too, so a check of "enough and not
more" must set those aside as it would on a cluster. With no rules configured at
all, every request is allowed (and a rules review says so with `*`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from .config import Rule

BUILT_IN = (
    Rule(
        verbs=("create",),
        api_groups=("authorization.k8s.io",),
        resources=("selfsubjectaccessreviews", "selfsubjectrulesreviews"),
    ),
    Rule(
        verbs=("get",),
        non_resource_urls=(
            "/api",
            "/api/*",
            "/apis",
            "/apis/*",
            "/healthz",
            "/livez",
            "/openapi",
            "/openapi/*",
            "/readyz",
            "/version",
            "/version/",
        ),
    ),
)
EVERYTHING = (
    Rule(verbs=("*",), api_groups=("*",), resources=("*",)),
    Rule(verbs=("*",), non_resource_urls=("*",)),
)


@dataclass(frozen=True)
class Attributes:
    """What a request does, in RBAC's terms."""

    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""
    """For a non-resource request (`/version`): its path."""

    @property
    def resource_request(self) -> bool:
        return bool(self.resource)


def _has(values: tuple[str, ...], value: str) -> bool:
    return "*" in values or value in values


def _rule_allows(rule: Rule, attrs: Attributes) -> bool:
    if not _has(rule.verbs, attrs.verb):
        return False
    if not attrs.resource_request:
        return any(
            url == attrs.path or (url.endswith("*") and fnmatch.fnmatch(attrs.path, url))
            for url in rule.non_resource_urls
        )
    if rule.namespace is not None and rule.namespace != attrs.namespace:
        return False
    resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    if not _has(rule.api_groups, attrs.group):
        return False
    if not (_has(rule.resources, resource) or f"*/{attrs.subresource}" in rule.resources):
        return False
    return not rule.resource_names or attrs.name in rule.resource_names


class Authorizer:
    def __init__(self, rules: tuple[Rule, ...] | None, user: str) -> None:
        """`rules` None: allow everything."""
        self.rules = EVERYTHING if rules is None else (*rules, *BUILT_IN)
        self.user = user

    def allows(self, attrs: Attributes) -> bool:
        return any(_rule_allows(rule, attrs) for rule in self.rules)

    def denial(self, attrs: Attributes) -> str:
        """The real server's message for a refused request."""
        if not attrs.resource_request:
            return f'forbidden: User "{self.user}" cannot {attrs.verb} path "{attrs.path}"'
        resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
        named = f'{resource} "{attrs.name}"' if attrs.name else resource
        where = (
            f' in the namespace "{attrs.namespace}"' if attrs.namespace else " at the cluster scope"
        )
        return (
            f'{named} is forbidden: User "{self.user}" cannot {attrs.verb} resource '
            f'"{resource}" in API group "{attrs.group}"{where}'
        )

    def access_review(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The `status` of a SelfSubjectAccessReview for `spec`."""
        resource = spec.get("resourceAttributes")
        if isinstance(resource, dict):
            attrs = Attributes(
                verb=str(resource.get("verb", "")),
                group=str(resource.get("group", "")),
                resource=str(resource.get("resource", "")),
                subresource=str(resource.get("subresource", "")),
                namespace=str(resource.get("namespace", "")),
                name=str(resource.get("name", "")),
            )
        else:
            other = spec.get("nonResourceAttributes") or {}
            attrs = Attributes(verb=str(other.get("verb", "")), path=str(other.get("path", "")))
        if self.allows(attrs):
            return {"allowed": True, "reason": "RBAC: allowed by the kube double's rules"}
        return {"allowed": False}

    def rules_review(self, namespace: str) -> dict[str, Any]:
        """The `status` of a SelfSubjectRulesReview for `namespace`."""
        resource_rules, url_rules = [], []
        for rule in self.rules:
            if rule.non_resource_urls:
                url_rules.append(
                    {"verbs": list(rule.verbs), "nonResourceURLs": list(rule.non_resource_urls)}
                )
            elif rule.namespace is None or rule.namespace == namespace:
                entry: dict[str, Any] = {
                    "verbs": list(rule.verbs),
                    "apiGroups": list(rule.api_groups),
                    "resources": list(rule.resources),
                }
                if rule.resource_names:
                    entry["resourceNames"] = list(rule.resource_names)
                resource_rules.append(entry)
        return {"resourceRules": resource_rules, "nonResourceRules": url_rules, "incomplete": False}
