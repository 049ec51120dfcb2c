"""The operator's policy: who may start which kernels, with how much.

A TOML file maps users and groups to ceilings on the provisioner's limits and
network, allowed kernelspecs, and per-user quotas. For each user the ceilings
are the `[default]` tier, raised by the user's groups (the most generous group
wins, setting by setting), then replaced by the user's own `[users.NAME]`
entry. A kernelspec or config may ask for less than a ceiling, never more; a
setting nobody asks for takes the ceiling itself.

    [default]
    memory_limit = "1G"
    cpu_limit = 1.0
    kernelspecs = ["python3-gvisor"]
    images = ["python3"]            # the images their kernels may run on
    max_kernels = 2                 # quotas: per user, across all kernels (quotas.py)

    [groups.r-course]
    images = ["course-101"]         # adds to [default]'s list

    [groups.instructors]
    memory_limit = "8G"
    network = "egress"
    egress_allow = ["pypi.org:443", "files.pythonhosted.org:443"]

    [users.alice]
    cpu_limit = 2.0

The file is read again whenever it changes; a file that no longer parses is
reported and the last good version stays in force.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import settings
from .errors import PolicyError
from .network.spec import MODES as NETWORK_MODES
from .network.spec import parse_bandwidth, parse_destination

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

POLICY_ENV = settings.POLICY_ENV
LISTS = ("kernelspecs", "images", "egress_allow")
"""The policy's lists: a user's groups add to them (the others: the most generous wins)."""
OPEN_WHEN_UNSET = ("kernelspecs", "images")
"""Lists that allow anything when [default] does not set them."""


@dataclass(frozen=True)
class Identity:
    user: str
    groups: frozenset[str]


HUB_GROUPS_TTL = 60.0
"""Seconds the groups the Hub gave for a user are used before it is asked again."""
_hub_groups: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
_hub_lock = threading.Lock()
_hub_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Asks the Hub directly, never through $http_proxy (which would be sent the token)."""


def hub_groups(api_url: str, token: str, user: str, log: logging.Logger) -> frozenset[str]:
    """The user's groups from the Hub's REST API, asked with the server's own token, cached.

    Any token may read its own owner's name and groups at /user (JupyterHub's
    implicit identify scopes), so the default server token is enough. If the Hub
    cannot say, the user has no Hub groups (the default tier): the policy never
    grants more because the Hub is down, nor keeps an expired answer.
    """
    key = (api_url, user)
    with _hub_lock:
        cached = _hub_groups.get(key)
        if cached and time.monotonic() - cached[0] < HUB_GROUPS_TTL:
            return cached[1]
    request = urllib.request.Request(
        f"{api_url.rstrip('/')}/user", headers={"Authorization": f"token {token}"}
    )
    try:
        with _hub_opener.open(request, timeout=5) as response:
            model = json.loads(response.read(1 << 20))
    except (OSError, ValueError) as e:
        log.warning("could not ask the Hub for %s's groups (%s); using none", user, e)
        return frozenset()
    name = model.get("name") if isinstance(model, dict) else None
    groups = model.get("groups") if isinstance(model, dict) else None
    if name != user or not isinstance(groups, list):
        log.warning(
            "the Hub's answer for the server token is about %r, not %s, or has no groups; "
            "using none",
            name,
            user,
        )
        groups = []
    found = frozenset(g for g in groups if isinstance(g, str))
    with _hub_lock:
        _hub_groups[key] = (time.monotonic(), found)
    return found


def identity_of(user: str, log: logging.Logger, hub: tuple[str, str] | None = None) -> Identity:
    """`user` with the user's OS groups and, given the Hub's (API URL, token), its Hub groups."""
    groups = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    with contextlib.suppress(KeyError):  # a Hub user may have no OS account
        groups.add(grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name)
    if hub is not None:
        groups |= hub_groups(*hub, user, log)
    return Identity(user, frozenset(groups))


