"""Kernel provisioners that start every kernel inside its own sandbox.

`SandboxProvisioner` holds the lifecycle and the settings every backend shares;
`GVisorProvisioner` adds what is particular to runsc. Everything that touches a
sandbox or a tunnel runs on the shared I/O loop (see `ioloop`), so the kernel
stays reachable whichever loop, if any, the caller runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, default, validate

from . import cleanup, guest, limits, policy, quotas
from .accel import choose as choose_accel
from .backends.base import Mount, Sandbox, SandboxError, SandboxSpec
from .backends.gvisor import GVisorSandbox, find_runsc
from .backends.microvm import MicroVMSandbox, find_qemu
from .console import Console
from .errors import Error, SettingError
from .guest.protocol import CHANNELS
from .http_errors import reported
from .images import find_image
from .ioloop import in_thread, run_on_io
from .microvm_image import find_boot_files
from .network.spec import MODES as NETWORK_MODES
from .network.spec import NetworkSpec, parse_bandwidth, parse_destination
from .service.client import DEFAULT_SOCKET, SOCKET_ENV, service_client
from .tunnel import Tunnel, TunnelError, reserve

GUEST_HOME = "/home/sandbox"
GUEST_PATH = "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"
FALLBACK_UID = 1000
ENDING_GRACE = 3.0
"""Seconds a sandbox whose kernel exited gets to end by itself once its channel closed."""
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                "/run", "/sbin", "/sys", "/usr", "/var/lib", "/var/run", "/var/log", "/var/cache",
                "/var/spool", "/var/tmp")  # fmt: skip
"""Folders that are never mounted as a kernel's workspace, nor is anything inside them."""
SYSTEM_DIRS = frozenset({"/", "/home", "/mnt", "/media", "/opt", "/srv", "/tmp", "/var"})
"""Folders never mounted themselves (their subfolders may be)."""


