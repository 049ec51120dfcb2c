"""One sandbox's network: none, egress (an allowlist) or open, always behind a firewall.

A sandbox whose mode is not `none` gets, on the host (root of everything here):

- a named network namespace, its sandbox id, with IPv6 disabled inside;
- a veth pair: `jsbv` + 11 hex digits of a hash of the sandbox id on the host,
  `eth0` inside (made in the namespace directly, so it never appears outside);
- a /30 of `POOL`: the host end is .1, the sandbox .2, default route via .1.
  The /30 comes from the host-wide pool (`host.free_subnet`), picked under a
  host-wide lock file and assigned before the lock is released: concurrent
  starts, in any process and any runtime dir, never collide;
- one nftables table `inet jsb_<id>` with every rule of that sandbox (deleting
  it removes them all at once): nothing from the sandbox to the host itself
  (any of its addresses, or a service it publishes by DNAT) but DNS to the
  responder; nothing to `ALWAYS_BLOCKED` (link-local and so the metadata
  service, the other clouds' metadata addresses, loopback, multicast,
  broadcast, other sandboxes); nothing from outside or from the host into the
  sandbox but replies; in `egress` only the allowed destinations; masquerade
  for what leaves;
- tbf qdiscs on both ends when a bandwidth is set;
- a DNS responder (`dns`) on the host end's address, bound to the host end
  of the link, named in the guest's resolv.conf: allowed names only in
  `egress`, any name in `open`. Lookups run on their own few threads, at most
  `LOOKUPS_PER_SANDBOX` per sandbox, so one guest cannot stall the others.

Refused packets get an ICMP "administratively prohibited", so a blocked
connect fails at once with EHOSTUNREACH rather than hanging. Replies to
sandboxes need IPv4 forwarding, which the first sandbox link turns on behind a
guard table if the host did not forward already (`host.hold_forwarding`). The
backend then starts the sandbox inside the namespace; for runsc that is
`nsenter --net=... runsc --network=host`.

A microVM (`tap=True`) has its own kernel, so the sandbox's address
lives in the guest, not in the namespace: the namespace's `eth0` gets no
address and is bridged (`br0`) with a persistent tap device `tap0` that only
root may attach to; the backend attaches to it (`tap.open_tap`) and hands QEMU
the descriptor, so QEMU, which runs unprivileged, never opens /dev/net/tun. A
bridge rather than routing: the namespace stays a plain piece of wire,
so what reaches the host end is exactly what gVisor's namespace would send,
from the same address and MAC-level peer, and every host rule (which match the
host end and the sandbox's address) applies unchanged; routing would need the
namespace to answer ARP for both ends (proxy ARP) and to forward. Only IPv4 and
ARP cross the bridge, and only with the sandbox's address from the guest's side
(an nftables `bridge` table in the namespace): the guest's raw frames never
reach the host as anything gVisor's stack could not have sent.

Everything is recorded in the sandbox's `Record` before it is made, so
`gc.remove` (from the backend's reap, or `jupyter sandbox gc`) can take it away
after a crash, idempotently: link, namespace, the link's conntrack entries,
then the table (the firewall stays until nothing can pass).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .. import hostcmd
from ..errors import SandboxError
from ..state import Record
from . import dns
from .gc import remove
from .host import (
    SETUP,
    VETH_PREFIX,
    free_subnet,
    hold_forwarding,
    in_namespace,
    names,
    netns_path,
    pool_lock,
    write_sysctl,
)
from .spec import ALWAYS_BLOCKED, NetworkSpec, parse_destination
from .tap import TAP_IF

GUEST_IF = "eth0"
BRIDGE_IF = "br0"
DNS_PORT = 53
RESOLV_OPTIONS = "options timeout:2 attempts:2"
"""resolv.conf's options line (the microVM's init writes the same one)."""
LOOKUP_TIMEOUT = 5.0
LOOKUP_THREADS = 8
LOOKUPS_PER_SANDBOX = 4
"""Host lookups one sandbox may have running (or queued) at once; more get SERVFAIL at once."""
CACHE_SECONDS = 2.0
"""How long a name's addresses are reused: enough to answer A and AAAA from one lookup, short
enough that a changed record reaches the guest (and its firewall) almost at once."""
NEGATIVE_CACHE_SECONDS = 30.0
"""How long "no such name" and a failed or timed-out lookup are reused: a guest asking again
and again for a name that does not resolve, or resolves slowly, costs one lookup per 30 s."""
CACHE_SIZE = 256
MAX_ADDRESSES = 16
"""Addresses a name may have open in the firewall at once (and answers carry)."""
OPEN_SECONDS = 300
"""How long an address a name resolved to stays open in `egress` unless the name is resolved
again: a name that moves elsewhere does not leave its old addresses open for good."""


# -- host lookups -----------------------------------------------------------------------

_lookups: concurrent.futures.ThreadPoolExecutor | None = None
_lookups_made = threading.Lock()


def _lookup_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Every sandbox's host lookups, apart from the loop's default executor: a lookup that
    hangs holds its thread until the host's resolver gives up, and must not hold up kernel
    starts. Made at the first lookup, not at import: importing this module starts nothing."""
    global _lookups
    with _lookups_made:
        if _lookups is None:
            _lookups = concurrent.futures.ThreadPoolExecutor(
                LOOKUP_THREADS, thread_name_prefix="sandbox-dns"
            )
        return _lookups


