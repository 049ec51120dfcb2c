"""Checks that this host can run sandboxed kernels, each with how to fix a failure."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import backends, cgroups
from .checks import INSTALL, Check
from .errors import ImageError
from .guest.layout import KERNEL_UID
from .idmap import IdMap, detached_tree
from .images.store import find_image, load_manifest, rebuild_hint, verify_image

NETWORK_TOOLS = {"ip": "iproute2", "nft": "nftables", "nsenter": "util-linux",
                 "conntrack": "conntrack"}  # fmt: skip
"""Host tools kernels with a network (egress, open) need, and their Debian packages."""


def check_network_tools() -> Check:
    """The tools provisioner/network runs: without conntrack, a removed kernel's flows linger."""
    missing = [tool for tool in NETWORK_TOOLS if shutil.which(tool) is None]
    if not missing:
        return Check("network tools", True, ", ".join(NETWORK_TOOLS))
    packages = " ".join(NETWORK_TOOLS[tool] for tool in missing)
    return Check(
        "network tools",
        False,
        f"missing {', '.join(missing)} (needed for network = 'egress' or 'open')",
        f"apt-get install {packages}, or {INSTALL}",
    )


def run_checks(image: str = "python3", overrides: Mapping[str, Any] | None = None) -> list[Check]:
    """Every check: the host's, then each backend's (`Backend.checks`, found through the
    registry) with its settings at their defaults but for `overrides` (by setting name)."""
    checks = [
        Check(
            "privileges",
            os.geteuid() == 0,
            "running as root" if os.geteuid() == 0 else f"running as uid {os.geteuid()}",
            "run the Jupyter server (or the sandbox service, `jupyter sandbox serve`) as root",
        ),
    ]
    version = "v2" if cgroups.is_v2() else "v1 (hybrid)"
    memory = Path("/sys/fs/cgroup/memory.max" if cgroups.is_v2() else "/sys/fs/cgroup/memory")
    checks.append(
        Check(
            "cgroups",
            cgroups.is_v2() or memory.exists(),
            f"cgroup {version}",
            "mount the cgroup memory controller; limits cannot be enforced without it",
        )
    )
    checks.append(check_network_tools())
    if os.geteuid() == 0:
        checks.append(check_idmap())
    try:
        rootfs = find_image(image)
        manifest = load_manifest(image)
        if manifest is not None:  # a named image: its files must still match its manifest
            verify_image(image)
        built = (manifest or {}).get("built_at", "?")
        checks.append(Check("image", True, f"{rootfs} (built {built}, content verified)"))
    except ImageError as e:
        checks.append(Check("image", False, str(e), rebuild_hint(image)))
    for backend in backends.registered():
        wanted = {name: value for name, value in (overrides or {}).items()
                  if name in backend.defaults()}  # fmt: skip
        checks += backend.checks({**backend.defaults(), **wanted}, image)
    return checks


def check_idmap() -> Check:
    """Whether this host can idmap a folder (`idmap.py`): what a kernel needs on a workspace
    that its uid does not own (root's), tried on a folder of /tmp's file system."""
    name = "workspaces of other owners (idmapped mounts)"
    with tempfile.TemporaryDirectory(prefix="jsb-doctor-") as folder:
        try:
            os.close(
                detached_tree(Path(folder), IdMap(owner=(0, 0), kernel=(KERNEL_UID, KERNEL_UID)))
            )
        except OSError as e:
            return Check(name, False, str(e), "use Linux 5.12 or later (6.x for tmpfs)")
    return Check(name, True, f"a root-owned folder is shown to uid {KERNEL_UID} as its own")
