"""One way to make a sandbox: a request, and the function that turns it into a running one.

`make_sandbox` does, in order, what every kernel start needs, whoever asks:
the operator's policy for the requester (`grant`), the workspace and the
kernel's owner (`workspace.py`), the backend's sandbox for the spec, the
user's quota, and the sandbox's start. The in-process provisioner calls it
for its own server; the sandbox service calls it for the caller the kernel
names on its socket, and hands back the channel and the granted settings.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import backends, cleanup, guest, policy, pool, quotas, settings
from .backends.base import Channel, Sandbox, SandboxSpec
from .errors import PolicyError, SandboxError
from .images.store import find_image
from .ioloop import in_thread
from .limits import Limits, parse_size
from .network.spec import NetworkSpec, parse_bandwidth, parse_destination
from .workspace import close_mounts, kernel_owner, mount_workspace

AGENT_SOURCE = Path(guest.__file__).parent
"""The guest agent's folder on the host, mounted read-only into every sandbox."""


@dataclass(frozen=True)
class SandboxRequest:
    """What one kernel start asks for; the same in-process and through the service."""

    kernel_id: str
    kernel_name: str
    """The kernelspec's name: what the policy's `kernelspecs` list."""
    backend: str
    """A name in `backends.BACKENDS`."""
    settings: Mapping[str, Any]
    """Every setting of the backend (`settings.COMMON` and the backend's) as configured."""
    asked: frozenset[str] = frozenset()
    """Which of `settings` were asked for (by a kernelspec, the config or the service's
    caller) rather than left at their defaults: the policy checks those against its
    ceilings, and grants its ceilings for the others."""
    cwd: str = ""
    """The kernel's working directory on the host ("" for this process's)."""
    agent_dir: Path = AGENT_SOURCE
    """The guest agent's folder on the host (the security tests put a hostile one here)."""
    kernel_argv: tuple[str, ...] = ()
    """The kernel's command, its connection file as "{connection_file}": what a warm pool
    may start ahead of its kernels (`warm_python`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))


@dataclass(frozen=True)
class Requester:
    """On whose behalf a sandbox is made, and under which rules."""

    identity: policy.Identity
    uid: int | None = None
    """The sandbox service's caller's uid and gid (the kernel runs as them, and may mount
    only its own folders); None in-process (a root server: the workspace's owner)."""
    gid: int | None = None
    policy_file: str = ""
    """The operator's policy ("" for none); never the caller's."""
    bounds: Mapping[str, Any] = field(default_factory=dict)
    """Ceilings for what the policy leaves out (the service's own settings)."""


@dataclass(frozen=True)
class Made:
    """A started sandbox, its channel, and what it was granted."""

    sandbox: Sandbox
    channel: Channel
    settings: Mapping[str, Any]
    """The settings the sandbox runs with, once the policy was applied."""
    cwd: str
    """The kernel's working directory in the guest."""


def grant(request: SandboxRequest, who: Requester,
          log: logging.Logger) -> tuple[dict[str, Any], quotas.Quota]:  # fmt: skip
    """The settings `request` gets under the policy for `who`, and `who`'s quota.

    PolicyError naming the rule if it asks for more than the policy allows, or for a
    kernelspec or image `who` may not start. Blocks (reads the policy file): call it in a thread.
    """
    granted = dict(request.settings)
    if not who.policy_file:
        return granted, quotas.Quota()
    ceilings = {**who.bounds, **policy.policy_file(who.policy_file, log).current().ceilings(
        who.identity)}  # fmt: skip
    asked = {name: granted[name] for name in request.asked if name in settings.ASKABLE}
    for name, value in policy.apply(ceilings, asked, request.kernel_name, who.identity).items():
        try:
            granted[name] = settings.check(settings.BY_NAME[name], value)
        except ValueError as e:
            raise PolicyError(f"sandbox policy {who.policy_file}: {e}") from None
    policy.check_image(ceilings, granted["image"], who.identity)
    max_memory = ceilings.get("max_memory")
    quota = quotas.Quota(
        max_kernels=int(ceilings["max_kernels"]) if "max_kernels" in ceilings else None,
        max_memory=None if max_memory is None else parse_size(max_memory),
        rule=f"the sandbox policy {who.policy_file}",
    )
    return granted, quota


def limits_of(granted: Mapping[str, Any]) -> Limits:
    """The sandbox's limits from its (checked) settings."""
    return Limits(
        cpu=granted["cpu_limit"],
        memory=parse_size(granted["memory_limit"]),
        pids=granted["pids_limit"],
        disk=parse_size(granted["disk_limit"]),
        open_files=granted["open_files_limit"],
    )


def network_of(granted: Mapping[str, Any], log: logging.Logger) -> NetworkSpec:
    """The sandbox's network from its (checked) settings."""
    if granted["egress_allow"] and granted["network"] != "egress":
        log.warning(
            "egress_allow is set but network = %r: it only applies to network = 'egress'",
            granted["network"],
        )
    return NetworkSpec(
        mode=granted["network"],
        allow=tuple(parse_destination(entry) for entry in granted["egress_allow"]),
        bandwidth=parse_bandwidth(granted["network_bandwidth"]),
    )


def warm_python(argv: tuple[str, ...]) -> str:
    """The Python whose kernel process a warm pool can start ahead for a kernel of `argv`
    (ipykernel's usual command: guest/warm_kernel.py), else ""."""
    if len(argv) == 5 and list(argv[1:]) == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]:
        return argv[0]
    return ""


