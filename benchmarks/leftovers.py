"""The check, at the end of a run, that none of its sandboxes is left on the host.

Every sandbox id the run made is looked for as a runsc container, as a cgroup
(`cgroups.find`) and as a process started with QEMU's `-name <sandbox id>,...`,
whichever backend made it: the check does not trust the backends' own bookkeeping.
Whatever is found is force-removed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from provisioner import cgroups, hostcmd
from provisioner.backends.gvisor import runsc_root

log = logging.getLogger("benchmark")
QEMU_GONE_TIMEOUT = 5.0
"""Seconds SIGKILLed QEMU processes get to be gone before their cgroup is removed."""


def runsc_containers() -> set[str]:
    """The containers runsc knows under this project's state root."""
    runsc = shutil.which("runsc")
    if runsc is None or not runsc_root().is_dir():
        return set()
    listed = hostcmd.run([runsc, f"--root={runsc_root()}", "list", "--quiet"], "runsc list")
    return set(listed.split())


def qemu_processes(sandbox_ids: set[str]) -> dict[str, list[int]]:
    """sandbox id -> pids of processes started with `-name <sandbox id>,...` (a microVM's
    QEMU, or the shell and setpriv that become it), from /proc/*/cmdline."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            sid = value.split(",", 1)[0]
            if flag == "-name" and sid in sandbox_ids:
                found.setdefault(sid, []).append(int(entry.name))
    return found


def check(sandbox_ids: set[str]) -> list[str]:
    """Those of `sandbox_ids` still known to runsc, still owning a cgroup or still with a
    QEMU process, each force-removed. Returns `<sandbox id> (what was left)` for each."""
    containers = runsc_containers()
    qemus = qemu_processes(sandbox_ids)
    left = []
    for sid in sorted(sandbox_ids):
        what = []
        if sid in containers:
            what.append("runsc container")
        if cgroups.find(sid):
            what.append("cgroup")
        if sid in qemus:
            what.append(f"QEMU pids {qemus[sid]}")
        if not what:
            continue
        left.append(f"{sid} ({', '.join(what)})")
        if sid in containers:
            hostcmd.quietly(["runsc", f"--root={runsc_root()}", "delete", "--force", sid], log)
        for pid in qemus.get(sid, []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + QEMU_GONE_TIMEOUT
        while sid in qemu_processes({sid}) and time.monotonic() < deadline:
            time.sleep(0.05)
        cgroup = cgroups.find(sid)
        if cgroup:
            cgroups.remove(cgroup)
    return left
