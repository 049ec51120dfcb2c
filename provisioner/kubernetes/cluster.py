"""The service's view of the cluster: kernel pods made, watched and deleted.

One `Cluster` per service holds one API client and ONE watch over every kernel pod
of its namespace (`manifests.SELECTOR`): starts, ends and deletions are waited for on
that watch's events, never by polling a pod (at 1,000 kernels, 1,000 pollers would
be 1,000 requests a second; the watch is one long request). The watch's state is
also the service's memory: a restarted service lists the pods and so knows (adopts)
every kernel it had, with its owner, from the pods' own annotations.

A kernel is a Pod, plus a Secret and a NetworkPolicy owned by it (ownerReferences):
deleting the pod is enough for Kubernetes' garbage collector to remove all three, so a
service that dies between two requests leaves nothing that outlives its pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from ..errors import SandboxError
from . import manifests
from .manifests import (
    ANNOTATION_KERNEL,
    ANNOTATION_MEMORY,
    ANNOTATION_SERVER,
    ANNOTATION_USER,
    KernelPlan,
)

WATCH_SECONDS = 300
"""How long one watch request lasts before it is renewed (the API server's own cap is
longer; a renewal every few minutes keeps a dead connection from going unnoticed)."""
RETRY_SECONDS = 2.0
"""Pause before the watch is opened again after an error."""
START_FAILURES = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError", "ErrImageNeverPull",
})  # fmt: skip
"""Waiting reasons of a container that will not start without someone's help."""
STOPPED_FROM_OUTSIDE = frozenset({"Evicted", "NodeLost", "Deleted", "Preempted", "Disrupted",
                                  "EvictionByEvictionAPI", "PreemptionByScheduler",
                                  "TerminationByKubelet"})  # fmt: skip
"""Reasons a pod ended that are none of its kernel's doing: its owner is told which."""


