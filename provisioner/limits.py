"""Resource limits: how operators write them, and what they mean for a sandbox."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SIZE_FORM = 'a size such as "512M", "2G", "1.5G", "2Gi" or a number of bytes'


def parse_size(value: str | int | float) -> int:
    """Bytes from "512M" / "2G" / "2Gi" / 1073741824. Units are binary (1G = 2**30)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_FORM}, got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(value)
        if not match or " " in value.strip():
            raise ValueError(f"expected {SIZE_FORM}, got {value!r}")
        number, unit = float(match.group(1)), (match.group(2) or "")[:1].lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"expected a positive {SIZE_FORM}, got {value!r}")
    return size


def format_size(size: int) -> str:
    for unit in "TGMK":
        factor = _UNITS[unit.lower()]
        if size >= factor:
            return f"{size / factor:.4g}{unit}"
    return str(size)


@dataclass(frozen=True)
class Limits:
    """What one sandbox may use. None means unlimited."""

    cpu: float | None = None
    """Cores, may be fractional; enforced as a CFS quota."""
    memory: int | None = None
    """Bytes of RAM plus swap for every process of the sandbox, the runtime included."""
    pids: int | None = None
    """Processes and threads inside the sandbox."""
    disk: int = 1 << 30
    """Bytes of the sandbox's writable layer (memory-backed: it counts as memory too)."""
    open_files: int = 4096
    """Open file descriptors per process in the sandbox."""

    def describe(self) -> str:
        cpu = f"{self.cpu:g} CPU" if self.cpu else "unlimited CPU"
        memory = f"{format_size(self.memory)} memory" if self.memory else "unlimited memory"
        pids = f"{self.pids} processes" if self.pids else "unlimited processes"
        return f"{cpu}, {memory}, {pids}, {format_size(self.disk)} disk, {self.open_files} files"


def check_cpu(value: float) -> float:
    cores = os.cpu_count() or 1
    if not 0 < value <= cores:
        raise ValueError(
            f"expected a number of cores in (0, {cores}] such as 0.5 or 1, got {value!r}"
        )
    return value