def open_folder(path: Path) -> int:
    """An O_PATH descriptor of folder `path`, opened one name at a time without following
    any link, so that what is checked (its owner) is what gets mounted: whoever owns a
    folder on the way could otherwise swap a name for a link meanwhile. OSError if `path`
    is missing, not absolute and normal, not a folder, or has a link in it."""
    if not path.is_absolute() or any(part in (".", "..") for part in path.parts):
        raise OSError(errno.EINVAL, f"not an absolute, normal path: {path}")
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        for name in path.parts[1:]:
            parent, fd = fd, -1
            try:
                fd = os.open(name, flags, dir_fd=parent)
            finally:
                os.close(parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def open_owned_folder(path: Path, uid: int) -> int:
    """`open_folder(path)`, if `uid` owns it; SandboxError if not (callers resolve their
    own links first: the provisioner sends a resolved path)."""
    refused = SandboxError(f"will not mount {path} into a sandbox: it is not a folder you own")
    try:
        fd = open_folder(path)
    except OSError:  # missing, a link, not a folder: the same words whether or not it exists
        raise refused from None
    if os.fstat(fd).st_uid != uid:
        os.close(fd)
        raise refused
    return fd


def server_installation() -> dict[str, Path]:
    """What of this server's own software a kernel must never be able to write: its Python
    environment and this package (a `.pth` file or a changed module runs as the server,
    with its secrets, the next time it starts)."""
    return {"the server's Python environment": Path(sys.prefix).resolve(),
            "the server's Python": Path(sys.base_prefix).resolve(),
            "jupyter-sandbox itself": Path(__file__).resolve().parent,
            "the guest agent": Path(guest.__file__).resolve().parent}  # fmt: skip


def close_mounts(mounts: tuple[Mount, ...]) -> None:
    """Close the descriptors `workspace_mount` opened (once the sandbox holds its folder)."""
    for mount in mounts:
        if mount.fd is not None:
            with contextlib.suppress(OSError):
                os.close(mount.fd)


class SandboxProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Lifecycle and settings shared by every sandbox backend."""

    backend = ""
    """The backend's name, as the sandbox service knows it."""

    image = Unicode(
        "python3",
        config=True,
        help="Guest image: a name built by `jupyter sandbox image build`, or a rootfs path.",
    )
    workspace = Enum(
        ["rw", "ro", "none"],
        "rw",
        config=True,
        help="How the kernel's working directory is mounted at the same path in the sandbox.",
    )
    cpu_limit = Float(1.0, config=True, help="CPU cores the sandbox may use, e.g. 0.5 or 2.")
    memory_limit = Unicode(
        "2G", config=True, help='Memory for the whole sandbox, swap counted: "512M", "2G".'
    )
    pids_limit = Int(512, config=True, help="Processes and threads the sandbox may have.")
    disk_limit = Unicode(
        "1G",
        config=True,
        help='Size of the sandbox\'s writable layer ("512M", "2G"); it is memory, and counts '
        "toward memory_limit too.",
    )
    open_files_limit = Int(4096, config=True, help="Open files per process in the sandbox.")
    env = Dict(
        value_trait=Unicode(),
        config=True,
        help="Extra environment variables for the kernel (the kernelspec's env is passed too).",
    )
    env_allowlist = List(
        Unicode(),
        ["LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "JPY_SESSION_NAME", "IPYKERNEL_CELL_NAME"],
        config=True,
        help="Variables of the server's environment that reach the kernel. No others do. "
        "IPYKERNEL_CELL_NAME is ipykernel's name for cells in tracebacks (test suites set it "
        "to compare tracebacks).",
    )
    kernel_uid = Int(
        None,
        allow_none=True,
        config=True,
        help="Uid of the kernel in the sandbox; default: the workspace's owner, else 1000.",
    )
    policy_file = Unicode(
        "",
        config=True,
        help="The operator's policy (TOML); default: $JUPYTER_SANDBOX_POLICY. Its ceilings "
        "bind every setting above; a kernelspec may ask for less, never more.",
    )
    network = Enum(
        list(NETWORK_MODES),
        "none",
        config=True,
        help="The kernel's network: none (no device at all), egress (only egress_allow, "
        "names through a DNS responder) or open (anything but the host, other sandboxes, "
        "link-local/metadata and multicast addresses).",
    )
    egress_allow = List(
        Unicode(),
        [],
        config=True,
        help='Where an egress kernel may connect: "host", "host:port", "IP", "IP:port", '
        '"CIDR" or "CIDR:port" (IPv4; TCP and UDP), e.g. ["pypi.org:443", "10.0.0.0/8"].',
    )
    network_bandwidth = Unicode(
        "",
        config=True,
        help='Cap on the kernel\'s network in each direction, bits per second: "10M", "512k"; '
        '"" for none.',
    )
    startup_timeout = Float(
        60.0, config=True, help="Seconds for the sandbox to come up and start the kernel."
    )
    mode = Enum(
        ["auto", "in-process", "service"],
        "auto",
        config=True,
        help="Who makes the sandboxes. in-process: this server (it must be root). service: "
        "the sandbox service (`jupyter sandbox serve`) on service_socket, for this server's "
        "user and under the operator's policy; this server's policy_file and kernel_uid are "
        "then not used. auto: service if this server is not root and the socket exists.",
    )
    service_socket = Unicode(
        config=True,
        help=f"The sandbox service's socket; default: ${SOCKET_ENV}, else {DEFAULT_SOCKET}.",
    )

    @default("service_socket")
    def _default_socket(self) -> str:
        return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET

    @validate("memory_limit", "disk_limit")
    def _check_size(self, proposal: dict) -> str:
        try:
            limits.parse_size(proposal["value"])
        except ValueError as e:
            raise TraitError(f"invalid {proposal['trait'].name}: {e}") from None
        return proposal["value"]

    @validate("egress_allow")
    def _check_egress_allow(self, proposal: dict) -> list[str]:
        for entry in proposal["value"]:
            try:
                parse_destination(entry)
            except ValueError as e:
                raise TraitError(f"invalid egress_allow entry: {e}") from None
        return proposal["value"]

    @validate("network_bandwidth")
    def _check_bandwidth(self, proposal: dict) -> str:
        try:
            parse_bandwidth(proposal["value"])
        except ValueError as e:
            raise TraitError(f"invalid network_bandwidth: {e}") from None
        return proposal["value"]

    @validate("cpu_limit")
    def _check_cpu(self, proposal: dict) -> float:
        try:
            return limits.check_cpu(proposal["value"])
        except ValueError as e:
            raise TraitError(f"invalid cpu_limit: {e}") from None

    @validate("pids_limit", "open_files_limit")
    def _check_count(self, proposal: dict) -> int:
        name, value = proposal["trait"].name, proposal["value"]
        if value < 64:
            raise TraitError(f"invalid {name}: expected an integer >= 64, got {value}")
        return value

    @validate("kernel_uid")
    def _check_uid(self, proposal: dict) -> int | None:
        if proposal["value"] is not None and proposal["value"] <= 0:
            raise TraitError(f"invalid kernel_uid: expected a uid > 0, got {proposal['value']}")
        return proposal["value"]

    _BASE_ARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - self._BASE_ARGS - set(self.class_trait_names(config=True)))
        if unknown:
            known = ", ".join(sorted(self.class_trait_names(config=True)))
            raise reported(
                SettingError(
                    f"unknown {type(self).__name__} setting {', '.join(unknown)}; "
                    f"known settings: {known}"
                )
            )
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
        self.asked = {
            n: getattr(self, n)
            for n in policy.SETTINGS
            if self.has_trait(n) and (n in kwargs or n in configured)
        }
        """Limits the kernelspec or the server's config asked for (the policy bounds them)."""
        self.sandbox: Sandbox | None = None
        self.tunnel: Tunnel | None = None
        self.stop_reason = ""
        """Why the sandbox was stopped by a limit, once it was."""
        self.limit_watch: asyncio.Task | None = None
        """Stops the sandbox once a limit struck, on the I/O loop (`_stop_on_limit`)."""
        self.ports: dict[str, socket.socket] = {}
        """The kernel's ports on the host, bound from pre_launch on (see `tunnel.reserve`)."""
        self.sandbox_id = ""
        self.user = ""
        """Whose kernel this is (see `policy.current_identity`), set at each launch."""
        self.quota = quotas.Quota()
        self.through_service = False
        """Whether the sandbox service made this kernel's sandbox (see `mode`)."""

    # -- what a backend provides --------------------------------------------

    async def create_sandbox(self, spec: SandboxSpec) -> Sandbox:
        raise NotImplementedError

    # -- launch ---------------------------------------------------------------

    @property
    def limits(self) -> limits.Limits:
        return limits.Limits(
            cpu=self.cpu_limit,
            memory=limits.parse_size(self.memory_limit),
            pids=self.pids_limit,
            disk=limits.parse_size(self.disk_limit),
            open_files=self.open_files_limit,
        )

    @property
    def network_spec(self) -> NetworkSpec:
        """The kernel's network, from the network traits (already validated)."""
        if self.egress_allow and self.network != "egress":
            self.log.warning(
                "egress_allow is set but network = %r: it only applies to network = 'egress'",
                self.network,
            )
        return NetworkSpec(
            mode=self.network,
            allow=tuple(parse_destination(entry) for entry in self.egress_allow),
            bandwidth=parse_bandwidth(self.network_bandwidth),
        )

    def _choose_mode(self) -> None:
        """Decide, once per launch, whether the sandbox service makes the sandbox."""
        self.through_service = self.mode == "service" or (self.mode == "auto" and os.geteuid() != 0)
        if self.through_service and not Path(self.service_socket).exists():
            raise SandboxError(
                f"no sandbox service listens at {self.service_socket}, and this server "
                "is not root: start the service (`jupyter sandbox serve`, README: "
                "'Multi-tenant hubs'), or run the server as root"
            )

    async def apply_policy(
        self, who: policy.Identity | None = None, bounds: dict[str, Any] | None = None
    ) -> None:
        """Bound the settings and quota by the policy for `who` (default: this server's user).

        `bounds`: ceilings for what the policy leaves out (the sandbox service's own
        settings: its callers get no more than those).
        """
        if who is None:
            who = await in_thread(policy.current_identity, self.log)
        self.user, self.quota = who.user, quotas.Quota()
        path = self.policy_file or os.environ.get(policy.POLICY_ENV, "")
        if not path:
            return
        ceilings = {**(bounds or {}), **policy.policy_file(path, self.log).current().ceilings(who)}
        kernel_name = getattr(self.parent, "kernel_name", "") or self.kernel_spec.name
        granted = policy.apply(ceilings, self.asked, kernel_name, who)
        try:
            for name, value in granted.items():
                setattr(self, name, value)
        except TraitError as e:
            raise policy.PolicyError(f"sandbox policy {path}: {e}") from None
        max_memory = ceilings.get("max_memory")
        self.quota = quotas.Quota(
            max_kernels=int(ceilings["max_kernels"]) if "max_kernels" in ceilings else None,
            max_memory=None if max_memory is None else limits.parse_size(max_memory),
            rule=f"the sandbox policy {path}",
        )
        self.log.info("sandbox policy for %s: %s", who.user, self.limits.describe())

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        try:
            return await self._pre_launch(**kwargs)
        except Error as e:
            raise reported(e) from None

    async def _pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        self._choose_mode()
        if not self.through_service:  # else the service applies it, for the caller it sees
            await self.apply_policy()
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

    def workspace_mount(self, cwd: str | None, caller_uid: int | None = None
                        ) -> tuple[str, tuple[Mount, ...]]:  # fmt: skip
        """The kernel's cwd in the guest and its mounts.

        Each mount carries an O_PATH descriptor of its folder and the owner read from it,
        so that the folder whose owner decides the kernel's ids is the one mounted: the
        caller closes them (`close_mounts`) once the sandbox started or failed to.
        `caller_uid`: the sandbox service's caller, who may mount only a folder it owns.
        """
        if self.workspace == "none":
            return GUEST_HOME, ()
        confined = caller_uid not in (None, 0)
        path = Path(cwd or Path.cwd())
        if not confined:  # a caller's path is taken as it is, links refused (open_owned_folder)
            path = path.resolve()
        if str(path) in SYSTEM_DIRS or any(path.is_relative_to(tree) for tree in SYSTEM_TREES):
            raise SandboxError(
                f"will not mount {path} into a sandbox: it is a system folder. Start the "
                "kernel from a project folder, or set workspace = 'none'"
            )
        read_only = self.workspace == "ro"
        if not read_only:
            for what, place in server_installation().items():
                if place.is_relative_to(path) or path.is_relative_to(place):
                    raise SandboxError(
                        f"will not mount {path} writable into a sandbox: it holds {what} "
                        f"({place}), which a kernel could change to run code as this server."
                        " Start the kernel from a folder of notebooks, or set workspace = 'ro'"
                    )
        if confined:
            fd = open_owned_folder(path, caller_uid)  # type: ignore[arg-type]
        else:
            try:
                fd = open_folder(path)
            except OSError:
                raise SandboxError(
                    f"the kernel's working directory {path} does not exist"
                ) from None
        found = os.fstat(fd)
        mount = Mount(source=path, destination=str(path), read_only=read_only, fd=fd,
                      owner=(found.st_uid, found.st_gid))  # fmt: skip
        return str(path), (mount,)

    def kernel_owner(self, mounts: tuple[Mount, ...]) -> tuple[int, int]:
        """Host uid and gid of a root caller's kernel: the workspace's owner's, else 1000
        (or kernel_uid); never 0. The sandbox service gives any other caller's kernel its own.

        A kernel never runs as root: a root-owned workspace (or one whose owner is not
        `kernel_uid`) is mounted idmapped, its owner's files shown as the kernel's."""
        uid = gid = FALLBACK_UID
        for mount in mounts:
            if mount.owner is not None and mount.owner[0] != 0:
                uid, gid = mount.owner
                gid = gid or uid  # a folder of group root: the kernel still gets a group of its own
        if self.kernel_uid is not None:
            uid = gid = self.kernel_uid
        return uid, gid

    def sandbox_spec(self, mounts: tuple[Mount, ...], owner: tuple[int, int]) -> SandboxSpec:
        """The sandbox of this kernel, with the settings as they are now (policy applied)."""
        self.sandbox_id = f"jsb-{self.kernel_id}-{uuid.uuid4().hex[:8]}"
        return SandboxSpec(
            sandbox_id=self.sandbox_id,
            kernel_id=self.kernel_id,
            rootfs=find_image(self.image),
            agent_dir=Path(guest.__file__).parent,
            limits=self.limits,
            mounts=mounts,
            user=self.user,
            network=self.network_spec,
            owner=owner,
        )

    def _guest_env(self, env: dict[str, str]) -> dict[str, str]:
        guest = {"PATH": GUEST_PATH, "HOME": GUEST_HOME, "LANG": "C.UTF-8", "SHELL": "/bin/sh"}
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
        try:
            return await self._launch(cmd, kwargs)
        except BaseException as e:
            self._release_ports()
            if isinstance(e, Error):
                raise reported(e) from None
            raise

    async def _launch(self, cmd: list[str], kwargs: dict[str, Any]) -> KernelConnectionInfo:
        cwd, mounts = self.workspace_mount(kwargs.get("cwd"))
        if self.through_service:  # the service opens the folder itself, as the caller's
            close_mounts(mounts)
            mounts = ()
        try:
            return await self._launch_in(cwd, mounts, cmd, kwargs)
        finally:
            close_mounts(mounts)  # once: a number closed twice may be someone else's by then

    async def _launch_in(self, cwd: str, mounts: tuple[Mount, ...], cmd: list[str],
                         kwargs: dict[str, Any]) -> KernelConnectionInfo:  # fmt: skip
        if self.through_service:
            sandbox = await run_on_io(
                service_client(self.service_socket, self.log).create(self, cwd)
            )
            self.sandbox_id = sandbox.record.sandbox_id
        else:
            await in_thread(cleanup.collect_stale_once, self.log)
            owner = self.kernel_owner(mounts)
            sandbox = await self.create_sandbox(self.sandbox_spec(mounts, owner))
            await in_thread(quotas.admit, sandbox.record, self.quota, self.log)
        self.log.info(
            "starting kernel %s in %s sandbox %s (%s)",
            self.kernel_id,
            sandbox.backend,
            self.sandbox_id,
            self.limits.describe(),
        )
        try:
            request = self._launch_request(cmd, kwargs.get("env", {}), cwd)
            self.tunnel = await run_on_io(self._start(sandbox, request))
        except BaseException:  # `_start` removes what it started; not if it never ran
            if self.tunnel is None:
                with contextlib.suppress(Exception):
                    await run_on_io(sandbox.destroy())
            raise
        self.sandbox = sandbox
        self.stop_reason = ""
        return self.connection_info

    async def _start(self, sandbox: Sandbox, request: dict) -> Tunnel:
        """Start the sandbox and its tunnel; on any failure remove all of it. I/O loop only."""
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
            channel = await sandbox.start()
            await console.attach(channel.console_fd)
            await tunnel.attach(channel.read_fd, channel.write_fd)
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
        return self.sandbox is not None and self.sandbox.poll() is None

    async def poll(self) -> int | None:
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
        stopped = await sandbox.wait_out_of_memory() and self._limit_reason(sandbox, tunnel)
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
        return self.stop_reason

    async def wait(self) -> int | None:
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return status

    async def send_signal(self, signum: int) -> None:
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
        await self.send_signal(signal.SIGTERM)

    async def kill(self, restart: bool = False) -> None:
        if self.sandbox is not None:
            await run_on_io(self.sandbox.kill())

    async def cleanup(self, restart: bool = False) -> None:
        sandbox, tunnel, watch = self.sandbox, self.tunnel, self.limit_watch
        self.sandbox = self.tunnel = self.limit_watch = None
        if sandbox is not None:

            async def teardown() -> None:
                if watch is not None:
                    watch.cancel()
                if tunnel is not None:
                    tunnel.close()
                await sandbox.destroy()

            await run_on_io(teardown())
        self._release_ports()

    def _release_ports(self) -> None:
        for sock in self.ports.values():
            sock.close()  # a no-op for those the tunnel listened on: it closed them
        self.ports = {}

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(sandbox_id=self.sandbox_id, backend=getattr(self.sandbox, "backend", None))
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
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
            "memory_limit": limits.parse_size(self.memory_limit),
            "cpu_limit": self.cpu_limit,
        }


