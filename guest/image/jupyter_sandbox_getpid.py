"""Imported at every start of the guest venv's Python (a .pth file names it).

Under gVisor getpid() is a real round trip to the sandbox's kernel, and
ipykernel calls it for every write to stdout (to tell a forked child's output
from its own): 50,000 calls for a 50 MB print. The pid only changes across a
fork, so cache it and refresh the cache in the child of every fork.
"""

import os

_getpid = os.getpid
_pid = _getpid()


def _refresh() -> None:
    global _pid
    _pid = _getpid()


def _cached_getpid() -> int:
    return _pid


os.register_at_fork(after_in_child=_refresh)
os.getpid = _cached_getpid
