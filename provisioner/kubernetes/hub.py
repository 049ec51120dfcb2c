"""Who calls the Kubernetes sandbox service: the JupyterHub user whose token it sends.

A caller is what the hub says its token belongs to (`GET /hub/api/user` with that
token: any token may identify its owner), never what the request claims. Only a
user's token is taken (not a service's): a kernel belongs to a user, whose name and
hub groups then drive the operator's policy and the user's quotas. A refused token
is refused at once; an accepted one is trusted for `ttl` seconds (a revoked token
keeps working at most that long). The service's own token is used only to ask which
servers a user runs (gc).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from ..errors import PolicyError, RequestError, ServiceError

MAX_ANSWER = 1 << 20
"""Bytes of one hub answer read: a user model is a few hundred."""
CACHE_SIZE = 10_000
"""Tokens remembered at once (least recently used go first)."""


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, or its first `limit` + 1 bytes if it is longer (then refused)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class Unauthenticated(RequestError):
    """No token, or one the hub does not know (HTTP 401)."""

    http_status = 401


@dataclass(frozen=True)
class Caller:
    name: str
    groups: frozenset[str]
    servers: frozenset[str] | None
    """The servers this token may act for (from its `access:servers` scopes); None: all
    of the user's."""

    def may_act_for(self, server: str) -> bool:
        return self.servers is None or server in self.servers


def _servers(name: str, scopes: Any) -> frozenset[str] | None:
    """The servers of `name` a token with `scopes` may access; None: any of them."""
    if not isinstance(scopes, list):
        return frozenset()
    servers = set()
    for scope in scopes:
        if not isinstance(scope, str):
            continue
        if scope in ("access:servers", f"access:servers!user={name}"):
            return None
        prefix = f"access:servers!server={name}/"
        if scope.startswith(prefix):
            servers.add(scope[len(prefix) :])
    return frozenset(servers)


class Hub:
    """The hub's REST API at `api_url` (`JUPYTERHUB_API_URL`)."""

    def __init__(self, api_url: str, service_token: str, log: logging.Logger,
                 ttl: float = 30.0) -> None:  # fmt: skip
        self.api_url = api_url.rstrip("/")
        self.service_token = service_token
        self.log = log
        self.ttl = ttl
        self._cache: OrderedDict[str, tuple[float, Caller]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, path: str, token: str) -> tuple[int, Any]:
        try:
            async with self.session().get(
                self.api_url + path, headers={"Authorization": f"token {token}"}
            ) as answer:
                data = await read_bounded(answer.content, MAX_ANSWER)
                status = answer.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise ServiceError(f"cannot reach the hub at {self.api_url}: {e}") from None
        if status != 200:
            return status, None
        try:
            return status, _json(data)
        except ValueError:
            raise ServiceError(f"the hub's answer to {path} is not JSON") from None

    async def identify(self, token: str) -> Caller:
        """The user `token` belongs to. Unauthenticated if the hub does not know it,
        PolicyError if it is not a user's; ServiceError if the hub cannot be asked."""
        if not token:
            raise Unauthenticated("no JupyterHub API token (Authorization: token ...)")
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            self._cache.move_to_end(key)
            return cached[1]
        status, model = await self._get("/user", token)
        if status in (401, 403):
            raise Unauthenticated("the hub does not accept this token (forged, expired or revoked)")
        if status != 200 or not isinstance(model, dict):
            raise ServiceError(f"the hub answered {status} when asked whose token it is")
        name, groups = model.get("name"), model.get("groups", [])
        if model.get("kind") != "user" or not isinstance(name, str) or not name:
            raise PolicyError("only a user's token may start kernels, not a service's")
        if not isinstance(groups, list):
            groups = []
        caller = Caller(
            name=name,
            groups=frozenset(g for g in groups if isinstance(g, str)),
            servers=_servers(name, model.get("scopes")),
        )
        self._cache[key] = (time.monotonic(), caller)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return caller

    async def running_servers(self, user: str) -> frozenset[str] | None:
        """The names of `user`'s running servers ("" for the default one), asked with the
        service's own token; an empty set if the hub has no such user; None if the hub
        cannot say (then nothing may be collected on its word)."""
        try:
            status, model = await self._get(f"/users/{quote(user, safe='')}", self.service_token)
        except ServiceError as e:
            self.log.warning("gc: %s", e)
            return None
        if status == 404:
            return frozenset()
        if (
            status != 200
            or not isinstance(model, dict)
            or not isinstance(model.get("servers"), dict)
        ):
            self.log.warning("gc: the hub answered %s for user %s without servers", status, user)
            return None
        return frozenset(
            name
            for name, server in model["servers"].items()
            if isinstance(server, dict) and (server.get("ready") or server.get("pending"))
        )


def _json(data: bytes) -> Any:
    if len(data) > MAX_ANSWER:
        raise ValueError("too large")
    return json.loads(data)
