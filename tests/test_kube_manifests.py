"""deploy/kubernetes/ checked without a cluster: every manifest against the Kubernetes API
schemas of the oldest and the newest supported release, the security the kernels rely on
(Pod Security `restricted` on their namespace, the service's exact RBAC, its hardened Pod,
the network paths), and the zero-to-jupyterhub values against the chart's own schema.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kube_schemas import load_yaml_documents, restricted_violations, validate
from provisioner.guest.layout import GUEST_PYTHON

from provisioner.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy/kubernetes"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
VALUES = DEPLOY / "z2jh-values.yaml"
KERNELSPEC = ROOT / "kernelspecs/python3-kubernetes/kernel.json"
Z2JH = Path(__file__).resolve().parent / "data/z2jh-4.4.0"
"""The chart's schema and defaults (the folder's README says from where)."""

KERNELS_NS = "jupyter-sandbox-kernels"
HUB_NS = "jhub"
SERVICE = "jupyter-sandbox"
SERVICE_PORT = 8181
KERNEL_PORT = 8470
KERNEL_POD_LABELS = {"app.kubernetes.io/name": "jupyter-sandbox-kernel"}
SERVER_POD_LABELS = {"component": "singleuser-server"}
"""How zero-to-jupyterhub's user servers are labelled (KubeSpawner's component label)."""
VERBS = ("create", "get", "list", "watch", "delete")
ROLE_GRANTS = {
    *(("", "pods", verb) for verb in VERBS),
    ("", "secrets", "create"),
    ("networking.k8s.io", "networkpolicies", "create"),
    ("networking.k8s.io", "networkpolicies", "delete"),
}
"""All the service may do in the kernels' namespace: no pods/exec, attach or portforward, no
patch, update or deletecollection."""
CLUSTER_GRANTS = {
    ("node.k8s.io", "runtimeclasses", "get"),
    ("node.k8s.io", "runtimeclasses", "list"),
}
"""All it may do cluster-wide: see that a RuntimeClass exists."""


def manifest_files() -> list[Path]:
    """The files of Kubernetes objects: every YAML file here but the kustomization and the
    chart's values."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p not in (KUSTOMIZATION, VALUES))


def objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_yaml_documents(path)]


