"""Reaping sandboxes left behind by a server that died: `jupyter sandbox gc`.

A sandbox normally ends with its server (the agent exits when its channel
closes), but its container state, cgroup and bundle stay until reaped. The
provisioner reaps stale ones once per process before its first launch.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading

from . import cgroups
from .backends.gvisor import runsc_root
from .state import Record, records, sandboxes_dir

_once = threading.Lock()
_done = False


def _runsc(*args: str) -> subprocess.CompletedProcess:
    runsc = shutil.which("runsc") or "runsc"
    return subprocess.run(
        [runsc, f"--root={runsc_root()}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def reap(record: Record, log: logging.Logger) -> None:
    """Remove one sandbox's container, cgroup and bundle, whatever state it is in."""
    if record.backend == "gvisor" and runsc_root().is_dir():
        result = _runsc("delete", "--force", record.sandbox_id)
        if result.returncode and "does not exist" not in result.stderr + result.stdout:
            log.warning("runsc delete %s: %s", record.sandbox_id, result.stderr.strip())
    cgroups.remove(record.cgroup)
    record.remove()
    log.info("reaped sandbox %s of kernel %s", record.sandbox_id, record.kernel_id)


def collect(log: logging.Logger, include_live: bool = False) -> list[str]:
    """Reap every sandbox whose owning server is gone (or every one, if include_live)."""
    reaped = []
    known = set()
    for record in records():
        known.add(record.sandbox_id)
        if include_live or not record.owner_alive():
            reap(record, log)
            reaped.append(record.sandbox_id)
    # Folders without a readable record, and containers without a folder.
    if sandboxes_dir().is_dir():
        for folder in sandboxes_dir().iterdir():
            if folder.name not in known:
                reap(
                    Record(
                        sandbox_id=folder.name,
                        kernel_id="?",
                        backend="gvisor",
                        cgroup=f"/jupyter-sandbox/{folder.name}",
                    ),
                    log,
                )
                reaped.append(folder.name)
    if runsc_root().is_dir() and shutil.which("runsc"):
        listing = _runsc("list", "--quiet")
        for sandbox_id in listing.stdout.split():
            if sandbox_id.startswith("jsb-") and sandbox_id not in known | set(reaped):
                reap(
                    Record(
                        sandbox_id=sandbox_id,
                        kernel_id="?",
                        backend="gvisor",
                        cgroup=f"/jupyter-sandbox/{sandbox_id}",
                    ),
                    log,
                )
                reaped.append(sandbox_id)
    return reaped


def collect_stale_once(log: logging.Logger) -> None:
    """Run `collect` the first time a kernel starts in this process."""
    global _done
    with _once:
        if not _done:
            _done = True
            try:
                collect(log)
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("could not reap stale sandboxes: %s", e)
