"""Every setting of a sandboxed kernel, declared once.

A `Setting` says what a setting is called, its type and default, how a value is
checked (`parse`), how the operator's policy bounds it (`magnitude`), who may
set it and where it is enforced. From these declarations come:

- the provisioners' traitlets (`traits`), so a value from the server's config or a
  kernelspec is checked where it is given;
- the policy's vocabulary and its checks (`policy.py`: `BOUNDED`, `magnitude`);
- what a caller of the sandbox service may ask for (`USER_SETTINGS`);
- the configuration reference of the documentation (docs/_ext/settings_reference.py).

Settings particular to one backend are declared in the backend's module
(`Backend.settings`), in the same form.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from traitlets import Bool, Dict, Enum, Float, Int, List, TraitType, Unicode

from .guest.layout import KERNEL_UID
from .limits import check_cpu, parse_size
from .network.spec import MODES as NETWORK_MODES
from .network.spec import parse_bandwidth, parse_destination

OPERATOR = "operator"
"""The server's traitlets config (`c.GVisorProvisioner...`), the sandbox service's, and the
operator's policy file."""
KERNELSPEC = "kernelspec"
"""A kernelspec's `metadata.kernel_provisioner.config`."""
USER = "user"
"""A user's own Jupyter server, asking the sandbox service (its config and kernelspecs):
the operator's policy bounds it all the same."""
POLICY = "policy"
"""The operator's policy file only: per-user quotas and the allowed kernelspecs."""

SOCKET_ENV = "JUPYTER_SANDBOX_SOCKET"
DEFAULT_SOCKET = "/run/jupyter-sandbox/service.sock"
POLICY_ENV = "JUPYTER_SANDBOX_POLICY"


def text_value(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def size_text(value: Any) -> str:
    if not isinstance(value, str):  # a number of bytes is written as a string too: "1073741824"
        raise ValueError(f'expected a size as a string such as "512M" or "2G", got {value!r}')
    parse_size(value)
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 64:
        raise ValueError(f"expected an integer >= 64, got {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _cores(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of cores such as 0.5 or 1, got {value!r}")
    return check_cpu(float(value))


def _uid(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"expected a uid > 0, got {value!r}")
    return value


def _bandwidth(value: Any) -> str:
    parse_bandwidth(value)
    return value


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(value)


def _table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"expected a table of strings, got {value!r}")
    return dict(value)


def _destinations(value: Any) -> list[str]:
    for entry in _strings(value):
        parse_destination(entry)
    return list(value)


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _by_size(value: Any) -> float:
    return parse_size(value)


def _by_number(value: Any) -> float:
    return float(value)


def _by_mode(value: Any) -> float:
    return NETWORK_MODES.index(value)


def _by_bandwidth(value: Any) -> float:
    rate = parse_bandwidth(value)
    return float("inf") if rate is None else rate


@dataclass(frozen=True)
class Setting:
    """One setting: everything the traits, the policy, the service and the docs need."""

    name: str
    kind: str
    """The trait's type: float, int, text, choice, list, table or flag."""
    default: Any
    help: str
    parse: Callable[[Any], Any]
    """Checks a value from anywhere (config, kernelspec, policy, a caller) and returns it;
    ValueError names the accepted form. Run by the trait's validation and the policy."""
    who: frozenset[str]
    """Who may set it: `OPERATOR`, `KERNELSPEC`, `USER`, or `POLICY` alone."""
    enforced: str
    """Where it takes effect: the modules a reader opens to see it enforced."""
    magnitude: Callable[[Any], float] | None = None
    """How much a value gives, if the policy bounds the setting from above: a kernelspec,
    the server's config or a caller may ask for less than the policy's value, never more."""
    choices: tuple[str, ...] = ()
    allow_none: bool = False
    example: str = ""
    """A value as written in the policy file or the config, for the reference."""

    def trait(self) -> TraitType:
        """The traitlets trait of this setting (config=True, with its help)."""
        common: dict[str, Any] = {"config": True, "help": self.help}
        if self.kind == "float":
            return Float(self.default, **common)
        if self.kind == "int":
            return Int(self.default, allow_none=self.allow_none, **common)
        if self.kind == "text":
            return Unicode(self.default, **common)
        if self.kind == "choice":
            return Enum(list(self.choices), self.default, **common)
        if self.kind == "list":
            return List(Unicode(), list(self.default), **common)
        if self.kind == "table":
            return Dict(value_trait=Unicode(), default_value=dict(self.default), **common)
        if self.kind == "flag":
            return Bool(self.default, **common)
        raise TypeError(f"setting {self.name}: unknown kind {self.kind!r}")

    @property
    def bounded(self) -> bool:
        return self.magnitude is not None