async def make_sandbox(request: SandboxRequest, who: Requester, log: logging.Logger) -> Made:
    """A started sandbox for `request`, made on behalf of `who`. Run on the I/O loop.

    On any failure nothing is left behind (the sandbox is destroyed, the workspace's
    descriptors closed, the quota released) and the error says why: PolicyError,
    QuotaError, SettingError or SandboxError (ImageError among them).
    """
    if who.uid is None:
        await in_thread(cleanup.collect_stale_once, log)
    granted, quota = await in_thread(grant, request, who, log)
    backend = backends.get(request.backend)
    cwd, mounts = await in_thread(mount_workspace, granted["workspace"], request.cwd, who.uid)
    try:
        if who.uid:  # the service's caller: the kernel is the caller
            owner = (who.uid, who.gid if who.gid is not None else who.uid)
        else:
            owner = kernel_owner(mounts, granted["kernel_uid"])
        spec = SandboxSpec(
            sandbox_id=f"jsb-{request.kernel_id}-{uuid.uuid4().hex[:8]}",
            kernel_id=request.kernel_id,
            rootfs=find_image(granted["image"]),
            agent_dir=request.agent_dir,
            limits=limits_of(granted),
            mounts=mounts,
            user=who.identity.user,
            network=network_of(granted, log),
            owner=owner,
        )
        ahead = replace(spec, warm=warm_python(request.kernel_argv))
        pooled = backend.poolable and pool.Sizing.of(granted).size > 0
        shape = pool.shape_of(backend, ahead, granted) if pooled else None
        warm = None if shape is None else pool.warm_pool(log).take(shape)
        claimed = None
        if warm is not None:
            try:
                claimed = await _claim(warm, shape, spec, who, quota, log)
            except SandboxError as e:  # removed: the kernel starts in a sandbox of its own
                log.warning("could not claim warm sandbox %s (%s); starting a fresh one",
                            warm.sandbox.record.sandbox_id, e)  # fmt: skip
                warm = None
        if claimed is not None:
            sandbox, channel = claimed
        else:
            sandbox = await backend.create(spec, granted, log)
            sandbox.record.uid = who.uid
            await in_thread(quotas.admit, sandbox.record, quota, log)
            try:
                channel = await sandbox.start()
            except BaseException as e:
                try:
                    await sandbox.destroy()
                except Exception:  # the start's failure is the one to report
                    log.exception("could not remove sandbox %s", spec.sandbox_id)
                if isinstance(e, OSError):  # a pipe, a process, a cgroup: say which kernel
                    raise SandboxError(f"kernel {request.kernel_id} did not start: {e}") from None
                raise
    finally:
        close_mounts(mounts)  # the sandbox holds its folder by now, or failed
    log.info(
        "sandbox %s (%s%s) for %s: %s",
        sandbox.record.sandbox_id,
        backend.name,
        ", warm" if warm is not None else "",
        who.identity.user,
        spec.limits.describe(),
    )
    if shape is not None:  # the kernel has its sandbox: the pool may refill, once it started
        pool.warm_pool(log).refill_later(shape, backend, granted)
    return Made(sandbox=sandbox, channel=channel, settings=granted, cwd=cwd)


async def _claim(warm: pool.Waiting, shape: pool.Shape, spec: SandboxSpec, who: Requester,
                 quota: quotas.Quota, log: logging.Logger) -> tuple[Sandbox, Channel]:  # fmt: skip
    """Give the pool's sandbox `warm` to `spec`'s kernel: counted in its user's quota (if
    that refuses, it goes back to the pool, and QuotaError says why), then claimed (if
    that fails, it is removed, and SandboxError says why: the caller starts a fresh one)."""
    sandbox, record = warm.sandbox, warm.sandbox.record
    record.kernel_id, record.user, record.uid = spec.kernel_id, spec.user, who.uid
    admit = asyncio.ensure_future(in_thread(quotas.admit, record, quota, log))
    try:
        await asyncio.shield(admit)
    except BaseException:
        # Refused, or cancelled (which does not stop the thread): once the thread is done,
        # the sandbox is the pool's again, in its record too if the thread saved it.
        await asyncio.wait([admit])
        record.kernel_id, record.user, record.uid = "", "", None
        if not admit.cancelled() and admit.exception() is None:
            await in_thread(record.save)
        pool.warm_pool(log).give_back(shape, warm)
        raise
    try:
        await sandbox.claim(spec)
        await in_thread(record.save)
    except BaseException as e:
        warm.channel.close()
        try:
            await sandbox.destroy()
        except Exception:
            log.exception("could not remove sandbox %s", record.sandbox_id)
        if isinstance(e, OSError):
            raise SandboxError(f"kernel {spec.kernel_id} did not start: {e}") from None
        raise
    return sandbox, warm.channel
