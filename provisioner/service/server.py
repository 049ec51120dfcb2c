"""`jupyter sandbox serve`: the root daemon that makes sandboxes for unprivileged servers.

A caller is whoever the kernel says is at the other end of the socket
(SO_PEERCRED), never what a request claims. The service applies the
operator's policy for that user, makes the sandbox exactly as an in-process
provisioner would, and hands the caller the sandbox's channel (`wire`): the
tunnel then runs in the caller's own server, so only that server can reach
the kernel. Only the caller's uid may signal, re-attach or destroy it.

A sandbox is held by the connection that made it. When that connection ends,
the sandbox waits `grace_period` for a connection of the same uid to attach
it again, then is destroyed (at once, if it has ended). The service stops
without touching running sandboxes; its next start adopts them from their
records and gives their callers the grace period to attach again.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import re
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from traitlets import Float, Int, Unicode, default
from traitlets.config import LoggingConfigurable

from .. import backends, cleanup, policy, settings
from ..backends.base import Backend, Sandbox
from ..errors import RequestError, SandboxError, SettingError, kind_of
from ..network.sandbox import SandboxNetwork
from ..pool import warm_pool
from ..request import Requester, SandboxRequest, make_sandbox
from ..settings import DEFAULT_SOCKET, SOCKET_ENV, USER_SETTINGS
from ..state import Record, process_start_time, records
from .wire import Connection, WireError, close_fds

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_ATTACH = 256
"""Sandbox ids in one attach: its reply stays well within a message."""
_TICK = 0.2
"""Seconds between looks at every sandbox: ended ones, and ones past their grace period."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    user: str


class Adopted:
    """A sandbox that an earlier run of the service made: known by its record, and its
    network's DNS responder, which died with that run, answering again."""

    def __init__(self, record: Record, log: logging.Logger) -> None:
        self.record = record
        self.log = log
        self.network: SandboxNetwork | None = None

    async def resume(self) -> None:
        if self.record.network_mode not in ("", "none"):
            try:
                self.network = await SandboxNetwork.resume(self.record, self.log)
            except (SandboxError, ValueError, OSError) as e:
                self.log.error("sandbox %s: its DNS does not answer: %s", self.record.sandbox_id, e)

    def poll(self) -> int | None:
        return None if self.record.process_alive() else 0

    async def kill(self) -> None:
        await self.destroy()

    async def destroy(self) -> None:
        if self.network is not None:
            self.network.close()
        await asyncio.to_thread(cleanup.reap, self.record, self.log)


@dataclass
class Held:
    """One sandbox of the service, and who may touch it."""

    sandbox: Sandbox | Adopted
    uid: int
    holder: Caller | None
    since: float = field(default_factory=time.monotonic)
    """When it lost its holder (for the grace period)."""
    status: int | None = None
    """Its exit status, once it ended."""


def _text(request: dict, name: str, pattern: re.Pattern | None = None, limit: int = 4096) -> str:
    value = request.get(name)
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= limit
        or "\0" in value
        or (pattern is not None and not pattern.match(value))
    ):
        raise RequestError(f"{name}: expected a string of at most {limit} characters")
    return value


OPS: dict[str, frozenset[str]] = {
    "create": frozenset({"kernel_id", "kernel_name", "settings", "cwd", "hub_token"}),
    "kill": frozenset({"sandbox_id"}),
    "destroy": frozenset({"sandbox_id"}),
    "attach": frozenset({"sandbox_ids"}),
    "list": frozenset(),
}
"""Each operation and the fields its request may have (besides id and op)."""


def check_request(request: dict[str, Any]) -> tuple[int, str]:
    """The request's id and operation, once every field is of the expected kind."""
    rid, op = request.get("id"), request.get("op")
    if type(rid) is not int or not 0 <= rid < 2**53:
        raise RequestError("id: expected an integer")
    if not isinstance(op, str) or op not in OPS:
        raise RequestError(f"op: expected one of {', '.join(OPS)}")
    unknown = set(request) - {"id", "op"} - OPS[op]
    if unknown:
        raise RequestError(f"{op}: unknown field {', '.join(sorted(unknown))}")
    if op == "create":
        _text(request, "kernel_id", _NAME, 128)
        _text(request, "kernel_name", _NAME, 255)
        settings = request.get("settings")
        if not isinstance(settings, dict) or not set(settings) <= USER_SETTINGS:
            raise RequestError(
                f"settings: expected a table of some of {', '.join(sorted(USER_SETTINGS))}"
            )
        if not _text(request, "cwd").startswith("/"):
            raise RequestError("cwd: expected an absolute path")
        if "hub_token" in request:
            _text(request, "hub_token", limit=1024)
    elif op in ("kill", "destroy"):
        _text(request, "sandbox_id", _NAME, 128)
    elif op == "attach":
        ids = request.get("sandbox_ids")
        if not isinstance(ids, list) or len(ids) > MAX_ATTACH:
            raise RequestError(f"sandbox_ids: expected a list of at most {MAX_ATTACH} sandbox ids")
        for sandbox_id in ids:
            _text({"sandbox_id": sandbox_id}, "sandbox_id", _NAME, 128)
    return rid, op


