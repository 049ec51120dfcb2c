"""microVMs restored from the snapshot of their shape (backends/microvm_snapshot.py).

Each restored VM must be a kernel of its own: its user, its workspace, its own
randomness, the host's time; a kernel the warm process cannot be starts afresh;
and a snapshot that cannot be made leaves nothing behind and the VM boots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path

import pytest
from conftest import BACKENDS, READY_TIMEOUT, execute, require_sandbox
from helpers import microvm_list
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner.backends import microvm_snapshot
from provisioner.images.boot import find_boot_files

PROBE = """
import ctypes, json, locale, os, random, resource, sys, time
def warm_processes():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"warm_kernel" in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(int(pid))
        except OSError:
            pass
    return [pid for pid in found if pid != os.getpid()]
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
umask = os.umask(0o077)
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "umask": umask,
    "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    "no_new_privs": status["NoNewPrivs"].strip(), "cap_eff": status["CapEff"].strip(),
    "cap_prm": status["CapPrm"].strip(), "session_leader": os.getsid(0) == os.getpid(),
    "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),
    "cwd": os.getcwd(), "files": sorted(os.listdir(".")), "path": sys.path,
    "argv": sys.argv, "executable": sys.executable, "utf8_mode": sys.flags.utf8_mode,
    "ctype": locale.setlocale(locale.LC_CTYPE), "encoding": sys.getfilesystemencoding(),
    "zone": time.strftime("%Z"), "stdin": os.readlink("/proc/self/fd/0"),
    "local_module": __import__("local_module").VALUE,
    "random": random.random(), "urandom": os.urandom(16).hex(), "time": time.time(),
    "cmdline": open("/proc/self/cmdline").read().split("\\0"),
    "warm_processes": warm_processes(),
}))
"""
SAME = (
    "uid",
    "gid",
    "groups",
    "umask",
    "nproc",
    "nofile",
    "no_new_privs",
    "cap_eff",
    "cap_prm",
    "session_leader",
    "dumpable",
    "cwd",
    "files",
    "path",
    "argv",
    "executable",
    "utf8_mode",
    "ctype",
    "encoding",
    "zone",
    "stdin",
    "local_module",
)
"""What a kernel restored from a snapshot has exactly as a kernel started afresh."""
RESTORED = "starts from the snapshot of its shape"
RESEEDED = "the host's entropy mixed in, the random pool reseeded"
PAUSE = 10.0


def snapshot_leftovers() -> list[str]:
    """Half-written snapshots, and QEMUs of snapshot builds still running."""
    folder = find_boot_files().kernel.parent / "snapshots"
    partial = [p.name for p in folder.glob(".*.tmp")] if folder.is_dir() else []
    return partial + [sid for sid in microvm_list() if sid.startswith("jsb-snapshot")]


async def start(workspace: Path, log: logging.Logger, **settings) -> AsyncIOLoopKernelManager:
    (workspace / "local_module.py").write_text("VALUE = 42\n")  # PROBE imports it
    km = AsyncIOLoopKernelManager(
        kernel_name=BACKENDS["microvm"],
        config=Config({"MicroVMProvisioner": settings}),
        log=log,
    )
    await km.start_kernel(cwd=str(workspace))
    return km


async def probe(km: AsyncIOLoopKernelManager) -> tuple[dict, float]:
    """What the kernel says of itself, and the host's time halfway through asking."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        before = time.time()
        reply, text, _ = await execute(kc, PROBE)
        after = time.time()
        assert reply["status"] == "ok", text
        return json.loads(text), (before + after) / 2
    finally:
        kc.stop_channels()


