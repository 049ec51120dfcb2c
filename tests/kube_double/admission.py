"""What the API server does to an object before storing it: defaults, validation, admission.

Per kind, `admit_*` fills the defaults the real server fills (so that what a
client reads back looks as on a cluster), refuses what the real validation
refuses (422 Invalid, every cause at once), and runs the admission plugins that
matter here: RuntimeClass (a pod naming a missing class is refused, 403) and Pod
Security Admission for namespaces labelled `pod-security.kubernetes.io/enforce`
(`pod_security`).

Pods the double cannot run as a cluster would are refused here with a 422 that
says "the kube double" (restartPolicy other than Never, a container without a
command, host namespaces, privileged containers, volume types other than
emptyDir, secret, configMap, persistentVolumeClaim): better a clear refusal than
a pod that behaves unlike the real one.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import random
from typing import Any

from .config import Config
from .kinds import NETWORK_POLICY, POD, Kind
from .meta import ApiError, Cause, bad_request, conflict, forbidden, invalid, not_found
from .validation import CONFIG_KEY, ENV_NAME, Problems

Obj = dict[str, Any]

DEFAULT_GRACE = 30
DOUBLE = " (the kube double runs only these)"
VOLUME_TYPES = ("emptyDir", "secret", "configMap", "persistentVolumeClaim")
MAX_SECRET = 1024 * 1024
DEFAULT_TOLERATIONS = [
    {
        "key": f"node.kubernetes.io/{taint}",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    }
    for taint in ("not-ready", "unreachable")
]


def _name_suffix() -> str:
    """generateName's 5 characters, from the real alphabet (no vowels, no lookalikes)."""
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))


def prepare_metadata(obj: Any, kind: Kind, namespace: str | None) -> Obj:
    """Check the body's shape and its metadata common to every kind; fill name from
    generateName and the namespace from the URL. 400 if it is no object of this kind."""
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    if (
        obj.get("kind", kind.kind) != kind.kind
        or obj.get("apiVersion", kind.api_version) != kind.api_version
    ):
        raise bad_request(
            f"the API version in the data ({obj.get('apiVersion')}) does not "
            f"match the expected API version ({kind.api_version})"
        )
    obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise bad_request("metadata must be an object")
    for field in (
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "selfLink",
    ):
        meta.pop(field, None)  # the server's, never the client's
    if not meta.get("name") and isinstance(meta.get("generateName"), str):
        meta["name"] = meta["generateName"] + _name_suffix()
    if namespace is not None:
        if meta.get("namespace", namespace) != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the "
                "namespace sent on the request"
            )
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    return obj


def _problems_of_metadata(obj: Obj) -> Problems:
    problems = Problems()
    problems.dns_subdomain("metadata.name", obj["metadata"].get("name"))
    problems.metadata(obj["metadata"])
    return problems


def check_namespace(config: Config, namespace: str) -> None:
    if namespace not in config.namespaces:
        raise not_found("namespaces", namespace)


# -- pods -------------------------------------------------------------------------------


def _container_defaults(container: Obj) -> None:
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    image = str(container.get("image", ""))
    tagged = ":" in image.rsplit("/", 1)[-1] or "@" in image
    latest = not tagged or image.endswith(":latest")
    container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
    resources = container.setdefault("resources", {})
    if isinstance(resources, dict) and isinstance(resources.get("limits"), dict):
        requests = resources.setdefault("requests", {})
        if isinstance(requests, dict):
            for name, value in resources["limits"].items():
                requests.setdefault(name, value)


def _qos(pod: Obj) -> str:
    containers = pod["spec"].get("containers", []) + pod["spec"].get("initContainers", [])
    requests = [c.get("resources", {}).get("requests") or {} for c in containers]
    limits = [c.get("resources", {}).get("limits") or {} for c in containers]
    if not any(requests) and not any(limits):
        return "BestEffort"
    guaranteed = all(
        all(name in lim and req.get(name) == lim.get(name) for name in ("cpu", "memory"))
        for req, lim in zip(requests, limits, strict=True)
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _pod_defaults(pod: Obj) -> None:
    spec = pod["spec"]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE)
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("serviceAccountName", spec.get("serviceAccount", "default"))
    spec["serviceAccount"] = spec["serviceAccountName"]
    tolerations = spec.setdefault("tolerations", [])
    for default in DEFAULT_TOLERATIONS:
        if not any(t.get("key") == default["key"] for t in tolerations if isinstance(t, dict)):
            tolerations.append(dict(default))
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        if isinstance(container, dict):
            _container_defaults(container)
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            for source in ("secret", "configMap"):
                if isinstance(volume.get(source), dict):
                    volume[source].setdefault("defaultMode", 0o644)


