"""`jupyter sandbox kubernetes serve`: the sandbox service inside a cluster.

A JupyterHub service holding the only Kubernetes credential for kernels (its
ServiceAccount's Role in the kernels' namespace). A user's server asks it over HTTP
with the server's own JupyterHub API token; the hub says whose token it is
(hub.py), and that user's name and groups drive the operator's policy
(`request.grant`, the same as on one host) and quotas (counted on the cluster's
pods). The service makes the kernel's Pod, Secret and NetworkPolicy (manifests.py,
cluster.py), waits on its one watch until the pod runs, and answers with the pod's
address and TLS credentials: from then on the server talks to the pod directly.

Everything a caller sends is checked: its token by the hub, every setting by its
declaration, and every kernel it names against the pod's owner annotation (one user
can never see, signal or delete another's kernel). A restarted service adopts the
kernels from their pods (cluster.py); `gc` deletes the pods whose server is gone.

Routes (JSON; errors as {"kind", "message"} with the error's HTTP status):
  POST   /kernels            start a kernel        GET /kernels       the caller's kernels
  GET    /kernels/{name}     one kernel's state    DELETE /kernels/{name}?grace=&wait=
  GET    /events             the caller's kernels' changes, one JSON object per line
  GET    /health             liveness (no token)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import web
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from traitlets import Bool, Dict, Float, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .. import backends, policy, quotas, settings
from ..backends.kubernetes import KUBERNETES
from ..errors import Error, ImageError, PolicyError, RequestError, SandboxError, SettingError
from ..guest.layout import KERNEL_HOME
from ..network.spec import NetworkSpec
from ..request import Requester, SandboxRequest, grant, limits_of, network_of
from . import credentials, manifests
from .cluster import Cluster, KernelPod, describe
from .hub import Caller, Hub
from .manifests import AGENT_PORT, GRACE_SECONDS, KernelPlan, Workspace

STOP_SECONDS = 2.0
"""Seconds running requests get when the service stops."""
MAX_BODY = 64 * 1024
"""Bytes of one request body: a kernel start is a few hundred."""
_KERNEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SANDBOXING_HANDLERS = ("runsc", "gvisor", "kata", "kata-qemu", "kata-fc", "kata-clh",
                       "kata-qemu-tdx", "kata-qemu-snp", "kata-dragonball")  # fmt: skip
"""RuntimeClass handlers known to run a pod in a sandbox of its own (gVisor, Kata)."""
BLOCKED_BY_DEFAULT = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private: pod, service, node ranges
    "100.64.0.0/10",  # shared address space (some clusters' pod ranges)
    "169.254.0.0/16",  # link-local: metadata services
    "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/3",
    "100.100.100.200/32", "168.63.129.16/32",  # Alibaba's and Azure's metadata services
)  # fmt: skip
"""What `network = "open"` never reaches unless the operator narrows it."""


class KubernetesService(LoggingConfigurable):
    """The Kubernetes sandbox service's configuration and its one instance's state."""

    port = Int(8181, config=True, help="The port the service listens on.")
    ip = Unicode("0.0.0.0", config=True, help="The address the service listens on.")
    namespace = Unicode(
        "jupyter-sandbox-kernels", config=True,
        help="The namespace of kernel pods (Pod Security `restricted`, default-deny network).",
    )  # fmt: skip
    hub_namespace = Unicode(
        "jhub", config=True, help="The namespace of the hub and the users' server pods."
    )
    runtime_class = Unicode(
        "gvisor", config=True,
        help="The RuntimeClass of kernel pods: gvisor, kata-qemu, kata-fc... Its handler must "
        f"sandbox ({', '.join(SANDBOXING_HANDLERS)}) unless allow_unsandboxed.",
    )  # fmt: skip
    allow_unsandboxed = Bool(
        False, config=True,
        help="Development only: allow a runtime class that does not sandbox (or none: "
        "runtime_class = ''). Kernels then share the node's kernel with everything else.",
    )  # fmt: skip
    agent_image = Unicode(
        config=True, help="The agent image (`jupyter sandbox kubernetes agent-image`)."
    )
    images = Dict(
        value_trait=Unicode(), config=True,
        help="Kernel images by name (what kernelspecs and the policy's `images` say) -> "
        "the image reference the cluster pulls.",
    )  # fmt: skip
    image_pull_policy = Unicode("IfNotPresent", config=True)
    kernel_settings = Dict(
        config=True,
        help="Kernels' settings where a caller asks for none (memory_limit, cpu_limit...): "
        "also the ceilings for what the policy file leaves out.",
    )  # fmt: skip
    policy_file = Unicode(
        "", config=True, help="The operator's policy (TOML, docs: 'Policy and quotas')."
    )
    hub_api_url = Unicode(config=True, help="The hub's API (default: $JUPYTERHUB_API_URL).")
    hub_api_token = Unicode(
        config=True, help="This service's own hub token (default: $JUPYTERHUB_API_TOKEN)."
    )
    token_ttl = Float(30.0, config=True, help="Seconds a token the hub accepted is trusted.")
    server_pod_labels = Dict(
        value_trait=Unicode(), config=True,
        help="Labels of a user's server pod (in hub_namespace): the only pod a kernel's "
        "NetworkPolicy admits. '{username}' is the user's name as KubeSpawner writes it in "
        "labels, '{servername}' the server's.",
    )  # fmt: skip
    server_label_scheme = Unicode(
        "safe", config=True,
        help="How KubeSpawner spells user names in labels: safe (KubeSpawner 7, "
        "zero-to-jupyterhub 4) or escape (KubeSpawner 6).",
    )  # fmt: skip
    blocked_networks = List(
        Unicode(), list(BLOCKED_BY_DEFAULT), config=True,
        help="What no kernel reaches, with network = open or egress (egress_allow cannot "
        "name around it; resolved names in it admit nothing): the cluster's pod, service "
        "and node ranges. Link-local, metadata, loopback and multicast are always added.",
    )  # fmt: skip
    dns_namespace = Unicode("kube-system", config=True)
    dns_labels = Dict(value_trait=Unicode(), default_value={"k8s-app": "kube-dns"}, config=True)
    workspace_claim = Unicode(
        "claim-{username}", config=True,
        help="The user's PersistentVolumeClaim (zero-to-jupyterhub's name) for workspace = "
        "rw or ro; '{username}' as KubeSpawner escapes it.",
    )  # fmt: skip
    workspace_mount_path = Unicode("/home/jovyan", config=True)
    workspace_single_node = Bool(
        True, config=True,
        help="The users' volumes are ReadWriteOnce: a kernel pod that mounts one is scheduled "
        "on its owner's server's node (pod affinity). False for ReadWriteMany volumes.",
    )  # fmt: skip
    node_selector = Dict(value_trait=Unicode(), config=True)
    tolerations = List(Dict(), config=True)
    gc_interval = Float(60.0, config=True, help="Seconds between looks for orphaned pods.")
    ended_grace = Float(
        120.0, config=True, help="Seconds an ended kernel pod may stay before gc deletes it."
    )
    api_url = Unicode(
        config=True,
        help="The Kubernetes API; default: in the cluster, its own; else ~/.kube/config.",
    )
    api_token_file = Unicode(config=True, help="A bearer token for api_url (with api_url).")

    @default("hub_api_url")
    def _hub_url(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    @default("hub_api_token")
    def _hub_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @default("server_pod_labels")
    def _server_labels(self) -> dict[str, str]:
        return {"component": "singleuser-server", "hub.jupyter.org/username": "{username}"}

    @default("images")
    def _images(self) -> dict[str, str]:
        return {"python3": "jupyter-sandbox-python3:latest"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cluster: Cluster | None = None
        self.hub: Hub | None = None
        self._user_locks: dict[str, asyncio.Lock] = {}
        self._starting: dict[str, list[int]] = {}
        """Memory of the kernels each user is starting now (not pods yet): quotas count
        them too."""
        self._gc: asyncio.Task | None = None

    # -- configuration ----------------------------------------------------------

    def kernel_defaults(self) -> dict[str, Any]:
        """Every kernel setting at the kubernetes backend's default, then the operator's
        `kernel_settings` (checked by their declarations)."""
        kind = KUBERNETES
        values = kind.defaults()
        for name, value in self.kernel_settings.items():
            if name not in values:
                raise SettingError(f"kernel_settings: unknown setting {name!r}")
            try:
                values[name] = settings.check(settings.BY_NAME.get(name) or _own(kind, name),
                                              value)  # fmt: skip
            except ValueError as e:
                raise SettingError(f"kernel_settings: {e}") from None
        return values

    def check_config(self) -> None:
        """SettingError naming what is wrong with this configuration."""
        if not self.runtime_class and not self.allow_unsandboxed:
            raise SettingError(
                "runtime_class is empty: kernel pods would run on the node's own kernel; "
                "name a sandboxing RuntimeClass (gvisor, kata-qemu...) or, for development "
                "only, set allow_unsandboxed = True"
            )
        if not self.agent_image:
            raise SettingError("agent_image is not set (`jupyter sandbox kubernetes agent-image`)")
        if not self.images:
            raise SettingError("images is empty: no kernel image to run")
        if not self.policy_file:
            # As the one-host service: without the operator's ceilings and quotas a caller
            # would get whatever it asks for (deploy/kubernetes/service.yaml sets one).
            raise SettingError("policy_file is not set: the operator's policy (docs: 'Policy "
                               "and quotas') bounds what every caller may ask")  # fmt: skip
        manifests.check_blocked(self.blocked_networks)
        self.kernel_defaults()

    # -- the plan of one kernel -------------------------------------------------

    def labels_for(self, user: str, server: str) -> dict[str, str]:
        """The owner's server pod's labels (`server_pod_labels`, filled in)."""
        scheme = self.server_label_scheme
        values = {"username": kubespawner_label(user, scheme),
                  "servername": kubespawner_label(server, scheme)}  # fmt: skip
        return {k: v.format(**values) for k, v in self.server_pod_labels.items()}

    def plan(self, kernel_id: str, user: str, server: str, kernelspec: str,
             granted: Mapping[str, Any], cwd: str,
             egress_addresses: Mapping[str, list[str]]) -> KernelPlan:  # fmt: skip
        """The kernel's objects for these granted settings. SettingError/ImageError if the
        settings name an image or workspace this service has not."""
        image = self.images.get(granted["image"])
        if image is None:
            raise ImageError(
                f"no kernel image {granted['image']!r} in this cluster's service; known: "
                f"{', '.join(sorted(self.images))}"
            )
        network: NetworkSpec = network_of(granted, self.log)
        workspace = None
        guest_cwd = KERNEL_HOME
        if granted["workspace"] in ("rw", "ro"):
            escaped = kubespawner_label(user, self.server_label_scheme)
            workspace = Workspace(
                claim=self.workspace_claim.format(
                    username=escaped,
                    servername=kubespawner_label(server, self.server_label_scheme),
                ),
                mount_path=self.workspace_mount_path,
                read_only=granted["workspace"] == "ro",
                server_labels=self.labels_for(user, server) if self.workspace_single_node else {},
            )
            guest_cwd = _inside(cwd, self.workspace_mount_path)
        return KernelPlan(
            kernel_id=kernel_id, user=user, server=server, instance=secrets.token_hex(3),
            kernelspec=kernelspec,
            namespace=self.namespace, image=image, agent_image=self.agent_image,
            runtime_class=self.runtime_class or None, limits=limits_of(granted),
            network=network, egress_addresses=dict(egress_addresses),
            blocked_networks=manifests.check_blocked(self.blocked_networks),
            hub_namespace=self.hub_namespace, server_labels=self.labels_for(user, server),
            dns_namespace=self.dns_namespace, dns_labels=dict(self.dns_labels),
            workspace=workspace, cwd=guest_cwd, image_pull_policy=self.image_pull_policy,
            node_selector=dict(self.node_selector), tolerations=list(self.tolerations),
        )  # fmt: skip

    def grant(self, caller: Caller, kernel_id: str, kernelspec: str, asked: Mapping[str, Any],
              cwd: str) -> tuple[dict[str, Any], quotas.Quota]:  # fmt: skip
        """The caller's settings under the operator's policy (as on one host), and its
        quota. Blocks (reads the policy file)."""
        own = self.kernel_defaults()
        try:
            checked = {n: settings.check(settings.BY_NAME[n], v) for n, v in asked.items()}
        except ValueError as e:
            raise SettingError(str(e)) from None
        request = SandboxRequest(
            kernel_id=kernel_id, kernel_name=kernelspec, backend=KUBERNETES.name,
            settings={**own, **checked}, asked=frozenset(checked), cwd=cwd,
        )  # fmt: skip
        who = Requester(
            identity=policy.Identity(caller.name, caller.groups),
            policy_file=self.policy_file,
            bounds={name: own[name] for name in settings.BOUNDED},
        )
        return grant(request, who, self.log)

    # -- running ------------------------------------------------------------------

    async def connect(self) -> client.ApiClient:
        """The Kubernetes API client: `api_url` with `api_token_file`, else in-cluster,
        else the kubeconfig."""
        if self.api_url:
            configuration = client.Configuration(host=self.api_url)
            if self.api_token_file:
                token = Path(self.api_token_file).read_text().strip()
                configuration.api_key = {"BearerToken": token}
                configuration.api_key_prefix = {"BearerToken": "Bearer"}
            return client.ApiClient(configuration)
        try:
            config.load_incluster_config()
        except config.ConfigException:
            await config.load_kube_config()
        return client.ApiClient()

    async def check_runtime_class(self, api: client.ApiClient) -> None:
        """SettingError unless `runtime_class` exists and its handler sandboxes (or the
        operator allowed otherwise)."""
        if not self.runtime_class:
            self.log.warning("allow_unsandboxed: kernel pods run WITHOUT a sandbox")
            return
        try:
            found = await client.NodeV1Api(api).read_runtime_class(self.runtime_class)
        except ApiException as e:
            raise SettingError(
                f"RuntimeClass {self.runtime_class!r} cannot be read ({e.status} {e.reason}): "
                "install it (deploy/kubernetes/runtimeclasses.yaml)"
            ) from None
        handler = found.handler or ""
        if not handler.startswith(SANDBOXING_HANDLERS):
            if not self.allow_unsandboxed:
                raise SettingError(
                    f"RuntimeClass {self.runtime_class!r} runs handler {handler!r}, which is "
                    "not a sandbox (gVisor's runsc, Kata); set allow_unsandboxed = True for "
                    "development only"
                )
            self.log.warning("allow_unsandboxed: handler %r is not a known sandbox", handler)

    async def start(self) -> web.AppRunner:
        """Connect to the API and the hub, adopt the existing kernel pods, start gc, and
        listen. Returns the runner (`stop` ends it all)."""
        self.check_config()
        if not self.hub_api_url:
            raise SettingError("hub_api_url is not set (nor $JUPYTERHUB_API_URL)")
        api = await self.connect()
        try:
            await self.check_runtime_class(api)
            self.cluster = Cluster(api, self.namespace, self.log)
            await self.cluster.start()
        except BaseException:
            await api.close()
            raise
        self.hub = Hub(self.hub_api_url, self.hub_api_token, self.log, self.token_ttl)
        self._gc = asyncio.create_task(self._collect_forever())
        # Event streams last as long as their servers: at a stop they are cut after a
        # moment (their clients reconnect to the next service), not waited for.
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=STOP_SECONDS)
        await runner.setup()
        await web.TCPSite(runner, self.ip, self.port).start()
        sandbox = self.runtime_class or "NO SANDBOX"
        self.log.info("Kubernetes sandbox service on %s:%d, kernels in %s under %s",
                      self.ip, self.port, self.namespace, sandbox)  # fmt: skip
        return runner

    async def stop(self, runner: web.AppRunner) -> None:
        """Stop listening and watching. Kernel pods keep running: the next start adopts
        them."""
        if self._gc is not None:
            self._gc.cancel()
        await runner.cleanup()
        if self.hub is not None:
            await self.hub.close()
        if self.cluster is not None:
            await self.cluster.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.add_routes([
            web.get("/health", self.on_health),
            web.post("/kernels", self.on_create),
            web.get("/kernels", self.on_list),
            web.get("/kernels/{name}", self.on_get),
            web.delete("/kernels/{name}", self.on_delete),
            web.get("/events", self.on_events),
        ])  # fmt: skip
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """This project's errors as JSON with their HTTP status; anything else as 500
        without its details (logged)."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Error as e:
            status = getattr(e, "http_status", 500)
            if status >= 500:
                self.log.error("%s %s: %s", request.method, request.path, e)
            return web.json_response({"kind": e.kind, "message": str(e)}, status=status)
        except Exception:
            self.log.exception("%s %s failed", request.method, request.path)
            return web.json_response(
                {"kind": "service", "message": "the sandbox service failed; see its log"},
                status=500,
            )

    async def _caller(self, request: web.Request) -> Caller:
        """Whose token the request carries; PolicyError if it may act for none of its
        owner's servers (any hub token identifies its owner, even one made for reading,
        or a user's OAuth token held by another user's shared server)."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("token", "bearer"):
            token = ""
        assert self.hub is not None
        caller = await self.hub.identify(token.strip())
        if caller.servers is not None and not caller.servers:
            raise PolicyError("this token may act for none of its user's servers")
        return caller

    @staticmethod
    def _mine(caller: Caller, pod: KernelPod) -> bool:
        """Whether `pod` is the caller's: its user's, of a server its token may act for."""
        return pod.user == caller.name and caller.may_act_for(pod.server)

    def _own(self, caller: Caller, name: str) -> KernelPod:
        """The caller's kernel pod `name`: RequestError (404) for another user's (or
        another server's than the token's) as for none, so that nobody learns which
        kernels others have."""
        assert self.cluster is not None
        pod = self.cluster.pods.get(name) if _NAME.match(name) else None
        if pod is None or not self._mine(caller, pod):
            raise NoKernel(f"no kernel {name!r} of {caller.name}")
        return pod

    async def on_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def on_create(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await _body(request)
        kernel_id = _field(body, "kernel_id", _KERNEL_ID)
        kernelspec = _text(body, "kernel_name", 128)
        server = _text(body, "server", 255)
        cwd = _text(body, "cwd", 4096)
        asked = body.get("settings", {})
        if not isinstance(asked, dict) or not set(asked) <= settings.USER_SETTINGS:
            unknown = sorted(set(asked) - settings.USER_SETTINGS) if isinstance(asked, dict) else []
            raise RequestError(f"settings: not settable by a caller: {', '.join(unknown)}")
        if not caller.may_act_for(server):
            raise PolicyError(f"this token may not start kernels for server {server!r}")
        granted, quota = await asyncio.to_thread(self.grant, caller, kernel_id, kernelspec,
                                                 asked, cwd)  # fmt: skip
        addresses = await _resolve(network_of(granted, self.log), self.log)
        plan = self.plan(kernel_id, caller.name, server, kernelspec, granted, cwd, addresses)
        memory = plan.limits.memory or 0
        assert self.cluster is not None
        running = [p for p in self.cluster.of_user(caller.name) if p.kernel_id == kernel_id]
        if running:
            raise RequestError(f"kernel {kernel_id} already has a pod: {running[0].name}")
        lock = self._user_locks.setdefault(caller.name, asyncio.Lock())
        async with lock:
            starting = self._starting.setdefault(caller.name, [])
            held = [p.memory for p in self.cluster.of_user(caller.name)] + starting
            quotas.check(caller.name, held, memory, quota)
            starting.append(memory)
        try:
            creds = credentials.make(plan.name)
            pod = await self.cluster.create(plan, creds.secret_data())
        finally:
            starting.remove(memory)
        try:
            await self.cluster.until_running(pod, float(granted["startup_timeout"]))
        except BaseException:
            await self.cluster.delete(plan.name, grace=0)
            raise
        self.log.info("kernel pod %s for %s (%s): %s on %s", plan.name, caller.name,
                      kernelspec, plan.limits.describe(), pod.node)  # fmt: skip
        return web.json_response({
            "name": plan.name, "host": pod.pod_ip, "port": AGENT_PORT, "user": caller.name,
            "credentials": creds.public(), "cwd": plan.cwd, "state": pod.public(),
            "settings": {n: granted[n] for n in settings.USER_SETTINGS},
        }, status=201)  # fmt: skip

    async def on_list(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        assert self.cluster is not None
        mine = [p.public() for p in self.cluster.pods.values() if self._mine(caller, p)]
        return web.json_response({"kernels": mine})

    async def on_get(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        return web.json_response(self._own(caller, request.match_info["name"]).public())

    async def on_delete(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        pod = self._own(caller, request.match_info["name"])
        grace_text = request.query.get("grace", "")
        grace = None
        if grace_text:
            if not grace_text.isdigit() or int(grace_text) > 300:
                raise RequestError("grace: a number of seconds from 0 to 300")
            grace = int(grace_text)
        assert self.cluster is not None
        await self.cluster.delete(pod.name, grace=GRACE_SECONDS if grace is None else grace)
        if request.query.get("wait") == "true" and not await self.cluster.until_gone(
            pod.name, timeout=60
        ):
            raise SandboxError(f"kernel pod {pod.name} was not gone within 60 s")
        return web.json_response({"deleted": pod.name})

    async def on_events(self, request: web.Request) -> web.StreamResponse:
        """The caller's kernels' states now, then every change, one JSON object per line,
        until the caller goes. A caller that does not read is dropped (bounded queue)."""
        caller = await self._caller(request)
        assert self.cluster is not None
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=1000)

        def listener(pod: KernelPod) -> None:
            if self._mine(caller, pod) and not queue.full():
                # The last place is for the end: a reader that far behind is dropped,
                # and learns every state afresh when it comes back.
                queue.put_nowait(pod.public() if queue.qsize() < queue.maxsize - 1 else None)

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for pod in list(self.cluster.pods.values()):
            if self._mine(caller, pod):
                await response.write(json.dumps(pod.public()).encode() + b"\n")
        self.cluster.listeners.append(listener)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 30)
                except asyncio.TimeoutError:
                    await response.write(b"\n")  # keep-alive: a dead reader is found
                    continue
                if event is None:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.cluster.listeners.remove(listener)
        return response

    # -- gc ---------------------------------------------------------------------------

    async def _collect_forever(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval)
            try:
                await self.collect()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("gc of kernel pods failed")

    async def collect(self) -> list[str]:
        """Delete kernel pods nobody will delete: ended ones after `ended_grace`, and
        those whose server the hub says is gone (never on the hub's silence). The names
        deleted."""
        assert self.cluster is not None and self.hub is not None
        loop_now = time.time()
        starting_for = float(self.kernel_defaults()["startup_timeout"]) + 60
        doomed = [
            p.name for p in self.cluster.pods.values()
            if p.ended and not p.deleting and loop_now - p.created > self.ended_grace
        ]  # fmt: skip
        by_user: dict[str, list[KernelPod]] = {}
        for pod in self.cluster.pods.values():
            # A pod not running yet is a start in flight (its server has just asked for it,
            # whatever the hub said a moment ago): its start deletes it if it never runs;
            # gc takes it only once no start can be waiting for it any more.
            starting = not pod.running and loop_now - pod.created < starting_for
            if not pod.ended and not pod.deleting and not starting:
                by_user.setdefault(pod.user, []).append(pod)
        for user, pods in by_user.items():
            servers = await self.hub.running_servers(user)
            if servers is None:
                continue
            doomed += [p.name for p in pods if p.server not in servers]
        for name in doomed:
            self.log.info("gc: deleting kernel pod %s (%s)", name,
                          describe(self.cluster.pods[name]) if name in self.cluster.pods
                          else "")  # fmt: skip
            await self.cluster.delete(name, grace=0)
        return doomed


class NoKernel(RequestError):
    http_status = 404


_LABEL_SAFE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def kubespawner_label(name: str, scheme: str = "safe") -> str:
    """`name` as KubeSpawner writes it in its pods' `hub.jupyter.org/username` label, so
    that a kernel's NetworkPolicy selects its owner's server pod.

    "safe" (KubeSpawner 7, zero-to-jupyterhub 4): a valid label value is kept as it is,
    anything else (or a name with "--") becomes a readable part of at most 21 characters,
    "---" and the first 8 hex digits of the name's SHA-256. "escape" (KubeSpawner 6): each
    character other than a lowercase letter or digit becomes "-" and its UTF-8 bytes in
    hex, then all is lowercased. Labels only select: the service decides whose a kernel
    is by the pod's owner annotation, never by a label."""
    if scheme == "escape":
        safe = set("abcdefghijklmnopqrstuvwxyz0123456789")
        escaped = "".join(c if c in safe else "".join(f"-{b:02x}" for b in c.encode())
                          for c in name)  # fmt: skip
        return escaped.lower()
    if not name or ("--" not in name and _LABEL_SAFE.match(name)):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    readable = _NOT_ALPHANUMERIC.sub("-", name.lower()).lstrip("-")[:21].rstrip("-")
    if readable and not readable[0].isalpha():
        readable = "x-" + readable[:19]
    return f"{readable or 'x'}---{digest}"


def _own(kind: backends.Backend, name: str) -> settings.Setting:
    return next(s for s in kind.declared() if s.name == name)


def _inside(cwd: str, root: str) -> str:
    """`cwd` if it is `root` or under it (the user's volume is mounted at the same path
    as in the server's pod), else `root`."""
    path = PurePosixPath(cwd or root)
    if (
        ".." not in path.parts
        and path.is_absolute()
        and (path == PurePosixPath(root) or PurePosixPath(root) in path.parents)
    ):
        return str(path)
    return root


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the request's body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request's body must be a JSON object")
    return body


def _text(body: Mapping[str, Any], name: str, limit: int) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise RequestError(f"{name}: a string of at most {limit} characters")
    return value


def _field(body: Mapping[str, Any], name: str, form: re.Pattern[str]) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not form.match(value):
        raise RequestError(f"{name}: expected {form.pattern}, got {str(value)[:80]!r}")
    return value


async def _resolve(network: NetworkSpec, log: logging.Logger) -> dict[str, list[str]]:
    """`egress_allow`'s host names -> their IPv4 addresses now (a NetworkPolicy takes
    addresses only; the kernel gets the same ones in its /etc/hosts). A name that does
    not resolve admits nothing."""
    if network.mode != "egress":
        return {}
    loop = asyncio.get_running_loop()
    found: dict[str, list[str]] = {}
    for destination in network.allow:
        if not destination.host:
            continue
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(destination.host, None, family=socket.AF_INET), 5
            )
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("egress_allow: %s does not resolve (%s): it admits nothing",
                        destination.host, e)  # fmt: skip
            continue
        found[destination.host] = sorted({str(info[4][0]) for info in infos})
    return found


