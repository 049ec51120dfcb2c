"""Finding and removing everything a double made on the host, after a crash too.

What a double makes is found from its state folder and its bridge's name alone,
without any record: runsc containers under its root, mounts under
`<state>`, pod folders under `<state>/pods`, namespaces and links named from
the bridge (`network.py`), cgroups under `/kube-double/<bridge>`; runsc's state root
is `/run/kube-double/<bridge>/runsc`. `sweep` runs
before a double starts (a previous run may have crashed) and after it stops;
`leftovers` is what the fixture asserts empty.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from provisioner import cgroups, hostcmd

from .config import Config
from .mounts import mount_points_under, remove_tree
from .network import Network
from .runtime import CGROUP_TOP, cgroup_top, runsc_root

log = logging.getLogger(__name__)


def runsc_containers(config: Config) -> list[str]:
    """Container ids runsc knows under the double's root."""
    root = runsc_root(config)
    if not root.is_dir():
        return []
    listed = hostcmd.probe([config.runsc, f"--root={root}", "list", "--quiet"])
    return listed.split() if listed else []


def _cgroup_dirs(config: Config) -> list[Path]:
    top = cgroup_top(config)
    found = []
    for path in cgroups.directories(top):
        found += [p for p in path.rglob("*") if p.is_dir()]
        found.append(path)
    return found


def leftovers(config: Config, state: Path) -> list[str]:
    """Everything of this double still on the host, one line each ([] when clean)."""
    found = [f"runsc container {cid}" for cid in runsc_containers(config)]
    found += [f"mount {p}" for p in mount_points_under(state)]
    pods = state / "pods"
    if pods.is_dir():
        found += [f"pod folder {p}" for p in sorted(pods.iterdir())]
    found += Network(config).leftovers()
    found += [f"cgroup {p}" for p in _cgroup_dirs(config)]
    return found


def sweep(config: Config, state: Path) -> None:
    """Remove everything of this double from the host: sandboxes first (they hold the
    mounts and cgroups), then mounts and folders, links and namespaces, cgroups.
    Never raises; what stays is for `leftovers` to report."""
    root = runsc_root(config)
    for cid in runsc_containers(config):
        runsc = [config.runsc, f"--root={root}"]
        hostcmd.quietly(
            [*runsc, "kill", "--all", cid, "KILL"],
            log,
            ("not running", "not found"),
            level=logging.DEBUG,
        )
        hostcmd.quietly([*runsc, "delete", "--force", cid], log, ("does not exist", "not found"))
    remove_tree(state / "pods")
    for point in mount_points_under(state):  # anything else mounted under the state folder
        hostcmd.quietly(["umount", "--lazy", point], log)
    if root.is_dir() and not runsc_containers(config):
        shutil.rmtree(root, ignore_errors=True)  # what runsc left of ended containers
        with contextlib.suppress(OSError):
            root.parent.rmdir()
    Network(config).sweep()
    cgroups.remove(cgroup_top(config))
    for path in cgroups.directories(CGROUP_TOP):  # shared by doubles of other bridges
        with contextlib.suppress(OSError):
            path.rmdir()
