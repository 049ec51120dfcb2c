"""What the sandboxes' networks share on one host: names, the pool lock, forwarding, the /30s.

Host-wide, whatever JUPYTER_SANDBOX_RUNTIME_DIR says: every server on the host
(and the sandbox service) takes its /30s from the same pool, under the same lock
file, and shares the one switch of IPv4 forwarding. Nothing here runs at import.

- Names: each sandbox's namespace, host-end link and nftables table are named
  from its sandbox id, so `gc` finds them even without a record.
- Forwarding: replies to sandboxes need IPv4 forwarding. If the host did not
  forward already, the first sandbox link turns it on behind a guard table
  (`inet jsbhost`, which forwards only to and from sandbox links), and the last
  one to go turns it off again and removes the guard.
- The pool: a /30 of `POOL` is picked at random among those no host address
  uses and none freed in the last `REUSE_DELAY` seconds, and assigned before
  the lock is released: concurrent starts, in any process, never collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import hostcmd
from ..errors import SandboxError
from .spec import POOL

NETNS_DIR = Path("/run/netns")
HOST_STATE = Path("/run/jupyter-sandbox-network")
"""Host-wide, whatever JUPYTER_SANDBOX_RUNTIME_DIR says: the pool's lock, the forwarding
state and recently freed /30s, shared by every server on the host."""
REUSE_DELAY = 300.0
"""Seconds before a freed /30 is handed out again, unless the pool has no other."""
VETH_PREFIX = "jsbv"
TABLE_PREFIX = "jsb_"
NETNS_PREFIX = "jsb-"
GUARD_TABLE = "jsbhost"
"""The table that keeps the host from forwarding anything but sandbox traffic (not `jsb_`:
it is no sandbox's)."""
GUARD_RULESET = f"""
table inet {GUARD_TABLE} {{
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
    }}
}}
flush chain inet {GUARD_TABLE} forward
add rule inet {GUARD_TABLE} forward iifname != "{VETH_PREFIX}*" oifname != "{VETH_PREFIX}*" drop
"""
SETUP = "network setup"
"""How a failed host command of a sandbox's network setup is named in its SandboxError."""


# -- names ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    netns: str
    veth: str
    table: str


def in_namespace(netns: Path) -> list[str]:
    """The prefix that runs a command in network namespace `netns`: nsenter, not `ip netns
    exec` (that remounts /sys, and runsc then cannot find its cgroups); nsenter execs the
    command, so the process started is the command itself."""
    return [shutil.which("nsenter") or "nsenter", f"--net={netns}", "--"]


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


def write_sysctl(path: str, value: str) -> None:
    """Set /proc/sys/`path` to `value`, unless it is already (OSError if it cannot)."""
    file = Path("/proc/sys") / path
    if file.read_text().strip() != value:
        file.write_text(value)


@contextlib.contextmanager
def pool_lock() -> Iterator[None]:
    """Host-wide: every server on the host shares the pool, the links and the forwarding."""
    HOST_STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(HOST_STATE / "pool.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- IPv4 forwarding (with the pool lock held) ---------------------------------------

_FORWARDING = "net/ipv4/ip_forward"
FORWARDING_BEFORE = HOST_STATE / "ip_forward.before"
"""The host's own net.ipv4.ip_forward, recorded when the first sandbox link was made."""


def sandbox_links() -> list[str]:
    """The host ends of every sandbox's link, whichever server made it."""
    return sorted(p.name for p in Path("/sys/class/net").glob(f"{VETH_PREFIX}*"))


def guard_exists() -> bool:
    return hostcmd.probe(["nft", "list", "table", "inet", GUARD_TABLE]) is not None


def hold_forwarding(log: logging.Logger) -> None:
    """Forward for sandboxes; if the host did not forward, forward nothing else (the guard)."""
    try:
        now = (Path("/proc/sys") / _FORWARDING).read_text().strip()
        if now != "1" or not FORWARDING_BEFORE.exists():
            FORWARDING_BEFORE.write_text(now)  # not forwarding now: ours to turn on and off
        if FORWARDING_BEFORE.read_text().strip() == "0":
            # the guard first, then forwarding
            hostcmd.run(["nft", "-f", "-"], SETUP, input=GUARD_RULESET)
            if now != "1":
                write_sysctl(_FORWARDING, "1")
                log.info("IPv4 forwarding on, for sandbox links only (nftables table %s)",
                         GUARD_TABLE)  # fmt: skip
    except OSError as e:
        raise SandboxError(f"{SETUP}: cannot enable IPv4 forwarding: {e}") from None


def release_forwarding(log: logging.Logger) -> None:
    """Once no sandbox link is left: give the host back the forwarding it had."""
    if sandbox_links() or not (FORWARDING_BEFORE.exists() or guard_exists()):
        return
    try:
        if FORWARDING_BEFORE.exists() and FORWARDING_BEFORE.read_text().strip() == "0":
            write_sysctl(_FORWARDING, "0")  # forwarding off first, then the guard
            log.info("IPv4 forwarding off again: no sandbox link is left")
        FORWARDING_BEFORE.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not restore IPv4 forwarding: %s", e)
        return
    hostcmd.quietly(["nft", "delete", "table", "inet", GUARD_TABLE], log, ("No such file",))


# -- the /30 pool (with the pool lock held) --------------------------------------------

_RECENTLY_FREED = HOST_STATE / "recently-freed.json"


def _recently_freed() -> dict[str, float]:
    """Subnets freed less than REUSE_DELAY ago -> when."""
    try:
        freed = json.loads(_RECENTLY_FREED.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(freed, dict):
        return {}
    horizon = time.time() - REUSE_DELAY
    return {s: t for s, t in freed.items() if isinstance(t, (int, float)) and t > horizon}


def note_freed(subnet: str) -> None:
    """A /30 just freed: its old flows may still be in flight, so it waits before reuse."""
    freed = _recently_freed()
    freed[subnet] = time.time()
    tmp = _RECENTLY_FREED.with_suffix(".tmp")
    tmp.write_text(json.dumps(freed))
    tmp.replace(_RECENTLY_FREED)


def free_subnet() -> ipaddress.IPv4Network:
    """A /30 of POOL that no host address is in, not freed recently if another is free."""
    used = set()
    for link in json.loads(hostcmd.run(["ip", "-j", "-4", "addr", "show"], SETUP) or "[]"):
        for info in link.get("addr_info", []):
            address = ipaddress.IPv4Address(info["local"])
            if address in POOL:
                used.add(int(address) >> 2)
    recent = {int(ipaddress.IPv4Network(s).network_address) >> 2 for s in _recently_freed()}
    slot = _pick_slot(used | recent)
    if slot is None:
        slot = _pick_slot(used)
    if slot is None:
        raise SandboxError(f"{SETUP}: every /30 of {POOL} is in use")
    return ipaddress.IPv4Network((slot << 2, 30))


def _pick_slot(avoid: set[int]) -> int | None:
    """A random /30 slot of POOL not in `avoid` (by index of /30), or None if there is none."""
    base, slots = int(POOL.network_address) >> 2, POOL.num_addresses // 4
    free = (base + random.randrange(slots) for _ in range(64))
    slot = next((s for s in free if s not in avoid), None)
    if slot is None:
        slot = next((base + i for i in range(slots) if base + i not in avoid), None)
    return slot
