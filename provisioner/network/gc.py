"""Removing a sandbox's network, after a crash too: `remove`, and `gc`'s host-wide sweep.

Everything a sandbox's network makes is recorded in its `Record` before it is
made, so `remove` (from the backend's reap, a failed start, or `jupyter sandbox
gc`) can take it away idempotently: link, namespace, the link's conntrack
entries, then the table (the firewall stays until nothing can pass). Objects no
record names are found by their names' prefixes (`host_objects`) and removed
the same way (`remove_objects`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import hostcmd
from ..state import Record
from .host import (
    FORWARDING_BEFORE,
    GUARD_TABLE,
    NETNS_DIR,
    NETNS_PREFIX,
    TABLE_PREFIX,
    names,
    netns_path,
    note_freed,
    pool_lock,
    release_forwarding,
    sandbox_links,
)
from .spec import POOL


def remove(record: Record, log: logging.Logger) -> None:
    """Remove a sandbox's link, namespace, flows and table, whatever of them exists; the
    firewall goes last, once nothing can pass it. Never raises."""
    subnet = record.subnet
    if record.veth and Path("/sys/class/net", record.veth).exists():
        subnet = subnet or _link_subnet(record.veth)
        hostcmd.quietly(["ip", "link", "del", record.veth], log, ("Cannot find device",))
    if record.netns and netns_path(record.netns).exists():
        hostcmd.quietly(["ip", "netns", "del", record.netns], log, ("No such file",))
    if subnet:
        _forget_flows(str(ipaddress.IPv4Network(subnet)[2]), log)
    if record.nft_table:
        hostcmd.quietly(
            ["nft", "delete", "table", "inet", record.nft_table], log, ("No such file",)
        )
    if record.veth:
        _after_link_removed(subnet, log)


def _link_subnet(veth: str) -> str:
    """The /30 of a host-end link (for one no record names); "" if it has none."""
    for link in json.loads(hostcmd.probe(["ip", "-j", "-4", "addr", "show", "dev", veth]) or "[]"):
        for info in link.get("addr_info", []):
            network = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            if network.subnet_of(POOL):
                return str(network)
    return ""


def _forget_flows(guest: str, log: logging.Logger) -> None:
    """Delete the conntrack entries of a sandbox's address: left in place, replies to its old
    flows would reach the next sandbox given the same /30."""
    conntrack = shutil.which("conntrack")
    if conntrack is None:
        log.warning("conntrack (Debian package conntrack) is not installed: the flows of "
                    "sandbox address %s stay until they time out", guest)  # fmt: skip
        return
    for direction in ("--orig-src", "--orig-dst"):
        hostcmd.quietly([conntrack, "-D", direction, guest], log, ("0 flow entries",))


def _after_link_removed(subnet: str, log: logging.Logger) -> None:
    """Hold a freed /30 back for a while; if it was the last link, restore forwarding."""
    try:
        with pool_lock():
            if subnet:
                note_freed(subnet)
            release_forwarding(log)
    except OSError as e:
        log.warning("network cleanup: %s", e)


@dataclass
class HostObjects:
    """This project's namespaces, host-end links and tables present on the host, and whether
    forwarding is still held for sandboxes when none has a link."""

    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    forwarding: bool = False

    def __bool__(self) -> bool:
        return bool(self.netns or self.links or self.tables or self.forwarding)

    def without(self, live: Iterable[Record]) -> HostObjects:
        """Those that belong to none of the `live` sandboxes, and to no namespace a process
        still runs in (a sandbox of another runtime dir, whose records we do not see)."""
        keep: set[str] = set()
        for sandbox in [*(r.sandbox_id for r in live), *_namespaces_in_use(self.netns)]:
            n = names(sandbox)
            keep |= {n.netns, n.veth, n.table}
        for r in live:
            keep |= {r.netns, r.veth, r.nft_table}
        return HostObjects(
            [x for x in self.netns if x not in keep],
            [x for x in self.links if x not in keep],
            [x for x in self.tables if x not in keep],
            self.forwarding,
        )


def _namespaces_in_use(candidates: list[str]) -> list[str]:
    """Those of the named namespaces some process is in (sandbox ids: ours are named so)."""
    wanted = {}
    for name in candidates:
        with contextlib.suppress(OSError):
            wanted[netns_path(name).stat().st_ino] = name
    found = set()
    for proc in Path("/proc").iterdir() if wanted else ():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                inode = (proc / "ns" / "net").stat().st_ino
                if inode in wanted:
                    found.add(wanted[inode])
    return sorted(found)


def host_objects() -> HostObjects:
    """List what of ours exists now (namespaces, links, nftables tables, forwarding)."""
    found = HostObjects()
    if NETNS_DIR.is_dir():
        found.netns = sorted(p.name for p in NETNS_DIR.glob(f"{NETNS_PREFIX}*"))
    found.links = sandbox_links()
    if shutil.which("nft"):
        listing = hostcmd.probe(["nft", "list", "tables", "inet"]) or ""
        tables = [line.split()[2] for line in listing.splitlines()
                  if line.startswith("table inet ")]  # fmt: skip
        found.tables = sorted(t for t in tables if t.startswith(TABLE_PREFIX))
        found.forwarding = not found.links and (GUARD_TABLE in tables or FORWARDING_BEFORE.exists())
    return found


def remove_objects(objects: HostObjects, log: logging.Logger) -> None:
    """Remove listed objects (orphans found by `gc`), links first, tables last. Never raises."""
    for link in objects.links:
        remove(Record(sandbox_id="?", kernel_id="?", backend="?", veth=link), log)
    for netns in objects.netns:
        remove(Record(sandbox_id="?", kernel_id="?", backend="?", netns=netns), log)
    for table in objects.tables:
        remove(Record(sandbox_id="?", kernel_id="?", backend="?", nft_table=table), log)
    if objects.forwarding:
        _after_link_removed("", log)
