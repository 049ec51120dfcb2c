"""A sandbox's cgroups, on cgroup v1 (hybrid) and v2 hosts.

Every sandbox's cgroup sits under its user's, `/jupyter-sandbox/users/<user>/<sandbox>`:
the user's cgroup carries the user's memory quota, so that whatever its kernels
do, together they never use more. A sandbox of a warm pool waits in
`/jupyter-sandbox/pool/<sandbox>` and is moved under its user's when claimed (`move`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SANDBOXES = "/jupyter-sandbox"
V1_CONTROLLERS = (
    "memory",
    "cpu",
    "cpuacct",
    "cpu,cpuacct",
    "pids",
    "cpuset",
    "devices",
    "freezer",
    "blkio",
    "net_cls",
    "net_prio",
    "hugetlb",
    "perf_event",
    "systemd",
)


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def user_cgroup(user: str) -> str:
    """The cgroup of all of `user`'s sandboxes; any user name maps to one safe folder name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", lambda m: f"%{ord(m.group()):02x}", user)
    return f"{SANDBOXES}/users/u-{safe}"


POOL = f"{SANDBOXES}/pool"
"""Where sandboxes made ahead of their kernel wait (a warm pool's), charged to no user."""


def find(sandbox_id: str) -> str:
    """The cgroup of a sandbox known only by its id (its record is gone), or ""."""
    base = ROOT if is_v2() else ROOT / "memory"
    root = SANDBOXES.strip("/")
    for pattern in (f"{root}/users/*/{sandbox_id}", f"{root}/pool/{sandbox_id}"):
        for path in base.glob(pattern):
            return "/" + str(path.relative_to(base))
    return ""


def make_v2(root: Path, cgroup: str, controllers: str) -> Path:
    """Create `cgroup` (and its ancestors) in the v2 hierarchy mounted at `root`, with
    `controllers` ("+memory", "+cpu +pids") enabled for it, and return its folder.

    A cgroup gets a controller from its parent's `cgroup.subtree_control`, so every
    ancestor from `root` down hands them on, but never `cgroup` itself: v2 lets no cgroup
    but the root both hand controllers on and hold processes ("no internal processes":
    moving a process in then fails with EBUSY), and the sandbox's processes join
    `cgroup` itself (runsc puts them there; a VM's QEMU joins it by `cgroup.procs`).
    Idempotent; an ancestor that holds processes itself makes this fail with EBUSY.
    """
    parts = Path(cgroup.strip("/")).parts
    for depth in range(len(parts)):
        level = root.joinpath(*parts[:depth])
        level.mkdir(exist_ok=True)
        (level / "cgroup.subtree_control").write_text(controllers)
    path = root.joinpath(*parts)
    path.mkdir(exist_ok=True)
    return path


def procs(cgroup: str) -> list[int]:
    """The pids of every process in `cgroup` and the cgroups below it, sorted; [] if it is
    not there.

    Read from the memory controller's hierarchy on v1 (where `find` looks, and where every
    sandbox's processes are: runsc puts its own there, a VM's QEMU joins it), from the
    unified one on v2. A process that leaves meanwhile may still be listed. An empty
    `cgroup` (the root) has none: this never lists the whole host.
    """
    if not cgroup.strip("/"):
        return []
    pids: set[int] = set()
    for path in memory_dir(cgroup).rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.update(int(pid) for pid in path.read_text().split())
    return sorted(pids)


