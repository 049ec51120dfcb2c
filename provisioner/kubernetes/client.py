"""The user's server's side of the Kubernetes backend: asking the service, reaching the pod.

The server holds no Kubernetes credential. It asks the sandbox service in the
cluster (`kubernetes serve`, service.py) for a kernel, with its own JupyterHub API
token as its only proof of who it is; the service answers with the kernel pod's
address and TLS credentials (credentials.py), and the server's tunnel connects to
the pod directly (`TlsChannel`). Everything else of the kernel's life (its end, and
why) comes from the service's event stream, one per server, fed by the service's one
watch: a killed gVisor sandbox or VM sends no FIN, so the channel alone cannot say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

import aiohttp

from ..backends.base import Channel, Sandbox
from ..console import Console
from ..errors import KINDS, RequestError, SandboxError, ServiceError
from ..request import Made, SandboxRequest
from ..settings import USER_SETTINGS
from ..state import Record
from ..tunnel import Tunnel
from . import credentials
from .hub import read_bounded

TOKEN_ENV = "JUPYTERHUB_API_TOKEN"
SERVER_ENV = "JUPYTERHUB_SERVER_NAME"
CONNECT_TRIES_SECONDS = 30.0
"""How long the server retries reaching a running pod's agent (it listens a moment after
its container starts)."""
CALL_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
MAX_ANSWER = 1 << 20
"""Bytes of one answer or event from the service: more is a broken service."""
KEEPALIVE = (30, 10, 3)
"""TCP keepalive on the channel (idle seconds, interval, probes): a lost node's pod sends
nothing more, and the service may not be there to say so."""


class TlsChannel(Channel):
    """A kernel pod's agent at `host`:`port`, reached over TLS with its credentials."""

    def __init__(self, host: str, port: int, creds: credentials.Credentials) -> None:
        self.host, self.port, self.creds = host, port, creds
        self.transport: asyncio.BaseTransport | None = None

    async def attach(self, tunnel: Tunnel, console: Console) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TRIES_SECONDS
        context = self.creds.client_context()
        while True:
            try:
                await tunnel.connect(self.host, self.port, context, self.creds.server_name,
                                     self.creds.token)  # fmt: skip
                break
            except ConnectionRefusedError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self.transport = tunnel.out
        sock = tunnel.out.get_extra_info("socket") if tunnel.out is not None else None
        if sock is not None:
            idle, interval, probes = KEEPALIVE
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)

    def close(self) -> None:
        """Nothing is held before `attach`."""

    def cut(self) -> None:
        """Drop the connection at once: the pod is gone and will send nothing more."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()  # type: ignore[attr-defined]


class PodSandbox(Sandbox):
    """A kernel pod the service made, as its owner's server sees it: its state comes from
    the service's events; kill and destroy ask the service to delete it."""

    def __init__(self, client: KubernetesClient, name: str, record: Record,
                 channel: TlsChannel, log: logging.Logger) -> None:  # fmt: skip
        self.client = client
        self.name = name
        self.record = record
        self.log = log
        self.process = None
        self.network = None
        self.channel = channel
        self.state: dict[str, Any] = {}
        """The service's last word on the pod (cluster.KernelPod.public)."""
        self.changed = asyncio.Event()
        self.deleted_here = False
        """This server asked for the pod's deletion: its end is nobody else's doing."""

    async def start(self) -> Channel:
        raise SandboxError(f"kernel pod {self.name} was started by the sandbox service")

    def update(self, state: Mapping[str, Any]) -> None:
        """An event from the service about this pod."""
        self.state = dict(state)
        self.changed.set()
        self.changed = asyncio.Event()
        if self.state.get("ended") or self.state.get("gone") or self.state.get("deleting"):
            self.channel.cut()

    def poll(self) -> int | None:
        if not (self.state.get("ended") or self.state.get("gone")):
            return None
        code = self.state.get("exit_code")
        return code if type(code) is int else 137

    def out_of_memory(self) -> bool:
        return self.state.get("reason") == "OOMKilled"

    def stopped_by(self) -> str:
        """The service's words for why the cluster stopped the pod from outside (evicted,
        its node lost, deleted by someone else); "" for an end of the kernel's own."""
        if self.deleted_here:
            return ""
        return str(self.state.get("stopped_by") or "")[:2000]

    async def wait_stopped(self) -> bool:
        while not (self.state.get("ended") or self.state.get("gone")):
            await self.changed.wait()
        return self.out_of_memory() or bool(self.stopped_by())

    async def wait_out_of_memory(self) -> bool:
        return await self.wait_stopped() and self.out_of_memory()

    def memory_usage(self) -> int | None:
        return None  # the kubelet's metrics, not this server's to read

    def cpu_seconds(self) -> float | None:
        return None

    async def kill(self) -> None:
        """Delete the pod at once. A service that cannot be reached is logged, not raised:
        the channel is cut already, and the service's gc takes a pod nobody holds."""
        self.channel.cut()
        await self._delete(grace=0, wait=False)

    async def stop(self) -> None:
        await self._delete(grace=None, wait=False)

    async def _delete(self, grace: int | None, wait: bool) -> None:
        self.deleted_here = True
        try:
            await self.client.delete(self.name, grace=grace, wait=wait)
        except ServiceError as e:
            self.log.warning("kernel pod %s: %s", self.name, e)

    async def destroy(self) -> None:
        """Delete the pod (its Secret and NetworkPolicy go with it) and wait until it is
        gone, so that nothing is left and the user's quota is free again. ServiceError if
        the service cannot say it is gone."""
        self.channel.cut()
        self.deleted_here = True
        try:
            await self.client.delete(self.name, grace=None, wait=True)
        finally:
            await self.client.forget(self.name)