def current_identity(log: logging.Logger) -> Identity:
    """The user this server runs for: JupyterHub's single-user name, else the OS user."""
    user = os.environ.get("JUPYTERHUB_USER") or pwd.getpwuid(os.getuid()).pw_name
    api_url, token = os.environ.get("JUPYTERHUB_API_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
    hub = (api_url, token) if os.environ.get("JUPYTERHUB_USER") and api_url and token else None
    return identity_of(user, log, hub)


def _magnitude(name: str, value: Any) -> float:
    """How much a setting gives, to compare it with another value of the same setting
    (its declaration's `magnitude`, settings.py)."""
    return settings.BY_NAME[name].magnitude(value)  # type: ignore[misc]


def _check_tier(where: str, tier: Any) -> dict[str, Any]:
    if not isinstance(tier, dict):
        raise PolicyError(f"policy: [{where}] must be a table")
    unknown = set(tier) - settings.POLICY_KEYS
    if unknown:
        raise PolicyError(
            f"policy: unknown setting {', '.join(sorted(unknown))} in [{where}]; "
            f"known: {', '.join(sorted(settings.POLICY_KEYS))}"
        )
    for name, value in tier.items():
        try:
            if name in LISTS:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("expected a list of strings")
                if name == "egress_allow":
                    for entry in value:
                        parse_destination(entry)
            elif name == "network":
                if value not in NETWORK_MODES:  # ordered from closed to open
                    raise ValueError(f"expected one of {', '.join(NETWORK_MODES)}")
            elif name == "network_bandwidth":
                parse_bandwidth(value)
            elif isinstance(value, bool) or _magnitude(name, value) <= 0:
                raise ValueError("expected a positive value")
        except (TypeError, ValueError) as e:
            raise PolicyError(f"policy: [{where}] {name} = {value!r}: {e}") from None
    return tier


@dataclass(frozen=True)
class Policy:
    default: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    users: dict[str, dict[str, Any]]

    @classmethod
    def parse(cls, text: str, source: str = "policy") -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{source}: {e}") from None
        unknown = set(data) - {"default", "groups", "users"}
        if unknown:
            raise PolicyError(f"{source}: unknown section {', '.join(sorted(unknown))}")
        return cls(
            default=_check_tier("default", data.get("default", {})),
            groups={n: _check_tier(f"groups.{n}", t) for n, t in data.get("groups", {}).items()},
            users={n: _check_tier(f"users.{n}", t) for n, t in data.get("users", {}).items()},
        )

    def ceilings(self, who: Identity) -> dict[str, Any]:
        """The settings that bound `who`: default, raised by groups, replaced by the user's."""
        result = dict(self.default)
        for group in sorted(who.groups & set(self.groups)):
            for name, value in self.groups[group].items():
                if name in OPEN_WHEN_UNSET and name not in result:
                    # Where [default] sets no kernelspecs or images, any may be used, and a
                    # group (which only ever raises ceilings) does not narrow that.
                    continue
                if name in LISTS:
                    result[name] = sorted({*result.get(name, []), *value})
                elif name not in result or _magnitude(name, value) > _magnitude(name, result[name]):
                    result[name] = value
        result.update(self.users.get(who.user, {}))
        return result


class PolicyFile:
    """A policy file, read again when it changes (checked on every kernel start)."""

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._policy: Policy | None = None

    def current(self) -> Policy:
        with self._lock:
            try:
                stat = self.path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._stamp:
                    self._policy = Policy.parse(self.path.read_text(), str(self.path))
                    self._stamp = stamp
                    self.log.info("sandbox policy loaded from %s", self.path)
            except (OSError, PolicyError) as e:
                if self._policy is None:
                    raise PolicyError(f"no usable sandbox policy: {e}") from None
                self.log.error("policy %s not reloaded, the last one stays: %s", self.path, e)
                self._stamp = None
            return self._policy


_files: dict[Path, PolicyFile] = {}
_files_lock = threading.Lock()


def _reset_in_child() -> None:
    """After fork, in the child: a lock the parent's threads held would never be released.
    The caches start empty (the policy file is read again, the Hub asked again)."""
    global _hub_lock, _files_lock
    _hub_lock, _files_lock = threading.Lock(), threading.Lock()
    _hub_groups.clear()
    _files.clear()


os.register_at_fork(after_in_child=_reset_in_child)


def policy_file(path: str | os.PathLike[str], log: logging.Logger) -> PolicyFile:
    """One PolicyFile per path per process, so reloads are noticed once."""
    resolved = Path(path).resolve()
    with _files_lock:
        if resolved not in _files:
            _files[resolved] = PolicyFile(resolved, log)
        return _files[resolved]


def apply(
    ceilings: dict[str, Any], asked: dict[str, Any], kernel_name: str, who: Identity
) -> dict[str, Any]:
    """The settings a kernel gets: what it asked for within the ceilings, else the ceilings.

    Raises PolicyError naming the rule when it asks for more, or for a kernelspec
    the user may not start.
    """
    allowed = ceilings.get("kernelspecs")
    if allowed is not None and kernel_name not in allowed:
        raise PolicyError(
            f"the sandbox policy does not let {who.user} start kernel {kernel_name!r}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    granted: dict[str, Any] = {}
    for name in settings.BOUNDED:
        if name not in ceilings:
            continue
        ceiling = ceilings[name]
        if name in asked:
            if _magnitude(name, asked[name]) > _magnitude(name, ceiling):
                raise PolicyError(
                    f"{name} = {asked[name]!r} is more than the sandbox policy allows "
                    f"{who.user}: at most {ceiling!r}"
                )
        else:
            granted[name] = ceiling
    allowed_hosts = ceilings.get("egress_allow")
    if allowed_hosts is not None:
        beyond = sorted(set(asked.get("egress_allow", ())) - set(allowed_hosts))
        if beyond:
            raise PolicyError(
                f"egress_allow {', '.join(beyond)} is more than the sandbox policy allows "
                f"{who.user}: at most {', '.join(allowed_hosts) or 'nothing'}"
            )
        if "egress_allow" not in asked:
            granted["egress_allow"] = allowed_hosts
    return granted


def check_image(ceilings: dict[str, Any], image: str, who: Identity) -> None:
    """PolicyError unless the policy lets `who` run a kernel on `image` (a name, or a
    rootfs path, which only an unset `images` allows)."""
    allowed = ceilings.get("images")
    if allowed is not None and image not in allowed:
        raise PolicyError(
            f"the sandbox policy does not let {who.user} use image {image!r}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