_ALL = frozenset({OPERATOR, KERNELSPEC, USER})
_SERVER = frozenset({OPERATOR, KERNELSPEC})

COMMON: tuple[Setting, ...] = (
    Setting(
        name="image",
        kind="text",
        default="python3",
        help="Guest image: a name built by `jupyter sandbox image build`, or a rootfs path "
        "(in-process gVisor kernels only).",
        parse=text_value,
        who=_ALL,
        enforced="images/store.py (find_image), backends/gvisor.py, backends/microvm.py",
    ),
    Setting(
        name="workspace",
        kind="choice",
        default="rw",
        help="How the kernel's working directory is mounted at the same path in the sandbox: "
        "rw, ro, or none (the kernel starts in its home).",
        parse=one_of("rw", "ro", "none"),
        who=_ALL,
        enforced="workspace.py (the mount), backends/*.py",
        choices=("rw", "ro", "none"),
    ),
    Setting(
        name="memory_limit",
        kind="text",
        default="2G",
        help='Memory for the whole sandbox, the runtime and swap counted: "512M", "2G".',
        parse=size_text,
        who=_ALL,
        enforced="cgroups.py (memory and memory+swap limits), notices.py (the notebook is told)",
        magnitude=_by_size,
        example='"4G"',
    ),
    Setting(
        name="disk_limit",
        kind="text",
        default="1G",
        help="Size of the sandbox's writable layer; it is memory, and counts toward "
        "memory_limit too.",
        parse=size_text,
        who=_ALL,
        enforced="rootfs.py (gVisor's tmpfs), guest/microvm/pid1.py (the VM's tmpfs)",
        magnitude=_by_size,
        example='"2G"',
    ),
    Setting(
        name="cpu_limit",
        kind="float",
        default=1.0,
        help="CPU cores the sandbox may use, e.g. 0.5 or 2.",
        parse=_cores,
        who=_ALL,
        enforced="cgroups.py (a CFS quota on the sandbox's cgroup), backends/*.py",
        magnitude=_by_number,
        example="2.0",
    ),
    Setting(
        name="pids_limit",
        kind="int",
        default=512,
        help="Processes and threads the sandbox may have (at least 64).",
        parse=_count,
        who=_ALL,
        enforced="guest/agent.py (RLIMIT_NPROC of the kernel's user), cgroups.py (the host's "
        "backstop)",
        magnitude=_by_number,
        example="256",
    ),
    Setting(
        name="open_files_limit",
        kind="int",
        default=4096,
        help="Open files per process in the sandbox (at least 64).",
        parse=_count,
        who=_ALL,
        enforced="backends/gvisor.py (OCI rlimits), guest/agent.py (RLIMIT_NOFILE)",
        magnitude=_by_number,
        example="1024",
    ),
    Setting(
        name="network_bandwidth",
        kind="text",
        default="",
        help='Cap on the kernel\'s network in each direction, bits per second: "10M", "512k"; '
        '"" for none.',
        parse=_bandwidth,
        who=_ALL,
        enforced="network/sandbox.py (tc on the namespace's link)",
        magnitude=_by_bandwidth,
        example='"10M"',
    ),
    Setting(
        name="network",
        kind="choice",
        default="none",
        help="The kernel's network: none (no device at all), egress (only egress_allow, names "
        "through a DNS responder) or open (anything but the host, other sandboxes, "
        "link-local/metadata and multicast addresses).",
        parse=one_of(*NETWORK_MODES),
        who=_ALL,
        enforced="network/sandbox.py (namespace, firewall, DNS)",
        magnitude=_by_mode,
        choices=NETWORK_MODES,
        example='"egress"',
    ),
    Setting(
        name="egress_allow",
        kind="list",
        default=(),
        help='Where an egress kernel may connect: "host", "host:port", "IP", "IP:port", "CIDR" '
        'or "CIDR:port" (IPv4; TCP and UDP), e.g. ["pypi.org:443", "10.0.0.0/8"]. The '
        "policy's list bounds it: a kernel may ask for some of those entries, no others.",
        parse=_destinations,
        who=_ALL,
        enforced="network/sandbox.py (the firewall's sets, the DNS responder)",
        example='["pypi.org:443", "files.pythonhosted.org:443"]',
    ),
    Setting(
        name="env",
        kind="table",
        default={},
        help="Extra environment variables for the kernel (the kernelspec's env is passed too).",
        parse=_table,
        who=_SERVER,
        enforced="provisioner.py (the launch the agent gets)",
    ),
    Setting(
        name="env_allowlist",
        kind="list",
        default=(
            "LANG",
            "LC_ALL",
            "LC_CTYPE",
            "TZ",
            "TERM",
            "JPY_SESSION_NAME",
            "IPYKERNEL_CELL_NAME",
        ),
        help="Variables of the server's environment that reach the kernel. No others do. "
        "IPYKERNEL_CELL_NAME is ipykernel's name for cells in tracebacks (test suites set it "
        "to compare tracebacks).",
        parse=_strings,
        who=_SERVER,
        enforced="provisioner.py (the launch the agent gets)",
    ),
    Setting(
        name="kernel_uid",
        kind="int",
        default=None,
        help=f"Host uid of a root server's kernels; default: the workspace's owner, else "
        f"{KERNEL_UID}. Never root. The sandbox service gives each caller's kernel the "
        "caller's own uid instead.",
        parse=_uid,
        who=frozenset({OPERATOR}),
        enforced="workspace.py (kernel_owner), backends/*.py",
        allow_none=True,
    ),
    Setting(
        name="policy_file",
        kind="text",
        default="",
        help=f"The operator's policy (TOML); default: ${POLICY_ENV}. Its ceilings bind every "
        "bounded setting; a kernelspec may ask for less, never more.",
        parse=text_value,
        who=frozenset({OPERATOR}),
        enforced="policy.py",
    ),
    Setting(
        name="startup_timeout",
        kind="float",
        default=60.0,
        help="Seconds for the sandbox to come up and start the kernel.",
        parse=seconds,
        who=_SERVER,
        enforced="tunnel.py (the agent's launch reply)",
    ),
    Setting(
        name="mode",
        kind="choice",
        default="auto",
        help="Who makes the sandboxes. in-process: this server (it must be root). service: the "
        "sandbox service (`jupyter sandbox serve`) on service_socket, for this server's user "
        "and under the operator's policy; this server's policy_file and kernel_uid are then "
        "not used. auto: service if this server is not root.",
        parse=one_of("auto", "in-process", "service"),
        who=frozenset({OPERATOR}),
        enforced="provisioner.py",
        choices=("auto", "in-process", "service"),
    ),
    Setting(
        name="service_socket",
        kind="text",
        default="",
        help=f"The sandbox service's socket; default: ${SOCKET_ENV}, else {DEFAULT_SOCKET}.",
        parse=text_value,
        who=frozenset({OPERATOR}),
        enforced="service/client.py",
    ),
)
"""The settings of every backend, in the order the reference lists them."""