class KubernetesClient:
    """This server's connection to the sandbox service at `url`. I/O loop only.

    One per service URL and token in a server (`for_settings`); its event stream is
    opened with the first kernel and held while there are kernels.
    """

    _clients: dict[tuple[str, str], KubernetesClient] = {}

    def __init__(self, url: str, token: str, log: logging.Logger) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.log = log
        self.sandboxes: dict[str, PodSandbox] = {}
        self.session: aiohttp.ClientSession | None = None
        self.events: asyncio.Task | None = None

    @classmethod
    def for_settings(cls, settings: Mapping[str, Any], log: logging.Logger) -> KubernetesClient:
        url = settings["service_url"]
        token = os.environ.get(TOKEN_ENV, "")
        if not url:
            raise SandboxError("service_url is not set: the Kubernetes sandbox service's URL")
        if not token:
            raise SandboxError(
                f"${TOKEN_ENV} is not set: the Kubernetes sandbox service knows a server by "
                "its JupyterHub API token (run this server from JupyterHub)"
            )
        key = (url, token)
        if key not in cls._clients:
            cls._clients[key] = cls(url, token, log)
        return cls._clients[key]

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                headers={"Authorization": f"token {self.token}"}, timeout=CALL_TIMEOUT
            )
        return self.session

    async def call(self, method: str, path: str, body: dict | None = None,
                   timeout: float = 60.0) -> dict[str, Any]:  # fmt: skip
        """The service's JSON answer; its error as this project's error of the same kind."""

        async def ask() -> tuple[int, bytes]:
            async with self._session().request(method, self.url + path, json=body) as answer:
                return answer.status, await read_bounded(answer.content, MAX_ANSWER)

        try:
            status, data = await asyncio.wait_for(ask(), timeout)
        except (aiohttp.ClientError, OSError) as e:
            raise ServiceError(f"cannot reach the Kubernetes sandbox service at {self.url}: "
                               f"{e}") from None  # fmt: skip
        except asyncio.TimeoutError:
            raise ServiceError(f"the Kubernetes sandbox service at {self.url} did not answer "
                               f"{method} {path} within {timeout:.0f} s") from None  # fmt: skip
        if len(data) > MAX_ANSWER:
            raise ServiceError("the Kubernetes sandbox service's answer is too large")
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise ServiceError(f"the Kubernetes sandbox service answered {status} with no JSON")
        if status >= 400:
            error_class = KINDS.get(str(reply.get("kind")), ServiceError)
            raise error_class(str(reply.get("message", f"HTTP {status}"))[:4000])
        return reply

    async def create(self, request: SandboxRequest) -> Made:
        """A kernel pod for `request`, started, and the channel to it."""
        self._watch_events()
        asked = {n: request.settings[n] for n in request.asked if n in USER_SETTINGS}
        body = {
            "kernel_id": request.kernel_id,
            "kernel_name": request.kernel_name,
            "server": os.environ.get(SERVER_ENV, ""),
            "settings": asked,
            "cwd": request.cwd,
        }
        timeout = float(request.settings["startup_timeout"]) + 30
        reply = await self.call("POST", "/kernels", body, timeout=timeout)
        try:
            name, host, port = str(reply["name"]), str(reply["host"]), int(reply["port"])
            creds = credentials.from_public(reply["credentials"])
            # The service grants user settings only: anything else it names is ignored.
            granted = {n: v for n, v in dict(reply["settings"]).items() if n in USER_SETTINGS}
            cwd = str(reply["cwd"])
        except (KeyError, TypeError, ValueError) as e:
            why = f"the Kubernetes sandbox service's answer is malformed: {e}"
            raise ServiceError(why) from None
        channel = TlsChannel(host, port, creds)
        record = Record(sandbox_id=name, kernel_id=request.kernel_id, backend=request.backend,
                        user=str(reply.get("user", "")))  # fmt: skip
        sandbox = PodSandbox(self, name, record, channel, self.log)
        self.sandboxes[name] = sandbox
        if isinstance(reply.get("state"), dict):
            sandbox.update(reply["state"])
        return Made(sandbox=sandbox, channel=channel, settings={**request.settings, **granted},
                    cwd=cwd)  # fmt: skip

    async def delete(self, name: str, grace: int | None, wait: bool) -> None:
        query = f"?wait={'true' if wait else 'false'}"
        if grace is not None:
            query += f"&grace={grace}"
        try:
            await self.call("DELETE", f"/kernels/{name}{query}", timeout=120)
        except RequestError as e:
            if "no kernel" not in str(e):
                raise

    async def forget(self, name: str) -> None:
        """`name` is gone: once no pod is left, stop following events and close the HTTP
        session (a server with no kernel holds no connection to the service)."""
        self.sandboxes.pop(name, None)
        if self.sandboxes:
            return
        if self.events is not None:
            self.events.cancel()
            self.events = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _watch_events(self) -> None:
        if self.events is None or self.events.done():
            self.events = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        """Read the service's event stream for this server's kernels while it has any;
        reconnect after a failure (the service restarted: it adopted the pods)."""
        while True:
            try:
                async with self._session().get(self.url + "/events") as stream:
                    if stream.status != 200:
                        raise ServiceError(f"events: HTTP {stream.status}")
                    while True:
                        line = await stream.content.readline()
                        if not line:
                            break
                        if len(line) > MAX_ANSWER:
                            raise ServiceError("an event from the service is too large")
                        self._event(line)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log.warning("the Kubernetes sandbox service's events: %s; again", e)
            if not self.sandboxes:
                return
            await asyncio.sleep(1.0)

    def _event(self, line: bytes) -> None:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and isinstance(event.get("name"), str):
                sandbox = self.sandboxes.get(event["name"])
                if sandbox is not None:
                    sandbox.update(event)