def _check_container(
    problems: Problems, container: Any, where: str, volumes: set[str], init: bool
) -> None:
    if not isinstance(container, dict):
        problems.bad(where, container, "must be a container")
        return
    problems.dns_label(f"{where}.name", container.get("name"))
    if not container.get("image"):
        problems.required(f"{where}.image")
    command = container.get("command")
    if not command or not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        problems.required(
            f"{where}.command",
            "the kube double cannot read an image's "
            "entrypoint: every container must give its command",
        )
    args = container.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        problems.bad(f"{where}.args", args, "must be a list of strings")
    if init and container.get("restartPolicy") is not None:
        problems.unsupported(
            f"{where}.restartPolicy",
            container["restartPolicy"],
            [],
            " (the kube double has no sidecar init containers)",
        )
    for i, env in enumerate(container.get("env") or []):
        name = env.get("name") if isinstance(env, dict) else None
        if not isinstance(name, str) or not ENV_NAME.match(name):
            problems.bad(
                f"{where}.env[{i}].name",
                name,
                "a valid environment variable name "
                "must consist of alphabetic characters, digits, '_', '-', or '.', and "
                "must not start with a digit",
            )
        elif "value" in env and "valueFrom" in env:
            problems.bad(
                f"{where}.env[{i}].valueFrom", "", "may not be specified when `value` is not empty"
            )
    paths = set()
    for i, mount in enumerate(container.get("volumeMounts") or []):
        mwhere = f"{where}.volumeMounts[{i}]"
        if not isinstance(mount, dict) or mount.get("name") not in volumes:
            problems.causes.append(problems_not_found(f"{mwhere}.name", mount))
            continue
        path = mount.get("mountPath")
        if not isinstance(path, str) or not path.startswith("/"):
            problems.required(f"{mwhere}.mountPath", "must be an absolute path")
        elif path in paths:
            problems.bad(f"{mwhere}.mountPath", path, "must be unique")
        paths.add(path)
        sub = mount.get("subPath", "")
        if sub and (sub.startswith("/") or ".." in sub.split("/")):
            problems.bad(f"{mwhere}.subPath", sub, "must be a relative path without '..'")
    resources = container.get("resources") or {}
    amounts: dict[str, dict[str, Any]] = {}
    for section in ("limits", "requests"):
        for name, value in (resources.get(section) or {}).items():
            amount = problems.quantity(f"{where}.resources.{section}[{name}]", value)
            amounts.setdefault(section, {})[name] = amount
    for name, request in amounts.get("requests", {}).items():
        limit = amounts.get("limits", {}).get(name)
        if request is not None and limit is not None and request > limit:
            problems.bad(
                f"{where}.resources.requests",
                str(resources["requests"][name]),
                f"must be less than or equal to {name} limit of {resources['limits'][name]}",
            )
    security = container.get("securityContext") or {}
    _check_ids(problems, f"{where}.securityContext", security)
    caps = security.get("capabilities") or {}
    for key in ("add", "drop"):
        if not all(isinstance(c, str) for c in caps.get(key) or []):
            problems.bad(
                f"{where}.securityContext.capabilities.{key}",
                caps.get(key),
                "must be a list of capability names",
            )
    if security.get("privileged"):
        problems.forbidden(
            f"{where}.securityContext.privileged", "the kube double runs no privileged containers"
        )
    for i, port in enumerate(container.get("ports") or []):
        number = port.get("containerPort") if isinstance(port, dict) else None
        if not isinstance(number, int) or not 0 < number < 65536:
            problems.bad(
                f"{where}.ports[{i}].containerPort",
                number,
                "must be between 1 and 65535, inclusive",
            )
        if isinstance(port, dict) and port.get("hostPort"):
            problems.forbidden(f"{where}.ports[{i}].hostPort", "the kube double has no host ports")


