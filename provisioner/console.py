"""What a sandbox prints outside the tunnel (runtime messages, the kernel's raw stderr).

Read on the I/O loop into the provisioner's log, with bounds: a hostile kernel
can print without end, so lines are cut, the rate is capped, and only a short
tail is kept for error messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque

MAX_LINE = 2000
LINES_PER_SECOND = 50


class Console(asyncio.Protocol):
    def __init__(self, log: logging.Logger, name: str, tail_lines: int = 30) -> None:
        self.log = log
        self.name = name
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._partial = b""
        self._window_start = 0.0
        self._in_window = 0
        self._dropped = 0
        self.closed = asyncio.get_running_loop().create_future()

    async def attach(self, fd: int) -> None:
        """Read `fd` from now on; it is the console's to close, even if this fails."""
        pipe = os.fdopen(fd, "rb", buffering=0)
        try:
            await asyncio.get_running_loop().connect_read_pipe(lambda: self, pipe)
        except BaseException:
            pipe.close()
            raise

    def data_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-MAX_LINE:]
        for line in lines:
            self._line(line[:MAX_LINE].decode("utf-8", "replace").rstrip())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._line(self._partial.decode("utf-8", "replace"))
        if self._dropped:
            self.log.info("sandbox %s: %d more lines not logged", self.name, self._dropped)
        if not self.closed.done():
            self.closed.set_result(None)

    def _line(self, text: str) -> None:
        if not text:
            return
        self.tail.append(text)
        now = asyncio.get_running_loop().time()
        if now - self._window_start > 1.0:
            if self._dropped:
                self.log.info("sandbox %s: %d lines not logged", self.name, self._dropped)
            self._window_start, self._in_window, self._dropped = now, 0, 0
        self._in_window += 1
        if self._in_window <= LINES_PER_SECOND:
            self.log.info("sandbox %s: %s", self.name, text)
        else:
            self._dropped += 1

    def tail_text(self) -> str:
        return "\n".join(self.tail)