def memory_stat(cgroup: str) -> dict[str, int]:
    """`memory.stat` of `cgroup` as numbers; {} if it is not there. The names are the
    hierarchy's own: v1 says `rss`, `cache`, `mapped_file`; v2 `anon`, `file`,
    `file_mapped`; both say `shmem`."""
    stat = {}
    with contextlib.suppress(OSError):
        for line in (memory_dir(cgroup) / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                stat[name] = int(value)
    return stat


def set_memory_limit(cgroup: str, limit: int | None) -> None:
    """Create `cgroup` for memory if needed and cap it (memory plus swap) at `limit` bytes.

    On v2 the cgroup hands no controller on (see `make_v2`): processes may join it.
    """
    rel = cgroup.strip("/")
    if is_v2():
        path = make_v2(ROOT, rel, "+memory")
        (path / "memory.max").write_text("max" if limit is None else str(limit))
        return
    path = ROOT / "memory" / rel
    path.mkdir(parents=True, exist_ok=True)
    value = "-1" if limit is None else str(limit)
    files = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    files = [name for name in files if (path / name).exists()]
    try:  # memory may never exceed memory+swap: lower memory first, raise memory+swap first
        for name in files:
            (path / name).write_text(value)
    except OSError:
        for name in reversed(files):
            (path / name).write_text(value)


def set_cpu_shares(cgroup: str, shares: int) -> None:
    """Create `cgroup` for cpu if needed and give it `shares` of contended CPU (v1's
    `cpu.shares`, 1024 being a cgroup's default; v2's `cpu.weight`, scaled: 100 for 1024)."""
    rel = cgroup.strip("/")
    if is_v2():
        path = make_v2(ROOT, rel, "+cpu")
        (path / "cpu.weight").write_text(str(max(1, shares * 100 // 1024)))
        return
    path = ROOT / "cpu" / rel
    path.mkdir(parents=True, exist_ok=True)
    (path / "cpu.shares").write_text(str(shares))


def directories(cgroup: str) -> list[Path]:
    """Every existing directory of `cgroup` across the mounted hierarchies."""
    rel = cgroup.strip("/")
    if not rel:
        return []
    candidates = [ROOT / rel] if is_v2() else [ROOT / c / rel for c in V1_CONTROLLERS]
    candidates.append(ROOT / "unified" / rel)
    return [path for path in candidates if path.is_dir()]


def memory_usage(cgroup: str) -> int | None:
    """Bytes charged to `cgroup`, or None if it is not there."""
    rel = cgroup.strip("/")
    for path in (ROOT / rel / "memory.current", ROOT / "memory" / rel / "memory.usage_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
    return None


def cpu_seconds(cgroup: str) -> float | None:
    """CPU time used by `cgroup` so far, in seconds, or None if it is not there."""
    rel = cgroup.strip("/")
    with contextlib.suppress(OSError, ValueError):
        if is_v2():
            stat = (ROOT / rel / "cpu.stat").read_text().split()
            return int(stat[stat.index("usage_usec") + 1]) / 1e6
        for controller in ("cpuacct", "cpu,cpuacct"):
            path = ROOT / controller / rel / "cpuacct.usage"
            if path.exists():
                return int(path.read_text()) / 1e9
    return None


def oom_kills(cgroup: str) -> int:
    """How often the host's OOM killer struck inside `cgroup` (0 if unknown)."""
    rel = cgroup.strip("/")
    for path in (ROOT / rel / "memory.events", ROOT / "memory" / rel / "memory.oom_control"):
        with contextlib.suppress(OSError, ValueError):
            fields = path.read_text().split()
            return int(fields[fields.index("oom_kill") + 1])
    return 0


def memory_dir(cgroup: str) -> Path:
    """The folder of `cgroup` in the memory controller's hierarchy."""
    rel = cgroup.strip("/")
    return ROOT / rel if is_v2() else ROOT / "memory" / rel


def oom_eventfd(cgroup: str) -> int | None:
    """An eventfd the kernel signals when `cgroup` runs out of memory, or None.

    cgroup v1 only: registered for `memory.oom_control` through `cgroup.event_control`.
    The kernel signals it as it decides to kill (the kill is counted just after), and
    once more as the cgroup is removed. The caller closes it, which unregisters it.
    v2 has no eventfd registration: there the kernel raises a file-modified event
    (inotify, poll) on `memory.events` as it changes, but `wait_for_oom_kill` does not
    watch for it; it reads the count in `memory.events` every `interval` s instead.
    """
    if is_v2():
        return None
    path = memory_dir(cgroup)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        control = os.open(path / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:  # the registration keeps no reference to `control`: it may be closed
            (path / "cgroup.event_control").write_text(f"{efd} {control}")
        finally:
            os.close(control)
    except OSError:
        os.close(efd)
        return None
    return efd


OOM_COUNTED_TRIES, OOM_COUNTED_INTERVAL = 40, 0.05
"""How long a notified OOM is given to show in the count of kills (it may kill nothing)."""


async def wait_for_oom_kill(cgroup: str, interval: float = 0.5) -> bool:
    """Wait until the host's OOM killer has killed a process of `cgroup`: True; False once
    the cgroup is gone. Cancel it to stop watching. Runs on an event loop: woken by v1's
    eventfd (`oom_eventfd`), without polling; on v2 it reads the count every `interval` s.
    """
    loop = asyncio.get_running_loop()
    efd = oom_eventfd(cgroup)
    try:
        while not oom_kills(cgroup):
            if not memory_dir(cgroup).is_dir():
                return False
            if efd is None:
                await asyncio.sleep(interval)
                continue
            woken = asyncio.Event()
            loop.add_reader(efd, woken.set)
            try:
                await woken.wait()
            finally:
                loop.remove_reader(efd)
            os.eventfd_read(efd)
            for _ in range(OOM_COUNTED_TRIES):
                if oom_kills(cgroup) or not memory_dir(cgroup).is_dir():
                    break
                await asyncio.sleep(OOM_COUNTED_INTERVAL)
        return True
    finally:
        if efd is not None:
            os.close(efd)


CPU_PERIOD_US = 100_000


def create(cgroup: str, memory: int | None, cpu: float | None, pids: int | None) -> list[Path]:
    """Make `cgroup` with these limits for a process the host starts itself (a VM).

    Returns the `cgroup.procs` files the process joins it by, one per hierarchy.
    """
    set_memory_limit(cgroup, memory)
    rel = cgroup.strip("/")
    quota = "max" if cpu is None else str(int(cpu * CPU_PERIOD_US))
    if is_v2():
        path = make_v2(ROOT, rel, "+cpu +pids")
        (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        (path / "pids.max").write_text("max" if pids is None else str(pids))
        return [path / "cgroup.procs"]
    folders = {name: ROOT / name / rel for name in ("memory", "cpu", "cpuacct", "pids")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    (folders["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
    (folders["cpu"] / "cpu.cfs_quota_us").write_text("-1" if cpu is None else quota)
    (folders["pids"] / "pids.max").write_text("max" if pids is None else str(pids))
    return sorted({(folder / "cgroup.procs").resolve() for folder in folders.values()})


CARRIED = ("cpuset.cpus", "cpuset.mems", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares",
           "cpu.max", "cpu.weight", "pids.max", "memory.max", "memory.swap.max")  # fmt: skip
"""The limits `move` carries from a cgroup to its new place (v1's memory limits aside: they
must be written in order, `set_memory_limit`). cpuset's come first: a v1 cpuset cgroup
takes no process before it has CPUs and memory nodes."""
MOVE_ROUNDS = 20
"""Passes `move` makes over a cgroup's processes: one that forks while it moves leaves a
child behind for the next pass (gVisor starts a stub process per address space)."""


def _carry(source: Path, target: Path) -> None:
    """Make `target` (and its missing parents: v1 cpuset ones take their parent's CPUs and
    memory nodes) with `source`'s limits."""
    missing = [p for p in (target, *target.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir()
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (folder / name).exists() and not (folder / name).read_text().strip():
                (folder / name).write_text((folder.parent / name).read_text())
    for name in CARRIED:
        with contextlib.suppress(FileNotFoundError):
            (target / name).write_text((source / name).read_text())


def move(source: str, target: str) -> None:
    """Move every process of the cgroup `source` to the new cgroup `target`, which gets
    `source`'s limits, and remove `source`. For a sandbox made before its user was known
    (a warm pool's, `pool.py`), once a kernel claims it.

    On v1 the memory the processes were charged moves with them (the target's
    `memory.move_charge_at_immigrate`); v2 never moves charges: what was charged before
    stays counted in `source`'s parent (the pool's) until it is freed. OSError if a
    process could not be moved.
    """
    src, dst = source.strip("/"), target.strip("/")
    limit = None
    if is_v2():
        pairs = [(ROOT / src, make_v2(ROOT, dst, "+memory +cpu +pids"))]
    else:
        pairs = []
        for controller in V1_CONTROLLERS:
            folder = ROOT / controller / src
            if folder.is_dir() and folder.resolve() not in {p.resolve() for p, _ in pairs}:
                pairs.append((folder, ROOT / controller / dst))
        with contextlib.suppress(OSError, ValueError):
            limit = int((ROOT / "memory" / src / "memory.limit_in_bytes").read_text())
    for old, new in pairs:
        _carry(old, new)
    if not is_v2():
        set_memory_limit(target, limit if limit is not None and limit < 2**62 else None)
        charge = ROOT / "memory" / dst / "memory.move_charge_at_immigrate"
        with contextlib.suppress(OSError):  # deprecated upstream; gone, charges stay
            charge.write_text("3")
    for old, new in pairs:
        for _ in range(MOVE_ROUNDS):
            pids = (old / "cgroup.procs").read_text().split()
            if not pids:
                break
            for pid in pids:
                try:
                    (new / "cgroup.procs").write_text(pid)
                except ProcessLookupError:
                    continue  # it ended meanwhile
        else:
            raise OSError(f"processes of {source} kept appearing; not all moved to {target}")
        with contextlib.suppress(OSError):
            old.rmdir()


def remove_if_empty(cgroup: str) -> None:
    """Remove `cgroup` itself where it has no child cgroups and no processes left."""
    for path in directories(cgroup):
        with contextlib.suppress(OSError):
            path.rmdir()


def remove(cgroup: str) -> None:
    """Remove what is left of `cgroup` (children first). Only empty cgroups can go."""
    for path in directories(cgroup):
        for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()
