"""Reading and removing a sandbox's cgroups, on cgroup v1 (hybrid) and v2 hosts."""

from __future__ import annotations

import contextlib
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
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


def remove(cgroup: str) -> None:
    """Remove what is left of `cgroup` (children first). Only empty cgroups can go."""
    for path in directories(cgroup):
        for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()
