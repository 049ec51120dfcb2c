"""The HTTP side: the Kubernetes REST API (JSON) and watch streams, on aiohttp's server.

URL paths are the real ones (`/api/v1/namespaces/{ns}/pods/{name}`,
`/apis/{group}/{version}/...`); every request needs the config's bearer token
(401 otherwise) and passes the caller's RBAC rules (403, worded as the real
server). Errors are `kind: Status` objects with the real codes and reasons.
Request bodies are bounded (`MAX_BODY`, as the real server's 3 MiB: 413 beyond).

Watches (`watch=true` on a list) stream newline-delimited JSON events over a
chunked response: ADDED, MODIFIED, DELETED, BOOKMARK (with
`allowWatchBookmarks`, every `bookmark_seconds`), ERROR (410 Expired for a
resourceVersion older than the history); `timeoutSeconds` ends the stream;
`sendInitialEvents` is honoured as by a 1.27+ server.

Test hooks live under `/double/` (no real client goes there): `POST
/double/evict`, `POST /double/lose-node`, `POST /double/peers`, `GET /double/pods`,
`GET /double/requests` (requests served, by verb and resource).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import copy
import hmac
import json
import logging
import time
from typing import Any

from aiohttp import web

from . import admission, kinds, selectors, validation
from .config import Config
from .kinds import POD, Kind
from .kubelet import Kubelet
from .meta import (
    ApiError,
    bad_request,
    conflict,
    forbidden,
    gone,
    later,
    not_found,
    unauthorized,
)
from .patch import apply_patch
from .rbac import Attributes, Authorizer
from .store import Store, Watcher

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024
DEFAULT_WATCH_SECONDS = 1800
MAX_LIMIT = 500
FOLLOW_POLL = 0.2
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-kube-double",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
METHOD_NOT_ALLOWED = "the server does not allow this method on the requested resource"
NOT_FOUND = "the server could not find the requested resource"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type="application/json"
    )


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("true", "1")


def _int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"invalid {name}: {value!r}") from None


def _listed(obj: dict[str, Any]) -> dict[str, Any]:
    """An item as a list shows it: the real server leaves out kind and apiVersion."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


ADMIN: contextvars.ContextVar[bool] = contextvars.ContextVar("admin", default=False)
"""Whether the request being handled came with the admin token (no RBAC for it)."""


