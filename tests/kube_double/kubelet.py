"""The scheduler and the kubelet of the double's one node: pods from manifest to runsc and back.

The scheduler binds a new pod to the node (`spec.nodeName`, PodScheduled). The
kubelet then runs it as a real one would, writing each step into the pod's
status (a MODIFIED event to watchers each time): the pod's network and volumes,
the init containers one by one (each must exit 0; one that fails fails the pod,
`Init:Error`), then the containers together, each in its own runsc sandbox in
the pod's network namespace (`runtime.py`), with readiness, liveness and
startup probes run from the host. An image the config does not know leaves the
container waiting in ErrImagePull / ImagePullBackOff; a missing secret, config
map or claim leaves the pod in ContainerCreating until it appears.

Deleting a pod (a `deletionTimestamp` set by the API) sends SIGTERM to its
containers, SIGKILL after the grace period, writes their terminated states and
the pod's final phase, removes everything of it from the host and then the
object itself (DELETED). A pod removed at once (grace 0, or a terminal one) is
killed and cleaned up after the fact, as on a real node.

The test hooks act as the node would: `evict` (the eviction manager: containers
killed, phase Failed, reason Evicted, a DisruptionTarget condition) and
`lose_node` (the node drops off the network: its pods are cut off without a
FIN, killed, and then, as the node lifecycle controller and the taint manager
do, marked not Ready, given a DisruptionTarget condition, deleted gracefully,
and removed as pod garbage collection does once the node is gone).

Statuses are written only by the pod's own worker (or, for a lost node, by the
controllers), and only while the object in the store is still that pod (its uid).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import controllers, mounts, oci
from .config import Config
from .firewall import Firewalls, Guarded
from .kinds import CONFIG_MAP, POD, SECRET
from .meta import bad_request, not_found, now
from .network import Network, PodNet
from .probes import Prober
from .runtime import Container, Exit
from .store import Event, Store
from .volumes import HostVolume, Unavailable, Volumes, sub_path

log = logging.getLogger(__name__)

Obj = dict[str, Any]

BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
"""Retry delays for a missing image, volume source or configuration (the kubelet's are
10 s to 5 min: shorter here, as tests wait for them)."""
TERMINATION_MESSAGE_BYTES = 4096
ETC_HOSTS = """# Kubernetes-managed hosts file.
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
{ip}\t{hostname}
"""


class Stopped(Exception):
    """The pod's worker was told to stop (deletion, eviction, node loss, shutdown)."""


@dataclass
class ContainerStatus:
    """What the kubelet reports of one container."""

    name: str
    image: str
    init: bool
    state: Obj = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    container_id: str = ""
    image_id: str = ""

    def render(self) -> Obj:
        status: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "restartCount": 0,
            "started": self.started,
            "state": self.state,
            "lastState": {},
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> Obj | None:
        return self.state.get("terminated")