def _forget_lookup_pool() -> None:
    """After fork, in the child: the parent's pool counts threads the child does not have,
    and would queue lookups that no thread ever runs (and its lock may have been held)."""
    global _lookups, _lookups_made
    _lookups, _lookups_made = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_lookup_pool)


class LookupFailed(Exception):
    """The host's resolver failed or did not answer in time (the guest gets SERVFAIL)."""


class LookupBusy(LookupFailed):
    """The sandbox already has LOOKUPS_PER_SANDBOX lookups running (SERVFAIL, not cached)."""


def _host_addresses(name: str) -> list[str]:
    """The host resolver's IPv4 addresses for `name`; [] if it has none. Blocks: DNS threads."""
    try:
        infos = socket.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise LookupFailed(f"{name}: {e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))[:MAX_ADDRESSES]


# -- one sandbox's network ------------------------------------------------------------


class SandboxNetwork:
    """One sandbox's namespace, link, firewall and DNS, from `open` to `gc.remove`."""

    def __init__(self, spec: NetworkSpec, record: Record, log: logging.Logger,
                 tap: bool = False) -> None:  # fmt: skip
        """`tap`: a microVM's network: the address goes to the guest behind a tap device in
        the namespace (`tap.open_tap`), not to the namespace's eth0."""
        self.spec = spec
        self.record = record
        self.log = log
        self.tap = tap
        self.names = names(record.sandbox_id)
        self.host_ip = ""
        self.guest_ip = ""
        self.responder: dns.Responder | None = None
        self._ports: dict[str, set[int | None]] = {}
        for dest in spec.allow if spec.mode == "egress" else ():
            if dest.host:
                self._ports.setdefault(dest.host, set()).add(dest.port)
        self._cache: dict[str, tuple[float, list[str] | None]] = {}
        """name -> (until when, its addresses, or None for a failed lookup)."""
        self._lookup_slots = threading.BoundedSemaphore(LOOKUPS_PER_SANDBOX)
        self._opened: dict[str, dict[str, float]] = {}
        """name -> {address open in the firewall for it: until when (monotonic)}."""

    @property
    def netns_path(self) -> Path:
        return netns_path(self.names.netns)

    @classmethod
    async def resume(cls, record: Record, log: logging.Logger) -> SandboxNetwork:
        """The network of a sandbox that another process made (its record says what it
        is): answer its DNS again. The host objects are there already. I/O loop."""
        spec = NetworkSpec(
            mode=record.network_mode,
            allow=tuple(parse_destination(entry) for entry in record.egress_allow),
        )
        net = cls(spec, record, log)
        subnet = ipaddress.IPv4Network(record.subnet)
        net.host_ip, net.guest_ip = str(subnet[1]), str(subnet[2])
        await net._serve_dns()
        return net

    async def _serve_dns(self) -> None:
        await self._resolve_allowed_names()
        try:
            self.responder = await dns.serve(
                self.host_ip, DNS_PORT, self.guest_ip, self._lookup, self.log,
                self.record.sandbox_id, device=self.names.veth,
            )  # fmt: skip
        except OSError as e:
            raise SandboxError(
                f"{SETUP}: cannot answer DNS on {self.host_ip}:{DNS_PORT}: {e} (does "
                f"a DNS server on the host hold port {DNS_PORT} on every address?)"
            ) from None

    async def open(self) -> None:
        """Make all of it; on any failure remove what was made. I/O loop."""
        await asyncio.to_thread(self._create)
        try:
            await self._serve_dns()
        except BaseException:
            self.close()
            await asyncio.to_thread(remove, self.record, self.log)
            raise
        self.log.info(
            "sandbox %s: %s, address %s",
            self.record.sandbox_id,
            self.spec.describe(),
            self.guest_ip,
        )

    def guest_files(self, folder: Path) -> list[tuple[Path, str]]:
        """Files the guest needs, written in `folder`: (host path, path in the guest)."""
        resolv = folder / "resolv.conf"
        resolv.write_text(f"nameserver {self.host_ip}\n{RESOLV_OPTIONS}\n")
        resolv.chmod(0o644)
        return [(resolv, "/etc/resolv.conf")]

    def kernel_arguments(self) -> list[str]:
        """A microVM guest's equivalent of `guest_files`: its address, gateway and resolver,
        for the guest's init (guest/microvm/init) to set up."""
        return [f"jsb.ip={self.guest_ip}/30", f"jsb.gw={self.host_ip}", f"jsb.dns={self.host_ip}"]

    def close(self) -> None:
        """Stop the DNS responder (the host objects go with `gc.remove`)."""
        if self.responder is not None:
            self.responder.close()
            self.responder = None

    # -- creation (a thread) --

    def _create(self) -> None:
        record, n = self.record, self.names
        record.netns, record.veth, record.nft_table = n.netns, n.veth, n.table
        record.network_mode = self.spec.mode
        record.egress_allow = [str(destination) for destination in self.spec.allow]
        record.save()  # before anything exists: after a crash, gc knows what to remove
        try:
            hostcmd.run(["ip", "netns", "add", n.netns], SETUP)
            self._in_netns(
                ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                 "net.ipv6.conf.default.disable_ipv6=1"]
            )  # fmt: skip
            with pool_lock():
                subnet = free_subnet()
                self.host_ip, self.guest_ip = str(subnet[1]), str(subnet[2])
                record.subnet = str(subnet)
                record.save()
                hold_forwarding(self.log)  # with the lock: the last link's removal waits
                hostcmd.run(["ip", "link", "add", n.veth, "type", "veth",
                             "peer", "name", GUEST_IF, "netns", n.netns], SETUP)  # fmt: skip
                hostcmd.run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", n.veth], SETUP)
            for path, value in (
                (f"net/ipv6/conf/{n.veth}/disable_ipv6", "1"),
                (f"net/ipv4/conf/{n.veth}/rp_filter", "1"),  # strict: no spoofed sources
                (f"net/ipv4/conf/{n.veth}/route_localnet", "0"),
                (f"net/ipv4/conf/{n.veth}/send_redirects", "0"),
            ):
                write_sysctl(path, value)
            # rules first, then links up
            hostcmd.run(["nft", "-f", "-"], SETUP, input=self.ruleset())
            hostcmd.run(["ip", "link", "set", n.veth, "alias", record.sandbox_id, "up"], SETUP)
            if not self.tap:
                hostcmd.run(
                    ["ip", "-n", n.netns, "-batch", "-"],
                    SETUP,
                    input=f"addr add {self.guest_ip}/30 dev {GUEST_IF}\n"
                    f"link set {GUEST_IF} up\nlink set lo up\n"
                    f"route add default via {self.host_ip}\n",
                )
            else:
                self._make_tap()
            if self.spec.bandwidth:
                self._limit_bandwidth(self.spec.bandwidth)
        except BaseException:
            remove(record, self.log)
            raise

    def _in_netns(self, argv: list[str], input: str | None = None) -> str:
        return hostcmd.run([*in_namespace(self.netns_path), *argv], SETUP, input=input)

    def _make_tap(self) -> None:
        """A microVM's path: the namespace's eth0 (no address) bridged with a persistent tap
        device that has no owner (only root may attach: `tap.open_tap`); the bridge's filter
        first."""
        self._in_netns(["nft", "-f", "-"], input=self.bridge_ruleset())
        hostcmd.run(
            ["ip", "-n", self.names.netns, "-batch", "-"],
            SETUP,
            # Two ports and no learning: whatever one port receives goes out by the other,
            # and a guest sending from made-up MACs fills no forwarding table.
            input=f"link add {BRIDGE_IF} type bridge stp_state 0 mcast_snooping 0\n"
            f"tuntap add dev {TAP_IF} mode tap\n"
            + "".join(
                f"link set {port} master {BRIDGE_IF}\n"
                f"link set {port} type bridge_slave learning off\nlink set {port} up\n"
                for port in (GUEST_IF, TAP_IF)
            )
            + f"link set {BRIDGE_IF} up\nlink set lo up\n",
        )

    def bridge_ruleset(self) -> str:
        """The namespace's own filter for a microVM: across the bridge, only IPv4 and ARP, and
        from the guest only with its own address (the host's rules do the rest)."""
        return f"""
table bridge jsb {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        iifname "{TAP_IF}" ether type ip ip saddr {self.guest_ip} accept
        iifname "{TAP_IF}" ether type arp arp saddr ip {self.guest_ip} accept
        iifname "{GUEST_IF}" ether type {{ ip, arp }} accept
    }}
}}
"""

    def _limit_bandwidth(self, rate: int) -> None:
        # burst: 10 ms at the rate, at least a few full frames
        tbf = ["root", "tbf", "rate", f"{rate}bit", "burst", str(max(16384, rate // 800)),
               "latency", "100ms"]  # fmt: skip
        n = self.names
        hostcmd.run(["tc", "qdisc", "replace", "dev", n.veth, *tbf], SETUP)  # to the sandbox
        hostcmd.run(
            ["tc", "-n", n.netns, "qdisc", "replace", "dev", GUEST_IF, *tbf], SETUP
        )  # from it

    def ruleset(self) -> str:
        """The sandbox's nftables table, as `nft -f` input."""
        n, guest, host = self.names, self.guest_ip, self.host_ip
        refuse = "jump refuse"
        blocked = ", ".join(map(str, ALWAYS_BLOCKED))
        if self.spec.mode == "open":
            verdicts = ["accept"]
        else:
            verdicts = ["ct state established accept"]  # outlives its address's timeout
            for dest in self.spec.allow:
                if dest.net is None:
                    continue
                where = f"ip daddr {dest.net}"
                verdicts.append(
                    f"{where} accept"
                    if dest.port is None
                    else f"{where} meta l4proto {{ tcp, udp }} th dport {dest.port} accept"
                )
            verdicts += [
                "ip daddr @allow_any accept",
                "meta l4proto { tcp, udp } ip daddr . th dport @allow_port accept",
                refuse,
            ]
        body = "\n        ".join(verdicts)
        return f"""
table inet {n.table} {{
    set allow_any {{ type ipv4_addr; flags timeout; }}
    set allow_port {{ type ipv4_addr . inet_service; flags timeout; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{n.veth}" jump from_sandbox
        oifname "{n.veth}" jump to_sandbox
    }}
    chain from_sandbox {{
        ct status dnat {refuse}
        meta nfproto != ipv4 drop
        ip saddr != {guest} drop
        ip daddr {{ {blocked} }} {refuse}
        oifname "{VETH_PREFIX}*" {refuse}
        {body}
    }}
    chain to_sandbox {{
        ct state established,related accept
        {refuse}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {host} iifname != "lo" iifname != "{VETH_PREFIX}*" drop
        iifname "{n.veth}" jump from_sandbox_to_host
    }}
    chain from_sandbox_to_host {{
        ip saddr {guest} ip daddr {host} udp dport {DNS_PORT} accept
        {refuse}
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        oifname "{n.veth}" jump from_host_to_sandbox
    }}
    chain from_host_to_sandbox {{
        ip saddr {host} udp sport {DNS_PORT} accept
        ct state established,related accept
        {refuse}
    }}
    chain refuse {{
        counter reject with icmpx type admin-prohibited
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {guest} oifname != "{n.veth}" masquerade
    }}
}}
"""

    # -- DNS (I/O loop) --

    async def _resolve_allowed_names(self) -> None:
        """Open the firewall for allowed names before the guest asks: then their IPs work too.
        A few at a time: the sandbox's lookups are capped."""
        hosts = list(self._ports)
        for start in range(0, len(hosts), LOOKUPS_PER_SANDBOX):
            batch = hosts[start : start + LOOKUPS_PER_SANDBOX]
            await asyncio.gather(*(self._resolve_at_start(host) for host in batch))

    async def _resolve_at_start(self, name: str) -> None:
        try:
            found = await self._lookup(name)
        except LookupFailed as e:
            found, why = None, str(e)
        else:
            why = "no IPv4 address"
        if not found:
            self.log.warning(
                "sandbox %s: egress_allow names %s, which does not resolve now (%s); "
                "the sandbox's DNS will try again when asked",
                self.record.sandbox_id, name, why,
            )  # fmt: skip

    async def _lookup(self, name: str) -> list[str] | None:
        """The addresses the guest may use for `name`, the firewall opened for them first.
        None: not a name for this sandbox, or none; LookupFailed: SERVFAIL."""
        if self.spec.mode == "egress" and name not in self._ports:
            return None
        addresses = await self._cached_resolve(name)
        if addresses and self.spec.mode == "egress":
            await self._open_firewall(name, addresses)
        return addresses or None

    async def _cached_resolve(self, name: str) -> list[str]:
        """`_resolve` behind a cache that keeps failures and "no address" longer than addresses."""
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is None or cached[0] <= now:
            try:
                found: list[str] | None = await self._resolve(name)
            except LookupBusy:
                raise  # about this sandbox, not the name
            except LookupFailed as e:
                self.log.debug("sandbox %s: %s", self.record.sandbox_id, e)
                found = None
            seconds = CACHE_SECONDS if found else NEGATIVE_CACHE_SECONDS
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            cached = self._cache[name] = (now + seconds, found)
        if cached[1] is None:
            raise LookupFailed(f"{name}: the host's resolver failed (kept for a while)")
        return cached[1]

    async def _resolve(self, name: str) -> list[str]:
        """Look `name` up on the DNS threads; the slot is freed when the lookup ends, not when
        we stop waiting for it, so a hanging resolver holds this sandbox's slots only."""
        if not self._lookup_slots.acquire(blocking=False):
            raise LookupBusy(f"{name}: {LOOKUPS_PER_SANDBOX} lookups of this sandbox pending")
        try:
            future = _lookup_pool().submit(_host_addresses, name)
        except BaseException:
            self._lookup_slots.release()
            raise
        future.add_done_callback(lambda _: self._lookup_slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), LOOKUP_TIMEOUT)
        except asyncio.TimeoutError:
            raise LookupFailed(f"{name}: no answer in {LOOKUP_TIMEOUT:g} s") from None

    def _may_open(self, address: str) -> bool:
        """Whether a name may open `address`: a public one, or one inside a listed network
        (a name pointing at a private address must not open the host's LAN)."""
        ip = ipaddress.IPv4Address(address)
        if any(ip in blocked for blocked in ALWAYS_BLOCKED):
            return False
        return ip.is_global or any(d.net is not None and ip in d.net for d in self.spec.allow)

    async def _open_firewall(self, name: str, addresses: list[str]) -> None:
        """Open (or keep open) `name`'s ports on its addresses for OPEN_SECONDS. A name keeps
        at most MAX_ADDRESSES open: its latest ones (one that rotates through many addresses,
        like a bucket of a big object store, closes the oldest; open connections stay)."""
        now = time.monotonic()
        opened = {a: t for a, t in self._opened.get(name, {}).items() if t > now}
        usable = [a for a in addresses if self._may_open(a)]
        if len(usable) < len(addresses):
            kept_shut = sorted(set(addresses) - set(usable))
            self.log.debug("sandbox %s: %s: %s not opened (not public, in no listed network)",
                           self.record.sandbox_id, name, kept_shut)  # fmt: skip
        refresh = [a for a in usable if opened.get(a, 0) - now < OPEN_SECONDS / 2]
        opened.update((a, now + OPEN_SECONDS) for a in refresh)
        by_age = sorted(opened, key=lambda a: (a in usable, opened[a]))
        closed = by_age[: max(0, len(opened) - MAX_ADDRESSES)]
        for address in closed:
            del opened[address]
        self._opened[name] = opened
        if refresh or closed:
            commands = self._open_commands(name, refresh) + self._close_commands(name, closed)
            await asyncio.to_thread(hostcmd.run, ["nft", "-f", "-"], SETUP, input=commands)
            self.log.debug("sandbox %s: %s open on %s, closed on %s",
                           self.record.sandbox_id, name, refresh, closed)  # fmt: skip

    def _elements(self, name: str, address: str) -> Iterator[tuple[str, str]]:
        """(set, key) of each element that opens `name`'s ports on `address`."""
        for port in self._ports[name]:
            where = "allow_any" if port is None else "allow_port"
            key = address if port is None else f"{address} . {port}"
            yield f"element inet {self.names.table} {where}", key

    def _open_commands(self, name: str, addresses: list[str]) -> str:
        """nft input that adds each element with a fresh timeout: add, delete and add again
        in one transaction (a plain add keeps an existing element's old expiry)."""
        lines = []
        for address in addresses:
            for target, key in self._elements(name, address):
                lines += [
                    f"add {target} {{ {key} timeout {OPEN_SECONDS}s }}",
                    f"delete {target} {{ {key} }}",
                    f"add {target} {{ {key} timeout {OPEN_SECONDS}s }}",
                ]
        return "".join(f"{line}\n" for line in lines)

    def _close_commands(self, name: str, addresses: list[str]) -> str:
        """nft input that deletes the elements, even one that has just timed out (the add
        makes sure there is one to delete; a failed delete would fail the transaction)."""
        lines = []
        for address in addresses:
            for target, key in self._elements(name, address):
                lines += [f"add {target} {{ {key} timeout 1s }}", f"delete {target} {{ {key} }}"]
        return "".join(f"{line}\n" for line in lines)