class Caller:
    """One connection to the service, and the peer the kernel says is behind it."""

    def __init__(self, service: SandboxService, sock: socket.socket, peer: Peer) -> None:
        self.service = service
        self.peer = peer
        self.conn = Connection(sock, accept_fds=False)
        self.slots = asyncio.Semaphore(service.max_requests)
        self.tasks: set[asyncio.Task] = set()
        self.closed = False

    async def serve(self) -> None:
        try:
            while True:
                try:
                    request, _ = await self.conn.recv()
                except WireError as e:
                    await self.send({"id": None, "ok": False, "kind": "request", "error": str(e)})
                    continue
                await self.slots.acquire()  # a caller waits for a slot: no unbounded tasks
                self.spawn(self.handle(request)).add_done_callback(lambda _: self.slots.release())
        except (EOFError, OSError):
            pass
        finally:
            self.closed = True
            self.service.let_go(self)
            self.conn.close()

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def handle(self, request: dict[str, Any]) -> None:
        rid = request.get("id") if type(request.get("id")) is int else None
        try:
            rid, op = check_request(request)
            reply, fds = await getattr(self.service, f"op_{op}")(self, request)
        except Exception as e:
            if not isinstance(e, SettingError | RequestError | SandboxError | OSError):
                self.service.log.exception("%s from %s failed", request.get("op"), self.peer)
            await self.send({"id": rid, "ok": False, "kind": kind_of(e), "error": str(e)})
            return
        try:
            await self.send({"id": rid, "ok": True, **reply}, fds)
        finally:
            close_fds(list(fds))

    async def send(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Send, or drop the connection if the caller does not read (it is not waited for)."""
        if self.closed:
            return
        try:
            try:
                await asyncio.wait_for(self.conn.send(message, fds), self.service.send_timeout)
            except WireError as e:  # a reply that cannot be sent: say so, not hang the caller
                error = {"id": message.get("id"), "ok": False, "kind": "request", "error": str(e)}
                await asyncio.wait_for(self.conn.send(error), self.service.send_timeout)
        except (OSError, EOFError, asyncio.TimeoutError):
            self.closed = True
            self.conn.close()


class SandboxService(LoggingConfigurable):
    """Makes, signals and destroys sandboxes for the callers of its Unix socket."""

    socket_path = Unicode(
        config=True,
        help=f"The socket the service listens on; default: ${SOCKET_ENV}, else {DEFAULT_SOCKET}.",
    )
    policy_file = Unicode(
        config=True,
        help=f"The operator's policy (TOML, see policy.py); default: ${policy.POLICY_ENV}. "
        "Required: without one, any local user could ask for any limits.",
    )
    grace_period = Float(
        60.0,
        config=True,
        help="Seconds a caller's running sandboxes outlive its connection, for it (or its "
        "restarted server) to attach them again; then they are destroyed.",
    )
    hub_api_url = Unicode(
        "",
        config=True,
        help="JupyterHub's API URL: with it, a caller's Hub groups count in the policy (asked "
        "with the caller's own server token, which the Hub checks; the URL is never the caller's).",
    )
    max_connections = Int(1024, config=True, help="Connections at once, all callers together.")
    max_connections_per_user = Int(16, config=True, help="Connections at once of one uid.")
    socket_group = Unicode(
        "",
        config=True,
        help="If set, only root and this group's members may call: the socket is 0660 "
        "and the group's (else 0666: any local user, who is known by uid all the same).",
    )
    max_requests = Int(32, config=True, help="Requests of one connection being served at once.")
    send_timeout = Float(10.0, config=True, help="Seconds a caller may take to read a reply.")

    @default("socket_path")
    def _default_socket(self) -> str:
        return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET

    @default("policy_file")
    def _default_policy(self) -> str:
        return os.environ.get(policy.POLICY_ENV, "")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sandboxes: dict[str, Held] = {}
        self.callers: set[Caller] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()

    # -- running ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; the running sandboxes stay for the next start."""
        if not self.policy_file:
            raise SettingError(
                f"the sandbox service needs the operator's policy: set --policy or "
                f"${policy.POLICY_ENV} (any local user may call the service)"
            )
        policy.policy_file(self.policy_file, self.log).current()  # fails early if unusable
        listener = self._listen()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        try:
            adopted = await asyncio.to_thread(self._adopt)
            await asyncio.gather(*(sandbox.resume() for sandbox in adopted))
            for sandbox in adopted:  # their grace period starts as callers can attach again
                self.sandboxes[sandbox.record.sandbox_id] = Held(sandbox, sandbox.record.uid, None)
            loop.add_reader(listener.fileno(), self._accept, listener)
            self.log.info("sandbox service listening on %s", self.socket_path)
            watcher = asyncio.create_task(self._watch())
            await self._stop.wait()
            watcher.cancel()
        finally:
            loop.remove_reader(listener.fileno())
            listener.close()
            with contextlib.suppress(OSError):
                Path(self.socket_path).unlink()
            for caller in list(self.callers):
                caller.conn.close()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await warm_pool(self.log).drain()  # no kernel's: nothing to adopt of them
        self.log.info(
            "sandbox service stopped; %d sandboxes left running for its next start",
            len(self.sandboxes),
        )

    def _listen(self) -> socket.socket:
        path = Path(self.socket_path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with probe:
            if probe.connect_ex(str(path)) == 0:
                raise SandboxError(f"a sandbox service already listens on {path}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket of a service that is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        if self.socket_group:
            try:
                os.chown(path, 0, grp.getgrnam(self.socket_group).gr_gid)
            except KeyError:
                sock.close()
                raise SettingError(f"socket_group: no group {self.socket_group!r}") from None
        path.chmod(0o660 if self.socket_group else 0o666)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # e.g. EMFILE: stop accepting for a moment, not spin
            self.log.warning("cannot accept a caller: %s; pausing for a second", e)
            loop = asyncio.get_running_loop()
            loop.remove_reader(listener.fileno())
            loop.call_later(1.0, loop.add_reader, listener.fileno(), self._accept, listener)
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        try:
            entry = pwd.getpwuid(uid)
            user, gid = entry.pw_name, entry.pw_gid  # its primary group, not its egid now
        except KeyError:
            self.log.warning("refused pid %d: uid %d has no user name", pid, uid)
            sock.close()
            return
        if len(self.callers) >= self.max_connections or (
            sum(c.peer.uid == uid for c in self.callers) >= self.max_connections_per_user
        ):
            self.log.warning("refused %s (pid %d): too many connections", user, pid)
            sock.close()
            return
        caller = Caller(self, sock, Peer(pid, uid, gid, user))
        self.callers.add(caller)
        caller.spawn(caller.serve()).add_done_callback(lambda _: self.callers.discard(caller))

    def _adopt(self) -> list[Adopted]:
        """Take over the sandboxes an earlier run of the service left, then reap stale ones."""
        me, started = os.getpid(), process_start_time(os.getpid())
        adopted = []
        for record in records():
            if record.uid is None or record.owner_alive():
                continue
            record.owner_pid, record.owner_start = me, started
            record.save()
            adopted.append(Adopted(record, self.log))
            self.log.info("adopted sandbox %s of uid %d", record.sandbox_id, record.uid)
        cleanup.collect(self.log)
        return adopted

    async def _watch(self) -> None:
        """Tell holders of ended sandboxes; destroy those nobody holds any more."""
        while True:
            await asyncio.sleep(_TICK)
            try:
                await self._look()
            except Exception:  # the next look may do better; the watcher must not end
                self.log.exception("looking at the sandboxes failed")

    async def _look(self) -> None:
        now = time.monotonic()
        for sandbox_id, held in list(self.sandboxes.items()):
            if held.status is None and (status := held.sandbox.poll()) is not None:
                held.status = status
                if held.holder is not None:
                    event = {"event": "exited", "sandbox_id": sandbox_id, "status": status}
                    held.holder.spawn(held.holder.send(event))
            if held.holder is None and (
                held.status is not None or now - held.since > self.grace_period
            ):
                self.log.info(
                    "sandbox %s of uid %d: %s, destroying it",
                    sandbox_id,
                    held.uid,
                    "ended" if held.status is not None else "not attached again in time",
                )
                self._spawn(self._destroy(sandbox_id))  # one slow removal holds up no other

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def let_go(self, caller: Caller) -> None:
        """`caller` is gone: its sandboxes start their grace period."""
        for held in self.sandboxes.values():
            if held.holder is caller:
                held.holder, held.since = None, time.monotonic()

    async def _destroy(self, sandbox_id: str) -> None:
        held = self.sandboxes.pop(sandbox_id, None)
        if held is None:
            return
        try:
            await held.sandbox.destroy()
        except Exception:
            self.log.exception("could not remove sandbox %s", sandbox_id)

    def _own(self, caller: Caller, sandbox_id: str) -> Held:
        held = self.sandboxes.get(sandbox_id)
        if held is None or held.uid != caller.peer.uid:  # others' look exactly like none
            raise RequestError(f"no sandbox {sandbox_id} of yours")
        return held

    # -- operations: each returns the reply's fields and the descriptors it carries ---

    def _kernelspec(self, name: str) -> tuple[Backend, dict[str, Any], frozenset[str], list[str]]:
        """The backend of the service's own kernelspec `name`, the settings the service's
        config gives it (and which it sets), and its command: a caller names a kernelspec,
        and the policy's `kernelspecs` mean what the operator installed under that name
        (a warm pool starts that command's kernels ahead, never one a caller names)."""
        try:
            spec = KernelSpecManager(parent=self).get_kernel_spec(name)
        except NoSuchKernel:
            raise RequestError(f"no kernelspec {name!r} is installed for the service") from None
        provisioner = spec.metadata.get("kernel_provisioner", {}).get("provisioner_name")
        backend = backends.for_provisioner(provisioner)
        if backend is None:
            raise RequestError(f"kernelspec {name!r} is not a sandboxed one")
        sections = ("SandboxProvisioner", backend.provisioner_class)
        try:
            values, configured = settings.from_config(self.config, sections, backend.declared())
        except ValueError as e:
            raise SettingError(f"the sandbox service's config: {e}") from None
        return backend, values, configured, list(spec.argv)

    async def op_create(self, caller: Caller, request: dict) -> tuple[dict, tuple[int, ...]]:
        peer = caller.peer
        asked = dict(request["settings"])
        if "/" in str(asked.get("image", "")):
            raise SettingError("through the sandbox service, image is a built image's name")
        try:
            asked = {name: settings.check(settings.BY_NAME[name], v) for name, v in asked.items()}
        except ValueError as e:
            raise SettingError(str(e)) from None
        backend, own, configured, argv = await asyncio.to_thread(
            self._kernelspec, request["kernel_name"]
        )
        hub = None
        if self.hub_api_url and "hub_token" in request:
            hub = (self.hub_api_url, request["hub_token"])
        identity = await asyncio.to_thread(policy.identity_of, peer.user, self.log, hub)
        wanted = SandboxRequest(
            kernel_id=request["kernel_id"],
            kernel_name=request["kernel_name"],
            backend=backend.name,
            settings={**own, **asked},
            asked=configured | set(asked),
            cwd=request["cwd"],
            kernel_argv=tuple(argv),
        )
        # The service's own settings bound what the policy leaves out: its callers get no
        # more than those.
        bounds = {name: own[name] for name in settings.BOUNDED}
        who = Requester(identity, peer.uid, peer.gid, self.policy_file, bounds)
        made = await make_sandbox(wanted, who, self.log)
        sandbox, channel = made.sandbox, made.channel
        sandbox_id = sandbox.record.sandbox_id
        # Known from now on, not while it starts: nothing else may destroy it meanwhile.
        self.sandboxes[sandbox_id] = Held(sandbox, peer.uid, None if caller.closed else caller)
        self.log.info("sandbox %s is uid %d's (pid %d)", sandbox_id, peer.uid, peer.pid)
        reply = {
            "sandbox_id": sandbox_id,
            "backend": sandbox.backend,
            "user": peer.user,
            "cgroup": sandbox.record.cgroup,
            "cwd": made.cwd,
            "settings": {name: made.settings[name] for name in USER_SETTINGS},
        }
        return reply, (channel.read_fd, channel.write_fd, channel.console_fd)

    async def op_kill(self, caller: Caller, request: dict) -> tuple[dict, tuple[int, ...]]:
        await self._own(caller, request["sandbox_id"]).sandbox.kill()
        return {}, ()

    async def op_destroy(self, caller: Caller, request: dict) -> tuple[dict, tuple[int, ...]]:
        self._own(caller, request["sandbox_id"])
        await self._destroy(request["sandbox_id"])
        return {}, ()

    async def op_attach(self, caller: Caller, request: dict) -> tuple[dict, tuple[int, ...]]:
        attached, unknown = {}, []
        for sandbox_id in request["sandbox_ids"]:
            held = self.sandboxes.get(sandbox_id)
            if held is None or held.uid != caller.peer.uid:
                unknown.append(sandbox_id)
                continue
            held.holder = caller
            attached[sandbox_id] = held.status
        return {"attached": attached, "unknown": unknown}, ()

    async def op_list(self, caller: Caller, request: dict) -> tuple[dict, tuple[int, ...]]:
        mine = [
            {
                "sandbox_id": sandbox_id,
                "kernel_id": held.sandbox.record.kernel_id,
                "backend": held.sandbox.record.backend,
                "status": held.status,
                "attached": held.holder is not None,
            }
            for sandbox_id, held in self.sandboxes.items()
            if held.uid == caller.peer.uid
        ]
        return {"sandboxes": mine}, ()
