"""A provisioner's side of the sandbox service: one connection per server process.

The service makes the sandbox and hands over its channel; the tunnel runs
here as it does in-process. If the connection drops (the service restarts),
this side connects again and attaches its sandboxes before the service's
grace period ends: the kernels never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from typing import Any

from .. import settings
from ..backends.base import Channel, PipeChannel, Sandbox
from ..errors import KINDS, Error, SandboxError, ServiceError
from ..request import Made, SandboxRequest
from ..settings import USER_SETTINGS
from ..state import Record
from .wire import Connection, WireError, close_fds

RECONNECT_INTERVAL = 0.5
CALL_TIMEOUT = 120.0
"""Seconds the service may take to answer (a create starts a sandbox)."""


class RemoteSandbox(Sandbox):
    """A sandbox the service made: its channel is here; the rest is asked of the service.

    Memory and CPU are read from the sandbox's cgroup, as in-process (cgroup v2
    lets anyone read them); the exit status comes from the service's events.
    """

    def __init__(self, client: ServiceClient, record: Record, log: logging.Logger) -> None:
        self.client = client
        self.record = record
        self.log = log
        self.process = None
        self.network = None
        self.status: int | None = None

    async def start(self) -> Channel:
        """The service started it: `ServiceClient.create` hands its channel on (`Made`)."""
        raise SandboxError(f"sandbox {self.record.sandbox_id} was started by the service")

    def poll(self) -> int | None:
        return self.status

    async def kill(self) -> None:
        if self.status is None:
            await self.client.call("kill", sandbox_id=self.record.sandbox_id)

    async def destroy(self) -> None:
        try:
            await self.client.call("destroy", sandbox_id=self.record.sandbox_id)
        finally:
            self.client.sandboxes.pop(self.record.sandbox_id, None)


class ServiceClient:
    """The connection to the service at `path`. Use it on the shared I/O loop only."""

    def __init__(self, path: str, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.conn: Connection | None = None
        self.sandboxes: dict[str, RemoteSandbox] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._connecting = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self) -> Connection:
        async with self._connecting:
            if self.conn is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                try:
                    sock.setblocking(False)
                    await asyncio.get_running_loop().sock_connect(sock, self.path)
                except OSError as e:
                    sock.close()
                    raise ServiceError(
                        f"cannot reach the sandbox service at {self.path}: {e.strerror or e}; "
                        "is `jupyter sandbox serve` running? (`jupyter sandbox doctor` checks)"
                    ) from None
                self.conn = Connection(sock, accept_fds=True)
                self._spawn(self._read(self.conn))
                if self.sandboxes:
                    self._spawn(self._attach())
            return self.conn

    async def call(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """Ask the service; its reply and the descriptors it carried (the caller's to close)."""
        conn = await self._connection()
        self._next_id += 1
        rid = self._next_id
        answer = asyncio.get_running_loop().create_future()
        self._pending[rid] = answer
        try:
            await conn.send({"id": rid, "op": op, **fields})
            reply, fds = await asyncio.wait_for(asyncio.shield(answer), CALL_TIMEOUT)
        except (OSError, EOFError) as e:
            raise ServiceError(f"the sandbox service at {self.path} went away: {e}") from None
        except asyncio.TimeoutError:
            raise ServiceError(
                f"the sandbox service at {self.path} did not answer {op} in {CALL_TIMEOUT:.0f} s"
            ) from None
        except asyncio.CancelledError:
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                self._unused(*answer.result())  # it came as we gave up: nobody will use it
            raise
        finally:
            self._pending.pop(rid, None)
            if not answer.done():
                answer.cancel()
        if not reply.get("ok"):
            close_fds(fds)
            raise KINDS.get(reply.get("kind", ""), ServiceError)(
                str(reply.get("error", "the sandbox service refused"))
            )
        return reply, fds

    async def _read(self, conn: Connection) -> None:
        try:
            while True:
                try:
                    message, fds = await conn.recv()
                except WireError as e:
                    self.log.warning("sandbox service: %s", e)
                    continue
                answer = self._pending.get(message.get("id"))  # type: ignore[arg-type]
                if answer is not None and not answer.done():
                    answer.set_result((message, fds))
                    continue
                self._unused(message, fds)
                if message.get("event") == "exited":
                    sandbox = self.sandboxes.get(message.get("sandbox_id"))  # type: ignore[arg-type]
                    status = message.get("status")
                    if sandbox is not None and type(status) is int:
                        sandbox.status = status
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            if self.conn is conn:
                self.conn = None
            gone = ServiceError(f"the sandbox service at {self.path} closed the connection")
            for answer in list(self._pending.values()):
                if not answer.done():
                    answer.set_exception(gone)
            if self.sandboxes:
                self.log.warning("%s; connecting again to keep its sandboxes", gone)
                self._spawn(self._reconnect())

    def _unused(self, message: dict[str, Any], fds: list[int]) -> None:
        """A reply nobody waits for (its caller gave up): what it made goes at once."""
        close_fds(fds)
        made = message.get("sandbox_id") if message.get("ok") else None
        if isinstance(made, str) and made not in self.sandboxes:
            self._spawn(self._forget(made))

    async def _forget(self, sandbox_id: str) -> None:
        try:
            await self.call("destroy", sandbox_id=sandbox_id)
        except Error as e:  # any refusal: this runs as a task nobody awaits
            self.log.warning("could not destroy unused sandbox %s: %s", sandbox_id, e)

    async def _reconnect(self) -> None:
        """Connect again while there are sandboxes to keep (attaching them is `_connection`'s)."""
        while self.sandboxes and self.conn is None:
            with contextlib.suppress(ServiceError):
                await self._connection()
                return
            await asyncio.sleep(RECONNECT_INTERVAL)

    async def _attach(self) -> None:
        try:
            reply, _ = await self.call("attach", sandbox_ids=list(self.sandboxes))
        except Error as e:  # any refusal: this runs as a task nobody awaits
            self.log.warning("could not attach sandboxes to the sandbox service: %s", e)
            return
        for sandbox_id, status in reply.get("attached", {}).items():
            sandbox = self.sandboxes.get(sandbox_id)
            if sandbox is not None and type(status) is int:
                sandbox.status = status
        for sandbox_id in reply.get("unknown", []):
            sandbox = self.sandboxes.get(sandbox_id)
            if sandbox is not None:
                self.log.error("the sandbox service no longer has sandbox %s", sandbox_id)
                sandbox.status = -1
        attached = len(reply.get("attached", {}))
        self.log.info("attached %d sandboxes to the sandbox service", attached)

    async def create(self, request: SandboxRequest) -> Made:
        """Have the service make and start the sandbox of `request`, for this process's user
        as the service sees it and under the operator's policy; the settings in the answer
        are those granted. Only the settings a user may ask for are sent (`USER_SETTINGS`):
        of those, the ones asked for, and the image and workspace."""
        sent = {name for name in request.asked if name in USER_SETTINGS} | {"image", "workspace"}
        fields: dict[str, Any] = {
            "kernel_id": request.kernel_id,
            "kernel_name": request.kernel_name,
            "settings": {name: request.settings[name] for name in sorted(sent)},
            "cwd": request.cwd,
        }
        token = os.environ.get("JUPYTERHUB_API_TOKEN")
        if token and os.environ.get("JUPYTERHUB_USER"):
            fields["hub_token"] = token  # the service asks its own Hub who this token is
        reply, fds = await self.call("create", **fields)
        try:
            read_fd, write_fd, console_fd = fds
        except ValueError:
            close_fds(fds)
            raise ServiceError(f"the sandbox service sent {len(fds)} descriptors, not 3") from None
        made = reply.get("sandbox_id")
        try:
            record = Record(
                sandbox_id=str(reply["sandbox_id"]),
                kernel_id=request.kernel_id,
                backend=str(reply["backend"]),
                cgroup=str(reply["cgroup"]),
                user=str(reply["user"]),
            )
            unknown = set(reply["settings"]) - USER_SETTINGS
            if unknown:
                raise ValueError(f"settings {', '.join(sorted(unknown))} are no user's")
            granted = {
                name: settings.check(settings.BY_NAME[name], value)
                for name, value in reply["settings"].items()
            }
            cwd = reply.get("cwd", request.cwd)  # a service of an earlier version says none
            if not isinstance(cwd, str):
                raise TypeError("cwd is not a string")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            close_fds(fds)
            if isinstance(made, str):  # what it made is of no use: it goes at once
                self._spawn(self._forget(made))
            raise ServiceError(f"the sandbox service's answer is not valid: {e}") from None
        sandbox = RemoteSandbox(self, record, self.log)
        self.sandboxes[record.sandbox_id] = sandbox
        return Made(
            sandbox=sandbox,
            channel=PipeChannel(read_fd, write_fd, console_fd),
            settings={**request.settings, **granted},
            cwd=cwd,
        )


_clients: dict[str, ServiceClient] = {}
_clients_lock = threading.Lock()


def _forget_parents_clients() -> None:
    """After fork, in the child: the parent's clients run on the parent's I/O loop, and
    their connection is the parent's own (two processes writing one stream would garble
    it). The child connects anew; the parent's sandboxes stay the parent's."""
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_parents_clients)


def service_client(path: str, log: logging.Logger) -> ServiceClient:
    """The one client of this process for the service at `path`."""
    with _clients_lock:
        if path not in _clients:
            _clients[path] = ServiceClient(path, log)
        return _clients[path]
