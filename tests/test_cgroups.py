"""A sandbox's cgroup on a real cgroup v2 hierarchy: its processes can join it.

v2 refuses processes in any cgroup but the root that hands controllers on to children
("no internal processes", Documentation/admin-guide/cgroup-v2.rst): the sandbox's cgroup
must get its controllers from its ancestors and hand none on itself. On a v2 host this
runs with the memory controller at /sys/fs/cgroup; on a hybrid (v1) host it uses the
unified hierarchy at /sys/fs/cgroup/unified with whatever controller v1 left it (often
only hugetlb): the rule is the same for every controller.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_or_fail

from provisioner import cgroups


def v2_hierarchy() -> tuple[Path, str] | None:
    """A mounted v2 hierarchy and a controller it offers (memory where it can), or None."""
    for root in (cgroups.ROOT, cgroups.ROOT / "unified"):
        with contextlib.suppress(OSError):
            offered = (root / "cgroup.controllers").read_text().split()
            if offered:
                return root, "memory" if "memory" in offered else offered[0]
    return None


def remove_tree(top: Path) -> None:
    """Remove `top` and the cgroups under it, deepest first (a reaped process's cgroup
    may stay busy for a moment)."""
    for path in [*sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True), top]:
        if not path.is_dir():
            continue
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.02)


@pytest.fixture
def v2() -> Iterator[tuple[Path, str, str]]:
    """(root, controller, top cgroup of this test), all of it removed afterwards and the
    root's `cgroup.subtree_control` as it was."""
    found = v2_hierarchy()
    if found is None:
        skip_or_fail("no cgroup v2 hierarchy with a controller to hand down on this host")
    root, controller = found
    control = root / "cgroup.subtree_control"
    enabled_before = controller in control.read_text().split()
    top = f"jupyter-sandbox-test-{uuid.uuid4().hex[:8]}"
    try:
        yield root, controller, top
    finally:
        remove_tree(root / top)
        if not enabled_before:
            with contextlib.suppress(OSError):  # busy if something else uses it meanwhile
                control.write_text(f"-{controller}")


def test_sandbox_processes_can_join_its_v2_cgroup(v2: tuple[Path, str, str]) -> None:
    root, controller, top = v2
    user = f"/{top}/users/u-alice"
    sandbox = f"{user}/sandbox-1"
    cgroups.make_v2(root, user, f"+{controller}")  # the user's quota (quotas.admit)
    path = cgroups.make_v2(root, sandbox, f"+{controller}")

    assert controller in (path / "cgroup.controllers").read_text().split()
    assert (path / "cgroup.subtree_control").read_text().split() == []
    with subprocess.Popen(["sleep", "60"]) as process:
        try:
            # What runsc (or a VM's QEMU) does: EBUSY had the cgroup handed controllers on.
            (path / "cgroup.procs").write_text(str(process.pid))
            assert f"0::{sandbox}\n" in Path(f"/proc/{process.pid}/cgroup").read_text()
            # The user's next sandbox while this one runs: the ancestors hold no process.
            second = cgroups.make_v2(root, f"{user}/sandbox-2", f"+{controller}")
            assert controller in (second / "cgroup.controllers").read_text().split()
        finally:
            process.kill()
