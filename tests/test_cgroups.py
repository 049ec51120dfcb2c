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


def test_procs_of_a_real_v2_cgroup_include_its_children(
    v2: tuple[Path, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`procs` on the kernel's own v2 files: the hierarchy found above taken as the root."""
    root, controller, top = v2
    monkeypatch.setattr(cgroups, "ROOT", root)
    user = f"/{top}/users/u-alice"
    path = cgroups.make_v2(root, f"{user}/sandbox-1", f"+{controller}")
    assert cgroups.procs(f"{user}/sandbox-1") == []
    with subprocess.Popen(["sleep", "60"]) as process:
        try:
            (path / "cgroup.procs").write_text(str(process.pid))
            assert cgroups.procs(f"{user}/sandbox-1") == [process.pid]
            assert cgroups.procs(user) == [process.pid]  # a user's: its sandboxes' too
        finally:
            process.kill()


def fake_hierarchy(root: Path, v2: bool, cgroup: str) -> Path:
    """A cgroup filesystem's layout under `root` (v2: one hierarchy with
    `cgroup.controllers` at its top; v1: one per controller), with `cgroup` and a child
    of it in the memory one, holding processes 7 and 8, 9 in the child. Returns
    `cgroup`'s memory folder."""
    memory = root if v2 else root / "memory"
    memory.mkdir(parents=True, exist_ok=True)
    if v2:
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
    else:
        (root / "cpu,cpuacct" / cgroup.strip("/")).mkdir(parents=True)
        (root / "cpu,cpuacct" / cgroup.strip("/") / "cgroup.procs").write_text("99\n")
    path = memory / cgroup.strip("/")
    (path / "child").mkdir(parents=True)
    (memory / "cgroup.procs").write_text("1\n2\n")
    (path / "cgroup.procs").write_text("8\n7\n")
    (path / "child" / "cgroup.procs").write_text("9\n")
    return path


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_procs_and_memory_stat_read_the_memory_hierarchy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2: bool
) -> None:
    """Both layouts on a fake tree (this host has only one of them): the sandbox's
    processes and its children's, never another controller's or the root's."""
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    cgroup = "/jupyter-sandbox/users/u-alice/jsb-1"
    path = fake_hierarchy(tmp_path, v2, cgroup)
    assert cgroups.is_v2() is v2
    assert cgroups.find("jsb-1") == cgroup
    assert cgroups.procs(cgroup) == [7, 8, 9]
    assert cgroups.procs("") == []
    assert cgroups.procs("/jupyter-sandbox/users/u-bob/jsb-2") == []

    assert cgroups.memory_stat(cgroup) == {}
    names = "anon 4096\nfile 8192\nshmem 0\n" if v2 else "rss 4096\ncache 8192\nshmem 0\n"
    (path / "memory.stat").write_text(names)
    expected = {"anon": 4096, "file": 8192} if v2 else {"rss": 4096, "cache": 8192}
    assert cgroups.memory_stat(cgroup) == {**expected, "shmem": 0}
