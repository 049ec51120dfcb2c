"""The Pod, Secret and NetworkPolicy of a kernel, as the Kubernetes service makes them.

Each shape a kernel can take (network modes, a workspace, limits, an unsandboxed class
for development) is made by the service's own planning (`KubernetesService.plan`, the
same code a start runs) and checked against the official schemas of the oldest and the
newest supported Kubernetes (tests/kube_schemas.py) and against Pod Security
`restricted`, with what each mode must and must not admit.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_schemas import restricted_violations, validate

from provisioner.errors import ImageError, PolicyError, SettingError
from provisioner.kubernetes import credentials, manifests
from provisioner.kubernetes.hub import Caller
from provisioner.kubernetes.service import KubernetesService, kubespawner_label

KERNEL = "6f1c2e0a-9b7d-4c3e-8a52-0d4f3b2a1c9e"
REPO = Path(__file__).resolve().parent.parent


def service(**config: Any) -> KubernetesService:
    return KubernetesService(
        agent_image="registry.test/jupyter-sandbox-agent:1",
        images={"python3": "registry.test/python3:1", "course-101": "registry.test/c101:2"},
        **config,
    )


def plan(svc: KubernetesService | None = None, user: str = "amy", server: str = "",
         asked: dict[str, Any] | None = None, cwd: str = "/home/jovyan/work",
         addresses: dict[str, list[str]] | None = None) -> manifests.KernelPlan:  # fmt: skip
    svc = svc or service()
    caller = Caller(name=user, groups=frozenset(), servers=None)
    granted, _ = svc.grant(caller, KERNEL, "python3-kubernetes", asked or {}, cwd)
    return svc.plan(KERNEL, user, server, "python3-kubernetes", granted, cwd, addresses or {})


def objects(p: manifests.KernelPlan) -> list[dict[str, Any]]:
    creds = credentials.make(p.name)
    return [manifests.pod(p), manifests.secret(p, creds.secret_data()), manifests.network_policy(p)]


SHAPES = {
    "defaults": {},
    "egress": {"network": "egress", "egress_allow": ["pypi.org:443", "192.0.2.0/24"]},
    "open": {"network": "open"},
    "workspace-rw": {"workspace": "rw"},
    "workspace-ro": {"workspace": "ro"},
    "limits": {"memory_limit": "512M", "cpu_limit": 0.5, "disk_limit": "2G", "pids_limit": 128},
    "image": {"image": "course-101"},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_object_is_valid_in_every_supported_release(shape: str) -> None:
    addresses = {"pypi.org": ["151.101.0.223", "151.101.64.223"]}
    for obj in objects(plan(asked=SHAPES[shape], addresses=addresses)):
        validate(obj)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_pod_passes_pod_security_restricted(shape: str) -> None:
    pod = manifests.pod(plan(asked=SHAPES[shape]))
    assert restricted_violations(pod["spec"]) == []
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["restartPolicy"] == "Never"
    for container in (*spec["initContainers"], *spec["containers"]):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["runAsUser"] == 1000 and security["runAsNonRoot"] is True
    assert not any("hostPath" in v for v in spec["volumes"])


def test_restricted_check_is_not_empty() -> None:
    """The check above catches a breach (so its passing means something)."""
    pod = manifests.pod(plan())
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["spec"]["hostNetwork"] = True
    assert len(restricted_violations(pod["spec"])) >= 2


def test_limits_become_requests_and_limits_and_a_sized_scratch_volume() -> None:
    pod = manifests.pod(plan(asked=SHAPES["limits"]))
    kernel = pod["spec"]["containers"][0]
    assert kernel["resources"]["limits"] == {
        "memory": str(512 << 20), "cpu": "500m", "ephemeral-storage": str(2 << 30),
    }  # fmt: skip
    assert kernel["resources"]["requests"] == kernel["resources"]["limits"]
    writable = [v for v in pod["spec"]["volumes"] if v["name"] in manifests.WRITABLE]
    assert [v["emptyDir"]["sizeLimit"] for v in writable] == [str(2 << 30)] * 4
    mounted = {m["mountPath"] for m in kernel["volumeMounts"] if not m.get("readOnly")}
    assert mounted == {"/tmp", "/var/tmp", "/home/sandbox", "/run/kernel"}
    assert not any("subPath" in m for m in kernel["volumeMounts"])
    env = {e["name"]: e["value"] for e in kernel["env"]}
    assert env["JSB_KERNEL"] == "1000,1000,128,4096"  # the agent's rlimits: pids, files
    assert env["JSB_LISTEN"] == str(manifests.AGENT_PORT)


def test_the_agent_comes_from_its_own_image_through_an_init_container() -> None:
    pod = manifests.pod(plan())
    [init] = pod["spec"]["initContainers"]
    assert init["image"] == "registry.test/jupyter-sandbox-agent:1"
    kernel = pod["spec"]["containers"][0]
    assert kernel["image"] == "registry.test/python3:1"
    mounts = {m["mountPath"]: m for m in kernel["volumeMounts"]}
    assert mounts["/opt/jupyter-sandbox-runtime"]["readOnly"] is True
    assert mounts[manifests.TLS_DIR]["readOnly"] is True
    assert kernel["command"][0] == "/opt/jupyter-sandbox-runtime/bin/python3"


def test_labels_select_and_annotations_say_whose() -> None:
    p = plan(user="Amy.Smith@example.org", server="gpu")
    pod = manifests.pod(p)
    labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    assert annotations[manifests.ANNOTATION_USER] == "Amy.Smith@example.org"
    assert labels[manifests.LABEL_KERNEL] == KERNEL
    for value in labels.values():
        assert len(value) <= 63 and value.replace("-", "").replace(".", "").isalnum()
    assert manifests.label_value("Amy.Smith@example.org") != manifests.label_value(
        "amy.smith@example.org"
    )
    assert pod["metadata"]["name"] == f"jsb-{KERNEL}-{p.instance}"
    assert len(pod["metadata"]["name"]) <= 63
    again = plan(user="Amy.Smith@example.org", server="gpu")  # a restart: same kernel id
    assert again.name != p.name  # its objects never meet the old ones' being deleted


def test_the_policy_admits_only_the_owners_server_pod() -> None:
    svc = service()
    policy = manifests.network_policy(plan(svc, user="alice@example.org"))
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "jhub"}}
    assert peer["podSelector"]["matchLabels"] == {
        "component": "singleuser-server",
        "hub.jupyter.org/username": "alice-example-org---7a64adf2",  # KubeSpawner 7's spelling
    }
    assert rule["ports"] == [{"protocol": "TCP", "port": manifests.AGENT_PORT}]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_kubespawner_label_spellings() -> None:
    """As KubeSpawner 7 (safe slugs) and 6 (escapism) write user names in labels."""
    assert kubespawner_label("alice") == "alice"
    assert kubespawner_label("Alice") == "Alice"  # a valid label is kept, case too
    assert kubespawner_label("jörg") == "j-rg---12c433a0"
    assert kubespawner_label("a--b").startswith("a-b---")
    assert kubespawner_label("1user@x").startswith("x-1user-x---")
    assert kubespawner_label("a.b", "escape") == "a-2eb"
    assert kubespawner_label("Alice", "escape") == "-41lice"


def test_network_none_admits_no_egress_and_no_dns() -> None:
    p = plan()
    assert manifests.network_policy(p)["spec"]["egress"] == []
    pod = manifests.pod(p)
    assert pod["spec"]["dnsPolicy"] == "None"
    assert pod["spec"]["dnsConfig"]["nameservers"] == ["127.0.0.1"]


def test_network_egress_pins_names_to_the_addresses_it_admits() -> None:
    addresses = {"pypi.org": ["151.101.0.223", "151.101.64.223"]}
    p = plan(asked=SHAPES["egress"], addresses=addresses)
    egress = manifests.network_policy(p)["spec"]["egress"]
    cidrs = [[peer["ipBlock"]["cidr"] for peer in rule["to"]] for rule in egress]
    assert cidrs == [["151.101.0.223/32", "151.101.64.223/32"], ["192.0.2.0/24"]]
    assert egress[0]["ports"] == [
        {"protocol": "TCP", "port": 443},
        {"protocol": "UDP", "port": 443},
    ]
    assert "ports" not in egress[1]
    pod = manifests.pod(p)
    assert pod["spec"]["hostAliases"] == [
        {"ip": "151.101.0.223", "hostnames": ["pypi.org"]},
        {"ip": "151.101.64.223", "hostnames": ["pypi.org"]},
    ]
    assert pod["spec"]["dnsPolicy"] == "None"  # no DNS server to carry data out


def test_network_open_reaches_the_internet_but_not_the_cluster_or_metadata() -> None:
    p = plan(asked=SHAPES["open"])
    rules = manifests.network_policy(p)["spec"]["egress"]
    [block] = [peer["ipBlock"] for rule in rules for peer in rule["to"] if "ipBlock" in peer]
    assert block["cidr"] == "0.0.0.0/0"
    excluded = [ipaddress.ip_network(n) for n in block["except"]]
    for address in ("169.254.169.254", "10.96.0.1", "10.244.3.7", "172.20.0.5", "192.168.1.1",
                    "100.64.0.1", "168.63.129.16"):  # fmt: skip
        assert any(ipaddress.ip_address(address) in net for net in excluded), address
    assert not any(ipaddress.ip_address("151.101.0.223") in net for net in excluded)
    dns = [rule for rule in rules if any("podSelector" in peer for peer in rule["to"])]
    assert dns and dns[0]["ports"][0]["port"] == 53
    assert "dnsPolicy" not in manifests.pod(p)["spec"]


def test_a_read_write_workspace_is_the_users_claim_on_the_servers_node() -> None:
    p = plan(asked={"workspace": "rw"}, cwd="/home/jovyan/work/course")
    pod = manifests.pod(p)
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == "workspace"]
    assert volume["persistentVolumeClaim"] == {"claimName": "claim-amy", "readOnly": False}
    [term] = pod["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["hub.jupyter.org/username"] == "amy"
    assert p.cwd == "/home/jovyan/work/course"
    outside = plan(asked={"workspace": "ro"}, cwd="/etc")
    assert outside.cwd == "/home/jovyan"  # never a folder outside the volume
    [ro] = [v for v in manifests.pod(outside)["spec"]["volumes"] if v["name"] == "workspace"]
    assert ro["persistentVolumeClaim"]["readOnly"] is True


def test_workspace_is_none_by_default_on_kubernetes() -> None:
    pod = manifests.pod(plan())
    assert not [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert "affinity" not in pod["spec"]


def test_the_secret_carries_the_kernels_credentials_only() -> None:
    p = plan()
    creds = credentials.make(p.name)
    secret = manifests.secret(p, creds.secret_data())
    assert secret["immutable"] is True
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["tls.crt"] == creds.certificate and data["tls.key"] == creds.key
    assert bytes.fromhex(data["token"]) == creds.token
    assert "key" not in creds.public() and creds.key not in str(creds.public())


def test_an_unsandboxed_runtime_class_is_refused_unless_allowed(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nmemory_limit = "2G"\n')
    with pytest.raises(SettingError, match="allow_unsandboxed"):
        service(runtime_class="", policy_file=str(policy)).check_config()
    svc = service(runtime_class="", allow_unsandboxed=True, policy_file=str(policy))
    svc.check_config()
    assert "runtimeClassName" not in manifests.pod(plan(svc))["spec"]


def test_an_unknown_image_name_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ImageError, match="course-101, python3"):
        plan(asked={"image": "nope"})


def test_a_caller_gets_no_more_than_the_policy(tmp_path: Any) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[default]\nmemory_limit = "1G"\nnetwork = "none"\n')
    svc = service(policy_file=str(policy_file))
    granted = plan(svc).limits.memory
    assert granted == 1 << 30
    with pytest.raises(PolicyError, match="memory_limit"):
        plan(svc, asked={"memory_limit": "4G"})
    with pytest.raises(PolicyError, match="network"):
        plan(svc, asked={"network": "open"})


def test_the_service_refuses_to_start_without_the_operators_policy() -> None:
    with pytest.raises(SettingError, match="policy_file"):
        service().check_config()


def test_egress_never_reaches_blocked_networks_whatever_it_names() -> None:
    """`egress_allow = ["0.0.0.0/0"]` (a policy that lists no destinations lets a user ask
    for any) admits the internet minus the cluster, metadata and link-local; a name that
    resolves into a blocked network admits nothing."""
    p = plan(asked={"network": "egress", "egress_allow": ["0.0.0.0/0", "evil.example:443"]},
             addresses={"evil.example": ["169.254.169.254", "10.0.0.7"]})  # fmt: skip
    [rule] = manifests.network_policy(p)["spec"]["egress"]
    [peer] = rule["to"]
    assert peer["ipBlock"]["cidr"] == "0.0.0.0/0"
    excluded = [ipaddress.ip_network(n) for n in peer["ipBlock"]["except"]]
    for address in ("169.254.169.254", "10.96.0.1", "192.168.0.1", "127.0.0.1"):
        assert any(ipaddress.ip_address(address) in n for n in excluded), address
    inside = plan(asked={"network": "egress", "egress_allow": ["10.1.2.0/24"]})
    assert manifests.network_policy(inside)["spec"]["egress"] == []  # inside 10/8: blocked
    narrowed = plan(service(blocked_networks=["172.16.0.0/12"]),
                    asked={"network": "egress", "egress_allow": ["10.1.2.0/24"]})  # fmt: skip
    [rule] = manifests.network_policy(narrowed)["spec"]["egress"]
    assert rule["to"] == [{"ipBlock": {"cidr": "10.1.2.0/24"}}]  # the operator opened it
    assert "169.254.0.0/16" in narrowed.blocked_networks  # metadata: always blocked


def test_render_prints_what_a_start_would_make(tmp_path: Path) -> None:
    """`jupyter sandbox kubernetes render`: the Pod and NetworkPolicy of a start of a
    kernelspec on this machine, for a user under the service's config and policy, as YAML
    that validates; clear errors for what it cannot render."""
    kernels = tmp_path / "share" / "kernels" / "python3-kubernetes"
    kernels.mkdir(parents=True)
    spec = json.loads((REPO / "kernelspecs" / "python3-kubernetes" / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["memory_limit"] = "512M"
    (kernels / "kernel.json").write_text(json.dumps(spec))
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nmemory_limit = "1G"\nnetwork = "none"\n')
    config = tmp_path / "config.py"
    config.write_text(
        'c.KubernetesService.agent_image = "registry.test/agent:1"\n'
        'c.KubernetesService.images = {"python3": "registry.test/python3:1"}\n'
        f"c.KubernetesService.policy_file = {str(policy)!r}\n"
    )
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "share")}

    def render(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "jupyter-sandbox"), "kubernetes", "render", *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip

    done = render("--config", str(config), "--user", "alice@example.org")
    assert done.returncode == 0, done.stderr
    pod, policy_object = yaml.safe_load_all(done.stdout)
    assert (pod["kind"], policy_object["kind"]) == ("Pod", "NetworkPolicy")
    for obj in (pod, policy_object):
        validate(obj)
    assert restricted_violations(pod["spec"]) == []
    assert pod["metadata"]["annotations"]["jupyter-sandbox/user"] == "alice@example.org"
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["memory"] == str(512 << 20)  # what the kernelspec asks, under the policy
    missing = render("--config", str(config), "--kernelspec", "nope")
    assert missing.returncode == 1 and "no kernelspec 'nope'" in missing.stderr
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "policy_file" not in line))  # fmt: skip
    unbounded = render("--config", str(config))
    assert unbounded.returncode == 1 and "policy_file is not set" in unbounded.stderr
