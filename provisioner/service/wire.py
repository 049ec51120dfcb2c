"""The service's wire: one JSON object per datagram on a Unix SOCK_SEQPACKET socket.

SEQPACKET keeps every message whole (there is no framing to get wrong) and
carries file descriptors: the service hands each caller its sandbox's channel
(SCM_RIGHTS). Both ends are bounded: a message is at most MAX_MESSAGE bytes
and carries at most MAX_FDS descriptors, and only the service sends any (the
service reads with no room for them, so the kernel drops a caller's).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

MAX_MESSAGE = 64 * 1024
MAX_FDS = 3


class WireError(ValueError):
    """A message that is not one JSON object of at most MAX_MESSAGE bytes."""


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Connection:
    """One end of a connection, used from one asyncio loop: one reader, any number of senders."""

    def __init__(self, sock: socket.socket, accept_fds: bool) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.accept_fds = accept_fds
        self.loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self._waiters: set[asyncio.Future] = set()

    async def _ready(self, add: Callable, remove: Callable) -> None:
        if self.sock.fileno() < 0:
            raise EOFError
        fd = self.sock.fileno()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        add(fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if self.sock.fileno() == fd:  # else close() removed it (and the number may be reused)
                remove(fd)

    async def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors it carried (the caller's to close).

        Raises EOFError once the peer is gone, WireError for a message that is not
        valid (it is consumed: the connection stays usable).
        """
        loop = asyncio.get_running_loop()
        room = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize) if self.accept_fds else 0
        while True:
            try:
                # close-on-exec at once: no child of the server may inherit a channel
                data, ancillary, flags, _ = self.sock.recvmsg(
                    MAX_MESSAGE + 1, room, socket.MSG_CMSG_CLOEXEC
                )
                break
            except (BlockingIOError, InterruptedError):
                await self._ready(loop.add_reader, loop.remove_reader)
            except ConnectionResetError:
                raise EOFError from None
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % array.array("i").itemsize
                fds.extend(array.array("i", payload[:usable]))
        if not data and not fds:
            raise EOFError
        try:
            if len(data) > MAX_MESSAGE or flags & socket.MSG_TRUNC:
                raise WireError(f"message longer than {MAX_MESSAGE} bytes")
            if flags & socket.MSG_CTRUNC:
                raise WireError("descriptors are not accepted here" if not room else
                                f"more than {MAX_FDS} descriptors")  # fmt: skip
            try:
                message = json.loads(data)
            except (ValueError, RecursionError):
                raise WireError("message is not JSON") from None
            if not isinstance(message, dict):
                raise WireError("message is not a JSON object")
        except WireError:
            close_fds(fds)
            raise
        return message, fds

    async def send(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Send one message (and descriptors, which stay the sender's to close)."""
        data = json.dumps(message).encode()
        if len(data) > MAX_MESSAGE or len(fds) > MAX_FDS:
            raise WireError(f"message longer than {MAX_MESSAGE} bytes, or too many descriptors")
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        loop = asyncio.get_running_loop()
        async with self._send_lock:
            while True:
                try:
                    self.sock.sendmsg([data], ancillary)
                    return
                except (BlockingIOError, InterruptedError):
                    await self._ready(loop.add_writer, loop.remove_writer)

    def close(self) -> None:
        """Close; whoever waits to read or send gets EOFError."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(EOFError())