def _check_ids(problems: Problems, where: str, security: Obj) -> None:
    """uid and gid fields: whole numbers from 0 (the real server's 422 wording)."""
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        value = security.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2147483647
        ):
            problems.bad(f"{where}.{key}", value, "must be between 0 and 2147483647, inclusive")


def problems_not_found(field: str, mount: Any) -> Cause:
    name = mount.get("name") if isinstance(mount, dict) else mount
    return Cause(field, "FieldValueNotFound", f'Not found: "{name}"')


def _check_volumes(problems: Problems, spec: Obj) -> set[str]:
    names: set[str] = set()
    for i, volume in enumerate(spec.get("volumes") or []):
        where = f"spec.volumes[{i}]"
        if not isinstance(volume, dict):
            problems.bad(where, volume, "must be a volume")
            continue
        problems.dns_label(f"{where}.name", volume.get("name"))
        if volume.get("name") in names:
            problems.duplicate(f"{where}.name", volume.get("name"))
        names.add(volume.get("name"))
        sources = [key for key in volume if key != "name"]
        if len(sources) != 1:
            problems.forbidden(
                where,
                "may not specify more than 1 volume type"
                if sources
                else "must specify a volume type",
            )
            continue
        source = sources[0]
        if source not in VOLUME_TYPES:
            problems.unsupported(f"{where}.{source}", source, list(VOLUME_TYPES), DOUBLE)
            continue
        body = volume[source] or {}
        if source == "secret" and not body.get("secretName"):
            problems.required(f"{where}.secret.secretName")
        if source == "configMap" and not body.get("name"):
            problems.required(f"{where}.configMap.name")
        if source == "persistentVolumeClaim" and not body.get("claimName"):
            problems.required(f"{where}.persistentVolumeClaim.claimName")
        if source == "emptyDir" and body.get("medium", "") not in ("", "Memory"):
            problems.unsupported(f"{where}.emptyDir.medium", body["medium"], ["", "Memory"])
        if source == "emptyDir" and "sizeLimit" in body:
            problems.quantity(f"{where}.emptyDir.sizeLimit", body["sizeLimit"])
        for j, item in enumerate(body.get("items") or []):
            if not isinstance(item, dict) or not item.get("key") or not item.get("path"):
                problems.required(f"{where}.{source}.items[{j}].path")
            elif item["path"].startswith("/") or ".." in item["path"].split("/"):
                problems.bad(
                    f"{where}.{source}.items[{j}].path",
                    item["path"],
                    "must be a relative path without '..'",
                )
    return names


def admit_pod(pod: Obj, config: Config, runtime_classes: set[str]) -> Obj:
    """A new pod, defaulted and checked; raises the ApiError the real server would."""
    problems = _problems_of_metadata(pod)
    name = pod["metadata"].get("name", "")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        problems.required("spec")
        problems.check("Pod", name)
        return pod
    _pod_defaults(pod)
    volumes = _check_volumes(problems, spec)
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        problems.required("spec.containers")
        containers = []
    inits = spec.get("initContainers") or []
    names: set[str] = set()
    for field, group, init in (
        ("spec.initContainers", inits, True),
        ("spec.containers", containers, False),
    ):
        for i, container in enumerate(group):
            _check_container(problems, container, f"{field}[{i}]", volumes, init)
            cname = container.get("name") if isinstance(container, dict) else None
            if cname in names:
                problems.duplicate(f"{field}[{i}].name", cname)
            names.add(cname)
    if spec["restartPolicy"] != "Never":
        supported = ["Always", "OnFailure", "Never"]
        if spec["restartPolicy"] in supported:
            problems.unsupported(
                "spec.restartPolicy",
                spec["restartPolicy"],
                ["Never"],
                " (the kube double restarts no container)",
            )
        else:
            problems.unsupported("spec.restartPolicy", spec["restartPolicy"], supported)
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            problems.forbidden(f"spec.{host}", "the kube double runs no pod in host namespaces")
    pod_security_context = spec["securityContext"]
    _check_ids(problems, "spec.securityContext", pod_security_context)
    for i, gid in enumerate(pod_security_context.get("supplementalGroups") or []):
        if not isinstance(gid, int) or isinstance(gid, bool) or gid < 0:
            problems.bad(
                f"spec.securityContext.supplementalGroups[{i}]",
                gid,
                "must be between 0 and 2147483647, inclusive",
            )
    grace = spec["terminationGracePeriodSeconds"]
    if not isinstance(grace, int) or grace < 0:
        problems.bad("spec.terminationGracePeriodSeconds", grace, "must be >= 0")
    problems.check("Pod", name)
    runtime = spec.get("runtimeClassName")
    if runtime is not None and runtime not in runtime_classes:
        raise forbidden(
            f'pods "{name}" is forbidden: pod rejected: RuntimeClass "{runtime}" not found',
            "pods",
            name,
        )
    level = config.namespaces.get(pod["metadata"]["namespace"], {}).get(
        "pod-security.kubernetes.io/enforce", "privileged"
    )
    if violations := pod_security(pod, level):
        raise forbidden(
            f'pods "{name}" is forbidden: violates PodSecurity "{level}:latest": '
            + ", ".join(violations),
            "pods",
            name,
        )
    pod["status"] = {"phase": "Pending", "qosClass": _qos(pod)}
    return pod