class PodWorker:
    """One pod on the node, from its binding to its removal."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.config = kubelet.config
        self.pod = pod
        """The pod as bound (its spec does not change)."""
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = kubelet.state / "pods" / self.uid
        spec = pod["spec"]
        self.statuses = {
            c["name"]: ContainerStatus(c["name"], c["image"], init)
            for init, group in (
                (True, spec.get("initContainers") or []),
                (False, spec["containers"]),
            )
            for c in group
        }
        self.conditions: dict[str, Obj] = {}
        self.phase = "Pending"
        self.reason = ""
        self.message = ""
        self.start_time = ""
        self.net: PodNet | None = None
        self.containers: dict[str, Container] = {}
        self.stop = asyncio.Event()
        self.why_stopped = ""
        """"deleted", "evicted", "deadline", "lost", "removed" or "shutdown"."""
        self.deadline = float("inf")
        """When the deletion's grace period ends (monotonic)."""
        self.deadline_moved = asyncio.Event()
        self.silent = False
        """The kubelet no longer reports (node lost, object removed, shutdown)."""
        self.task: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        """activeDeadlineSeconds."""

    # -- status -------------------------------------------------------------------------

    def condition(self, kind: str, status: bool, reason: str = "", message: str = "") -> None:
        value = "True" if status else "False"
        old = self.conditions.get(kind)
        if old and (old["status"], old.get("reason", ""), old.get("message", "")) == (
            value,
            reason,
            message,
        ):
            return
        entry: Obj = {
            "type": kind,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"]
            if old and old["status"] == value
            else now(),
        }
        if reason:
            entry["reason"] = reason
        if message:
            entry["message"] = message
        self.conditions[kind] = entry

    def _render(self, status: Obj) -> Obj:
        order = (
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
            "DisruptionTarget",
        )
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        conditions.update(self.conditions)
        new: Obj = {
            "phase": self.phase,
            "conditions": sorted(
                conditions.values(),
                key=lambda c: order.index(c["type"]) if c["type"] in order else 99,
            ),
            "hostIP": self.config.gateway,
            "hostIPs": [{"ip": self.config.gateway}],
            "qosClass": status.get("qosClass", "BestEffort"),
        }
        if self.net is not None or status.get("podIP"):
            ip = self.net.ip if self.net is not None else status["podIP"]
            new["podIP"], new["podIPs"] = ip, [{"ip": ip}]
        if self.start_time:
            new["startTime"] = self.start_time
        inits = [s.render() for s in self.statuses.values() if s.init]
        if inits:
            new["initContainerStatuses"] = inits
        new["containerStatuses"] = [s.render() for s in self.statuses.values() if not s.init]
        if self.reason:
            new["reason"] = self.reason
        if self.message:
            new["message"] = self.message
        return new

    def publish(self) -> None:
        """Write the status into the pod object, if it is still this pod and the kubelet
        still reports."""
        if self.silent:
            return
        obj = self.kubelet.store.find(POD, self.namespace, self.name)
        if obj is None or obj["metadata"]["uid"] != self.uid:
            return

        def change(pod: Obj) -> None:
            pod["status"] = self._render(pod.get("status") or {})

        self.kubelet.store.update(POD, self.namespace, self.name, change)

    def _readiness(self) -> None:
        """Ready and ContainersReady from the containers, as the status manager computes."""
        mains = [s for s in self.statuses.values() if not s.init]
        if self.phase in ("Succeeded", "Failed"):
            self.condition("ContainersReady", False, "PodCompleted")
            self.condition("Ready", False, "PodCompleted")
            return
        unready = [s.name for s in mains if not s.ready]
        if unready:
            message = f"containers with unready status: [{' '.join(unready)}]"
            self.condition("ContainersReady", False, "ContainersNotReady", message)
            self.condition("Ready", False, "ContainersNotReady", message)
        else:
            self.condition("ContainersReady", True)
            self.condition("Ready", True)

    def _phase(self) -> None:
        mains = [s for s in self.statuses.values() if not s.init]
        ended = [s.terminated for s in mains if s.terminated is not None]
        if len(ended) == len(mains):
            self.phase = "Succeeded" if all(t["exitCode"] == 0 for t in ended) else "Failed"
        elif any(s.running for s in mains) and all(s.running or s.terminated for s in mains):
            self.phase = "Running"
        self._readiness()

    # -- waiting without blocking a stop ------------------------------------------------

    async def pause(self, seconds: float) -> None:
        """Sleep, or raise Stopped as soon as the worker is told to stop."""
        if self.stop.is_set():
            raise Stopped
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        if self.stop.is_set():
            raise Stopped

    # -- the lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Stopped:
            pass
        except Exception as e:
            log.exception("pod %s/%s", self.namespace, self.name)
            self.phase, self.reason, self.message = "Failed", "KubeDoubleError", str(e)[:1000]
            self.publish()
        finally:
            if self.timer is not None:
                self.timer.cancel()
            try:
                await self._release()
            finally:
                self.ended.set()
        await self._after()

    async def _run(self) -> None:
        spec = self.pod["spec"]
        inits = spec.get("initContainers") or []
        self.start_time = now()
        for status in self.statuses.values():
            reason = "PodInitializing" if status.init or inits else "ContainerCreating"
            status.state = {"waiting": {"reason": reason}}
        self.condition("PodReadyToStartContainers", False)
        if inits:
            names = " ".join(c["name"] for c in inits)
            self.condition(
                "Initialized",
                False,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{names}]",
            )
        else:
            self.condition("Initialized", True)
        self.condition("PodScheduled", True)
        self._readiness()
        self.publish()
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None:
            self.timer = asyncio.get_running_loop().call_later(
                float(deadline), lambda: self.kubelet.spawn(self.fail("deadline"))
            )
        await self._sandbox()
        volumes = await self._volumes()
        for container in inits:
            exit_ = await self._run_container(container, volumes)
            if exit_.code != 0:
                self.phase = "Failed"
                self._readiness()
                self.publish()
                return
        self.condition("Initialized", True)
        self.publish()
        await asyncio.gather(*(self._run_container(c, volumes) for c in spec["containers"]))

    async def _sandbox(self) -> None:
        """The pod's network (the pod sandbox of the CRI), once its runtime class can run."""
        runtime_class = self.pod["spec"].get("runtimeClassName")
        handler = (
            self.config.runtime_classes.get(runtime_class, "runsc") if runtime_class else "runsc"
        )
        if handler != "runsc":
            message = (
                f"Failed to create pod sandbox: rpc error: code = Unknown desc = failed "
                f'to get sandbox runtime: no runtime for "{handler}" is configured'
            )
            for status in self.statuses.values():
                status.state = {"waiting": {"reason": "ContainerCreating", "message": message}}
            self.publish()
            while True:
                await self.pause(3600)
        self.dir.mkdir(mode=0o700, parents=True)
        for sub in ("logs", "termination"):
            (self.dir / sub).mkdir(mode=0o755)
        network = self.kubelet.network
        address = network.allocate()
        try:
            self.net = await asyncio.to_thread(network.create, self.uid, address)
        except BaseException:
            network.release(address)
            raise
        hostname = self.pod["spec"].get("hostname") or self.name
        (self.dir / "hosts").write_text(ETC_HOSTS.format(ip=self.net.ip, hostname=hostname))
        (self.dir / "hostname").write_text(hostname + "\n")
        (self.dir / "resolv.conf").write_text(
            f"search {self.namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
            f"nameserver {self.config.gateway}\noptions ndots:5\n"
        )
        self.condition("PodReadyToStartContainers", True)
        self.publish()
        await self.kubelet.firewalls.enforce(Guarded(self.uid, self.namespace, self.name, self.net))

    async def _volumes(self) -> dict[str, HostVolume]:
        volumes = Volumes(self.dir, self.pod, self.kubelet.store, self.config)
        delay = BACKOFF_START
        while True:
            try:
                return await asyncio.to_thread(volumes.prepare)
            except Unavailable as e:
                # The kubelet says so in an event (FailedMount), not in the status.
                log.info("pod %s/%s: MountVolume.SetUp failed: %s", self.namespace, self.name, e)
                await self.pause(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _image(self, status: ContainerStatus) -> Path:
        image = self.config.images.get(status.image)
        delay = BACKOFF_START
        while image is None:
            status.state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": (
                        f'failed to pull and unpack image "{status.image}": failed to resolve '
                        f'reference "{status.image}": {status.image}: not found'
                    ),
                }
            }
            self.publish()
            await self.pause(min(delay, 1.0))
            status.state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{status.image}"',
                }
            }
            self.publish()
            await self.pause(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            image = self.config.images.get(status.image)
        return image

    def _lookup(self, kind: str, name: str) -> dict[str, str] | None:
        obj = self.kubelet.store.find(
            SECRET if kind == "Secret" else CONFIG_MAP, self.namespace, name
        )
        if obj is None:
            return None
        if kind == "Secret":
            return {
                k: base64.b64decode(v).decode(errors="replace")
                for k, v in (obj.get("data") or {}).items()
            }
        return dict(obj.get("data") or {})

    async def _configure(self, container: Obj, status: ContainerStatus, image: Path) -> list[str]:
        """The container's environment, once what it refers to exists (CreateContainerConfigError
        meanwhile), and its user allowed by runAsNonRoot."""
        delay = BACKOFF_START
        while True:
            try:
                env = oci.environment(self.pod_now(), container, self._lookup, self.config.gateway)
                sc = oci.security(self.pod, container)
                uid = oci.user(self.pod, container, image).uid
                if sc.get("runAsNonRoot") and uid == 0:
                    raise oci.ConfigError(
                        "container's runAsUser breaks non-root policy"
                        if "runAsUser" in sc
                        else "container has runAsNonRoot and image will run as root "
                        f'(pod: "{self.name}_{self.namespace}({self.uid})", '
                        f"container: {container['name']})"
                    )
                return env
            except oci.ConfigError as e:
                status.state = {
                    "waiting": {"reason": "CreateContainerConfigError", "message": str(e)}
                }
                self.publish()
                await self.pause(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def pod_now(self) -> Obj:
        """The pod with its current status (for the downward API: status.podIP)."""
        pod = dict(self.pod)
        pod["status"] = {"podIP": self.net.ip if self.net else "", "hostIP": self.config.gateway}
        return pod

    def _binds(self, container: Obj, volumes: dict[str, HostVolume]) -> list[oci.Bind]:
        """The container's volume mounts and the kubelet's own files (/etc/hosts, ...)."""
        name = container["name"]
        binds = [
            oci.Bind(self.dir / "hosts", "/etc/hosts", True),
            oci.Bind(self.dir / "hostname", "/etc/hostname", True),
            oci.Bind(self.dir / "resolv.conf", "/etc/resolv.conf", True),
        ]
        message = self.dir / "termination" / name
        message.touch(mode=0o666)
        message.chmod(0o666)
        binds.append(
            oci.Bind(
                message, container.get("terminationMessagePath", "/dev/termination-log"), False
            )
        )
        for i, mount in enumerate(container.get("volumeMounts") or []):
            volume = volumes[mount["name"]]
            source = volume.path
            read_only = volume.read_only or bool(mount.get("readOnly"))
            if mount.get("subPath"):
                source = self.dir / "subpaths" / name / str(i)
                sub_path(volume, mount["subPath"], source)
                if read_only:
                    mounts.read_only(source)
            elif read_only:
                view = self.dir / "read-only" / name / str(i)
                mounts.bind_read_only(source, view)
                source = view
            binds.append(oci.Bind(source, mount["mountPath"], read_only))
        return binds

    async def _run_container(self, container: Obj, volumes: dict[str, HostVolume]) -> Exit:
        """Run one container to its end and report each step; Stopped if told to stop
        before it started."""
        status = self.statuses[container["name"]]
        image = await self._image(status)
        env = await self._configure(container, status, image)
        if self.stop.is_set():
            raise Stopped
        cid = f"kd{secrets.token_hex(6)}"
        bundle = self.dir / "containers" / container["name"]
        log_path = self.dir / "logs" / f"{container['name']}.log"
        runner = Container(self.config, cid, bundle, log_path)
        self.containers[container["name"]] = runner
        root = await asyncio.to_thread(runner.prepare, image)
        binds = await asyncio.to_thread(self._binds, container, volumes)
        spec = oci.spec(
            self.pod,
            container,
            root=root,
            image_root=image,
            env=env,
            binds=binds,
            cgroup=runner.cgroup,
        )
        assert self.net is not None
        read_only = bool(oci.security(self.pod, container).get("readOnlyRootFilesystem"))
        await runner.start(spec, self.net.netns, read_only, oci.memory_limit(container))
        await runner.running()
        started = now()
        status.container_id = f"containerd://{cid}"
        status.image_id = "sha256:" + hashlib.sha256(status.image.encode()).hexdigest()
        status.state = {"running": {"startedAt": started}}
        status.started = True
        if self.stop.is_set():  # told to stop while it was starting
            await runner.signal(
                "TERM" if self.why_stopped == "deleted" else "KILL", everything=True
            )
        status.ready = not status.init and "readinessProbe" not in container
        if not status.init:
            self._phase()
        self.publish()
        prober = None
        if any(p in container for p in ("startupProbe", "readinessProbe", "livenessProbe")):
            grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

            def set_ready(ready: bool) -> None:
                if status.running:
                    status.ready = ready
                    self._phase()
                    self.publish()

            prober = asyncio.create_task(
                Prober(self.net.ip, container, runner, grace, set_ready).run()
            )
        try:
            exit_ = await runner.wait()
        finally:
            if prober is not None:
                prober.cancel()
        status.ready = False
        status.state = {"terminated": self._terminated(container, runner, exit_, started)}
        if not status.init:
            self._phase()
        self.publish()
        return exit_

    def _terminated(self, container: Obj, runner: Container, exit_: Exit, started: str) -> Obj:
        code, reason = exit_.code, "Completed" if exit_.code == 0 else "Error"
        if exit_.oom:
            code, reason = 137, "OOMKilled"
        elif exit_.start_error:
            reason = "StartError"
        elif self.why_stopped in ("evicted", "lost", "deadline") and code:
            code = 137
        state: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now(),
            "containerID": f"containerd://{runner.cid}",
        }
        message = self._termination_message(container, runner, exit_)
        if message:
            state["message"] = message
        return state

    def _termination_message(self, container: Obj, runner: Container, exit_: Exit) -> str:
        if exit_.start_error:
            return exit_.start_error
        path = self.dir / "termination" / container["name"]
        try:
            with open(path, "rb") as file:
                text = file.read(TERMINATION_MESSAGE_BYTES).decode(errors="replace")
        except OSError:
            text = ""
        if (
            not text
            and exit_.code
            and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            lines = runner.tail(2048).splitlines()[-80:]
            text = "\n".join(lines)
        return text

    # -- stopping -----------------------------------------------------------------------

    def delete(self, grace: int) -> None:
        """The API set a deletionTimestamp: SIGTERM now, SIGKILL after `grace` seconds (a
        shorter grace given later wins)."""
        deadline = time.monotonic() + grace
        if deadline < self.deadline:
            self.deadline = deadline
            self.deadline_moved.set()
        if not self.why_stopped:
            self.why_stopped = "deleted"
            self.stop.set()
            self.kubelet.spawn(self._terminate())

    async def _terminate(self) -> None:
        for runner in list(self.containers.values()):
            await runner.signal("TERM")
        while not self.ended.is_set():
            self.deadline_moved.clear()
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            waits = [asyncio.create_task(e.wait()) for e in (self.ended, self.deadline_moved)]
            _, pending = await asyncio.wait(
                waits, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
        for runner in list(self.containers.values()):
            await runner.signal("KILL", everything=True)

    async def fail(self, why: str, message: str = "") -> None:
        """Kill the pod now and fail it: "evicted" (the eviction manager, with `message`) or
        "deadline" (activeDeadlineSeconds). Nothing happens to a pod already stopping."""
        if self.why_stopped or self.phase in ("Succeeded", "Failed"):
            return
        self.why_stopped = why
        self.stop.set()
        await asyncio.gather(*(runner.stop() for runner in list(self.containers.values())))
        await self.ended.wait()
        self.phase = "Failed"
        if why == "evicted":
            self.reason, self.message = "Evicted", message
            self.condition("DisruptionTarget", True, "TerminationByKubelet", message)
        else:
            self.reason = "DeadlineExceeded"
            self.message = "Pod was active on the node longer than the specified deadline"
        self._readiness()
        self.publish()

    async def silence(self, why: str) -> None:
        """Stop reporting, kill everything now and wait until all of it is gone from the host
        (the node is lost, the object was removed, the double shuts down)."""
        self.silent = True
        self.why_stopped = self.why_stopped or why
        self.stop.set()
        if why == "lost" and self.net is not None:
            await asyncio.to_thread(self.kubelet.network.cut, self.net)
        await asyncio.gather(*(runner.stop() for runner in list(self.containers.values())))
        await self.ended.wait()

    async def _release(self) -> None:
        """Remove the containers' sandboxes and the pod's network (the logs stay until the
        object goes)."""
        for runner in list(self.containers.values()):
            await runner.remove()
        if self.net is not None:
            await asyncio.to_thread(self.kubelet.network.remove, self.net)

    async def _after(self) -> None:
        """Once the containers are gone: a deleted pod is removed from the store."""
        if self.why_stopped == "deleted":
            for status in self.statuses.values():
                if "running" in status.state:  # killed before its end was seen
                    status.state = {
                        "terminated": {"exitCode": 137, "reason": "Error", "finishedAt": now()}
                    }
            self._phase()
            if self.phase not in ("Succeeded", "Failed"):
                self.phase = "Failed"
                self._readiness()
            self.publish()
            await self.kubelet.forget(self, remove=True)
        elif self.silent:
            await self.kubelet.forget(self, remove=False)


class Kubelet:
    """The node's kubelet (and the scheduler's binding), fed by the store's pod events."""

    def __init__(self, config: Config, state: Path, store: Store, network: Network) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.network = network
        self.workers: dict[str, PodWorker] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        store.listeners.append(self.on_event)
        self.firewalls = Firewalls(config, store, network, self._guarded)

    def _guarded(self) -> list[Guarded]:
        return [
            Guarded(w.uid, w.namespace, w.name, w.net)
            for w in self.workers.values()
            if w.net is not None and not w.silent
        ]

    def spawn(self, coroutine: Any) -> None:
        """Run `coroutine` on the loop, kept until it ends (its failure is logged)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("kubelet task failed", exc_info=task.exception())

    def on_event(self, event: Event) -> None:
        if event.kind is not POD:
            return
        pod, meta = event.obj, event.obj["metadata"]
        worker = self.workers.get(meta["uid"])
        if event.type == "ADDED":
            self.spawn(self._bind(pod))
        elif event.type == "DELETED":
            if worker is None:
                self.spawn(self._remove_folder(meta["uid"]))
            elif worker.ended.is_set():  # a pod that had ended kept only its logs
                self.spawn(self.forget(worker, remove=False))
            else:
                self.spawn(worker.silence("removed"))
        elif worker is not None and meta.get("deletionTimestamp") and not worker.silent:
            worker.delete(int(meta.get("deletionGracePeriodSeconds", 0)))

    async def _bind(self, pod: Obj) -> None:
        """The scheduler (binding to the node) and the kubelet's admission of the pod."""
        meta = pod["metadata"]
        current = self.store.find(POD, meta["namespace"], meta["name"])
        if current is None or current["metadata"]["uid"] != meta["uid"]:
            return
        if not pod["spec"].get("nodeName"):
            pod = controllers.bind(self.store, pod, self.config.node)
        worker = PodWorker(self, pod)
        self.workers[meta["uid"]] = worker
        worker.task = asyncio.get_running_loop().create_task(worker.run())
        self._tasks.add(worker.task)
        worker.task.add_done_callback(self._done)
        if pod["metadata"].get("deletionTimestamp"):  # deleted before it got here
            worker.delete(int(pod["metadata"].get("deletionGracePeriodSeconds", 0)))

    async def forget(self, worker: PodWorker, remove: bool) -> None:
        """The worker is done: its folder goes, and (`remove`) the object too."""
        self.workers.pop(worker.uid, None)
        self.firewalls.forget(worker.uid)
        await self._remove_folder(worker.uid)
        if remove:
            obj = self.store.find(POD, worker.namespace, worker.name)
            if obj is not None and obj["metadata"]["uid"] == worker.uid:
                self.store.remove(POD, worker.namespace, worker.name)

    async def _remove_folder(self, uid: str) -> None:
        if uid not in self.workers:
            await asyncio.to_thread(mounts.remove_tree, self.state / "pods" / uid)

    # -- for the API and the test hooks -------------------------------------------------

    def worker(self, namespace: str, name: str) -> PodWorker:
        obj = self.store.find(POD, namespace, name)
        worker = self.workers.get(obj["metadata"]["uid"]) if obj else None
        if obj is None or worker is None:
            raise not_found("pods", name)
        return worker

    def logs(
        self, namespace: str, name: str, container: str | None, tail: int | None, limit: int | None
    ) -> bytes:
        """A container's log, as `GET pods/{name}/log` answers (400s as the real server)."""
        pod = self.store.find(POD, namespace, name)
        if pod is None:
            raise not_found("pods", name)
        spec = pod["spec"]
        names = [c["name"] for c in spec["containers"]]
        inits = [c["name"] for c in spec.get("initContainers") or []]
        if container is None:
            if len(names) != 1:
                raise bad_request(
                    f"a container name must be specified for pod {name}, choose "
                    f"one of: [{' '.join(names)}] or one of the init containers: "
                    f"[{' '.join(inits)}]"
                )
            container = names[0]
        if container not in names + inits:
            raise bad_request(f"container {container} is not valid for pod {name}")
        statuses = (pod.get("status") or {}).get("containerStatuses", []) + (
            pod.get("status") or {}
        ).get("initContainerStatuses", [])
        state = next((s["state"] for s in statuses if s["name"] == container), {})
        if "waiting" in state or not state:
            reason = state.get("waiting", {}).get("reason", "ContainerCreating")
            raise bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        path = self.state / "pods" / pod["metadata"]["uid"] / "logs" / f"{container}.log"
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
        if limit is not None:
            data = data[:limit]
        return data

    async def evict(self, namespace: str, name: str, message: str) -> None:
        await self.worker(namespace, name).fail("evicted", message)

    async def lose_node(self, node: str) -> list[str]:
        """The node drops off the network with its pods; the control plane then does what it
        does for a lost node. Returns the names (namespace/name) of the pods it had."""
        lost = [w for w in self.workers.values() if w.pod["spec"].get("nodeName") == node]
        await asyncio.gather(*(w.silence("lost") for w in lost))
        for worker in lost:
            grace = int(worker.pod["spec"].get("terminationGracePeriodSeconds", 30))
            self.spawn(
                controllers.node_lost(self.store, worker.namespace, worker.name, worker.uid, grace)
            )
        return [f"{w.namespace}/{w.name}" for w in lost]

    async def shutdown(self) -> None:
        """Kill every pod and remove all of it from the host (the objects stay in memory)."""
        workers = list(self.workers.values())
        await asyncio.gather(*(w.silence("shutdown") for w in workers))
        ended = [w.task for w in workers if w.task is not None and not w.task.done()]
        if ended:
            await asyncio.wait(ended, timeout=30)
        await asyncio.gather(*(self.forget(w, remove=False) for w in list(self.workers.values())))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.firewalls.remove_peers)

    def describe(self) -> list[Obj]:
        """What runs where, for tests: pod, netns, host link, address, containers."""
        return [
            {
                "namespace": w.namespace,
                "name": w.name,
                "uid": w.uid,
                "netns": w.net.netns if w.net else None,
                "veth": w.net.veth if w.net else None,
                "ip": w.net.ip if w.net else None,
                "containers": {n: c.cid for n, c in w.containers.items()},
            }
            for w in self.workers.values()
        ]
