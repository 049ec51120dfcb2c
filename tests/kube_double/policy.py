"""NetworkPolicy, enforced as a CNI plugin would: an nftables table in each pod's namespace.

Pure functions: from the pod, the policies of its namespace, the namespaces' labels
and every endpoint with an address, `ruleset` makes the nftables text of the pod's
firewall (the kubelet applies it in the pod's namespace, before its containers
start and again whenever pods, policies or peers change). gVisor runs with the
namespace's own stack (`network.py`), so the namespace's netfilter sees every
packet of the pod.

The semantics are the API's: a pod selected by no policy of a direction is open
in that direction; once one selects it, only what some rule of a selecting
policy allows passes (peers by podSelector, namespaceSelector, both, or
ipBlock with its exceptions; ports by number, name or range, per protocol);
replies of allowed connections pass (conntrack); loopback always does. Refused
packets are dropped, as most CNIs do.

Endpoints are the pods with an IP, the test's peers (network namespaces with
labels that stand for other tenants' pods), and the host itself when the config
gives it pod labels (`host_pod_labels`: then it is subject to the policies like
a pod, probes included); otherwise the host is the node, always allowed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .selectors import from_object

Obj = dict[str, Any]
TABLE = "kube_double_policy"
PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


@dataclass(frozen=True)
class Endpoint:
    """Something a policy may name as a peer: a pod, a test's peer, or the host."""

    namespace: str
    labels: Mapping[str, str]
    ip: str
    ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    """Named container ports: name -> (number, protocol)."""


def named_ports(pod: Obj) -> dict[str, tuple[int, str]]:
    found = {}
    for container in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", []):
        for port in container.get("ports") or []:
            if port.get("name"):
                found[port["name"]] = (int(port["containerPort"]), port.get("protocol", "TCP"))
    return found


@dataclass(frozen=True)
class Peer:
    """What one `from`/`to` entry lets through: an address or network, less exceptions."""

    network: str
    excepted: tuple[str, ...] = ()
    endpoint: Endpoint | None = None

    def match(self, address: str) -> str:
        text = f"ip {address} {self.network}"
        if self.excepted:
            text += f" ip {address} != {{ {', '.join(self.excepted)} }}"
        return text


def _peers(
    entry: Obj,
    policy_namespace: str,
    namespaces: Mapping[str, Mapping[str, str]],
    endpoints: list[Endpoint],
) -> list[Peer]:
    if "ipBlock" in entry:
        block = entry["ipBlock"]
        cidr = ipaddress.ip_network(block["cidr"], strict=False)
        if cidr.version != 4:
            return []  # the pods have IPv4 only
        excepted = tuple(
            str(ipaddress.ip_network(e, strict=False)) for e in block.get("except") or []
        )
        return [Peer(str(cidr), excepted)]
    pods = from_object(entry["podSelector"]) if "podSelector" in entry else None
    if "namespaceSelector" in entry:
        spaces = from_object(entry["namespaceSelector"])
        chosen = {name for name, labels in namespaces.items() if spaces.matches(labels)}
    else:
        chosen = {policy_namespace}
    return [
        Peer(e.ip, endpoint=e)
        for e in endpoints
        if e.namespace in chosen and (pods is None or pods.matches(e.labels))
    ]


def _ports(rule_ports: list[Obj] | None, named: Mapping[str, tuple[int, str]]) -> list[str] | None:
    """nft port matches of a rule; None: every port and protocol."""
    if not rule_ports:
        return None
    found = []
    for port in rule_ports:
        protocol = PROTOCOLS.get(port.get("protocol", "TCP"), "tcp")
        number = port.get("port")
        if number is None:
            found.append(f"meta l4proto {protocol}")
            continue
        if isinstance(number, str) and not number.isdigit():
            if number not in named:
                continue  # a name the pod does not have: matches nothing
            number, protocol = named[number][0], PROTOCOLS.get(named[number][1], "tcp")
        end = port.get("endPort")
        found.append(f"{protocol} dport {number}" + (f"-{end}" if end else ""))
    return found


def _direction(
    pod: Obj,
    policies: list[Obj],
    kind: str,
    namespaces: Mapping[str, Mapping[str, str]],
    endpoints: list[Endpoint],
) -> list[str] | None:
    """The accept rules of one direction ("Ingress" or "Egress"); None if no policy selects
    the pod for it (open)."""
    labels = pod["metadata"].get("labels") or {}
    selecting = [
        p
        for p in policies
        if kind in p["spec"].get("policyTypes", [])
        and from_object(p["spec"].get("podSelector") or {}).matches(labels)
    ]
    if not selecting:
        return None
    address = "saddr" if kind == "Ingress" else "daddr"
    peers_key = "from" if kind == "Ingress" else "to"
    rules = []
    for policy in selecting:
        namespace = policy["metadata"]["namespace"]
        for rule in policy["spec"].get(kind.lower()) or []:
            peers: list[Peer | None] = [None]  # no peers given: from (or to) anywhere
            if rule.get(peers_key):
                peers = [
                    p
                    for entry in rule[peers_key]
                    for p in _peers(entry, namespace, namespaces, endpoints)
                ]
            for peer in peers:
                # A named port is the pod's own for ingress, the peer's for egress.
                named = (
                    named_ports(pod)
                    if kind == "Ingress"
                    else (peer.endpoint.ports if peer is not None and peer.endpoint else {})
                )
                ports = _ports(rule.get("ports"), named)
                where = peer.match(address) if peer is not None else ""
                for port in ports if ports is not None else [""]:
                    rules.append(" ".join(part for part in (where, port, "accept") if part))
    return rules


def ruleset(
    pod: Obj,
    policies: list[Obj],
    namespaces: Mapping[str, Mapping[str, str]],
    endpoints: list[Endpoint],
    host: str | None,
) -> str:
    """The nftables text of the pod's firewall ("" if no policy selects it): input and
    output chains that drop what no rule accepts. `host`: the host's address when it
    is the node (always let in), None when it counts as a pod."""
    namespace = pod["metadata"]["namespace"]
    mine = [p for p in policies if p["metadata"]["namespace"] == namespace]
    ingress = _direction(pod, mine, "Ingress", namespaces, endpoints)
    egress = _direction(pod, mine, "Egress", namespaces, endpoints)
    if ingress is None and egress is None:
        return ""
    common = ["ct state established,related accept", "ct state invalid drop"]
    lines = [f"table inet {TABLE} {{"]
    for chain, hook, rules, loop in (
        ("ingress", "input", ingress, 'iif "lo" accept'),
        ("egress", "output", egress, 'oif "lo" accept'),
    ):
        if rules is None:
            continue
        lines += [
            f"  chain {chain} {{",
            f"    type filter hook {hook} priority filter; policy drop;",
        ]
        lines += [f"    {r}" for r in (*common, loop)]
        if host and chain == "ingress":
            lines.append(f"    ip saddr {host} accept")
        lines += [f"    {r}" for r in rules]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def replace(text: str) -> str:
    """An nft script that swaps the pod's table for `text` in one transaction."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n{text}"
