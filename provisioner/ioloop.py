"""One background event loop per process that carries every tunnel.

The tunnels must keep moving bytes whether or not the caller's loop is running:
a blocking `KernelManager` (nbclient, papermill, scripts) only runs its loop
inside each call. Running the host ends on their own thread also keeps an
output flood off the Jupyter server's main loop.

A forked child (a `ProcessPoolExecutor` running notebooks, papermill workers)
inherits the loop object but not its thread: it starts its own loop on first
use. The parent's loop is kept there, never closed nor collected: its selector
is the same epoll instance as the parent's, and closing the loop unregisters its
wake-up socket from it, which would take it away from the parent too.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_parents_loops: list[asyncio.AbstractEventLoop] = []
"""In a forked child, the loops it inherited (see above)."""


def io_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="sandbox-io", daemon=True).start()
            _loop = loop
        return _loop


async def run_on_io(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the shared loop and await its result from any loop."""
    loop = io_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


async def in_thread(func: Callable[..., T], *args: Any) -> T:
    """Run blocking `func(*args)` on a thread of the shared loop's executor, from any loop.

    Not on the caller's loop's own executor: a caller's loop may come from a fork
    (jupyter_core keeps one loop per thread, which the workers of a forked process
    pool inherit), and its executor then counts threads that did not survive the
    fork: work queued there never runs.
    """
    return await run_on_io(asyncio.to_thread(func, *args))


def _forget_parents_loop() -> None:
    """After fork, in the child: the loop's thread and any holder of the lock are gone."""
    global _lock, _loop
    _lock = threading.Lock()
    if _loop is not None:
        _parents_loops.append(_loop)
    _loop = None


os.register_at_fork(after_in_child=_forget_parents_loop)