async def clock_drift(km: AsyncIOLoopKernelManager) -> tuple[float, float]:
    """How far the kernel's clock ran ahead of the host's over PAUSE seconds, and the
    uncertainty of that figure (half of each reading's round trip)."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        readings = []
        for pause in (0.0, PAUSE):
            await asyncio.sleep(pause)
            before = time.time()
            _, text, _ = await execute(kc, "print(repr(__import__('time').time()))")
            after = time.time()
            readings.append((float(text), (before + after) / 2, (after - before) / 2))
    finally:
        kc.stop_channels()
    (guest0, host0, half0), (guest1, host1, half1) = readings
    return (guest1 - guest0) - (host1 - host0), half0 + half1


async def test_restored_kernels_are_each_their_own(no_leftovers, workspace, caplog):
    require_sandbox("microvm")
    caplog.set_level(logging.INFO)
    (workspace / "note.txt").write_text("mine")
    log = logging.getLogger("jsb-test-snapshots")
    first = await start(workspace, log)  # makes the shape's snapshot, if it was not there
    await first.shutdown_kernel(now=True)
    seen = []
    for _ in range(2):
        caplog.clear()
        km = await start(workspace, log)
        try:
            assert RESTORED in caplog.text  # not booted: restored
            kernel, host_time = await probe(km)
            drift, uncertainty = await clock_drift(km)
        finally:
            await km.shutdown_kernel(now=True)
        assert RESEEDED in caplog.text
        # the warm process became the kernel, as the workspace's owner, in the workspace
        assert kernel["cmdline"][1].endswith("/warm_kernel.py"), kernel["cmdline"]
        assert kernel["uid"] == 1000 and kernel["cwd"] == str(workspace)
        assert "note.txt" in kernel["files"] and kernel["local_module"] == 42
        # the host's time, and a clock that keeps it (a wrong TSC rate: 5% fast, 0.5 s)
        assert abs(kernel["time"] - host_time) < 1.0
        assert abs(drift) <= uncertainty + 0.01 * PAUSE, (drift, uncertainty)
        seen.append(kernel)
    # each its own randomness, though both were restored from the same memory
    assert seen[0]["random"] != seen[1]["random"]
    assert seen[0]["urandom"] != seen[1]["urandom"]


async def test_a_restored_kernel_is_what_a_fresh_one_is(no_leftovers, workspace, caplog):
    """User, groups, umask, rlimits, privileges, session, paths, locale, time zone..."""
    require_sandbox("microvm")
    caplog.set_level(logging.INFO)
    log = logging.getLogger("jsb-test-snapshots")
    env = {"TZ": "Asia/Tokyo"}  # read by `time` at import: the warm process imported it
    kernels = {}
    for restored in (False, True):
        caplog.clear()
        # A booted VM has a warm process too: PYTHON* makes the agent start a fresh one.
        fresh = {} if restored else {"PYTHONDONTWRITEBYTECODE": "1"}
        km = await start(workspace, log, snapshots=restored, env=env | fresh)
        try:
            kernels[restored], _ = await probe(km)
        finally:
            await km.shutdown_kernel(now=True)
        assert (RESTORED in caplog.text) == restored
    fresh, warm = kernels[False], kernels[True]
    assert fresh["cmdline"][1:3] == ["-m", "ipykernel_launcher"]
    assert warm["cmdline"][1].endswith("/warm_kernel.py")
    assert {k: warm[k] for k in SAME} == {k: fresh[k] for k in SAME}
    assert warm["zone"] == "JST" and warm["dumpable"] == 1 and warm["uid"] == 1000


async def test_a_kernel_the_warm_process_cannot_be_starts_afresh(no_leftovers, workspace, caplog):
    """PYTHONPATH acts when an interpreter starts: the warm one started long ago."""
    require_sandbox("microvm")
    caplog.set_level(logging.INFO)
    extra = "/opt/jsb-test-extra"
    km = await start(workspace, logging.getLogger("jsb-test"), env={"PYTHONPATH": extra})
    try:
        kernel, _ = await probe(km)
    finally:
        await km.shutdown_kernel(now=True)
    assert RESTORED in caplog.text  # the VM was restored, warm process and all
    assert kernel["cmdline"][1:3] == ["-m", "ipykernel_launcher"], kernel["cmdline"]
    assert kernel["warm_processes"] == []  # the warm one is gone, not left running as root
    assert extra in kernel["path"]
    assert kernel["uid"] == 1000


async def test_a_snapshot_that_cannot_be_made_leaves_nothing_and_the_vm_boots(
    no_leftovers, workspace, caplog, monkeypatch
):
    require_sandbox("microvm")
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(microvm_snapshot, "BUILD_TIMEOUT", 1.0)  # no VM is ready in 1 s
    # a shape of its own (memory), of which no snapshot can exist: its builds all fail
    km = await start(workspace, logging.getLogger("jsb-test"), memory_limit="1111M")
    try:
        kernel, _ = await probe(km)
    finally:
        await km.shutdown_kernel(now=True)
    assert "no snapshot for this VM shape (the VM was not ready in 1 s" in caplog.text
    assert RESTORED not in caplog.text
    assert kernel["uid"] == 1000
    assert not snapshot_leftovers()


async def test_a_start_given_up_gives_up_its_snapshot_build(no_leftovers, workspace):
    """E.g. the server stopping: the build's VM goes with the start, at once."""
    require_sandbox("microvm")
    # a shape never seen before (its disk layer's size): its snapshot is built here
    disk = f"{1000 + secrets.randbelow(10000)}M"
    km = AsyncIOLoopKernelManager(
        kernel_name=BACKENDS["microvm"],
        config=Config({"MicroVMProvisioner": {"disk_limit": disk}}),
    )
    starting = asyncio.ensure_future(km.start_kernel(cwd=str(workspace)))
    try:
        for _ in range(300):
            if snapshot_leftovers() or starting.done():
                break
            await asyncio.sleep(0.1)
        assert snapshot_leftovers(), "no snapshot build was seen"
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        for _ in range(50):  # the build notices within half a second, then kills its VM
            if not snapshot_leftovers():
                break
            await asyncio.sleep(0.1)
        assert not snapshot_leftovers()
        assert not [sid for sid in microvm_list() if km.kernel_id in sid]
    finally:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


def test_least_recently_used_snapshots_go_first(tmp_path):
    for n in range(microvm_snapshot.MAX_SNAPSHOTS + 3):
        path = tmp_path / f"shape{n}.vmstate"
        path.write_bytes(b"x")
        os.utime(path, (1000 + n, 1000 + n))
    os.utime(tmp_path / "shape0.vmstate")  # used just now
    microvm_snapshot._evict(tmp_path)
    kept = sorted(int(p.stem.removeprefix("shape")) for p in tmp_path.glob("*.vmstate"))
    assert kept == [0, *range(4, microvm_snapshot.MAX_SNAPSHOTS + 3)]
