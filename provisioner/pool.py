"""Warm pools: sandboxes started before a kernel asks, claimed in milliseconds.

Most of a gVisor kernel's start is the sandbox's: runsc boots the Sentry and the
agent's Python starts. None of that depends on the kernel: only on the sandbox's
*shape* (`Shape`: its image, limits, network and backend settings). What does
depend on the kernel (its id, its user's quota and cgroup, its folders)
comes with the claim (`Sandbox.claim`). So this process keeps, per shape in use,
`pool_size` sandboxes started and waiting; `make_sandbox` takes one if it can and
refills the pool once its kernel has started.

Rules, and why:
- A start never waits for the pool: `take` returns a ready sandbox or none at once,
  and refills start only after the kernel that asked has its sandbox.
- Waiting sandboxes belong to no user: their cgroup is the pool's (`cgroups.POOL`),
  one for the host, capped at `pool_memory` and given a small share of contended CPU
  (`CPU_SHARES`), and a refill that would not fit is not started. A claimed one moves
  under its user's cgroup and is counted in its user's quota from then on, as a fresh
  one is.
- A shape's sandboxes beyond `pool_min` go once it has had no claim for
  `pool_idle_timeout` seconds; `drain` removes all (at the process's end, a
  test's). A sandbox that ended while waiting is removed, never handed out.

Each waiting sandbox is recorded like any other (kernel "", user ""), so `ps` shows
it and `gc` reaps it if this process dies. Runs on the I/O loop (`ioloop.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.util
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import cgroups
from .backends.base import Backend, Channel, Sandbox, SandboxSpec
from .limits import parse_size
from .settings import POOL

REFILL_AFTER = 3.0
"""Seconds between a claim (or a cold start) and the refill it calls for: the kernel that
asked is starting its Python meanwhile, the CPU-heavy part of its start, and a sandbox
booting beside it on a small host would slow it down."""
DRAIN_TIMEOUT = 30.0
"""Seconds the pool gets to remove its sandboxes when the process exits."""
SETTLE = 10.0
"""Seconds after its start when a waiting sandbox's memory is measured."""
IDLE_ESTIMATE = 160 << 20
"""Bytes a waiting sandbox is taken to use until one of its shape was measured."""
CPU_SHARES = 128
"""The pool's cgroup's share of contended CPU, against 1024 for each user's: a sandbox that
boots for the pool yields the CPU to the kernels people are using (`cgroups.set_cpu_shares`);
a claimed one moves under its user's cgroup, out of this."""
EXPIRE_EVERY = 30.0
"""Seconds between looks for shapes whose pool has been idle too long."""


@dataclass(frozen=True)
class Shape:
    """What a sandbox needs to start, known before its kernel: sandboxes of one shape
    are interchangeable until claimed."""

    backend: str
    spec: SandboxSpec
    """The spec with everything of a kernel left out (`shape_of`)."""
    settings: tuple[tuple[str, Any], ...]
    """The backend's own settings (runsc_path, platform...), by name."""


def shape_of(backend: Backend, spec: SandboxSpec, granted: Mapping[str, Any]) -> Shape:
    """The shape of `spec`'s sandbox under `granted` settings. The kernel's uid and gid
    (`owner`) are part of it: the warm kernel process runs as them from its start, so that
    the image's code never runs as root before the claim; a user's second kernel and its
    restarts are warm, another user's first is not."""
    ahead = replace(spec, sandbox_id="", kernel_id="", mounts=(), user="")
    own = tuple(sorted((s.name, granted[s.name]) for s in backend.settings if s not in POOL))
    return Shape(backend=backend.name, spec=ahead, settings=own)


@dataclass(frozen=True)
class Sizing:
    """How many sandboxes of a shape to keep, as the settings of its last start said."""

    size: int
    minimum: int
    idle_timeout: float
    budget: int

    @classmethod
    def of(cls, granted: Mapping[str, Any]) -> Sizing:
        return cls(
            size=int(granted.get("pool_size", 0)),
            minimum=min(int(granted.get("pool_min", 0)), int(granted.get("pool_size", 0))),
            idle_timeout=float(granted.get("pool_idle_timeout", 0.0)),
            budget=parse_size(granted.get("pool_memory", "0")),
        )


@dataclass
class Waiting:
    """A started, unclaimed sandbox and its channel (not attached to any tunnel yet)."""

    sandbox: Sandbox
    channel: Channel


@dataclass
class _ShapePool:
    backend: Backend
    settings: Mapping[str, Any]
    sizing: Sizing
    waiting: list[Waiting] = field(default_factory=list)
    starting: int = 0
    last_claim: float = field(default_factory=time.monotonic)


