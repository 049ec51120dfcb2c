"""Idle memory of a kernel: PSS of its processes, and what its sandbox's cgroup is charged.

A sandbox's processes are found through its cgroup (`provisioner.cgroups`, v1 or v2),
the same cgroup its memory limit is enforced on. See README.md for what each number
counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from pathlib import Path
from typing import Any

from kernels import Kernel

from provisioner import cgroups

SMAPS_KEYS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss")
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
KCMP_VM = 1
_libc = ctypes.CDLL(None, use_errno=True)


def smaps_rollup(pid: int) -> dict[str, int]:
    """Pss, Rss, ... of one process in bytes; {} if it is gone."""
    fields = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


def process_tree(root: int) -> list[int]:
    """`root` and every descendant of it (from /proc/*/stat), `root` first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def same_mm(a: int, b: int) -> bool:
    """Whether two processes share one address space (kcmp(2) KCMP_VM)."""
    if SYS_KCMP is None:
        return False
    return _libc.syscall(SYS_KCMP, a, b, KCMP_VM, 0, 0) == 0


def address_spaces(pids: list[int]) -> list[int]:
    """One pid per distinct address space.

    gVisor's systrap stubs are processes made with CLONE_VM: several pids share
    one mm, and each one's smaps_rollup reports that whole mm. Summing them all
    would count the same pages several times.
    """
    keep: list[int] = []
    for pid in pids:
        if not any(same_mm(pid, other) for other in keep):
            keep.append(pid)
    return keep


def sum_smaps(pids: list[int]) -> dict[str, int]:
    """Pss (split into anon / file / shmem) and Rss summed over distinct address spaces."""
    total = dict.fromkeys(SMAPS_KEYS, 0)
    for pid in address_spaces(pids):
        rollup = smaps_rollup(pid)
        for key in total:
            total[key] += rollup.get(key, 0)
    return total


def measure_memory(kernel: Kernel) -> dict[str, Any]:
    """The kernel's PSS and RSS (`pss`, `rss`, `smaps`: the split, `pids`: whose).

    The local kernel: its process tree. A sandbox: every process in its cgroup, plus
    `cgroup_usage` (bytes charged to the cgroup) and `cgroup_stat` (its memory.stat),
    and `outside_pss` (with their `outside_names`): the PSS of the processes of the
    sandbox's host process tree that are not in its cgroup (gVisor's `runsc run`, which
    stays in the server's), not counted in `pss`.
    """
    provisioner = kernel.km.provisioner
    if kernel.kind.backend is None:
        pids = process_tree(provisioner.pid)
        mem = sum_smaps(pids)
        return {"pss": mem["Pss"], "rss": mem["Rss"], "smaps": mem, "pids": pids}
    cgroup = cgroups.find(kernel.sandbox_id)
    pids = cgroups.procs(cgroup)
    outside = [pid for pid in process_tree(provisioner.sandbox.process.pid) if pid not in pids]
    names = []
    for pid in outside:
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    mem = sum_smaps(pids)
    return {
        "pss": mem["Pss"],
        "rss": mem["Rss"],
        "smaps": mem,
        "pids": pids,
        "address_spaces": address_spaces(pids),
        "cgroup": cgroup,
        "cgroup_usage": cgroups.memory_usage(cgroup),
        "cgroup_stat": cgroups.memory_stat(cgroup),
        "outside_pids": outside,
        "outside_names": names,
        "outside_pss": sum_smaps(outside)["Pss"],
    }
