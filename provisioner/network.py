"""Per-kernel networks: none, egress (an allowlist) or open, always behind a firewall.

A sandbox whose mode is not `none` gets, on the host (root of everything here):

- a named network namespace, its sandbox id, with IPv6 disabled inside;
- a veth pair: `jsbv` + 11 hex digits of a hash of the sandbox id on the host,
  `eth0` inside (made in the namespace directly, so it never appears outside);
- a /30 of `POOL`: the host end is .1, the sandbox .2, default route via .1.
  The /30 is picked at random among those no host address uses, under a lock
  file, and assigned before the lock is released: concurrent starts, in any
  process, never collide;
- one nftables table `inet jsb_<id>` with every rule of that sandbox (deleting
  it removes them all at once): nothing from the sandbox to the host itself
  (any of its addresses) but DNS to the responder; nothing to `ALWAYS_BLOCKED`
  (link-local and so the metadata service, loopback, multicast, broadcast,
  other sandboxes); nothing from outside into the sandbox but replies; in
  `egress` only the allowed destinations; masquerade for what leaves;
- tbf qdiscs on both ends when a bandwidth is set;
- a DNS responder (`dns.py`) on the host end's address, named in the guest's
  resolv.conf: allowed names only in `egress`, any name in `open`.

Refused packets get an ICMP "administratively prohibited", so a blocked
connect fails at once with EHOSTUNREACH rather than hanging. IPv4 forwarding
is switched on for the host (net.ipv4.ip_forward = 1) when the first such
sandbox starts, and left on. The backend then starts the sandbox inside the
namespace; for runsc that is `nsenter --net=... runsc --network=host`.

Everything is recorded in the sandbox's `Record` before it is made, so
`remove` (from the backend's reap, or `jupyter sandbox gc`) can take it away
after a crash, idempotently.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import dns
from .errors import SandboxError
from .state import Record, runtime_dir

MODES = ("none", "egress", "open")
POOL = ipaddress.IPv4Network("10.223.0.0/16")
"""Addresses of sandbox links: one /30 per sandbox (16384 at once)."""
ALWAYS_BLOCKED = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: cloud metadata services live here
        "224.0.0.0/3",  # multicast, reserved, limited broadcast
        str(POOL),  # other sandboxes
    )
)
NETNS_DIR = Path("/run/netns")
GUEST_IF = "eth0"
DNS_PORT = 53
LOOKUP_TIMEOUT = 5.0
CACHE_SECONDS = 2.0
"""How long a name's addresses are reused: enough to answer A and AAAA from one lookup, short
enough that a changed record reaches the guest (and its firewall) almost at once."""
CACHE_SIZE = 256
MAX_ADDRESSES = 16
"""Addresses a name may open in the firewall per lookup (and answer with)."""
VETH_PREFIX = "jsbv"
TABLE_PREFIX = "jsb_"
NETNS_PREFIX = "jsb-"

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
_BANDWIDTH = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)(?:bit)?$", re.IGNORECASE)
_BANDWIDTH_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
BANDWIDTH_FORM = 'bits per second such as "512k", "10M" or "1G" (decimal units), or "" for none'
MIN_BANDWIDTH = 8_000


# -- settings -------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """One `egress_allow` entry: a hostname or an IPv4 network, any port or one."""

    host: str = ""
    net: ipaddress.IPv4Network | None = None
    port: int | None = None

    def __str__(self) -> str:
        where = self.host or (
            str(self.net.network_address)
            if self.net and self.net.prefixlen == 32
            else str(self.net)
        )
        return where if self.port is None else f"{where}:{self.port}"


def parse_destination(text: str) -> Destination:
    """'pypi.org:443', '10.0.0.0/8', '192.0.2.7:8080' -> Destination; ValueError says why not."""
    form = 'expected "host", "host:port", "IP", "IP:port", "CIDR" or "CIDR:port"'
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{form}, got {text!r}")
    where, port = text.strip(), None
    if where.startswith("[") or where.count(":") > 1:
        raise ValueError(
            f"{text!r}: IPv6 destinations are not supported (sandboxes have IPv4 only)"
        )
    if ":" in where:
        where, _, digits = where.partition(":")
        if not digits.isdigit() or not 1 <= int(digits) <= 65535:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        port = int(digits)
    if re.fullmatch(r"[\d./]+", where):
        try:
            net = ipaddress.IPv4Network(where)
        except ValueError as e:
            raise ValueError(f"{text!r}: not an IPv4 address or network ({e}); {form}") from None
        for blocked in ALWAYS_BLOCKED:
            if net.subnet_of(blocked):
                raise ValueError(
                    f"{text!r} is always blocked for sandboxes (it is inside {blocked}: "
                    "loopback, link-local/metadata, multicast or the sandboxes' own pool)"
                )
        return Destination(net=net, port=port)
    host = where.lower().rstrip(".")
    if not _HOSTNAME.match(host):
        raise ValueError(f"{text!r}: not a valid hostname; {form}")
    return Destination(host=host, port=port)


def parse_bandwidth(text: str) -> int | None:
    """Bits per second from "10M" / "512k" / "1G" / "2500000"; None for ""."""
    if not isinstance(text, str):
        raise ValueError(f"expected {BANDWIDTH_FORM}, got {text!r}")
    if not text.strip():
        return None
    match = _BANDWIDTH.match(text.strip())
    if not match:
        raise ValueError(f"expected {BANDWIDTH_FORM}, got {text!r}")
    rate = int(float(match.group(1)) * _BANDWIDTH_UNITS[match.group(2).lower()])
    if rate < MIN_BANDWIDTH:
        raise ValueError(f"expected at least {MIN_BANDWIDTH} bits per second, got {text!r}")
    return rate


@dataclass(frozen=True)
class NetworkSpec:
    """What network one sandbox gets."""

    mode: str = "none"
    allow: tuple[Destination, ...] = ()
    """Only for `egress`: where the sandbox may connect (TCP and UDP)."""
    bandwidth: int | None = None
    """Bits per second in each direction, or None for no cap."""

    def describe(self) -> str:
        if self.mode == "egress":
            text = "egress to " + (", ".join(map(str, self.allow)) or "nothing")
        else:
            text = f"network {self.mode}"
        return text if self.bandwidth is None else f"{text} at {self.bandwidth} bit/s"


# -- names and host state ---------------------------------------------------------


@dataclass(frozen=True)
class Names:
    netns: str
    veth: str
    table: str


def names(sandbox_id: str) -> Names:
    """The host names of a sandbox's namespace, host-end link (<= 15 chars) and table."""
    digest = hashlib.sha256(sandbox_id.encode()).hexdigest()
    return Names(
        netns=re.sub(r"[^A-Za-z0-9_.-]", "_", sandbox_id),
        veth=f"{VETH_PREFIX}{digest[:11]}",
        table=TABLE_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", sandbox_id.removeprefix(NETNS_PREFIX)),
    )


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def _run(argv: list[str], input: str | None = None) -> str:
    """Run a host tool; SandboxError naming the step if it fails."""
    try:
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"network setup: {' '.join(argv[:4])}: {e}") from None
    if result.returncode:
        raise SandboxError(f"network setup: {' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def _quietly(argv: list[str], log: logging.Logger, gone: tuple[str, ...]) -> None:
    """Run a removal; 'already gone' is fine, anything else is logged, nothing raises."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s: %s", " ".join(argv), e)
        return
    if result.returncode and not any(g in result.stderr for g in gone):
        log.warning("%s: %s", " ".join(argv), result.stderr.strip())


def _write_sysctl(path: str, value: str) -> None:
    file = Path("/proc/sys") / path
    if file.read_text().strip() != value:
        file.write_text(value)


def enable_forwarding(log: logging.Logger) -> None:
    """Turn on IPv4 forwarding for the host, once: replies to sandboxes need it."""
    try:
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
            _write_sysctl("net/ipv4/ip_forward", "1")
            log.info("enabled IPv4 forwarding (net.ipv4.ip_forward = 1) for sandbox networks")
    except OSError as e:
        raise SandboxError(f"network setup: cannot enable IPv4 forwarding: {e}") from None


@contextlib.contextmanager
def _pool_lock() -> Iterator[None]:
    runtime_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(runtime_dir() / "network.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of POOL that no host address is in. Call with the pool lock held."""
    used = set()
    for link in json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        for info in link.get("addr_info", []):
            address = ipaddress.IPv4Address(info["local"])
            if address in POOL:
                used.add(int(address) >> 2)
    base, slots = int(POOL.network_address) >> 2, POOL.num_addresses // 4
    free = (base + random.randrange(slots) for _ in range(64))
    slot = next((s for s in free if s not in used), None)
    if slot is None:
        slot = next((base + i for i in range(slots) if base + i not in used), None)
    if slot is None:
        raise SandboxError(f"network setup: every /30 of {POOL} is in use")
    return ipaddress.IPv4Network((slot << 2, 30))


# -- one sandbox's network ------------------------------------------------------------


class SandboxNetwork:
    """One sandbox's namespace, link, firewall and DNS, from `open` to `remove`."""

    def __init__(self, spec: NetworkSpec, record: Record, log: logging.Logger) -> None:
        self.spec = spec
        self.record = record
        self.log = log
        self.names = names(record.sandbox_id)
        self.host_ip = ""
        self.guest_ip = ""
        self.responder: dns.Responder | None = None
        self._ports: dict[str, set[int | None]] = {}
        for dest in spec.allow if spec.mode == "egress" else ():
            if dest.host:
                self._ports.setdefault(dest.host, set()).add(dest.port)
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._opened: set[tuple[str, int | None]] = set()

    @property
    def netns_path(self) -> Path:
        return netns_path(self.names.netns)

    async def open(self) -> None:
        """Make all of it; on any failure remove what was made. I/O loop."""
        await asyncio.to_thread(self._create)
        try:
            await asyncio.gather(*(self._resolve_at_start(host) for host in self._ports))
            try:
                self.responder = await dns.serve(
                    self.host_ip, DNS_PORT, self.guest_ip, self._lookup, self.log,
                    self.record.sandbox_id,
                )  # fmt: skip
            except OSError as e:
                raise SandboxError(
                    f"network setup: cannot answer DNS on {self.host_ip}:{DNS_PORT}: {e} (does "
                    f"a DNS server on the host hold port {DNS_PORT} on every address?)"
                ) from None
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
        resolv.write_text(f"nameserver {self.host_ip}\noptions timeout:2 attempts:2\n")
        resolv.chmod(0o644)
        return [(resolv, "/etc/resolv.conf")]

    def close(self) -> None:
        """Stop the DNS responder (the host objects go with `remove`)."""
        if self.responder is not None:
            self.responder.close()
            self.responder = None

    # -- creation (a thread) --

    def _create(self) -> None:
        record, n = self.record, self.names
        record.netns, record.veth, record.nft_table = n.netns, n.veth, n.table
        record.save()  # before anything exists: after a crash, gc knows what to remove
        try:
            enable_forwarding(self.log)
            _run(["ip", "netns", "add", n.netns])
            self._in_netns(
                ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                 "net.ipv6.conf.default.disable_ipv6=1"]
            )  # fmt: skip
            with _pool_lock():
                subnet = _free_subnet()
                self.host_ip, self.guest_ip = str(subnet[1]), str(subnet[2])
                record.subnet = str(subnet)
                record.save()
                _run(["ip", "link", "add", n.veth, "type", "veth",
                      "peer", "name", GUEST_IF, "netns", n.netns])  # fmt: skip
                _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", n.veth])
            for path, value in (
                (f"net/ipv6/conf/{n.veth}/disable_ipv6", "1"),
                (f"net/ipv4/conf/{n.veth}/rp_filter", "1"),  # strict: no spoofed sources
                (f"net/ipv4/conf/{n.veth}/route_localnet", "0"),
                (f"net/ipv4/conf/{n.veth}/send_redirects", "0"),
            ):
                _write_sysctl(path, value)
            _run(["nft", "-f", "-"], input=self.ruleset())  # rules first, then links up
            _run(["ip", "link", "set", n.veth, "alias", record.sandbox_id, "up"])
            _run(
                ["ip", "-n", n.netns, "-batch", "-"],
                input=f"addr add {self.guest_ip}/30 dev {GUEST_IF}\n"
                f"link set {GUEST_IF} up\nlink set lo up\n"
                f"route add default via {self.host_ip}\n",
            )
            if self.spec.bandwidth:
                self._limit_bandwidth(self.spec.bandwidth)
        except BaseException:
            remove(record, self.log)
            raise

    def _in_netns(self, argv: list[str]) -> str:
        nsenter = shutil.which("nsenter") or "nsenter"
        return _run([nsenter, f"--net={self.netns_path}", "--", *argv])

    def _limit_bandwidth(self, rate: int) -> None:
        # burst: 10 ms at the rate, at least a few full frames
        tbf = ["root", "tbf", "rate", f"{rate}bit", "burst", str(max(16384, rate // 800)),
               "latency", "100ms"]  # fmt: skip
        _run(["tc", "qdisc", "replace", "dev", self.names.veth, *tbf])  # to the sandbox
        _run(["tc", "-n", self.names.netns, "qdisc", "replace", "dev", GUEST_IF, *tbf])  # from it

    def ruleset(self) -> str:
        """The sandbox's nftables table, as `nft -f` input."""
        n, guest, host = self.names, self.guest_ip, self.host_ip
        refuse = "jump refuse"
        blocked = ", ".join(map(str, ALWAYS_BLOCKED))
        if self.spec.mode == "open":
            verdicts = ["accept"]
        else:
            verdicts = []
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
    set allow_any {{ type ipv4_addr; }}
    set allow_port {{ type ipv4_addr . inet_service; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{n.veth}" jump from_sandbox
        oifname "{n.veth}" jump to_sandbox
    }}
    chain from_sandbox {{
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
        iifname "{n.veth}" jump from_sandbox_to_host
    }}
    chain from_sandbox_to_host {{
        ip saddr {guest} ip daddr {host} udp dport {DNS_PORT} accept
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

    async def _resolve_at_start(self, name: str) -> None:
        """Open the firewall for an allowed name before the guest asks: then its IP works too."""
        try:
            found = await self._lookup(name)
        except (OSError, asyncio.TimeoutError) as e:
            found, why = None, str(e) or type(e).__name__
        else:
            why = "no IPv4 address"
        if not found:
            self.log.warning(
                "sandbox %s: egress_allow names %s, which does not resolve now (%s); "
                "the sandbox's DNS will try again when asked",
                self.record.sandbox_id, name, why,
            )  # fmt: skip

    async def _lookup(self, name: str) -> list[str] | None:
        """The addresses the guest may use for `name`, the firewall opened for them first."""
        if self.spec.mode == "egress" and name not in self._ports:
            return None
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            addresses = cached[1]
        else:
            addresses = await self._resolve(name)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = (now + CACHE_SECONDS, addresses)
        if addresses and self.spec.mode == "egress":
            await self._open_firewall(name, addresses)
        return addresses or None

    async def _resolve(self, name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM),
                LOOKUP_TIMEOUT,
            )
        except socket.gaierror as e:
            self.log.debug("sandbox %s: %s does not resolve: %s", self.record.sandbox_id, name, e)
            return []
        found = dict.fromkeys(str(info[4][0]) for info in infos)
        return list(found)[:MAX_ADDRESSES]

    async def _open_firewall(self, name: str, addresses: list[str]) -> None:
        new = [
            (address, port)
            for address in addresses
            if not any(ipaddress.IPv4Address(address) in b for b in ALWAYS_BLOCKED)
            for port in self._ports[name]
            if (address, port) not in self._opened
        ]
        if not new:
            return
        anywhere = [a for a, port in new if port is None]
        ported = [f"{a} . {port}" for a, port in new if port is not None]
        commands = "".join(
            f"add element inet {self.names.table} {set_name} {{ {', '.join(elements)} }}\n"
            for set_name, elements in (("allow_any", anywhere), ("allow_port", ported))
            if elements
        )
        await asyncio.to_thread(_run, ["nft", "-f", "-"], commands)
        self._opened.update(new)
        self.log.debug("sandbox %s: %s opened for %s", self.record.sandbox_id, name, new)


# -- removal ----------------------------------------------------------------------------


def remove(record: Record, log: logging.Logger) -> None:
    """Remove a sandbox's table, link and namespace, whatever of them exists. Never raises."""
    if record.nft_table:
        _quietly(["nft", "delete", "table", "inet", record.nft_table], log, ("No such file",))
    if record.veth and Path("/sys/class/net", record.veth).exists():
        _quietly(["ip", "link", "del", record.veth], log, ("Cannot find device",))
    if record.netns and netns_path(record.netns).exists():
        _quietly(["ip", "netns", "del", record.netns], log, ("No such file",))


@dataclass
class HostObjects:
    """This project's namespaces, host-end links and tables present on the host."""

    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.netns or self.links or self.tables)

    def without(self, live: Iterable[Record]) -> HostObjects:
        """Those that belong to none of the `live` sandboxes."""
        keep: set[str] = set()
        for r in live:
            n = names(r.sandbox_id)
            keep |= {r.netns, r.veth, r.nft_table, n.netns, n.veth, n.table}
        return HostObjects(
            [x for x in self.netns if x not in keep],
            [x for x in self.links if x not in keep],
            [x for x in self.tables if x not in keep],
        )


def host_objects() -> HostObjects:
    """List what of ours exists now (namespaces, links, nftables tables)."""
    found = HostObjects()
    if NETNS_DIR.is_dir():
        found.netns = sorted(p.name for p in NETNS_DIR.glob(f"{NETNS_PREFIX}*"))
    found.links = sorted(p.name for p in Path("/sys/class/net").glob(f"{VETH_PREFIX}*"))
    if shutil.which("nft"):
        result = subprocess.run(
            ["nft", "list", "tables", "inet"], capture_output=True, text=True, check=False
        )
        found.tables = sorted(
            line.split()[2]
            for line in result.stdout.splitlines()
            if line.startswith("table inet ") and line.split()[2].startswith(TABLE_PREFIX)
        )
    return found


def remove_objects(objects: HostObjects, log: logging.Logger) -> None:
    """Remove listed objects (orphans found by `gc`). Never raises."""
    for table in objects.tables:
        remove(Record(sandbox_id="?", kernel_id="?", backend="?", nft_table=table), log)
    for link in objects.links:
        remove(Record(sandbox_id="?", kernel_id="?", backend="?", veth=link), log)
    for netns in objects.netns:
        remove(Record(sandbox_id="?", kernel_id="?", backend="?", netns=netns), log)