# -- Pod Security Admission -------------------------------------------------------------

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _who(names: list[str]) -> str:
    quoted = ", ".join(f'"{n}"' for n in names)
    return f"container {quoted}" if len(names) == 1 else f"containers {quoted}"


def pod_security(pod: Obj, level: str) -> list[str]:
    """The Pod Security Standards checks `level` ("privileged", "baseline", "restricted")
    fails, worded as the real admission plugin words them; [] if it passes."""
    if level not in ("baseline", "restricted"):
        return []
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    containers = [
        c
        for c in spec.get("initContainers", []) + spec.get("containers", [])
        if isinstance(c, dict)
    ]
    found = []
    hosts = [f"{h}=true" for h in ("hostNetwork", "hostPID", "hostIPC") if spec.get(h)]
    if hosts:
        found.append(f"host namespaces ({', '.join(hosts)})")
    privileged = [
        c["name"] for c in containers if (c.get("securityContext") or {}).get("privileged")
    ]
    if privileged:
        found.append(
            f"privileged ({_who(privileged)} must not set securityContext.privileged=true)"
        )
    for c in containers:
        added = ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        extra = [a for a in added if a not in BASELINE_CAPABILITIES]
        if extra:
            found.append(
                f'non-default capabilities (container "{c["name"]}" must not include '
                + ", ".join(f'"{a}"' for a in extra)
                + " in securityContext.capabilities.add)"
            )
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            found.append(f'hostPath volumes (volume "{volume.get("name")}")')
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append(
            'seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")'
        )
    if level == "baseline":
        return found
    for volume in spec.get("volumes") or []:
        kinds = [k for k in volume if k != "name" and k not in RESTRICTED_VOLUMES]
        if kinds:
            found.append(
                f'restricted volume types (volume "{volume.get("name")}" uses restricted '
                f'volume type "{kinds[0]}")'
            )
    escalating = [
        c["name"]
        for c in containers
        if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False
    ]
    if escalating:
        found.append(
            f"allowPrivilegeEscalation != false ({_who(escalating)} must set "
            "securityContext.allowPrivilegeEscalation=false)"
        )
    drops, adds = [], []
    for c in containers:
        caps = (c.get("securityContext") or {}).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            drops.append(c["name"])
        if any(a != "NET_BIND_SERVICE" for a in caps.get("add") or []):
            adds.append(c["name"])
    if drops or adds:
        parts = []
        if drops:
            parts.append(f'{_who(drops)} must set securityContext.capabilities.drop=["ALL"]')
        if adds:
            parts.append(
                f"{_who(adds)} must not include capabilities other than "
                '"NET_BIND_SERVICE" in securityContext.capabilities.add'
            )
        found.append(f"unrestricted capabilities ({'; '.join(parts)})")
    non_root = pod_sc.get("runAsNonRoot") is True
    missing = [
        c["name"]
        for c in containers
        if (c.get("securityContext") or {}).get("runAsNonRoot") is not True
        and not ((c.get("securityContext") or {}).get("runAsNonRoot") is None and non_root)
    ]
    if missing:
        found.append(
            f"runAsNonRoot != true (pod or {_who(missing)} must set "
            "securityContext.runAsNonRoot=true)"
        )
    if pod_sc.get("runAsUser") == 0 or any(
        (c.get("securityContext") or {}).get("runAsUser") == 0 for c in containers
    ):
        found.append("runAsUser=0 (pod and containers must not set runAsUser=0)")
    seccomp_ok = (pod_sc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    unconfined = [
        c["name"]
        for c in containers
        if ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        not in (
            ("RuntimeDefault", "Localhost", None) if seccomp_ok else ("RuntimeDefault", "Localhost")
        )
    ]
    if unconfined:
        found.append(
            f"seccompProfile (pod or {_who(unconfined)} must set "
            'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")'
        )
    return found


# -- secrets and config maps -----------------------------------------------------------


def _check_keys(problems: Problems, field: str, data: Any) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise bad_request(f"{field}: must be a map of strings")
    for key in data:
        if not CONFIG_KEY.match(key) or len(key) > 253:
            problems.bad(
                f"{field}[{key}]",
                key,
                "a valid config key must consist of "
                "alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or "
                "'KEY_NAME',  or 'key-name', regex used for validation is "
                "'[-._a-zA-Z0-9]+')",
            )
        elif key.startswith(".."):  # the atomic writer's own names (..data) start so
            problems.bad(f"{field}[{key}]", key, "must not start with '..'")
    return data


def _decode_all(field: str, data: dict[str, str]) -> int:
    size = 0
    for key, value in data.items():
        try:
            size += len(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise bad_request(f"{field}[{key}]: illegal base64 data") from None
    return size


def admit_secret(secret: Obj) -> Obj:
    problems = _problems_of_metadata(secret)
    data = _check_keys(problems, "data", secret.get("data"))
    for key, value in _check_keys(problems, "stringData", secret.pop("stringData", None)).items():
        data[key] = base64.b64encode(value.encode()).decode()
    secret["data"] = data
    secret.setdefault("type", "Opaque")
    if _decode_all("data", data) > MAX_SECRET:
        problems.causes.append(_too_long("data"))
    problems.check("Secret", secret["metadata"].get("name", ""))
    return secret


def admit_config_map(config_map: Obj) -> Obj:
    problems = _problems_of_metadata(config_map)
    data = _check_keys(problems, "data", config_map.get("data"))
    binary = _check_keys(problems, "binaryData", config_map.get("binaryData"))
    if set(data) & set(binary):
        problems.duplicate("data", sorted(set(data) & set(binary))[0])
    size = _decode_all("binaryData", binary) + sum(len(v.encode()) for v in data.values())
    if size > MAX_SECRET:
        problems.causes.append(_too_long("data"))
    problems.check("ConfigMap", config_map["metadata"].get("name", ""))
    return config_map


def _too_long(field: str) -> Cause:
    return Cause(field, "FieldValueTooLong", f"Too long: must have at most {MAX_SECRET} bytes")


# -- network policies -------------------------------------------------------------------


def _check_peers(problems: Problems, where: str, peers: Any) -> None:
    for i, peer in enumerate(peers or []):
        pwhere = f"{where}[{i}]"
        if not isinstance(peer, dict) or not peer:
            problems.required(pwhere, "must specify a peer")
            continue
        if "ipBlock" in peer and ("podSelector" in peer or "namespaceSelector" in peer):
            problems.forbidden(pwhere, "may not specify more than 1 peer type")
        problems.label_selector(f"{pwhere}.podSelector", peer.get("podSelector"))
        problems.label_selector(f"{pwhere}.namespaceSelector", peer.get("namespaceSelector"))
        block = peer.get("ipBlock")
        if block is not None:
            try:
                cidr = ipaddress.ip_network(block.get("cidr", ""), strict=False)
            except (ValueError, AttributeError):
                problems.bad(f"{pwhere}.ipBlock.cidr", block, "must be a valid CIDR")
                continue
            for j, ex in enumerate(block.get("except") or []):
                try:
                    inner = ipaddress.ip_network(ex, strict=False)
                except ValueError:
                    problems.bad(f"{pwhere}.ipBlock.except[{j}]", ex, "must be a valid CIDR")
                    continue
                if inner.version != cidr.version or not inner.subnet_of(cidr):  # type: ignore[arg-type]
                    problems.bad(
                        f"{pwhere}.ipBlock.except[{j}]", ex, "must be a strict subset of `cidr`"
                    )


def admit_network_policy(policy: Obj) -> Obj:
    problems = _problems_of_metadata(policy)
    spec = policy.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise bad_request("spec must be an object")
    spec.setdefault("podSelector", {})
    problems.label_selector("spec.podSelector", spec["podSelector"])
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(spec.get(direction) or []):
            where = f"spec.{direction}[{i}]"
            _check_peers(problems, f"{where}.{peers_key}", rule.get(peers_key))
            for j, port in enumerate(rule.get("ports") or []):
                port.setdefault("protocol", "TCP")
                if port["protocol"] not in ("TCP", "UDP", "SCTP"):
                    problems.unsupported(
                        f"{where}.ports[{j}].protocol", port["protocol"], ["SCTP", "TCP", "UDP"]
                    )
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
    for i, kind in enumerate(spec["policyTypes"]):
        if kind not in ("Ingress", "Egress"):
            problems.unsupported(f"spec.policyTypes[{i}]", kind, ["Egress", "Ingress"])
    problems.check("NetworkPolicy", policy["metadata"].get("name", ""), NETWORK_POLICY.group)
    return policy


# -- updates ----------------------------------------------------------------------------


def check_update(kind: Kind, old: Obj, new: Obj) -> None:
    """What an update (PUT, PATCH) may not do: make labels or annotations invalid, change
    identity or a pod's spec, or an immutable Secret or ConfigMap's data. Raises 422 as
    the real server does."""
    name = old["metadata"]["name"]
    problems = Problems()
    problems.metadata(new["metadata"])
    for field in ("name", "namespace", "uid"):
        if new["metadata"].get(field, old["metadata"].get(field)) != old["metadata"].get(field):
            problems.bad(f"metadata.{field}", new["metadata"].get(field), "field is immutable")
    if kind == POD and new.get("spec") != old.get("spec"):
        problems.forbidden(
            "spec",
            "pod updates may not change fields other than "
            "`spec.containers[*].image`,`spec.initContainers[*].image`,"
            "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions "
            "to existing tolerations),`spec.terminationGracePeriodSeconds` "
            "(the kube double allows none of them)",
        )
    if old.get("immutable") and any(
        new.get(f) != old.get(f) for f in ("data", "binaryData", "immutable")
    ):
        problems.forbidden("data", "field is immutable when `immutable` is set")
    problems.check(kind.kind, name, kind.group)


def resource_version_required(kind: Kind, name: str) -> ApiError:
    cause = Cause(
        "metadata.resourceVersion",
        "FieldValueInvalid",
        "Invalid value: 0x0: must be specified for an update",
    )
    return invalid(kind.kind, name, [cause], kind.group)


def grace_of(value: Any) -> int | None:
    """A `gracePeriodSeconds` from a query or DeleteOptions; 400 if it is no number."""
    if value is None or value == "":
        return None
    try:
        grace = int(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid gracePeriodSeconds {value!r}") from None
    return max(grace, 0)


def precondition_failed(kind: Kind, obj: Obj, options: Obj) -> ApiError | None:
    """The 409 of a DeleteOptions `preconditions` the object does not meet, or None."""
    pre = options.get("preconditions") or {}
    meta = obj["metadata"]
    if pre.get("uid") and pre["uid"] != meta["uid"]:
        why = (
            f"Precondition failed: UID in precondition: {pre['uid']}, "
            f"UID in object meta: {meta['uid']}"
        )
    elif pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
        why = (
            f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
            f"ResourceVersion in object meta: {meta['resourceVersion']}"
        )
    else:
        return None
    return conflict(kind.plural, meta["name"], why, kind.group)