@dataclass
class KernelPod:
    """What the watch last saw of one kernel pod."""

    name: str
    user: str
    server: str
    memory: int
    kernel_id: str = ""
    phase: str = "Pending"
    pod_ip: str = ""
    node: str = ""
    created: float = 0.0
    """When the pod was made (seconds since the epoch)."""
    running: bool = False
    """The kernel container runs (its agent listens soon after)."""
    exit_code: int | None = None
    reason: str = ""
    """Why it ended or cannot start: OOMKilled, Evicted, NodeLost, Deleted, Error,
    ErrImagePull..."""
    message: str = ""
    deleting: bool = False
    gone: bool = False
    """Deleted from the API (the DELETED event)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def ended(self) -> bool:
        return self.gone or self.phase in ("Succeeded", "Failed") or self.exit_code is not None

    def public(self) -> dict[str, Any]:
        """What its owner may know of it (client.PodSandbox reads it)."""
        outside = self.reason in STOPPED_FROM_OUTSIDE or (self.deleting and not self.reason)
        return {
            "name": self.name, "phase": self.phase, "running": self.running,
            "ended": self.ended, "exit_code": self.exit_code, "reason": self.reason,
            "message": self.message[:2000], "deleting": self.deleting, "gone": self.gone,
            "stopped_by": describe(self) if outside and (self.ended or self.deleting) else "",
        }  # fmt: skip


def _owner(pod: client.V1Pod) -> KernelPod:
    """A new state for `pod`, from its owner annotations (what the service wrote)."""
    annotations = pod.metadata.annotations or {}
    try:
        memory = int(annotations.get(ANNOTATION_MEMORY, "0"))
    except ValueError:
        memory = 0
    return KernelPod(
        name=pod.metadata.name,
        user=annotations.get(ANNOTATION_USER, ""),
        server=annotations.get(ANNOTATION_SERVER, ""),
        memory=memory,
        kernel_id=annotations.get(ANNOTATION_KERNEL, ""),
    )


def _read(state: KernelPod, pod: client.V1Pod) -> None:
    """Update `state` from what the API says of `pod` (a V1Pod)."""
    status = pod.status or client.V1PodStatus()
    state.phase = status.phase or "Pending"
    state.pod_ip = status.pod_ip or ""
    state.node = (pod.spec.node_name if pod.spec else None) or ""
    if pod.metadata.creation_timestamp is not None:
        state.created = pod.metadata.creation_timestamp.timestamp()
    state.deleting = pod.metadata.deletion_timestamp is not None
    state.running = False
    for condition in status.conditions or ():
        if condition.type == "DisruptionTarget" and condition.status == "True":
            node_lost = condition.reason == "DeletionByTaintManager"
            state.reason = "NodeLost" if node_lost else condition.reason or "Disrupted"
            state.message = condition.message or ""
        elif condition.type == "PodScheduled" and condition.reason == "Unschedulable":
            state.reason, state.message = "Unschedulable", condition.message or ""
    if status.reason == "Evicted":
        state.reason, state.message = "Evicted", status.message or ""
    for container in status.container_statuses or ():
        if container.name != "kernel" or container.state is None:
            continue
        if container.state.running is not None:
            state.running = True
            if state.reason == "Unschedulable":
                state.reason = state.message = ""
        if (waiting := container.state.waiting) is not None and waiting.reason in START_FAILURES:
            state.reason, state.message = waiting.reason, waiting.message or ""
        if (ended := container.state.terminated) is not None:
            state.exit_code = ended.exit_code
            if state.reason not in ("Evicted", "NodeLost"):
                state.reason, state.message = ended.reason or "Error", ended.message or ""
    for container in status.init_container_statuses or ():
        ended = container.state.terminated if container.state else None
        if ended is not None and ended.exit_code != 0:
            state.reason = "AgentInstallFailed"
            state.message = f"the agent's init container: {ended.reason} {ended.message or ''}"
    state.changed.set()
    state.changed = asyncio.Event()


class Cluster:
    """Kernel pods in one namespace, through one API client and one watch."""

    def __init__(self, api: client.ApiClient, namespace: str, log: logging.Logger) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.namespace = namespace
        self.log = log
        self.pods: dict[str, KernelPod] = {}
        """Every kernel pod the watch knows, by name (ended ones until they are deleted)."""
        self.listeners: list[Callable[[KernelPod], None]] = []
        """Called with each pod the watch saw change (the service's event streams)."""
        self.synced = asyncio.Event()
        """Set once the first list is in: before that, no quota may be counted."""
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the watch; returns once the kernel pods that exist are known (adopted)."""
        self._watch = asyncio.create_task(self._watch_forever())
        await self.synced.wait()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.api.close()

    # -- the one watch --------------------------------------------------------

    async def _watch_forever(self) -> None:
        version = await self._relist()
        while True:
            try:
                version = await self._watch_from(version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API server went away, a 410 Gone...
                gone = isinstance(e, ApiException) and e.status == 410
                if not gone:
                    self.log.warning("the watch of kernel pods failed (%s); again", e)
                    await asyncio.sleep(RETRY_SECONDS)
                version = await self._relist()

    async def _relist(self) -> str:
        """List every kernel pod (after a start, or when the watch's version is too old);
        the list's resourceVersion, to watch from."""
        while True:
            try:
                listed = await self.core.list_namespaced_pod(
                    self.namespace, label_selector=manifests.SELECTOR
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log.warning("cannot list kernel pods (%s); again", e)
                await asyncio.sleep(RETRY_SECONDS)
        seen = set()
        for pod in listed.items:
            seen.add(pod.metadata.name)
            self._saw(pod, deleted=False)
        for name in set(self.pods) - seen:  # deleted while nobody watched
            self._gone(name)
        if not self.synced.is_set():
            self.log.info("%d kernel pods in namespace %s", len(seen), self.namespace)
        self.synced.set()
        return listed.metadata.resource_version

    async def _watch_from(self, version: str) -> str:
        stream = watch.Watch()
        async with stream:
            async for event in stream.stream(
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=manifests.SELECTOR,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
            ):
                # kubernetes_asyncio raises an ERROR event (410 Gone among them) as an
                # ApiException; a BOOKMARK's object stays a dict, the others are V1Pods.
                kind, raw = event["type"], event.get("raw_object") or {}
                version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._saw(event["object"], deleted=kind == "DELETED")
        return version

    def _saw(self, pod: client.V1Pod, deleted: bool) -> None:
        name = pod.metadata.name
        state = self.pods.get(name)
        if state is None:
            if deleted:
                return
            state = self.pods[name] = _owner(pod)
        _read(state, pod)
        if deleted:
            self._gone(name)
            return
        self._tell(state)

    def _gone(self, name: str) -> None:
        state = self.pods.pop(name, None)
        if state is None:
            return
        if not state.reason and not state.ended:  # deleted before it ended by itself
            state.reason = "Deleted"
        state.gone = True
        state.changed.set()
        self._tell(state)

    def _tell(self, state: KernelPod) -> None:
        for listener in list(self.listeners):
            try:
                listener(state)
            except Exception:
                self.log.exception("a listener of kernel pod events failed")

    # -- kernels ----------------------------------------------------------------

    def of_user(self, user: str) -> list[KernelPod]:
        """The user's kernel pods that have not ended (what the user's quotas count)."""
        return [p for p in self.pods.values() if p.user == user and not p.ended]

    async def create(self, plan: KernelPlan, secret_data: Mapping[str, str]) -> KernelPod:
        """Make the kernel's Pod, then its Secret and NetworkPolicy owned by it. Until its
        own policy exists the namespace's default-deny holds it, and the agent starts only
        once its Secret is there (the kubelet waits for it). SandboxError if the API
        refuses; whatever was made is deleted again."""
        try:
            made = await self.core.create_namespaced_pod(self.namespace, manifests.pod(plan))
        except ApiException as e:
            raise SandboxError(f"Kubernetes refused the kernel's pod: {_reason(e)}") from None
        owner = {
            "apiVersion": "v1", "kind": "Pod", "name": made.metadata.name,
            "uid": made.metadata.uid, "blockOwnerDeletion": True,
        }  # fmt: skip
        try:
            secret = manifests.secret(plan, secret_data)
            policy = manifests.network_policy(plan)
            for body in (secret, policy):
                body["metadata"]["ownerReferences"] = [owner]
            await self.core.create_namespaced_secret(self.namespace, secret)
            await self.networking.create_namespaced_network_policy(self.namespace, policy)
        except BaseException as e:
            await self.delete(plan.name, grace=0)
            if isinstance(e, ApiException):
                why = f"Kubernetes refused the kernel's objects: {_reason(e)}"
                raise SandboxError(why) from None
            raise
        state = self.pods.get(plan.name)
        if state is None:  # the watch has not seen it yet
            state = self.pods[plan.name] = _owner(made)
            _read(state, made)
        return state

    async def until_running(self, state: KernelPod, timeout: float) -> None:
        """Wait (on the watch) until the kernel's container runs with a pod IP. SandboxError
        saying why if it ended, cannot start (its image, its agent) or is not running
        within `timeout` (unschedulable: the scheduler's message)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (state.running and state.pod_ip):
            if state.ended or state.reason in (*START_FAILURES, "AgentInstallFailed"):
                raise SandboxError(f"the kernel's pod did not start: {describe(state)}")
            left = deadline - loop.time()
            if left <= 0:
                why = f" ({describe(state)})" if state.reason else f" (phase {state.phase})"
                raise SandboxError(f"the kernel's pod was not running within {timeout:.0f} s{why}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(state.changed.wait(), left)

    async def delete(self, name: str, grace: int) -> None:
        """Delete the kernel's pod (its Secret and NetworkPolicy go with it). Never raises
        for a pod that is already gone."""
        try:
            await self.core.delete_namespaced_pod(
                name, self.namespace, grace_period_seconds=grace,
                propagation_policy="Background",
            )  # fmt: skip
        except ApiException as e:
            if e.status != 404:
                raise SandboxError(f"cannot delete kernel pod {name}: {_reason(e)}") from None

    async def until_gone(self, name: str, timeout: float) -> bool:
        """Wait (on the watch) until the pod is deleted from the API; False on timeout."""
        state = self.pods.get(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while state is not None and not state.gone:
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(state.changed.wait(), left)
        return True


def describe(state: KernelPod) -> str:
    """Why a kernel pod ended or cannot start, as its owner reads it."""
    reason, message = state.reason, state.message.strip()
    text = {
        "OOMKilled": "it exceeded its memory limit (OOMKilled)",
        "Evicted": "Kubernetes evicted its pod",
        "NodeLost": "its node was lost and Kubernetes deleted its pod",
        "Deleted": "its pod was deleted",
        "AgentInstallFailed": "the agent could not be installed in its pod",
    }.get(reason, reason or state.phase)
    return f"{text}: {message}" if message else text


def _reason(error: ApiException) -> str:
    """The API's Status message (bounded), not its whole body."""
    try:
        status = json.loads(error.body or "{}")
        message = status.get("message") or error.reason
    except (TypeError, ValueError):
        message = error.reason
    return f"{error.status} {str(message)[:500]}"