class WarmPool:
    """This process's warm sandboxes, by shape. I/O loop only."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.shapes: dict[Shape, _ShapePool] = {}
        self.idle_usage: dict[Shape, int] = {}
        """Bytes one waiting sandbox of each shape was measured to use."""
        self.tasks: set[asyncio.Task] = set()
        self.measuring: set[asyncio.Task] = set()
        """The `_measure` tasks among `tasks`: a drain cancels them (each waits `SETTLE`)."""
        self.pending: set[asyncio.TimerHandle] = set()
        """Refills not begun yet (`refill_later`)."""
        self.expiry: asyncio.TimerHandle | None = None
        self.closed = False
        """Set by `drain`: no refill starts after it."""

    def take(self, shape: Shape) -> Waiting | None:
        """A started sandbox of `shape`, now no longer the pool's; None (at once) if there
        is none. A waiting one that ended meanwhile is removed, never handed out."""
        pool = self.shapes.get(shape)
        if pool is None:
            return None
        pool.last_claim = time.monotonic()
        while pool.waiting:
            waiting = pool.waiting.pop(0)
            if waiting.sandbox.poll() is None:
                return waiting
            self.log.warning("warm sandbox %s ended while waiting; removed",
                             waiting.sandbox.record.sandbox_id)  # fmt: skip
            self._spawn(self._discard(waiting))
        return None

    def give_back(self, shape: Shape, waiting: Waiting) -> None:
        """Put back a sandbox `take` gave that was not claimed after all (its user's quota
        refused the kernel): it never held anything of a kernel."""
        pool = self.shapes.get(shape)
        if pool is None or waiting.sandbox.poll() is not None:
            self._spawn(self._discard(waiting))
            return
        pool.waiting.append(waiting)

    def refill_later(self, shape: Shape, backend: Backend, settings: Mapping[str, Any]) -> None:
        """`refill` in `REFILL_AFTER` seconds."""

        def refill() -> None:
            self.pending.discard(handle)
            self.refill(shape, backend, settings)

        handle = asyncio.get_running_loop().call_later(REFILL_AFTER, refill)
        self.pending.add(handle)

    def refill(self, shape: Shape, backend: Backend, settings: Mapping[str, Any]) -> None:
        """Start sandboxes of `shape` in the background until `pool_size` of them wait (as
        far as `pool_memory` allows); `settings` are a start's granted settings, with
        which the pool's are made. Call it once the kernel that asked has its sandbox.
        Nothing once the pool was drained (the process is ending)."""
        if self.closed:
            return
        sizing = Sizing.of(settings)
        pool = self.shapes.get(shape)
        if pool is None:
            if sizing.size == 0:
                return
            pool = self.shapes[shape] = _ShapePool(backend, settings, sizing)
        pool.settings, pool.sizing = settings, sizing
        self._schedule_expiry()
        while len(pool.waiting) + pool.starting < sizing.size:
            if not self._fits(shape, sizing):
                if self._evict_for(pool):  # then try again once its memory is free
                    self.refill_later(shape, backend, settings)
                break
            pool.starting += 1
            self._spawn(self._start_one(shape, pool))

    def _evict_for(self, wanted: _ShapePool) -> bool:
        """Remove one waiting sandbox of the shape claimed least recently, if that was
        longer ago than `wanted`'s last claim: a shape in use takes the budget from one
        that is not (a user who left at noon, from the class that came at two). Whether
        one is being removed."""
        idle = [p for p in self.shapes.values()
                if p is not wanted and p.waiting and p.last_claim < wanted.last_claim]  # fmt: skip
        if not idle:
            return False
        oldest = min(idle, key=lambda p: p.last_claim)
        self._spawn(self._discard(oldest.waiting.pop()))
        return True

    def _fits(self, shape: Shape, sizing: Sizing) -> bool:
        """Whether one more waiting sandbox of `shape` fits in `pool_memory` with all the
        others: this process's (those starting counted at their estimate), and those of
        every server and service of the host, which share the pool's cgroup and are
        counted by what it is charged."""
        own = starting = 0
        for other, pool in self.shapes.items():
            each = self.idle_usage.get(other, IDLE_ESTIMATE)
            own += (len(pool.waiting) + pool.starting) * each
            starting += pool.starting * each
        host = (cgroups.memory_usage(cgroups.POOL) or 0) + starting
        return max(own, host) + self.idle_usage.get(shape, IDLE_ESTIMATE) <= sizing.budget

    async def _start_one(self, shape: Shape, pool: _ShapePool) -> None:
        sandbox = None
        try:
            await asyncio.to_thread(
                cgroups.set_memory_limit, cgroups.POOL, pool.sizing.budget or None
            )
            await asyncio.to_thread(cgroups.set_cpu_shares, cgroups.POOL, CPU_SHARES)
            spec = replace(shape.spec, sandbox_id=f"jsb-pool-{uuid.uuid4().hex[:12]}")
            sandbox = await pool.backend.create(spec, pool.settings, self.log)
            channel = await sandbox.start()
        except BaseException as e:
            if not isinstance(e, Exception | asyncio.CancelledError):
                raise
            if isinstance(e, Exception):
                self.log.warning("could not start a warm sandbox: %s", e)
            if sandbox is not None:  # not cancelled itself: whatever was made goes
                await asyncio.shield(self._destroy(sandbox))
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        finally:
            pool.starting -= 1
        if self.shapes.get(shape) is not pool:  # drained meanwhile
            await self._discard(Waiting(sandbox, channel))
            return
        pool.waiting.append(Waiting(sandbox, channel))
        self.log.info("warm sandbox %s ready", sandbox.record.sandbox_id)
        task = self._spawn(self._measure(shape, sandbox))
        self.measuring.add(task)
        task.add_done_callback(self.measuring.discard)

    async def _measure(self, shape: Shape, sandbox: Sandbox) -> None:
        """Learn what a waiting sandbox of `shape` uses, once it has settled (booted, its
        kernel process past its imports: a few seconds)."""
        await asyncio.sleep(SETTLE)
        usage = sandbox.memory_usage()
        if usage is not None and sandbox.poll() is None and not sandbox.record.kernel_id:
            self.idle_usage[shape] = max(usage, self.idle_usage.get(shape, 0))

    def _schedule_expiry(self) -> None:
        if self.expiry is None:
            loop = asyncio.get_running_loop()
            self.expiry = loop.call_later(EXPIRE_EVERY, self._expire)

    def _expire(self) -> None:
        """Remove the waiting sandboxes that ended (replaced), and those beyond `pool_min`
        of shapes idle too long."""
        self.expiry = None
        now = time.monotonic()
        for shape, pool in list(self.shapes.items()):
            for waiting in [w for w in pool.waiting if w.sandbox.poll() is not None]:
                pool.waiting.remove(waiting)  # ended while waiting: gone, and refilled
                self._spawn(self._discard(waiting))
                self.refill_later(shape, pool.backend, pool.settings)
            if now - pool.last_claim < pool.sizing.idle_timeout:
                continue
            while len(pool.waiting) > pool.sizing.minimum:
                self._spawn(self._discard(pool.waiting.pop()))
            if not pool.waiting and not pool.starting and pool.sizing.minimum == 0:
                del self.shapes[shape]
        if self.shapes:
            self._schedule_expiry()

    async def drain(self) -> None:
        """Remove every waiting sandbox, and those still starting once they have; the pool
        makes no new ones after this (`reopen` lets it again: a test's next pool)."""
        self.closed = True
        shapes, self.shapes = self.shapes, {}
        for handle in self.pending:
            handle.cancel()
        self.pending.clear()
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        for task in self.measuring:
            task.cancel()
        await asyncio.gather(*(self._discard(w) for pool in shapes.values() for w in pool.waiting))
        while self.tasks:
            await asyncio.wait(list(self.tasks))

    def reopen(self) -> None:
        """Let a drained pool refill again."""
        self.closed = False

    def waiting(self) -> list[Sandbox]:
        """Every sandbox waiting in the pool now."""
        return [w.sandbox for pool in self.shapes.values() for w in pool.waiting]

    async def _discard(self, waiting: Waiting) -> None:
        waiting.channel.close()
        await self._destroy(waiting.sandbox)

    async def _destroy(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.destroy()
        except Exception:
            self.log.exception("could not remove warm sandbox %s", sandbox.record.sandbox_id)

    def _spawn(self, work: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


_pools: dict[int, WarmPool] = {}


def warm_pool(log: logging.Logger) -> WarmPool:
    """The pool of the running loop: this process's, on its I/O loop (`ioloop.py`), where
    every sandbox is made; a forked child's loop gets a pool of its own."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(id(loop))
    if pool is None:
        pool = _pools[id(loop)] = WarmPool(log)
        # Before the interpreter's shutdown, not at its atexit: by then concurrent.futures
        # refuses new work (its own exit hook, registered the same way, ran), and removing a
        # sandbox needs the loop's threads. Called in reverse: this one runs before that.
        threading._register_atexit(_drain_at_exit, pool, loop, os.getpid())
        # A multiprocessing child (a forked papermill or grading worker) ends with
        # os._exit, past atexit: its exit function runs these finalizers instead.
        multiprocessing.util.Finalize(pool, _drain_at_exit, args=(pool, loop, os.getpid()),
                                      exitpriority=0)  # fmt: skip
    return pool


def _drain_at_exit(pool: WarmPool, loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """At the process's end, remove the pool's sandboxes, if its loop still runs (the I/O
    loop's thread does until the interpreter goes; a loop that ended drained its pool
    itself, as the sandbox service does, or left it to `gc`). Not in a child forked from
    the pool's process (`pid`), which inherits the handler and a copy of the loop whose
    thread it does not have."""
    if os.getpid() != pid or loop.is_closed() or not loop.is_running():
        return
    future = asyncio.run_coroutine_threadsafe(pool.drain(), loop)
    with contextlib.suppress(Exception):
        future.result(DRAIN_TIMEOUT)
