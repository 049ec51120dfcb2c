"""The jupyter_client side: kernel provisioners that start every kernel in its own sandbox.

`SandboxProvisioner` does the jupyter_client lifecycle only: it reserves the
kernel's ports, asks for a sandbox (`request.make_sandbox` in-process, or the
sandbox service), starts the tunnel to it and answers poll, signals and
shutdown. Its settings are traits derived from `settings.py` and the backend's
declarations; `provisioner_class` makes one provisioner class per backend.
Everything that touches a sandbox or a tunnel runs on the shared I/O loop (see
`ioloop`), so the kernel stays reachable whichever loop, if any, the caller runs.
Errors leave here as tornado HTTP errors (`http_errors`), so JupyterLab shows
their message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import HasTraits, TraitError, default, validate
from traitlets.utils.importstring import import_item

from . import backends, policy, settings
from .backends.base import Backend, Sandbox
from .console import Console
from .errors import Error, PolicyError, SandboxError, SettingError
from .guest.layout import KERNEL_HOME, KERNEL_PATH
from .guest.protocol import CHANNELS
from .http_errors import reported
from .ioloop import in_thread, io_loop, run_on_io
from .limits import parse_size
from .request import Made, Requester, SandboxRequest, make_sandbox
from .service.client import service_client
from .tunnel import Tunnel, TunnelError, reserve
from .workspace import close_mounts, mount_workspace

ENDING_GRACE = 3.0
"""Seconds a sandbox whose kernel exited gets to end by itself once its channel closed."""


def _check_setting(self: HasTraits, proposal: dict) -> Any:
    """Every setting's trait validation: its declaration's `parse` (`settings.py`)."""
    setting = self.declared[proposal["trait"].name]  # type: ignore[attr-defined]
    try:
        return settings.check(setting, proposal["value"])
    except ValueError as e:
        raise TraitError(str(e)) from None


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """The provisioner's edge: an error of this project leaves as a tornado HTTP error of
    the same class (`http_errors.reported`), so the Jupyter server answers with its status
    and message rather than "Unhandled error"."""
    try:
        yield
    except Error as e:
        raise reported(e) from None


async def discard(made: Made, log: logging.Logger) -> None:
    """Remove a sandbox that was made but will not be used: its channel and all of it."""
    made.channel.close()
    try:
        await made.sandbox.destroy()
    except Exception:
        log.exception("could not remove sandbox %s", made.sandbox.record.sandbox_id)


def settings_namespace(owner: str, declared: tuple[settings.Setting, ...]) -> dict[str, Any]:
    """A provisioner class's own traits for `declared`, and their validation by each
    declaration's `parse`. Own traits, not a mixin's: traitlets takes `--Class.trait` on a
    command line only for a class's own traits."""
    namespace: dict[str, Any] = settings.traits(declared)
    # A name per `owner`: a subclass's validator of the same name would hide this one.
    namespace[f"_check_{owner}_settings"] = validate(*(s.name for s in declared))(_check_setting)
    return namespace


class SandboxProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """The lifecycle every sandbox backend shares; `provisioner_class` makes one per backend."""

    vars().update(settings_namespace("common", settings.COMMON))  # the settings every backend has

    kind: ClassVar[Backend]
    """The backend this provisioner's kernels run under."""
    declared: ClassVar[dict[str, settings.Setting]] = {s.name: s for s in settings.COMMON}
    """Every setting of this provisioner, by name."""

    @default("service_socket")
    def _default_socket(self) -> str:
        return settings.default_socket()

    _BASE_ARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})

    def __init__(self, **kwargs: Any) -> None:
        """Refuses (as a 400 in a server) a setting it does not know or a value its
        declaration does not accept, naming it: a typo in a kernelspec is an error, not
        a silently ignored limit."""
        unknown = sorted(set(kwargs) - self._BASE_ARGS - set(self.class_trait_names(config=True)))
        if unknown:
            known = ", ".join(sorted(self.class_trait_names(config=True)))
            raise reported(SettingError(
                f"unknown {type(self).__name__} setting {', '.join(unknown)}; "
                f"known settings: {known}"
            ))  # fmt: skip
        try:
            super().__init__(**kwargs)
        except TraitError as e:
            raise reported(SettingError(str(e))) from None
        configured = {
            name
            for cls in type(self).__mro__
            if cls.__name__ in self.config
            for name in self.config[cls.__name__]
        }
        self.asked = frozenset(n for n in self.declared if n in kwargs or n in configured)
        """Settings the kernelspec or the server's config asked for (the policy bounds them)."""
        self.sandbox: Sandbox | None = None
        self.tunnel: Tunnel | None = None
        self.stop_reason = ""
        """Why the sandbox was stopped by a limit, once it was."""
        self.limit_watch: asyncio.Task | None = None
        """Stops the sandbox once a limit struck, on the I/O loop (`_stop_on_limit`)."""
        self.teardown: concurrent.futures.Future[None] | None = None
        """The last `cleanup`'s removal of the sandbox, on the I/O loop (see `cleanup`)."""
        self.ports: dict[str, socket.socket] = {}
        """The kernel's ports on the host, bound from pre_launch on (see `tunnel.reserve`)."""
        self.sandbox_id = ""
        self.user = ""
        """Whose kernel this is, set at each launch."""
        self.through_service = False
        """Whether the sandbox service made this kernel's sandbox (see `mode`)."""

    # -- launch ---------------------------------------------------------------

    def _choose_mode(self) -> None:
        """Decide, once per launch, whether the sandbox service makes the sandbox (a backend
        with a `maker` of its own never asks the local one)."""
        if self.kind.maker:
            self.through_service = False
            return
        self.through_service = self.mode == "service" or (self.mode == "auto" and os.geteuid() != 0)
        if self.through_service and not Path(self.service_socket).exists():
            raise SandboxError(
                f"no sandbox service listens at {self.service_socket}, and this server "
                "is not root: start the service (`jupyter sandbox serve`, docs: "
                "'Multi-tenant hubs'), or run the server as root"
            )

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Reserve the kernel's ports on the loopback interface and write its connection
        file; return the kernel's command (`cmd`) and the launch's keyword arguments.

        The ports are bound here and held until the tunnel listens on them, so that no
        other process can take one meanwhile. Refuses a transport other than tcp or an
        address other than loopback: the kernel is reachable only through the tunnel.
        """
        with reported_errors():
            return await self._pre_launch(**kwargs)

    async def _pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        self._choose_mode()
        km = self.parent
        if km.transport != "tcp":
            raise SandboxError(f"sandboxed kernels need transport 'tcp', not {km.transport!r}")
        if not km.ip.startswith("127.") and km.ip != "localhost":
            raise SandboxError(
                f"sandboxed kernels listen on the loopback interface only, not {km.ip!r}; "
                "set the KernelManager's ip to 127.0.0.1"
            )
        # CurveZMQ needs keys in the kernel's connection file, which the agent
        # writes in the guest; until it passes them on, kernels run without it.
        kwargs.pop("transport_encryption", None)
        extra_arguments = kwargs.pop("extra_arguments", [])
        self._release_ports()
        try:
            self.ports = reserve(km.ip, {c: getattr(km, f"{c}_port") for c in CHANNELS})
        except TunnelError as e:
            raise SandboxError(f"kernel {self.kernel_id} did not start: {e}") from None
        for channel, sock in self.ports.items():
            setattr(km, f"{channel}_port", sock.getsockname()[1])
        km.write_connection_file(jupyter_session=kwargs.get("env", {}).get("JPY_SESSION_NAME", ""))
        self.connection_info = km.get_connection_info()
        cmd = km.format_kernel_cmd(extra_arguments=extra_arguments)
        return await super().pre_launch(cmd=cmd, **kwargs)

    def sandbox_request(self, cwd: str, cmd: list[str] | None = None) -> SandboxRequest:
        """What this kernel asks for: its settings as configured (traits), which of them
        were asked for, its working directory on the host, and its command."""
        kernel_name = getattr(self.parent, "kernel_name", "") or self.kernel_spec.name
        connection_file = self.parent.connection_file
        argv = tuple(
            arg.replace(connection_file, "{connection_file}") if connection_file else arg
            for arg in cmd or ()
        )
        return SandboxRequest(
            kernel_id=self.kernel_id,
            kernel_name=kernel_name,
            backend=self.kind.name,
            settings={name: getattr(self, name) for name in self.declared},
            asked=self.asked,
            cwd=cwd,
            kernel_argv=argv,
        )

    async def _make(self, request: SandboxRequest) -> Made:
        """The started sandbox, in-process, by the sandbox service (`mode`), or by the
        backend's own maker (`Backend.maker`: the Kubernetes service)."""
        if self.kind.maker:
            maker = import_item(self.kind.maker).for_settings(
                {name: getattr(self, name) for name in self.declared}, self.log
            )
            return await run_on_io(maker.create(request))
        if self.through_service:
            return await run_on_io(service_client(self.service_socket, self.log).create(request))
        who = Requester(
            identity=await in_thread(policy.current_identity, self.log),
            policy_file=self.policy_file or os.environ.get(settings.POLICY_ENV, ""),
        )
        return await run_on_io(make_sandbox(request, who, self.log))

    def _guest_env(self, env: dict[str, str]) -> dict[str, str]:
        guest = {"PATH": KERNEL_PATH, "HOME": KERNEL_HOME, "LANG": "C.UTF-8", "SHELL": "/bin/sh"}
        guest.update({name: env[name] for name in self.env_allowlist if name in env})
        guest.update({name: env.get(name, value) for name, value in self.kernel_spec.env.items()})
        guest.update(self.env)
        return guest

    def _launch_request(self, cmd: list[str], env: dict[str, str], cwd: str) -> dict[str, Any]:
        """What the agent is asked to start: the kernel's argv, env and cwd (its user and
        rlimits are the sandbox's own, `SandboxSpec.owner` and `limits`)."""
        connection_file = self.parent.connection_file
        key = self.connection_info.get("key", b"")
        return {
            "argv": [arg.replace(connection_file, "{connection_file}") for arg in cmd],
            "env": self._guest_env(env),
            "cwd": cwd,
            "connection": {
                "key": key.decode() if isinstance(key, bytes) else key,
                **{
                    name: self.connection_info[name]
                    for name in ("signature_scheme", "kernel_name")
                    if name in self.connection_info
                },
            },
        }

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Make the kernel's sandbox, start the kernel in it and the tunnel to it; return
        the connection info (the ports reserved in `pre_launch`, now the tunnel's).

        The sandbox gets the settings the operator's policy grants (they become this
        provisioner's settings too). On any failure nothing is left: no sandbox, no
        port, no connection file (it holds the kernel's key); the error says why (a
        policy's or quota's refusal, a missing image...).
        """
        try:
            with reported_errors():
                await self._launch(cmd, kwargs)
        except BaseException:
            self._release_ports()
            self.parent.cleanup_connection_file()
            raise
        return self.connection_info

    async def _launch(self, cmd: list[str], kwargs: dict[str, Any]) -> None:
        cwd = kwargs.get("cwd") or str(Path.cwd())
        if self.through_service:
            cwd = await in_thread(self._checked_workspace, cwd)
        made = await self._make(self.sandbox_request(cwd, cmd))
        try:
            self._take(made.settings)
            self.user, self.sandbox_id = made.sandbox.record.user, made.sandbox.record.sandbox_id
            self.log.info("starting kernel %s in %s sandbox %s", self.kernel_id,
                          made.sandbox.backend, self.sandbox_id)  # fmt: skip
            request = self._launch_request(cmd, kwargs.get("env", {}), made.cwd)
        except BaseException:
            await run_on_io(discard(made, self.log))
            raise
        self.tunnel = await run_on_io(self._start(made, request))  # it removes all if it fails
        self.sandbox = made.sandbox
        self.stop_reason = ""

    def _checked_workspace(self, cwd: str) -> str:
        """`cwd` resolved, once this server's own checks of it as a workspace passed (a
        system folder, or one holding this server's software writable, is refused here:
        the sandbox service cannot see which software this server runs). The service
        checks again, as the caller, what it mounts."""
        cwd, mounts = mount_workspace(self.workspace, cwd)
        close_mounts(mounts)
        return cwd

    def _take(self, granted: Mapping[str, Any]) -> None:
        """Make the granted settings this provisioner's own: what the kernel runs with."""
        try:
            for name, value in granted.items():
                if name in self.declared:
                    setattr(self, name, value)
        except TraitError as e:
            raise PolicyError(f"a granted setting is not valid here: {e}") from None

    async def _start(self, made: Made, request: dict) -> Tunnel:
        """Start the tunnel to the sandbox and the kernel in it; on any failure remove all
        of it. I/O loop only."""
        sandbox, channel = made.sandbox, made.channel
        key = self.connection_info.get("key", b"")
        tunnel = Tunnel(
            self.log,
            sandbox.record.sandbox_id,
            on_broken=lambda: self._stop_after_channel(sandbox, tunnel),
            explain=lambda: self._limit_reason(sandbox, tunnel),
            signing=(
                key.encode() if isinstance(key, str) else key,
                self.connection_info.get("signature_scheme", "hmac-sha256"),
            ),
        )
        console = Console(self.log, sandbox.record.sandbox_id)
        try:
            await channel.attach(tunnel, console)
            await tunnel.launch(request, self.startup_timeout)
            await tunnel.listen(self.ports)
            self.limit_watch = self._watch_limits(self._stop_on_limit(sandbox, tunnel))
            return tunnel
        except BaseException as e:
            tunnel.close()
            self._release_ports()
            try:
                await sandbox.destroy()
            except Exception:
                self.log.exception("could not remove sandbox %s", sandbox.record.sandbox_id)
            if isinstance(e, TunnelError | SandboxError | OSError):
                await asyncio.wait([console.closed], timeout=2)
                tail = console.tail_text()
                detail = f"\n{type(sandbox).__name__} output:\n{tail}" if tail else ""
                raise SandboxError(f"kernel {self.kernel_id} did not start: {e}{detail}") from None
            raise

    # -- running --------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        """Whether the kernel's sandbox exists and has not ended (the KernelManager's
        `has_kernel`). Cheap: reads the host process's status."""
        return self.sandbox is not None and self.sandbox.poll() is None

    async def poll(self) -> int | None:
        """None while the sandbox runs; else its exit status, the kernel's own where the
        agent reported it (0 once there is no sandbox), as `Popen.poll` would.

        A sandbox the host's OOM killer left wedged is stopped here too, so that its
        end (and the notebook's notice of why) does not wait for anyone else.
        """
        sandbox = self.sandbox
        if sandbox is None:
            return 0
        status = sandbox.poll()
        tunnel = self.tunnel
        reported = tunnel.exit_report.get("status") if tunnel is not None else None
        if status is not None and type(reported) is int and reported:
            status = reported  # the kernel's own, as the agent saw it (a VM's QEMU exits 0)
        if not self.stop_reason and self._limit_reason(sandbox, tunnel) and status is None:
            # The OOM killer may take one of the runtime's processes and leave the
            # sandbox wedged: stop all of it (the tunnel then tells the notebook).
            await run_on_io(sandbox.kill())
        return status

    async def _stop_after_channel(self, sandbox: Sandbox, tunnel: Tunnel) -> None:
        """Stop `sandbox` once its channel is broken or gone. I/O loop only.

        When the agent reported the kernel's exit first, the sandbox is ending by itself
        (a VM powers off once its agent ends): it gets `ENDING_GRACE` seconds to, so that
        a graceful shutdown ends as one (status 0, not SIGKILL). Otherwise it is killed.
        """
        if tunnel.exit_report and await sandbox.ended(ENDING_GRACE):
            return
        await sandbox.kill()

    def _watch_limits(self, watch: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run `watch` as a task nobody awaits; log its failure, if it fails.

        Without this asyncio would report an exception (a failing `sandbox.kill()`) only
        as "Task exception was never retrieved", whenever the task is collected, and
        not in this kernel's log. Cancellation (by `cleanup`) is the normal end.
        """

        def done(task: asyncio.Task) -> None:
            if not task.cancelled() and (error := task.exception()) is not None:
                self.log.error(
                    "kernel %s: the watch of its memory limit failed",
                    self.kernel_id,
                    exc_info=error,
                )

        task = asyncio.create_task(watch)
        task.add_done_callback(done)
        return task

    async def _stop_on_limit(self, sandbox: Sandbox, tunnel: Tunnel) -> None:
        """Stop the sandbox as soon as the host's OOM killer struck in it. I/O loop only.

        Whether or not anyone calls `poll`: a blocking KernelManager without a restarter
        never does. The kill may have taken one of the runtime's own processes and left
        the sandbox wedged, its channel open; once it is stopped the channel closes and
        the tunnel tells the notebook why (`explain`).
        """
        stopped = await sandbox.wait_stopped() and self._limit_reason(sandbox, tunnel)
        if stopped and not tunnel.closed:
            await sandbox.kill()

    def _limit_reason(self, sandbox: Sandbox, tunnel: Tunnel | None) -> str:
        """Why a limit stopped `sandbox`, or "". Cheap: reads one cgroup file.

        The host's OOM killer ends a whole gVisor sandbox; in a VM the guest
        kernel's ends the kernel, and the agent says so.
        """
        guest_oom = tunnel is not None and tunnel.exit_report.get("oom_killed") is True
        if not self.stop_reason and (guest_oom or sandbox.out_of_memory()):
            self.stop_reason = f"it exceeded its memory limit, memory_limit = {self.memory_limit}"
            self.log.error("kernel %s: %s; stopping its sandbox", self.kernel_id, self.stop_reason)
        elif not self.stop_reason and (outside := sandbox.stopped_by()):
            self.stop_reason = outside
            self.log.error("kernel %s: %s", self.kernel_id, outside)
        return self.stop_reason

    async def wait(self) -> int | None:
        """Wait for the sandbox to end; its exit status (see `poll`)."""
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return status

    async def send_signal(self, signum: int) -> None:
        """Deliver `signum` to the kernel process in the sandbox (through the agent, over
        the channel), as `os.kill` would to a local kernel: SIGINT interrupts, SIGTERM ends
        it. SIGKILL kills the whole sandbox at once (`kill`). A signal the closed channel
        cannot carry is logged, never raised: the kernel is gone or going."""
        with reported_errors():
            if signum == signal.SIGKILL:
                await self.kill()
                return
            tunnel = self.tunnel
            if tunnel is None:
                return

            async def deliver() -> bool:
                return tunnel.signal(signum)

            if not await run_on_io(deliver()) and await self.poll() is None:
                self.log.warning(
                    "kernel %s: channel closed, signal %d not delivered", self.kernel_id, signum
                )

    async def terminate(self, restart: bool = False) -> None:
        """Ask the kernel to end: SIGTERM to the kernel process (`send_signal`)."""
        await self.send_signal(signal.SIGTERM)

    async def kill(self, restart: bool = False) -> None:
        """End the kernel at once: every process of its sandbox is killed."""
        with reported_errors():
            if self.sandbox is not None:
                await run_on_io(self.sandbox.kill())

    async def cleanup(self, restart: bool = False) -> None:
        """Remove everything of the kernel's sandbox: its watch, its tunnel (the ports
        close), the sandbox itself and all it had on the host. Idempotent; called after
        the kernel ended, and before a restart's new launch (which makes a new sandbox).

        Two callers may overlap (the restarter restarting a kernel that died while a
        shutdown cleans it up): the second returns only once the first's removal has
        ended, so that whoever sees `cleanup` return finds nothing of the sandbox left.
        """
        sandbox, tunnel, watch = self.sandbox, self.tunnel, self.limit_watch
        self.sandbox = self.tunnel = self.limit_watch = None

        async def teardown() -> None:
            if watch is not None:
                watch.cancel()
            if tunnel is not None:
                tunnel.close()
            if sandbox is not None:
                await sandbox.destroy()

        try:
            if sandbox is None and tunnel is None and watch is None:
                if self.teardown is not None:
                    # Its errors were the first caller's to report.
                    await asyncio.wait([asyncio.wrap_future(self.teardown)])
                return
            self.teardown = asyncio.run_coroutine_threadsafe(teardown(), io_loop())
            with reported_errors():
                await asyncio.wrap_future(self.teardown)
        finally:
            self._release_ports()

    def _release_ports(self) -> None:
        for sock in self.ports.values():
            sock.close()  # a no-op for those the tunnel listened on: it closed them
        self.ports = {}

    async def get_provisioner_info(self) -> dict[str, Any]:
        """The base class's info plus the sandbox's id and backend, so that a restarted
        server's `load_provisioner_info` knows which sandbox it was."""
        info = await super().get_provisioner_info()
        info.update(sandbox_id=self.sandbox_id, backend=getattr(self.sandbox, "backend", None))
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Take back what `get_provisioner_info` saved (the sandbox's id)."""
        await super().load_provisioner_info(provisioner_info)
        self.sandbox_id = provisioner_info.get("sandbox_id", "")

    def usage(self) -> dict[str, float | int | None]:
        """What this kernel's whole sandbox uses now: for a status bar or a server extension.

        `memory` in bytes, `cpu_seconds` since the sandbox started, and the limits.
        """
        sandbox = self.sandbox
        return {
            "memory": None if sandbox is None else sandbox.memory_usage(),
            "cpu_seconds": None if sandbox is None else sandbox.cpu_seconds(),
            "memory_limit": parse_size(self.memory_limit),
            "cpu_limit": self.cpu_limit,
        }


def provisioner_class(backend: Backend) -> type[SandboxProvisioner]:
    """The provisioner of `backend`'s kernels: `SandboxProvisioner` with the backend's own
    settings as traits too (and the common ones whose default it changes), named
    `backend.provisioner_class` (its config section)."""
    declared = backend.declared()
    own = tuple(s for s in declared if s.name in backend.changed_defaults or s in backend.settings)
    return type(
        backend.provisioner_class,
        (SandboxProvisioner,),
        {
            **settings_namespace(backend.name, own),
            "__doc__": f"Runs each kernel in its own sandbox of backend {backend.name!r}: "
            f"{type(backend).__doc__}",
            "__module__": __name__,
            "kind": backend,
            "declared": {s.name: s for s in declared},
        },
    )


GVisorProvisioner = provisioner_class(backends.get("gvisor"))
MicroVMProvisioner = provisioner_class(backends.get("microvm"))
KubernetesProvisioner = provisioner_class(backends.get("kubernetes"))
