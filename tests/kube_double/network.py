"""The pod network: one bridge on the host, one network namespace per pod.

The bridge (`config.bridge`, e.g. `jsbkd0`) holds the subnet's first address
(the node's IP, every pod's `hostIP`). Each pod gets a namespace
`<bridge>-<8 hex>` with `lo` and `eth0`, the far end of a veth pair whose host
end `<bridge>v<8 hex>` is a port of the bridge, and one address of the subnet.
The pod has no default route: nothing it sends can leave the host (there is no
NAT either). IPv6 is off in the namespace and on the bridge, so the IPv4
firewall of `policy.py` is the whole story.

gVisor runs each container with `--network=host` inside the pod's namespace (see
`runtime.py`): its sockets are the namespace's, so the host reaches a server in
the pod at `podIP:port`, containers of one pod share `localhost`, and the
namespace's own netfilter applies to them. (This runsc's `--network=sandbox`
refuses to start on kernels that give each namespace its own
`net.core.rmem_default`: it takes every namespace for the root one.)

Everything is named from the bridge's name, so `sweep` finds what a crashed run
left without any record: namespaces and links by prefix, then the bridge.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from provisioner import hostcmd

from .config import Config

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
GUEST_IF = "eth0"


def in_netns(netns: str) -> list[str]:
    """The prefix that runs a command in the pod's namespace (nsenter execs the command
    itself, and leaves /sys alone, unlike `ip netns exec`: runsc finds its cgroups)."""
    return [shutil.which("nsenter") or "nsenter", f"--net={NETNS_DIR / netns}", "--"]


@dataclass(frozen=True)
class PodNet:
    """One pod's namespace, host-end link and address."""

    netns: str
    veth: str
    ip: str


class Network:
    def __init__(self, config: Config) -> None:
        self.bridge = config.bridge
        self.subnet = config.subnet
        self.gateway = config.gateway
        self._used: set[str] = set()
        self._next = 2
        """Index in the subnet of the next address to try: addresses go round the whole
        subnet before one is used again, so a stale ARP or conntrack entry of a gone pod
        never meets its successor within a test run."""

    # -- names --------------------------------------------------------------------------

    def names(self, uid: str) -> tuple[str, str]:
        """(namespace, host-end link) of the pod with this uid."""
        digest = hashlib.sha256(uid.encode()).hexdigest()[:8]
        return f"{self.bridge}-{digest}", f"{self.bridge}v{digest}"

    # -- the bridge ---------------------------------------------------------------------

    def setup(self) -> None:
        """Make the bridge with the node's address (after `sweep`: it must not exist)."""
        prefix = self.subnet.prefixlen
        hostcmd.run(["ip", "link", "add", self.bridge, "type", "bridge"], "pod network")
        try:
            _ipv6_off(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6")
            hostcmd.run(
                ["ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge], "pod network"
            )
            hostcmd.run(["ip", "link", "set", self.bridge, "up"], "pod network")
        except BaseException:
            hostcmd.quietly(["ip", "link", "del", self.bridge], log)
            raise

    # -- pods ---------------------------------------------------------------------------

    def allocate(self) -> str:
        """A free address of the subnet (not the network, gateway or broadcast address)."""
        size = self.subnet.num_addresses
        for _ in range(size):
            index, self._next = self._next, self._next + 1
            if self._next >= size - 1:
                self._next = 2
            address = str(self.subnet[index])
            if address not in self._used:
                self._used.add(address)
                return address
        raise RuntimeError(f"every address of {self.subnet} is in use")

    def release(self, address: str) -> None:
        self._used.discard(address)

    def create(self, uid: str, address: str) -> PodNet:
        """The pod's namespace, link and `address`; on failure nothing of it is left."""
        netns, veth = self.names(uid)
        pod = PodNet(netns, veth, address)
        try:
            hostcmd.run(["ip", "netns", "add", netns], "pod network")
            run_in = in_netns(netns)
            hostcmd.run(
                [
                    *run_in,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
                "pod network",
            )
            hostcmd.run(
                [
                    "ip",
                    "link",
                    "add",
                    veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    GUEST_IF,
                    "netns",
                    netns,
                ],
                "pod network",
            )
            _ipv6_off(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6")
            hostcmd.run(["ip", "link", "set", veth, "master", self.bridge, "up"], "pod network")
            prefix = self.subnet.prefixlen
            for argv in (
                ["ip", "addr", "add", f"{address}/{prefix}", "dev", GUEST_IF],
                ["ip", "link", "set", GUEST_IF, "up"],
                ["ip", "link", "set", "lo", "up"],
            ):
                hostcmd.run(["ip", "-n", netns, *argv[1:]], "pod network")
        except BaseException:
            self.remove(pod)
            raise
        return pod

    def cut(self, pod: PodNet) -> None:
        """Take the pod off the wire without a word: what either end sends from now on is
        lost (no FIN, no RST reaches the host), as when a node drops off the network."""
        hostcmd.quietly(["ip", "link", "set", pod.veth, "down"], log)

    def remove(self, pod: PodNet) -> None:
        """Remove the pod's link and namespace, and the host's memory of its address
        (neighbour entry, tracked connections). Idempotent; never raises."""
        if Path("/sys/class/net", pod.veth).exists():
            hostcmd.quietly(["ip", "link", "del", pod.veth], log, ("Cannot find device",))
        if (NETNS_DIR / pod.netns).exists():
            hostcmd.quietly(["ip", "netns", "del", pod.netns], log, ("No such file",))
        hostcmd.quietly(
            ["ip", "neigh", "del", pod.ip, "dev", self.bridge],
            log,
            ("No such file", "Cannot find device", "RTNETLINK"),
            level=logging.DEBUG,
        )
        if shutil.which("conntrack"):
            for direction in ("--orig-src", "--orig-dst"):
                hostcmd.quietly(
                    ["conntrack", "-D", direction, pod.ip],
                    log,
                    ("0 flow entries",),
                    level=logging.DEBUG,
                )
        self.release(pod.ip)

    # -- what is there ------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Every namespace and link of this bridge's name that exists now, and the bridge."""
        found = [f"netns {p.name}" for p in sorted(NETNS_DIR.glob(f"{self.bridge}-*"))]
        found += [f"link {p.name}" for p in sorted(Path("/sys/class/net").glob(f"{self.bridge}v*"))]
        if Path("/sys/class/net", self.bridge).exists():
            found.append(f"link {self.bridge}")
        return found

    def sweep(self) -> None:
        """Remove every namespace and link of this bridge's name, then the bridge. Never
        raises (what stays is reported by `leftovers`)."""
        for path in sorted(Path("/sys/class/net").glob(f"{self.bridge}v*")):
            hostcmd.quietly(["ip", "link", "del", path.name], log, ("Cannot find device",))
        for path in sorted(NETNS_DIR.glob(f"{self.bridge}-*")):
            hostcmd.quietly(["ip", "netns", "del", path.name], log, ("No such file",))
        if Path("/sys/class/net", self.bridge).exists():
            hostcmd.quietly(["ip", "link", "del", self.bridge], log, ("Cannot find device",))


def _ipv6_off(path: str) -> None:
    with contextlib.suppress(OSError):  # no IPv6 on this host at all: nothing to turn off
        Path(path).write_text("1")