class Api:
    def __init__(self, config: Config, store: Store, kubelet: Kubelet) -> None:
        self.config = config
        self.store = store
        self.kubelet = kubelet
        self.authorizer = Authorizer(config.rules, config.user)
        self.address = ""
        """host:port this server answers on (for /api's serverAddressByClientCIDRs)."""
        self.requests: dict[str, int] = {}
        """Requests served by "VERB resource" ("POST pods", "WATCH pods", "GET secrets"...),
        what the control plane's load would be: `GET /double/requests`."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Authentication, then the handler; its ApiError as a Status object."""
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        try:
            admin = bool(self.config.admin_token) and hmac.compare_digest(
                token.encode(), self.config.admin_token.encode()
            )
            if not admin and not hmac.compare_digest(token.encode(), self.config.token.encode()):
                raise unauthorized()
            ADMIN.set(admin)  # this request's task only
            return await handler(request)
        except ApiError as e:
            if e.code >= 500:
                log.error("%s %s: %s", request.method, request.path_qs, e)
            return _json(e.status(), e.code)
        except web.HTTPRequestEntityTooLarge:
            error = ApiError(
                413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_BODY}"
            )
            return _json(error.status(), 413)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("%s %s", request.method, request.path_qs)
            return _json(ApiError(500, "InternalError", f"kube double: {e}").status(), 500)

    # -- routing ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        if parts and parts[0] == "double":
            return await self._hook(request, parts[1:])
        if len(parts) < 2 or parts[0] not in ("api", "apis"):
            return self._non_resource(request, path)
        if parts[0] == "api":
            group, rest = "", parts[1:]
        else:
            group, rest = parts[1], parts[2:]
            if not rest:
                return self._non_resource(request, path, group)
        version, rest = rest[0], rest[1:]
        if not rest:
            return self._non_resource(request, path, group, version)
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise ApiError(404, "NotFound", NOT_FOUND)
        kind = kinds.find(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if kind is None or (kind.namespaced is False and namespace is not None):
            raise ApiError(404, "NotFound", NOT_FOUND)
        if sub and sub not in kind.subresources:
            raise ApiError(404, "NotFound", NOT_FOUND)
        verb = "WATCH" if request.query.get("watch") in ("1", "true") else request.method
        key = f"{verb} {kind.plural}{'/' + sub if sub else ''}"
        self.requests[key] = self.requests.get(key, 0) + 1
        return await self._resource(request, kind, namespace, name, sub)

    def _non_resource(
        self, request: web.Request, path: str, group: str | None = None, version: str | None = None
    ) -> web.StreamResponse:
        """Discovery (`/api`, `/apis`, a group, a group version), `/version`, health."""
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED)
        self._authorize(Attributes("get", path=path))
        if version is not None:
            return self._resources(group or "", version)
        if group is not None:
            return self._group(group)
        if path == "/version":
            return _json(VERSION)
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/api":
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address}
                    ],
                }
            )
        if path == "/apis":
            return _json(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [self._group_object(g) for g in self._groups()],
                }
            )
        raise ApiError(404, "NotFound", NOT_FOUND)

    @staticmethod
    def _groups() -> list[str]:
        return sorted({group for group, _ in kinds.GROUP_VERSIONS if group})

    @staticmethod
    def _group_object(group: str) -> dict[str, Any]:
        versions = [
            {"groupVersion": f"{group}/{v}", "version": v}
            for g, v in kinds.GROUP_VERSIONS
            if g == group
        ]
        return {"name": group, "versions": versions, "preferredVersion": versions[0]}

    def _group(self, group: str) -> web.StreamResponse:
        if group not in self._groups():
            raise ApiError(404, "NotFound", NOT_FOUND)
        return _json({"kind": "APIGroup", "apiVersion": "v1", **self._group_object(group)})

    @staticmethod
    def _resources(group: str, version: str) -> web.StreamResponse:
        found = [k for k in kinds.KINDS if (k.group, k.version) == (group, version)]
        if not found:
            raise ApiError(404, "NotFound", NOT_FOUND)
        resources = []
        for kind in found:
            resources.append(
                {
                    "name": kind.plural,
                    "singularName": kind.kind.lower(),
                    "namespaced": kind.namespaced,
                    "kind": kind.kind,
                    "verbs": list(kind.verbs),
                }
            )
            for sub in kind.subresources:
                verbs = ["create"] if sub == "eviction" else ["get"]
                resources.append(
                    {
                        "name": f"{kind.plural}/{sub}",
                        "singularName": "",
                        "namespaced": kind.namespaced,
                        "kind": "Eviction" if sub == "eviction" else kind.kind,
                        "verbs": verbs,
                    }
                )
        group_version = f"{group}/{version}" if group else version
        return _json(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": resources,
            }
        )

    def _authorize(self, attrs: Attributes) -> None:
        if ADMIN.get():
            return
        if not self.authorizer.allows(attrs):
            raise forbidden(
                self.authorizer.denial(attrs), attrs.resource or "", attrs.name, attrs.group
            )

    # -- resources ----------------------------------------------------------------------

    async def _resource(
        self, request: web.Request, kind: Kind, namespace: str | None, name: str | None, sub: str
    ) -> web.StreamResponse:
        method = request.method
        if sub:
            verb = {"GET": "get", "POST": "create"}.get(method, "")
            allowed = (sub == "eviction" and verb == "create") or (
                sub != "eviction" and verb == "get"
            )
        elif name is None:
            verb = {
                "GET": "watch" if _flag(request, "watch") else "list",
                "POST": "create",
                "DELETE": "deletecollection",
            }.get(method, "")
            allowed = verb in kind.verbs or (verb == "deletecollection" and "delete" in kind.verbs)
        else:
            verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
                method, ""
            )
            allowed = verb in kind.verbs
        if not allowed:
            raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED)
        self._authorize(Attributes(verb, kind.group, kind.plural, sub, namespace or "", name or ""))
        if kind.namespaced and namespace is None and name is not None:
            raise ApiError(404, "NotFound", NOT_FOUND)
        ns = namespace or ""
        if kind in (kinds.ACCESS_REVIEW, kinds.RULES_REVIEW):
            return await self._review(request, kind)
        if sub == "log":
            return await self._log(request, ns, str(name))
        if sub == "eviction":
            return await self._evict(request, ns, str(name))
        if verb == "get":
            return _json(self.store.get(kind, ns, str(name)))
        if verb in ("list", "watch"):
            return await self._list(request, kind, namespace, verb == "watch")
        if verb == "create":
            return await self._create(request, kind, ns)
        if verb in ("update", "patch"):
            return await self._update(request, kind, ns, str(name), verb == "patch")
        if verb == "delete":
            options = await self._body(request, optional=True) or {}
            return self._delete(request, kind, ns, str(name), options)
        return await self._delete_collection(request, kind, namespace)

    async def _body(self, request: web.Request, optional: bool = False) -> Any:
        raw = await request.read()
        if not raw:
            if optional:
                return None
            raise bad_request("the request body is empty")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise bad_request(f"the body of the request was in an unknown format: {e}") from None

    def _admit(self, kind: Kind, obj: dict[str, Any]) -> dict[str, Any]:
        if kind is POD:
            classes = {o["metadata"]["name"] for o in self.store.items(kinds.RUNTIME_CLASS)}
            return admission.admit_pod(obj, self.config, classes)
        if kind is kinds.SECRET:
            return admission.admit_secret(obj)
        if kind is kinds.CONFIG_MAP:
            return admission.admit_config_map(obj)
        return admission.admit_network_policy(obj)

    async def _create(self, request: web.Request, kind: Kind, namespace: str) -> web.StreamResponse:
        obj = admission.prepare_metadata(await self._body(request), kind, namespace)
        validation.decode(obj)
        admission.check_namespace(self.config, namespace)
        obj = self._admit(kind, obj)
        if request.query.get("dryRun"):
            return _json(obj, 201)
        return _json(self.store.create(kind, obj), 201)

    async def _update(
        self, request: web.Request, kind: Kind, namespace: str, name: str, patch: bool
    ) -> web.StreamResponse:
        old = self.store.get(kind, namespace, name)
        body = await self._body(request)
        if patch:
            new = apply_patch(old, body, request.content_type)
        else:
            new = admission.prepare_metadata(body, kind, namespace)
            given = (
                (body.get("metadata") or {}).get("resourceVersion")
                if isinstance(body, dict)
                else None
            )
            if not given:
                raise admission.resource_version_required(kind, name)
            new["metadata"]["resourceVersion"] = given
        given = new["metadata"].get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise conflict(
                kind.plural,
                name,
                "the object has been modified; please apply your "
                "changes to the latest version and try again",
                kind.group,
            )
        for field in (
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
            else:
                new["metadata"].pop(field, None)
        if "status" in old:
            new["status"] = old["status"]  # the main resource never writes status
        new["kind"], new["apiVersion"] = kind.kind, kind.api_version
        validation.decode(new)
        if kind is not POD:
            new = self._admit(kind, new)
        admission.check_update(kind, old, new)
        if request.query.get("dryRun"):
            return _json(new)
        generation = new.get("spec") != old.get("spec") or new.get("data") != old.get("data")

        def change(obj: dict[str, Any]) -> None:
            obj.clear()
            obj.update(copy.deepcopy(new))

        return _json(self.store.update(kind, namespace, name, change, generation=generation))

    def _delete(
        self, request: web.Request, kind: Kind, namespace: str, name: str, options: dict[str, Any]
    ) -> web.StreamResponse:
        """Pods: gracefully through the kubelet, or at once when the real server deletes at
        once (grace 0, not scheduled, terminal). Others: at once. 409 on a failed
        precondition."""
        obj = self.store.get(kind, namespace, name)
        if not isinstance(options, dict):
            raise bad_request("DeleteOptions must be an object")
        if error := admission.precondition_failed(kind, obj, options):
            raise error
        if request.query.get("dryRun") or options.get("dryRun"):
            return _json(obj)
        if kind is not POD:
            final = self.store.remove(kind, namespace, name)
            return _json(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {
                        "name": name,
                        "kind": kind.plural,
                        "uid": final["metadata"]["uid"],
                        **({"group": kind.group} if kind.group else {}),
                    },
                }
            )
        grace = admission.grace_of(request.query.get("gracePeriodSeconds"))
        if grace is None:
            grace = admission.grace_of(options.get("gracePeriodSeconds"))
        if grace is None:
            grace = int(obj["spec"].get("terminationGracePeriodSeconds", admission.DEFAULT_GRACE))
        phase = (obj.get("status") or {}).get("phase")
        if grace == 0 or not obj["spec"].get("nodeName") or phase in ("Succeeded", "Failed"):
            return _json(self.store.remove(kind, namespace, name))
        current = obj["metadata"].get("deletionGracePeriodSeconds")
        if current is not None and current <= grace:
            return _json(obj)

        def mark(pod: dict[str, Any]) -> None:
            pod["metadata"]["deletionTimestamp"] = later(grace)
            pod["metadata"]["deletionGracePeriodSeconds"] = grace

        return _json(self.store.update(kind, namespace, name, mark))

    async def _delete_collection(
        self, request: web.Request, kind: Kind, namespace: str | None
    ) -> web.StreamResponse:
        labels = selectors.parse_labels(request.query.get("labelSelector"))
        fields = selectors.parse_fields(request.query.get("fieldSelector"), kind.plural)
        options = await self._body(request, optional=True) or {}
        deleted = []
        for obj in self.store.list(kind, namespace, labels, fields):
            meta = obj["metadata"]
            self._delete(request, kind, meta.get("namespace", ""), meta["name"], options)
            deleted.append(_listed(obj))
        return _json(
            {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": self.store.resource_version},
                "items": deleted,
            }
        )

    # -- list and watch -----------------------------------------------------------------

    async def _list(
        self, request: web.Request, kind: Kind, namespace: str | None, watch: bool
    ) -> web.StreamResponse:
        labels = selectors.parse_labels(request.query.get("labelSelector"))
        fields = selectors.parse_fields(request.query.get("fieldSelector"), kind.plural)
        if watch:
            return await self._watch(request, kind, namespace, labels, fields)
        items = self.store.list(kind, namespace, labels, fields)
        rv = self.store.resource_version
        start = 0
        token = request.query.get("continue")
        if token:
            try:
                state = json.loads(base64.b64decode(token))
                rv, start = str(state["rv"]), int(state["start"])
            except (binascii.Error, ValueError, KeyError, TypeError):
                raise bad_request("continue key is not valid") from None
            if int(rv) < self.store.compacted:
                raise gone(
                    "The provided continue parameter is too old to display a consistent "
                    "list result. You can start a new list without the continue "
                    "parameter."
                )
        limit = _int(request, "limit")
        meta: dict[str, Any] = {"resourceVersion": rv}
        if limit:
            limit = min(limit, MAX_LIMIT)
            page = items[start : start + limit]
            if start + limit < len(items):
                meta["continue"] = base64.b64encode(
                    json.dumps({"rv": rv, "start": start + limit}).encode()
                ).decode()
                meta["remainingItemCount"] = len(items) - start - limit
            items = page
        elif start:
            items = items[start:]
        return _json(
            {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": meta,
                "items": [_listed(o) for o in items],
            }
        )

    async def _watch(
        self,
        request: web.Request,
        kind: Kind,
        namespace: str | None,
        labels: selectors.LabelSelector,
        fields: selectors.FieldSelector,
    ) -> web.StreamResponse:
        timeout = _int(request, "timeoutSeconds") or DEFAULT_WATCH_SECONDS
        bookmarks = _flag(request, "allowWatchBookmarks")
        initial = _flag(request, "sendInitialEvents")
        since = request.query.get("resourceVersion")
        watcher = Watcher(kind, namespace, labels, fields)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        error = None
        try:
            self.store.watch(watcher, None if initial else since)
        except ApiError as e:
            if e.code != 410:
                raise
            error = e
        await response.prepare(request)
        try:
            if error is not None:
                line = {"type": "ERROR", "object": error.status()}
                await response.write(json.dumps(line).encode() + b"\n")
                return response
            if initial and bookmarks:
                mark = self._bookmark(kind, {"k8s.io/initial-events-end": "true"})
                watcher.put("BOOKMARK", mark)
            await self._stream(response, watcher, timeout, bookmarks)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    def _bookmark(self, kind: Kind, annotations: dict[str, str] | None = None) -> bytes:
        meta: dict[str, Any] = {
            "resourceVersion": self.store.resource_version,
            "creationTimestamp": None,
        }
        if annotations:
            meta["annotations"] = annotations
        return json.dumps(
            {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}
        ).encode()

    async def _stream(
        self, response: web.StreamResponse, watcher: Watcher, timeout: float, bookmarks: bool
    ) -> None:
        end = time.monotonic() + timeout
        interval = self.config.bookmark_seconds
        next_mark = time.monotonic() + interval
        while (left := end - time.monotonic()) > 0:
            wait = min(left, next_mark - time.monotonic()) if bookmarks else left
            try:
                item = await asyncio.wait_for(watcher.queue.get(), max(wait, 0.01))
            except asyncio.TimeoutError:
                if bookmarks and time.monotonic() >= next_mark:
                    next_mark = time.monotonic() + interval
                    await response.write(
                        b'{"type":"BOOKMARK","object":' + self._bookmark(watcher.kind) + b"}\n"
                    )
                continue
            if item is None:
                return
            kind, data = item
            await response.write(b'{"type":"' + kind.encode() + b'","object":' + data + b"}\n")

    # -- pods' subresources -------------------------------------------------------------

    async def _log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        if _flag(request, "previous"):
            container = request.query.get("container", "")
            raise bad_request(
                f'previous terminated container "{container}" in pod "{name}" not found'
            )
        container = request.query.get("container")
        tail, limit = _int(request, "tailLines"), _int(request, "limitBytes")
        data = self.kubelet.logs(namespace, name, container, tail, limit)
        if not _flag(request, "follow"):
            return web.Response(body=data, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(data)
        sent = len(self.kubelet.logs(namespace, name, container, None, None))
        try:
            while self._running(namespace, name, container):
                await asyncio.sleep(FOLLOW_POLL)
                sent = await self._more(response, namespace, name, container, sent)
            await self._more(response, namespace, name, container, sent)
        except (ApiError, ConnectionResetError):
            pass
        return response

    async def _more(
        self,
        response: web.StreamResponse,
        namespace: str,
        name: str,
        container: str | None,
        sent: int,
    ) -> int:
        data = self.kubelet.logs(namespace, name, container, None, None)
        if len(data) < sent:  # the log dropped its older half
            sent = 0
        if len(data) > sent:
            await response.write(data[sent:])
        return len(data)

    def _running(self, namespace: str, name: str, container: str | None) -> bool:
        pod = self.store.find(POD, namespace, name)
        if pod is None:
            return False
        status = pod.get("status") or {}
        every = status.get("containerStatuses", []) + status.get("initContainerStatuses", [])
        wanted = container or pod["spec"]["containers"][0]["name"]
        return any(s["name"] == wanted and "running" in s["state"] for s in every)

    async def _evict(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        """The Eviction API: a graceful delete (no PodDisruptionBudgets here)."""
        body = await self._body(request)
        options = (body.get("deleteOptions") or {}) if isinstance(body, dict) else {}
        self._delete(request, POD, namespace, name, options)
        return _json(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "code": 201,
            },
            201,
        )

    # -- reviews ------------------------------------------------------------------------

    async def _review(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        body = await self._body(request)
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            raise bad_request("spec is required")
        if kind is kinds.ACCESS_REVIEW:
            status = self.authorizer.access_review(spec)
        else:
            status = self.authorizer.rules_review(str(spec.get("namespace", "")))
        return _json(
            {
                "kind": kind.kind,
                "apiVersion": kind.api_version,
                "metadata": {"creationTimestamp": None},
                "spec": spec,
                "status": status,
            },
            201,
        )

    # -- test hooks ---------------------------------------------------------------------

    async def _hook(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        what = "/".join(parts)
        if request.method == "GET" and what == "pods":
            return _json(self.kubelet.describe())
        if request.method == "GET" and what == "requests":
            return _json(dict(self.requests))
        if request.method != "POST":
            raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED)
        body = await self._body(request, optional=True) or {}
        if not isinstance(body, dict):
            raise bad_request("expected a JSON object")
        if what == "evict":
            await self.kubelet.evict(
                str(body.get("namespace")),
                str(body.get("name")),
                str(body.get("message", "The node was low on resource: memory.")),
            )
            return _json({"evicted": f"{body.get('namespace')}/{body.get('name')}"})
        if what == "peers":
            labels = body.get("labels") or {}
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                raise bad_request("labels: expected an object of strings")
            try:
                net = await asyncio.to_thread(
                    self.kubelet.firewalls.add_peer,
                    str(body.get("namespace")),
                    str(body.get("name")),
                    labels,
                )
            except ValueError as e:
                raise ApiError(409, "AlreadyExists", str(e)) from None
            self.kubelet.firewalls.changed()
            return _json({"ip": net.ip, "netns": net.netns})
        if what == "lose-node":
            lost = await self.kubelet.lose_node(str(body.get("node", self.config.node)))
            return _json({"lost": lost})
        raise not_found("hooks", what)
