"""The backends, by name: the one place that lists them.

The provisioner, the sandbox service, gc, doctor and the benchmark find a
backend here, never by comparing names. Adding a backend is a module under
provisioner/backends/ with one `Backend` instance, a line in `BACKENDS`, its
provisioner class (provisioner.py: `provisioner_class`) and an entry point in
pyproject.toml (docs: "Adding a backend").
"""

from __future__ import annotations

from ..errors import SettingError
from .base import Backend
from .gvisor import GVISOR
from .kubernetes import KUBERNETES
from .microvm import MICROVM

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (GVISOR, MICROVM, KUBERNETES)}


def get(name: str) -> Backend:
    """The backend called `name`; SettingError naming the known ones if there is none."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise SettingError(f"no sandbox backend {name!r}; known: {', '.join(BACKENDS)}") from None


def for_provisioner(provisioner_name: str) -> Backend | None:
    """The backend whose provisioner a kernelspec names (`gvisor-provisioner`), if any."""
    for backend in BACKENDS.values():
        if backend.provisioner_name == provisioner_name:
            return backend
    return None


def registered() -> tuple[Backend, ...]:
    return tuple(BACKENDS.values())