class GVisorProvisioner(SandboxProvisioner):
    """Runs each kernel in its own gVisor (runsc) sandbox."""

    backend = "gvisor"

    runsc_path = Unicode("runsc", config=True, help="The runsc binary (a name on PATH, or a path).")
    platform = Enum(
        ["systrap", "ptrace", "kvm"],
        "systrap",
        config=True,
        help="gVisor platform. systrap is fast and needs nothing from the host.",
    )

    async def create_sandbox(self, spec: SandboxSpec) -> Sandbox:
        return GVisorSandbox(spec, self.log, find_runsc(self.runsc_path), self.platform)


class MicroVMProvisioner(SandboxProvisioner):
    """Runs each kernel in its own QEMU microVM, with its own guest kernel."""

    backend = "microvm"

    qemu_path = Unicode(
        "qemu-system-x86_64", config=True, help="The QEMU binary (a name on PATH, or a path)."
    )
    accel = Enum(
        ["auto", "kvm", "tcg"],
        "auto",
        config=True,
        help="auto: KVM where a probe guest boots under it (once per host boot), else TCG. "
        "`jupyter sandbox doctor` says which and why.",
    )
    startup_timeout = Float(
        120.0, config=True, help="Seconds for the VM to boot and start the kernel."
    )
    snapshots = Bool(
        True,
        config=True,
        help="Start VMs without a network device from a snapshot of their shape (made by "
        "the first VM of each shape) instead of booting them: seconds instead of ~20 under "
        "TCG. See backends/microvm_snapshot.py for what restored VMs share.",
    )

    async def create_sandbox(self, spec: SandboxSpec) -> Sandbox:
        if Path(self.image).is_absolute():
            raise SandboxError(
                "microVM kernels need a built image name (image = 'python3'), not a rootfs path"
            )
        qemu = find_qemu(self.qemu_path)
        boot = find_boot_files(self.image)
        chosen = await in_thread(choose_accel, qemu, boot.kernel, self.accel)
        return MicroVMSandbox(spec, self.log, qemu, boot, chosen, self.snapshots)