def the(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def service_pod() -> dict[str, Any]:
    return the("Deployment", SERVICE)["spec"]["template"]


def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


@pytest.mark.parametrize(
    "obj",
    [pytest.param(o, id=f"{o['kind']}/{o['metadata']['name']}") for o in objects()],
)
def test_manifest_is_valid_in_oldest_and_newest_kubernetes(obj: dict[str, Any]) -> None:
    validate(obj)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load(KUSTOMIZATION.read_text())["resources"]
    assert sorted(listed) == sorted(str(p.relative_to(DEPLOY)) for p in manifest_files())
    for path in manifest_files():
        for doc in load_yaml_documents(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path


def test_validate_refuses_an_unknown_field() -> None:
    """Strict: a misspelt field fails here, not silently on a cluster."""
    pod = copy.deepcopy(service_pod())
    pod["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(AssertionError, match="securityContex"):
        validate({"apiVersion": "v1", "kind": "Pod", **pod})


def test_kernels_namespace_enforces_restricted() -> None:
    labels = the("Namespace", KERNELS_NS)["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "latest"
    # such a label would open the hub or the users' servers to every kernel
    assert not [k for k in labels if k.startswith("hub.jupyter.org/")]


def test_kernels_namespace_denies_all_traffic_by_default() -> None:
    [deny] = [
        o
        for o in objects()
        if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == KERNELS_NS
    ]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule; anything beyond these (resourceNames,
    nonResourceURLs) shows as a grant of its own, so that it fails the exact comparison."""
    found = set()
    for rule in rules:
        for extra in set(rule) - {"apiGroups", "resources", "verbs"}:
            found.add((extra, json.dumps(rule[extra]), ""))
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                found |= {(group, resource, verb) for verb in rule.get("verbs", [])}
    return found


def test_role_grants_exactly_the_kernels_needs() -> None:
    role = the("Role", SERVICE)
    assert role["metadata"]["namespace"] == KERNELS_NS
    assert grants(role["rules"]) == ROLE_GRANTS
    assert grants(the("ClusterRole", "jupyter-sandbox-runtimeclasses")["rules"]) == CLUSTER_GRANTS


def test_a_widened_role_would_be_caught() -> None:
    for extra in (
        {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
    ):
        assert grants([*the("Role", SERVICE)["rules"], extra]) != ROLE_GRANTS


def test_only_the_service_account_is_bound_and_only_to_these_roles() -> None:
    roles = {(o["kind"], o["metadata"]["name"]) for o in objects() if o["kind"].endswith("Role")}
    assert roles == {("Role", SERVICE), ("ClusterRole", "jupyter-sandbox-runtimeclasses")}
    bindings = [o for o in objects() if o["kind"].endswith("RoleBinding")]
    assert len(bindings) == 2
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": SERVICE, "namespace": HUB_NS}
        ]
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles
        if binding["kind"] == "RoleBinding":
            assert binding["metadata"]["namespace"] == KERNELS_NS
    account = the("ServiceAccount", SERVICE)
    assert account["metadata"]["namespace"] == HUB_NS
    assert account["automountServiceAccountToken"] is False


def test_service_pod_passes_restricted_and_is_hardened() -> None:
    spec = service_pod()["spec"]
    assert restricted_violations(spec) == []
    assert spec["serviceAccountName"] == SERVICE
    assert spec["automountServiceAccountToken"] is True
    assert spec["enableServiceLinks"] is False
    [container] = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["command"] == [
        "jupyter", "sandbox", "kubernetes", "serve",
        "--config", "/etc/jupyter-sandbox/jupyter_sandbox_config.py",
    ]  # fmt: skip
    assert container["ports"] == [
        {"name": "http", "containerPort": SERVICE_PORT, "protocol": "TCP"}
    ]


def test_service_environment_names_the_hub_and_its_token() -> None:
    [container] = service_pod()["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JUPYTERHUB_API_URL"]["value"] == "http://hub:8081/hub/api"
    assert env["JUPYTERHUB_SERVICE_NAME"]["value"] == SERVICE
    # z2jh keeps a registered service's token in its Secret `hub` under this key (chart
    # 4.4.0, templates/hub/secret.yaml), for the key the service is registered under
    [key] = values()["hub"]["services"]
    assert env["JUPYTERHUB_API_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "hub", "key": f"hub.services.{key}.apiToken"}
    }
    assert key == SERVICE


def test_service_config_and_policy() -> None:
    """The ConfigMap's policy is one the policy parser takes, offering the kernelspec the
    single-user image installs; its config file is Python."""
    config = the("ConfigMap", SERVICE)["data"]
    policy = Policy.parse(config["policy.toml"], "policy.toml")
    assert policy.default["kernelspecs"] == ["python3-kubernetes"]
    compile(config["jupyter_sandbox_config.py"], "jupyter_sandbox_config.py", "exec")
    mounts = {m["name"]: m for m in service_pod()["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["config"]["mountPath"] == "/etc/jupyter-sandbox"
    assert "subPath" not in mounts["config"]  # a changed policy reaches the running service


def test_service_is_reachable_by_servers_and_reaches_the_hub() -> None:
    labels = service_pod()["metadata"]["labels"]
    # the hub's own NetworkPolicy (z2jh) admits Pods with this label to its API
    assert labels["hub.jupyter.org/network-access-hub"] == "true"
    service = the("Service", SERVICE)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == SERVICE_PORT
    assert service["spec"]["selector"].items() <= labels.items()
    policy = the("NetworkPolicy", SERVICE)["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    [ingress] = policy["ingress"]
    assert ingress == {
        "from": [{"podSelector": {"matchLabels": SERVER_POD_LABELS}}],
        "ports": [{"port": SERVICE_PORT, "protocol": "TCP"}],
    }
    assert {
        "to": [{"podSelector": {"matchLabels": {"component": "hub"}}}],
        "ports": [{"port": 8081, "protocol": "TCP"}],
    } in policy["egress"]


def good_pod() -> dict[str, Any]:
    return copy.deepcopy(service_pod()["spec"])


def _at(spec: dict[str, Any], path: str) -> tuple[Any, Any]:
    """The container of what `path` (dotted, list indexes as numbers) names, and its key;
    the maps on the way are made when missing."""
    *parents, last = (int(p) if p.isdigit() else p for p in path.split("."))
    node: Any = spec
    for part in parents:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    return node, last


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        node, key = _at(spec, path)
        node[key] = value

    return change


def _drop(*paths: str) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        for path in paths:
            node, key = _at(spec, path)
            del node[key]

    return change


def _add_container(spec: dict[str, Any], kind: str, **fields: Any) -> None:
    spec.setdefault(kind, []).append({"name": "extra", "image": "x", **fields})


C = "containers.0"
SC = f"{C}.securityContext"
HARDENED = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
BREACHES = {
    "hostNetwork": _set("hostNetwork", True),
    "hostPID": _set("hostPID", True),
    "hostIPC": _set("hostIPC", True),
    "hostPath volume": _set("volumes.0", {"name": "h", "hostPath": {"path": "/"}}),
    "nfs volume": _set("volumes.0", {"name": "n", "nfs": {"server": "s", "path": "/"}}),
    "pod runAsNonRoot false": _set("securityContext.runAsNonRoot", False),
    "container runAsNonRoot false": _set(f"{SC}.runAsNonRoot", False),
    "no runAsNonRoot anywhere": _drop("securityContext.runAsNonRoot", f"{SC}.runAsNonRoot"),
    "runAsUser 0": _set(f"{SC}.runAsUser", 0),
    "pod runAsUser 0": _set("securityContext.runAsUser", 0),
    "escalation allowed": _set(f"{SC}.allowPrivilegeEscalation", True),
    "escalation unset": _drop(f"{SC}.allowPrivilegeEscalation"),
    "privileged": _set(f"{SC}.privileged", True),
    "drop not ALL": _set(f"{SC}.capabilities", {"drop": ["NET_RAW"]}),
    "add SYS_ADMIN": _set(f"{SC}.capabilities.add", ["SYS_ADMIN"]),
    "seccomp Unconfined": _set("securityContext.seccompProfile.type", "Unconfined"),
    "no seccomp": _drop("securityContext.seccompProfile"),
    "container seccomp Unconfined": _set(f"{SC}.seccompProfile", {"type": "Unconfined"}),
    "hostPort": _set(f"{C}.ports.0.hostPort", 8181),
    "procMount": _set(f"{SC}.procMount", "Unmasked"),
    "sysctl": _set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
    "SELinux type": _set(f"{SC}.seLinuxOptions", {"type": "spc_t"}),
    "SELinux user": _set("securityContext.seLinuxOptions", {"user": "system_u"}),
    "AppArmor": _set(f"{SC}.appArmorProfile", {"type": "Unconfined"}),
    "HostProcess": _set(f"{SC}.windowsOptions", {"hostProcess": True}),
    "probe host": _set(f"{C}.readinessProbe.tcpSocket.host", "10.0.0.1"),
    "lifecycle host": _set(f"{C}.lifecycle", {"preStop": {"httpGet": {"port": 1, "host": "h"}}}),
    "bare init container": lambda s: _add_container(s, "initContainers"),
    "privileged ephemeral container": lambda s: _add_container(
        s, "ephemeralContainers", securityContext={**HARDENED, "privileged": True}
    ),
}


@pytest.mark.parametrize("breach", BREACHES)
def test_restricted_violations_finds(breach: str) -> None:
    spec = good_pod()
    BREACHES[breach](spec)
    assert restricted_violations(spec), breach


def test_restricted_allows_what_the_profile_allows() -> None:
    spec = good_pod()
    spec["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    spec["securityContext"]["seccompProfile"] = {"type": "Localhost", "localhostProfile": "p"}
    spec["volumes"] += [
        {"name": "s", "secret": {"secretName": "tls"}},
        {"name": "w", "persistentVolumeClaim": {"claimName": "claim-alice"}},
    ]
    _add_container(spec, "initContainers", securityContext=HARDENED)
    assert restricted_violations(spec) == []


def helm_merge(defaults: Any, given: Any) -> Any:
    """`given` over `defaults` as Helm merges an install's values over a chart's: maps merge
    key by key, anything else replaces, and a null removes the key."""
    if not (isinstance(defaults, dict) and isinstance(given, dict)):
        return given
    merged = dict(defaults)
    for key, value in given.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = helm_merge(defaults.get(key), value)
    return merged


def test_values_pass_the_charts_schema() -> None:
    schema = yaml.safe_load((Z2JH / "values.schema.yaml").read_text())
    defaults = yaml.safe_load((Z2JH / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors(defaults))  # the chart's own defaults pass
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(helm_merge(defaults, values()))
    ]
    assert errors == []
    # and a misspelt key fails, so that the check is not empty
    wrong = helm_merge(defaults, {"singleuser": {"serviceAcountName": "x"}})
    assert list(validator.iter_errors(wrong))


def test_values_register_the_service_with_its_role() -> None:
    hub = values()["hub"]
    assert hub["services"] == {SERVICE: {"name": SERVICE}}  # no URL, no admin, token made
    [role] = hub["loadRoles"].values()
    assert sorted(role["scopes"]) == ["read:servers", "read:users:groups", "read:users:name"]
    assert role["services"] == [SERVICE]
    assert not {"users", "groups"} & set(role)


def test_values_give_servers_no_kubernetes_credential() -> None:
    singleuser = values()["singleuser"]
    assert "serviceAccountName" in singleuser and singleuser["serviceAccountName"] is None
    assert singleuser["extraPodConfig"]["automountServiceAccountToken"] is False


def test_values_let_servers_reach_their_kernels_and_the_service() -> None:
    netpol = values()["singleuser"]["networkPolicy"]
    assert netpol["enabled"] is True
    to_kernels = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": KERNELS_NS}},
                "podSelector": {"matchLabels": KERNEL_POD_LABELS},
            }
        ],
        "ports": [{"port": KERNEL_PORT, "protocol": "TCP"}],
    }
    assert to_kernels in netpol["egress"]
    [to_service] = [r for r in netpol["egress"] if r["ports"][0]["port"] == SERVICE_PORT]
    [peer] = to_service["to"]
    assert set(peer) == {"podSelector"}  # the hub's namespace, where the service runs
    assert peer["podSelector"]["matchLabels"].items() <= service_pod()["metadata"]["labels"].items()
    # the rules as the chart renders them, into the single-user NetworkPolicy
    validate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "singleuser", "namespace": HUB_NS},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": netpol["egress"]},
        }
    )


def test_kernelspec_names_the_provisioner_and_the_service() -> None:
    spec = json.loads(KERNELSPEC.read_text())
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "kubernetes-provisioner"
    url = f"http://{SERVICE}.{HUB_NS}.svc:{SERVICE_PORT}"
    assert provisioner["config"] == {"service_url": url}
    assert spec["argv"][0] == GUEST_PYTHON  # the kernel image's Python, in the kernel's Pod
    assert "{connection_file}" in spec["argv"]
    assert values()["singleuser"]["extraEnv"]["JUPYTER_SANDBOX_SERVICE_URL"] == url