QUOTAS: tuple[Setting, ...] = (
    Setting(
        name="max_kernels",
        kind="int",
        default=None,
        help="Kernels one user may have at once, on this host.",
        parse=_positive_int,
        who=frozenset({POLICY}),
        enforced="quotas.py (admit, under the user's lock)",
        magnitude=_by_number,
        allow_none=True,
        example="3",
    ),
    Setting(
        name="max_memory",
        kind="text",
        default=None,
        help="The sum of the memory limits of one user's kernels; the user's cgroup is capped "
        "at it too.",
        parse=size_text,
        who=frozenset({POLICY}),
        enforced="quotas.py, cgroups.py (the user's cgroup)",
        magnitude=_by_size,
        allow_none=True,
        example='"6G"',
    ),
    Setting(
        name="kernelspecs",
        kind="list",
        default=(),
        help="The kernelspecs a user may start; unset: any.",
        parse=_strings,
        who=frozenset({POLICY}),
        enforced="policy.py (apply)",
        example='["python3-gvisor"]',
    ),
    Setting(
        name="images",
        kind="list",
        default=(),
        help="The images a user's kernels may run on (by name; a kernelspec names its image); "
        "unset: any.",
        parse=_strings,
        who=frozenset({POLICY}),
        enforced="policy.py (check_image)",
        example='["python3", "course-101"]',
    ),
)
"""What only the policy file sets: per-user quotas and the kernelspecs and images a user
may start."""

