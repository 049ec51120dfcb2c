"""Per-user quotas across kernels: how many at once, and how much memory in all.

A start is admitted under the user's lock, shared by every server process on
the host, by counting the records of the user's live sandboxes; the new record
is saved before the lock is let go, so two servers of one user cannot both take
the last slot. Memory is counted by what the kernels may use (their memory
limits), and the user's cgroup, above all of them, is capped at the quota too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import cgroups
from .errors import QuotaError
from .limits import format_size
from .state import Record, records, runtime_dir


@dataclass(frozen=True)
class Quota:
    max_kernels: int | None = None
    max_memory: int | None = None
    """Bytes, the sum of the memory limits of the user's kernels."""
    rule: str = "the sandbox policy"
    """Where the quota comes from, for messages."""


@contextlib.contextmanager
def user_lock(user: str) -> Iterator[None]:
    """Hold `user`'s lock; blocks, so call it from a worker thread."""
    folder = runtime_dir() / "users"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = cgroups.user_cgroup(user).rsplit("/", 1)[1]
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def admit(record: Record, quota: Quota, log: logging.Logger) -> None:
    """Save `record` if its user's quotas have room for it, else raise QuotaError naming one."""
    user = record.user
    with user_lock(user):
        try:  # the cap follows the policy at once, whether or not this start is admitted
            cgroups.set_memory_limit(cgroups.user_cgroup(user), quota.max_memory)
        except OSError as e:  # e.g. the kernels running now use more than a lowered quota
            log.warning("could not set %s's memory quota on its cgroup: %s", user, e)
        live = [
            r
            for r in records()
            if r.user == user and r.sandbox_id != record.sandbox_id and r.owner_alive()
        ]
        check(user, [r.memory for r in live], record.memory, quota)
        record.save()


def check(user: str, held: list[int], memory: int, quota: Quota) -> None:
    """QuotaError naming the quota if `user`, whose running kernels hold `held` bytes of
    memory each, may not start one more of `memory` bytes. Where the kernels are counted
    is the caller's: host records (`admit`) or a cluster's pods (kubernetes/service.py)."""
    if quota.max_kernels is not None and len(held) >= quota.max_kernels:
        raise QuotaError(
            f"kernel quota: {user} already runs {len(held)} of at most "
            f"{quota.max_kernels} sandboxed kernels (max_kernels in {quota.rule}); "
            "shut one down to start another"
        )
    if quota.max_memory is not None and sum(held) + memory > quota.max_memory:
        raise QuotaError(
            f"memory quota: {user}'s {len(held)} running kernels hold "
            f"{format_size(sum(held))} of at most {format_size(quota.max_memory)} "
            f"(max_memory in {quota.rule}), and this kernel's memory_limit is "
            f"{format_size(memory)}; shut a kernel down or ask for less"
        )


def release(user: str) -> None:
    """Remove the user's cgroup once none of the user's sandboxes is left in it."""
    with user_lock(user):
        cgroups.remove_if_empty(cgroups.user_cgroup(user))
