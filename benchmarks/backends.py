"""What the benchmark knows of each sandboxed backend: one list, `BACKENDS`.

Every other module of the benchmark asks this list (a backend's kernelspec, its
extra kinds of start, its own smaller counts, its targets, its runtime's version)
instead of comparing backend names. Each entry names a backend of the project's
registry (`provisioner.backends`), which gives its provisioner's config section;
a new backend is one more entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imported import IMPORTED, KERNELSPEC

from provisioner import backends as registry


@dataclass(frozen=True)
class Target:
    """A bound one summary metric of a backend must keep to PASS (else MISS)."""

    metric: str
    """A key of the backend's summary (`report.summarize`): "start", "execute_p50"..."""
    limit: float
    minimum: bool = False
    """The value must be at least `limit` (throughput); else at most."""
    relative: bool = True
    """The bound is on the backend's value over local's (a ratio); else on its own value."""
    unit: str = "x"
    informational: bool = False
    """Shown beside the numbers, but no verdict of the backend's rests on it."""
    per_accelerator: bool = False
    """The bound assumes the accelerator the backend's VMs used (TCG here): name it."""

    def met(self, value: float, local: float) -> bool:
        measured = value / local if self.relative else value
        return measured >= self.limit if self.minimum else measured <= self.limit

    def text(self, accelerator: str = "") -> str:
        """`≤ 3x`, `≥ 0.5x`, `≤ 10 s (TCG)`."""
        text = f"{'≥' if self.minimum else '≤'} {self.limit:g}{self.unit}"
        if self.per_accelerator:
            text += f" ({accelerator or '?'})"
        return text


@dataclass(frozen=True)
class Variant:
    """Another way of starting a backend's kernels, measured as one more row of starts."""

    label: str
    title: str
    row: str
    """The table row's name; `{n}` is replaced by its number of starts."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Traits of the backend's provisioner for these kernels."""
    via_service: bool = False
    """The run's own sandbox service makes these sandboxes (`mode = "service"`)."""
    count_option: str = ""
    """The command-line option that gives its number of starts ("" for as many as the
    backend's own starts)."""
    skip_option: str = ""
    """The command-line flag that leaves this row out ("" if none does)."""
    kernelspec: str = ""
    """Its kernelspec, if not the backend's."""
    image: str = ""
    """An image the run imports for these kernels before any start and removes at its
    end (imported.py); `kernelspec` is the one `kernelspec install --image` writes for it."""
    versus_backend: Target | None = None
    """A bound on its start over the same start of the backend's own kernels (its
    `metric` is "start"); else it is only compared with local."""
    versus_local: Target | None = None
    """A bound on its start over the local kernel's start in the same run."""
    warm: bool = False
    """Its kernels claim a sandbox of the run's own warm pool (provisioner/pool.py): after
    each of its starts the run waits for the pool to have a sandbox again, its kernel
    process past its imports, before anything else starts (measure.py `pool_ready`)."""


@dataclass(frozen=True)
class Backend:
    name: str
    """As in `--backends`, and the provisioner registry's name."""
    title: str
    kernelspec: str
    targets: tuple[Target, ...]
    variants: tuple[Variant, ...] = ()
    counts: Mapping[str, str] = field(default_factory=dict)
    """count (`run.COUNTS`) -> the option that gives this backend's own, smaller count of it
    (its kernels are slow); a count not named here is the common option's."""
    version: tuple[str, ...] = ()
    """The command that prints its runtime's version, for the report's header."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Traits of its provisioner for all its kernels (a variant's add to these)."""

    @property
    def provisioner(self) -> str:
        """Its provisioner class, the section of the traitlets config its variant sets (the
        registry's; SettingError if the registry has no backend of this name)."""
        return registry.get(self.name).provisioner_class


NEIGHBOUR_TARGET = 2.0
"""Most a CPU hog next door may stretch a kernel's execute p99 (loaded / idle)."""
WARM_START_TARGET = 0.25
"""Most a kernel's start from a warm pool may take over the local kernel's (issue 18)."""
IMPORTED_START_TARGET = 1.1
"""Most a kernel's start on an imported image may take over the same start on the default
image (issue 16: within 10%)."""

BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="gvisor",
        title="gVisor",
        kernelspec="python3-gvisor",
        targets=(
            Target("start", 3.0),
            Target("execute_p50", 1.5),
            Target("throughput", 0.5, minimum=True),
            Target("neighbour_ratio", NEIGHBOUR_TARGET, relative=False),
        ),
        variants=(
            Variant(
                label="service",
                title="gVisor (service)",
                row="the same start, the sandbox made by the sandbox service (`mode = service`)",
                settings={"mode": "service"},
                via_service=True,
            ),
            Variant(
                label="imported",
                title="gVisor (imported image)",
                row="the same start on an imported image (the default image plus a layer, "
                f"through a docker-archive: `{IMPORTED}`, its kernelspec written by "
                "`kernelspec install --image`)",
                skip_option="no_imported",
                kernelspec=KERNELSPEC,
                image=IMPORTED,
                versus_backend=Target("start", IMPORTED_START_TARGET),
            ),
            Variant(
                label="warm",
                title="gVisor (warm pool)",
                row="the same start from a warm pool (`pool_size = 1`: a sandbox started "
                "ahead, its kernel process past its imports, claimed)",
                settings={"pool_size": 1},
                warm=True,
                versus_local=Target("start", WARM_START_TARGET),
            ),
        ),
        version=("runsc", "--version"),
        # Its own row is a cold start, as a server's first kernel of a shape: no pool.
        settings={"pool_size": 0},
    ),
    Backend(
        name="microvm",
        title="microVM",
        kernelspec="python3-microvm",
        targets=(
            # absolute: seconds from start_kernel() to ready, under TCG
            Target("start", 10.0, relative=False, unit=" s", per_accelerator=True),
            Target("neighbour_ratio", NEIGHBOUR_TARGET, relative=False, informational=True),
        ),
        variants=(
            Variant(
                label="microvm-boot",
                title="microVM (booted)",
                row="the same start, the VM booted instead of restored from its shape's "
                "snapshot (`snapshots = False`; n={n})",
                settings={"snapshots": False},
                count_option="microvm_boot_starts",
            ),
        ),
        counts={
            "starts": "microvm_starts",
            "executes": "microvm_executes",
            "throughput_mb": "microvm_throughput_mb",
            "neighbour_executes": "microvm_executes",
        },
        version=("qemu-system-x86_64", "--version"),
    ),
)
"""Every sandboxed backend the benchmark can measure, in the order of the report's columns.

Its names are the provisioner registry's (`provisioner.backends`); the rest is the
benchmark's own (targets, counts)."""


def by_name(names: list[str]) -> list[Backend]:
    """The backends called `names`, in that order. KeyError for an unknown name."""
    known = {backend.name: backend for backend in BACKENDS}
    return [known[name] for name in names]
