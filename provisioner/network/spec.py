"""A kernel's network as asked for: the modes, `egress_allow` entries and bandwidths.

Parsing only, standard library only: the settings (`settings.py`) and the policy
check values with it without touching the host.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MODES = ("none", "egress", "open")
POOL = ipaddress.IPv4Network("10.223.0.0/16")
"""Addresses of sandbox links: one /30 per sandbox (16384 at once)."""
ALWAYS_BLOCKED = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: most clouds' metadata services live here
        "100.100.100.200/32",  # Alibaba Cloud's metadata service
        "168.63.129.16/32",  # Azure's WireServer (and its DNS, health probes)
        "224.0.0.0/3",  # multicast, reserved, limited broadcast
        str(POOL),  # other sandboxes
    )
)

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
_BANDWIDTH = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)(?:bit)?$", re.IGNORECASE)
_BANDWIDTH_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
BANDWIDTH_FORM = 'bits per second such as "512k", "10M" or "1G" (decimal units), or "" for none'
MIN_BANDWIDTH = 8_000


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
                    "loopback, link-local, a cloud metadata service, multicast or the "
                    "sandboxes' own pool)"
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
