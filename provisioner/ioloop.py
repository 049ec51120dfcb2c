"""One background event loop per process that carries every tunnel.

The tunnels must keep moving bytes whether or not the caller's loop is running:
a blocking `KernelManager` (nbclient, papermill, scripts) only runs its loop
inside each call. Running the host ends on their own thread also keeps an
output flood off the Jupyter server's main loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


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