async def render(service: KubernetesService, user: str, groups: frozenset[str], server: str,
                 kernelspec: str, asked: Mapping[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """The Pod and NetworkPolicy a start of `kernelspec` by `user` would make now (egress
    names resolved now), without a cluster: for review and for policy tools. The Secret
    is left out: its credentials are made afresh at each start."""
    service.check_config()
    caller = Caller(name=user, groups=groups, servers=None)
    kernel_id = str(uuid.uuid4())
    granted, _ = await asyncio.to_thread(service.grant, caller, kernel_id, kernelspec,
                                         dict(asked), "")  # fmt: skip
    addresses = await _resolve(network_of(granted, service.log), service.log)
    plan = service.plan(kernel_id, user, server, kernelspec, granted, "", addresses)
    return [manifests.pod(plan), manifests.network_policy(plan)]


async def collect_once(service: KubernetesService) -> list[str]:
    """One gc pass, as the running service makes every `gc_interval`: the pods deleted."""
    service.check_config()
    api = await service.connect()
    service.cluster = Cluster(api, service.namespace, service.log)
    service.hub = Hub(service.hub_api_url, service.hub_api_token, service.log)
    try:
        await service.cluster.start()
        return await service.collect()
    finally:
        await service.hub.close()
        await service.cluster.close()


async def serve(service: KubernetesService) -> None:
    """Run `service` until SIGTERM or SIGINT (a Deployment's stop)."""
    runner = await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await service.stop(runner)