POOL: tuple[Setting, ...] = (
    Setting(
        name="pool_size", kind="int", default=1,
        help="Warm sandboxes kept started, per shape in use (the kernel's command, image, "
        "limits, network and backend settings), each with its kernel's process past its "
        "imports, for kernels that start or restart (docs: 'Warm pools'): with 1, a "
        "user's second kernel and every restart are warm. 0 turns the pool off.",
        parse=non_negative_int, who=frozenset({OPERATOR, KERNELSPEC}),
        enforced="pool.py (refill)",
    ),
    Setting(
        name="pool_min", kind="int", default=0,
        help="Warm sandboxes kept for a shape even once it has been idle for "
        "pool_idle_timeout (a class's image before 9:00); at most pool_size.",
        parse=non_negative_int, who=frozenset({OPERATOR, KERNELSPEC}),
        enforced="pool.py (expire)",
    ),
    Setting(
        name="pool_idle_timeout", kind="float", default=900.0,
        help="Seconds after a shape's last claim when its warm sandboxes beyond pool_min "
        "are removed.",
        parse=seconds, who=frozenset({OPERATOR, KERNELSPEC}),
        enforced="pool.py (expire)",
    ),
    Setting(
        name="pool_memory", kind="text", default="1G",
        help="Memory all warm sandboxes of the host (every server's and the sandbox "
        "service's) may use together, charged to no user: the pool's cgroup is capped at "
        "it, and no sandbox is added that would not fit.",
        parse=size_text, who=frozenset({OPERATOR}),
        enforced="pool.py, cgroups.py (the pool's cgroup)",
    ),
)  # fmt: skip
"""A warm pool's settings (provisioner/pool.py), for the backends whose sandboxes can wait
for their kernel (`Backend.poolable`). They say how many sandboxes to keep, never what a
sandbox is: they are no part of its shape."""

BY_NAME: dict[str, Setting] = {s.name: s for s in (*COMMON, *QUOTAS)}
BOUNDED: tuple[str, ...] = tuple(s.name for s in COMMON if s.bounded)
"""Settings the policy bounds from above, compared by their `magnitude`."""
POLICY_KEYS: frozenset[str] = frozenset(
    {*BOUNDED, "network", "egress_allow", *(s.name for s in QUOTAS)}
)
"""What a tier of the policy file may set."""
ASKABLE: tuple[str, ...] = (*BOUNDED, "egress_allow")
"""Settings whose asked-for value the policy checks (a kernelspec's, a caller's)."""
USER_SETTINGS: frozenset[str] = frozenset(s.name for s in COMMON if USER in s.who)
"""What a caller of the sandbox service may ask for; the policy bounds the limits among them."""


def traits(settings: Iterable[Setting]) -> dict[str, TraitType]:
    """The traits of `settings`, by name, for a provisioner class's namespace."""
    return {s.name: s.trait() for s in settings}


def check(setting: Setting, value: Any) -> Any:
    """`value` checked by `setting.parse`; ValueError naming the setting and the form."""
    try:
        return setting.parse(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {setting.name}: {e}") from None


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


@dataclass(frozen=True)
class Reference:
    """One row of the configuration reference (docs/configuration.md)."""

    setting: Setting
    scope: str
    """"all backends", or the backend's name."""
    default: str = field(default="")


def reference(backend_settings: dict[str, tuple[Setting, ...]]) -> list[Reference]:
    """The configuration reference's rows: the common settings, each backend's, the
    policy's. `backend_settings` maps backend name -> its settings (the registry's)."""
    rows = [Reference(s, "all backends", repr(s.default)) for s in COMMON]
    for backend, settings in backend_settings.items():
        rows += [Reference(s, backend, repr(s.default)) for s in settings]
    rows += [Reference(s, "policy file", "unset") for s in QUOTAS]
    return rows


def from_config(config: Any, sections: Iterable[str],
                declared: Iterable[Setting]) -> tuple[dict[str, Any], frozenset[str]]:  # fmt: skip
    """The values of `declared` as a traitlets `config` sets them in `sections` (later
    sections win, as a subclass's do), else their defaults; and which were set there.

    For the sandbox service, which makes sandboxes without provisioner instances: its
    config names them as the provisioners' (`c.GVisorProvisioner.memory_limit`).
    ValueError naming the setting if a configured value is not accepted.
    """
    values = {s.name: s.default for s in declared}
    configured: set[str] = set()
    for section in sections:
        if section not in config:
            continue
        for s in declared:
            if s.name in config[section]:
                values[s.name] = check(s, config[section][s.name])
                configured.add(s.name)
    return values, frozenset(configured)
