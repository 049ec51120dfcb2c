"""Keeping every pod's firewall in step with the NetworkPolicies (the CNI's part), and the
test's peers: network namespaces that stand for other tenants' pods.

A pod's firewall (`policy.ruleset`) is put in place when its network is made,
before any container starts, and made again whenever a pod, a policy or a
namespace changes (coalesced: one pass over all pods at a time, only changed
tables rewritten, each in one nftables transaction).

A peer has an address of the pod subnet and labels in a namespace, and nothing
else: no API object (the backend under test never sees it), no firewall of its
own. The test connects from it (`Double.connect_from`) to play another
tenant's pod, or the owner's server pod.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from provisioner import hostcmd

from . import policy
from .config import Config
from .kinds import NAMESPACE, NETWORK_POLICY, POD
from .network import Network, PodNet, in_netns
from .store import Event, Store

log = logging.getLogger(__name__)

Obj = dict[str, Any]


@dataclass(frozen=True)
class Guarded:
    """A pod whose network exists: its uid, namespace and name, and its network."""

    uid: str
    namespace: str
    name: str
    net: PodNet


class Firewalls:
    def __init__(
        self, config: Config, store: Store, network: Network, pods: Callable[[], Iterable[Guarded]]
    ) -> None:
        """`pods`: the pods whose network namespace exists now."""
        self.config = config
        self.store = store
        self.network = network
        self.pods = pods
        self.applied: dict[str, str] = {}
        """uid -> the ruleset in place ("" or absent: none)."""
        self.peers: dict[tuple[str, str], tuple[PodNet, policy.Endpoint]] = {}
        self._dirty = False
        self._running: asyncio.Task[None] | None = None
        store.listeners.append(self.on_event)

    def on_event(self, event: Event) -> None:
        if event.kind in (POD, NETWORK_POLICY, NAMESPACE):
            self.changed()

    def changed(self) -> None:
        """Something policies depend on changed: refresh every pod's firewall soon."""
        self._dirty = True
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._refresh())

    def endpoints(self) -> list[policy.Endpoint]:
        found = [
            policy.Endpoint(
                p["metadata"]["namespace"],
                p["metadata"].get("labels") or {},
                p["status"]["podIP"],
                policy.named_ports(p),
            )
            for p in self.store.items(POD)
            if (p.get("status") or {}).get("podIP")
        ]
        found += [endpoint for _, endpoint in self.peers.values()]
        if self.config.host_pod_labels:
            found.append(
                policy.Endpoint(
                    self.config.host_pod_namespace, self.config.host_pod_labels, self.config.gateway
                )
            )
        return found

    def ruleset(self, pod: Guarded) -> str | None:
        """The pod's ruleset now; None if its object is gone."""
        obj = self.store.find(POD, pod.namespace, pod.name)
        if obj is None or obj["metadata"]["uid"] != pod.uid:
            return None
        namespaces = {
            n["metadata"]["name"]: n["metadata"].get("labels") or {}
            for n in self.store.items(NAMESPACE)
        }
        policies = list(self.store.items(NETWORK_POLICY, pod.namespace))
        host = None if self.config.host_pod_labels else self.config.gateway
        return policy.ruleset(obj, policies, namespaces, self.endpoints(), host)

    async def enforce(self, pod: Guarded) -> None:
        """Put the pod's firewall in place now (before its containers start)."""
        text = self.ruleset(pod)
        if text is not None and text != self.applied.get(pod.uid, ""):
            await asyncio.to_thread(self._apply, pod, text)

    def _apply(self, pod: Guarded, text: str) -> None:
        if text:
            hostcmd.run(
                [*in_netns(pod.net.netns), "nft", "-f", "-"],
                "network policy",
                input=policy.replace(text),
            )
        else:
            hostcmd.quietly(
                [*in_netns(pod.net.netns), "nft", "delete", "table", "inet", policy.TABLE],
                log,
                ("No such file",),
            )
        self.applied[pod.uid] = text

    async def _refresh(self) -> None:
        while self._dirty:
            self._dirty = False
            for pod in list(self.pods()):
                try:
                    await self.enforce(pod)
                except Exception:  # the pod's namespace may be going: the next pass sees
                    log.exception("network policy of pod %s/%s", pod.namespace, pod.name)

    def forget(self, uid: str) -> None:
        self.applied.pop(uid, None)

    # -- peers --------------------------------------------------------------------------

    def add_peer(self, namespace: str, name: str, labels: dict[str, str]) -> PodNet:
        """A network namespace with an address and labels, as another pod would have."""
        key = (namespace, name)
        if key in self.peers:
            raise ValueError(f"peer {namespace}/{name} exists")
        address = self.network.allocate()
        try:
            net = self.network.create(f"peer/{namespace}/{name}", address)
        except BaseException:
            self.network.release(address)
            raise
        self.peers[key] = (net, policy.Endpoint(namespace, dict(labels), address))
        return net

    def remove_peers(self) -> None:
        for net, _ in self.peers.values():
            self.network.remove(net)
        self.peers.clear()
