"""Reaping sandboxes left behind by a server that died: `jupyter sandbox gc`.

A sandbox normally ends with its server (the agent exits when its channel
closes), but its container state, cgroup and bundle stay until reaped. The
provisioner reaps stale ones once per process before its first launch.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

from . import backends, cgroups
from .backends import base
from .images.install import collect_leftovers
from .network import gc as network_gc
from .network import host as network_host
from .state import Record, records, sandboxes_dir

UNRECORDED_GRACE = 60.0
"""Seconds a sandbox folder may exist without its record before gc takes it."""
_once = threading.Lock()
_done = False


def reap(record: Record, log: logging.Logger) -> None:
    """Remove everything of a recorded sandbox, whichever backend made it; a sandbox whose
    backend is not known (no record, or a backend no longer installed) is reaped by every
    backend (each `remove_runtime` is harmless for a sandbox it does not know)."""
    found = backends.BACKENDS.get(record.backend)
    base.reap(record, log, (found,) if found is not None else backends.registered())
    log.info("reaped sandbox %s of kernel %s", record.sandbox_id, record.kernel_id)


def _unrecorded(sandbox_id: str) -> Record:
    names = network_host.names(sandbox_id)  # removing what does not exist is harmless
    return Record(
        sandbox_id=sandbox_id,
        kernel_id="?",
        backend="",  # not known: every backend removes what it may have of it
        cgroup=cgroups.find(sandbox_id),
        netns=names.netns,
        veth=names.veth,
        nft_table=names.table,
    )


def collect(log: logging.Logger, include_live: bool = False) -> list[str]:
    """Reap every sandbox whose owning server is gone (or every one, if include_live), but
    those of a sandbox service that is gone: its next start adopts them."""
    reaped = []
    known = set()
    for record in records():
        known.add(record.sandbox_id)
        # The sandbox service's (uid set) wait for its next start to adopt them.
        if include_live or (record.uid is None and not record.owner_alive()):
            reap(record, log)
            reaped.append(record.sandbox_id)
    # Folders without a readable record (past the moment a starting sandbox writes
    # its record), then containers without a folder.
    if sandboxes_dir().is_dir():
        for folder in sandboxes_dir().iterdir():
            if folder.name not in known and time.time() - folder.stat().st_mtime > UNRECORDED_GRACE:
                reap(_unrecorded(folder.name), log)
                reaped.append(folder.name)
    for backend in backends.registered():
        for sandbox_id in backend.orphans(known | set(reaped)):
            reap(_unrecorded(sandbox_id), log)
            reaped.append(sandbox_id)
    # Network namespaces, links and tables of no recorded sandbox. Listed before the
    # records are read again: a starting sandbox records itself before making any.
    objects = network_gc.host_objects()
    orphans = objects.without(records())
    if orphans:
        log.info("removing network objects of no sandbox: %s", orphans)
        network_gc.remove_objects(orphans, log)
    try:  # and what interrupted image builds left; never at the cost of the rest
        collect_leftovers(log)
    except Exception:
        log.exception("could not remove what interrupted image builds left")
    return reaped


def _new_lock_in_child() -> None:
    """After fork: a parent's thread may have held the lock (mid-collect)."""
    global _once
    _once = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


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
