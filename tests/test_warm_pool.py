"""gVisor sandboxes started before a kernel asks, claimed when one does (provisioner/pool.py).

A kernel that claims a warm sandbox must be the kernel a fresh sandbox would have
given it: its user, limits, folders, cgroup and quota, its own randomness. The pool
must never hand out a sandbox that ended, must give one back that its user's quota
refused, must stay within its memory budget, and must leave nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from conftest import BACKENDS, READY_TIMEOUT, execute, require_sandbox
from helpers import runsc_list
from images_kit import kernelspecs
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner import cgroups
from provisioner.ioloop import run_on_io
from provisioner.pool import warm_pool
from provisioner.state import records

log = logging.getLogger("test_warm_pool")

PROBE = """
import ctypes, json, os, random, resource, sys, time
def age():
    start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return float(open("/proc/uptime").read().split()[0]) - start / os.sysconf("SC_CLK_TCK")
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
mounts = [line.split() for line in open("/proc/self/mountinfo")]
here = [m for m in mounts if m[4] == os.getcwd()]
umask = os.umask(0o077)
open("written-by-the-kernel", "w").write("x")
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "umask": umask,
    "rlimits": {name: resource.getrlimit(getattr(resource, name))
                for name in dir(resource) if name.startswith("RLIMIT_")},
    "no_new_privs": status.get("NoNewPrivs", "").strip(),
    "cap_eff": status.get("CapEff", "").strip(), "cap_prm": status.get("CapPrm", "").strip(),
    "cap_bnd": status.get("CapBnd", "").strip(),
    "cwd": os.getcwd(), "files": sorted(os.listdir(".")),
    "workspace_mount": [(m[5].split(",")[0], m[-1].split(",")[0]) for m in here],
    "mount_points": sorted(m[4] for m in mounts),
    "env": dict(os.environ), "hostname": os.uname().nodename, "zone": time.strftime("%Z"),
    "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "argv": sys.argv, "path": sys.path, "executable": sys.executable, "pid": os.getpid(),
    "ppid": os.getppid(), "modules": sorted(sys.modules),
    "username": get_ipython().kernel.session.username,
    "random": random.random(), "urandom": os.urandom(16).hex(), "started": time.time() - age(),
}))
"""
SAME = ("uid", "gid", "groups", "umask", "rlimits", "no_new_privs", "cap_eff", "cap_prm",
        "cap_bnd", "cwd", "workspace_mount", "mount_points", "env", "hostname", "zone",
        "processes", "argv", "path", "executable", "pid", "ppid", "modules",
        "username")  # fmt: skip
"""What a kernel in a warm sandbox has exactly as a kernel in a fresh one."""
POOL = {"pool_size": 1, "pool_memory": "2G"}
SETTLE = 6.0
"""Seconds for a waiting sandbox to boot and its kernel process to import its modules (about
two here): the pool hands out sandboxes still booting too, which the test must not take."""


@pytest.fixture(autouse=True)
def _gvisor() -> None:
    require_sandbox("gvisor")


@pytest.fixture
async def pool(no_leftovers):
    """This process's pool, open for the test (the suite keeps it closed: conftest's
    `closed_warm_pool`) and drained at the end (before `no_leftovers` looks)."""
    await run_on_io(_reopen())
    try:
        yield
    finally:
        await run_on_io(_drain())


async def _reopen() -> None:
    warm_pool(log).reopen()


async def _drain() -> None:
    await warm_pool(log).drain()


async def _waiting() -> list[str]:
    return [s.record.sandbox_id for s in warm_pool(log).waiting()]


async def wait_for_warm(count: int = 1, timeout: float = 60) -> list[str]:
    """The ids of the pool's waiting sandboxes once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while len(waiting := await run_on_io(_waiting())) < count:
        assert time.monotonic() < deadline, f"the pool has {waiting}, not {count} sandboxes"
        await asyncio.sleep(0.1)
    return waiting


async def start(workspace: Path, **settings) -> AsyncIOLoopKernelManager:
    km = AsyncIOLoopKernelManager(
        kernel_name=BACKENDS["gvisor"], config=Config({"GVisorProvisioner": settings}), log=log
    )
    await km.start_kernel(cwd=str(workspace))
    return km


async def probe(km: AsyncIOLoopKernelManager) -> dict:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        reply, text, _ = await execute(kc, PROBE)
        assert reply["status"] == "ok", (text, reply.get("ename"), reply.get("evalue"))
        return json.loads(text)
    finally:
        kc.stop_channels()


HOST_LIMITS = (
    ("memory", "memory.limit_in_bytes"),
    ("memory", "memory.memsw.limit_in_bytes"),
    ("cpu", "cpu.cfs_quota_us"),
    ("cpu", "cpu.cfs_period_us"),
    ("pids", "pids.max"),
)


def host_limits(cgroup: str) -> dict[str, str]:
    """The limits of a sandbox's cgroup, as the host enforces them (cgroup v1, this host's)."""
    found = {}
    for controller, name in HOST_LIMITS:
        path = cgroups.ROOT / controller / cgroup.strip("/") / name
        found[name] = path.read_text().strip() if path.exists() else "absent"
    return found


async def test_a_warm_kernel_is_the_kernel_a_fresh_sandbox_gives(pool, workspace, tmp_path):
    """Field by field, from inside and from the host: a kernel in a warm sandbox and one
    in a fresh sandbox of the same shape, each in a workspace of its own."""
    other = Path(str(workspace) + "-other")
    other.mkdir()
    os.chown(other, 1000, 1000)
    fresh_asked = time.time()
    fresh = await start(workspace, **POOL)
    warm_ids = await wait_for_warm()
    await asyncio.sleep(SETTLE)
    warm_asked = time.time()
    warm = await start(other, **POOL)
    try:
        assert fresh.provisioner.sandbox_id not in warm_ids
        assert warm.provisioner.sandbox_id == warm_ids[0], "the second kernel was not warm"
        a, b = await probe(fresh), await probe(warm)
        b["cwd"] = b["cwd"].replace(str(other), str(workspace))
        b["mount_points"] = [p.replace(str(other), str(workspace)) for p in b["mount_points"]]
        for name in ("PWD", "JPY_SESSION_NAME"):
            a["env"].pop(name, None), b["env"].pop(name, None)
        for name in SAME:
            assert a[name] == b[name], f"{name}: fresh {a[name]!r}, warm {b[name]!r}"
        assert a["random"] != b["random"] and a["urandom"] != b["urandom"]
        # No capability left, and none to get back: kernel_init emptied the bounding set
        # before the warm process started, as the user (the image's code never ran as root).
        assert (b["cap_eff"], b["cap_prm"], b["cap_bnd"]) == ("0" * 16,) * 3
        # The warm kernel's process is the one started before it was asked for (not a
        # fresh one the agent fell back to), the other kernel's one started after.
        assert b["started"] < warm_asked - 0.5, (b["started"], warm_asked)
        assert a["started"] > fresh_asked - 0.5, (a["started"], fresh_asked)
        assert a["files"] == ["written-by-the-kernel"] == b["files"]
        for folder in (workspace, other):  # the kernel's files are its owner's on the host
            assert (folder / "written-by-the-kernel").stat().st_uid == 1000
        ra, rb = (next(r for r in records() if r.sandbox_id == km.provisioner.sandbox_id)
                  for km in (fresh, warm))  # fmt: skip
        assert (rb.kernel_id, rb.user, rb.uid) == (warm.kernel_id, ra.user, ra.uid)
        user_cgroup = cgroups.user_cgroup(ra.user)
        assert ra.cgroup == f"{user_cgroup}/{ra.sandbox_id}"
        assert rb.cgroup == f"{user_cgroup}/{rb.sandbox_id}"
        assert host_limits(ra.cgroup) == host_limits(rb.cgroup)
        assert not (cgroups.ROOT / "memory" / cgroups.POOL.strip("/") / rb.sandbox_id).exists()
        warm_pids = cgroups.procs(rb.cgroup)
        assert warm_pids, "the warm sandbox's processes are not in its user's cgroup"
    finally:
        for km in (fresh, warm):
            await km.shutdown_kernel(now=True)


async def test_a_restart_claims_a_warm_sandbox_behind_the_same_ports(pool, workspace):
    """With the pool's default settings (on, one sandbox per shape in use), as a user
    gets it: the first kernel is cold, its restart is warm."""
    km = await start(workspace)
    try:
        ports = {name: getattr(km, f"{name}_port") for name in ("shell", "iopub", "hb")}
        first = km.provisioner.sandbox_id
        waiting = await wait_for_warm()
        began = time.monotonic()
        await km.restart_kernel(now=True)
        restart = time.monotonic() - began
        assert km.provisioner.sandbox_id == waiting[0] != first
        assert ports == {name: getattr(km, f"{name}_port") for name in ports}
        found = await probe(km)
        # kernel_init's first child: the warm process, not a fresh one that replaced it
        # (claimed while its sandbox still booted, as here, it once fell back to one)
        assert (found["uid"], found["pid"]) == (1000, 2)
        log.info("a warm restart took %.0f ms", restart * 1000)
        assert first not in {r.sandbox_id for r in records()}, "the old sandbox is left"
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_kernel_of_another_uid_never_gets_the_sandbox(pool, workspace):
    """The kernel's uid is part of a pool's shape: the waiting sandbox's kernel process
    runs as it already. A kernel whose workspace belongs to another uid starts in a
    sandbox of its own, as that uid, and the waiting one stays for the first uid."""
    other = Path(f"{workspace}-1001")
    other.mkdir()
    os.chown(other, 1001, 1001)
    km = await start(workspace, **POOL)
    try:
        [waiting] = await wait_for_warm()
        second = await start(other, **POOL)
        try:
            assert second.provisioner.sandbox_id != waiting
            assert (await probe(second))["uid"] == 1001
            assert waiting in await run_on_io(_waiting())
        finally:
            await second.shutdown_kernel(now=True)
    finally:
        await km.shutdown_kernel(now=True)
        shutil.rmtree(other, ignore_errors=True)


async def test_the_pool_keeps_to_its_memory_budget(pool, workspace):
    """No waiting sandbox is started that would take the pool over `pool_memory`: of the
    three `pool_size` asks for, fewer wait, and together they use less than the budget,
    which caps the pool's cgroup too."""
    km = await start(workspace, pool_size=3, pool_memory="200M")
    try:
        await wait_for_warm(1)
        await asyncio.sleep(SETTLE)  # time enough for more starts, were they allowed
        waiting = await run_on_io(_sandboxes())
        assert 1 <= len(waiting) < 3
        assert sum(s.memory_usage() or 0 for s in waiting) <= 200 << 20
        limit = cgroups.ROOT / "memory" / cgroups.POOL.strip("/") / "memory.limit_in_bytes"
        assert int(limit.read_text()) == 200 << 20
    finally:
        await km.shutdown_kernel(now=True)


async def test_no_pool_without_pool_size(pool, workspace):
    km = await start(workspace, pool_size=0)
    try:
        await asyncio.sleep(2)
        assert await run_on_io(_waiting()) == []
        assert [r for r in records() if not r.kernel_id] == []
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_sandbox_that_ended_while_waiting_is_never_handed_out(pool, workspace):
    km = await start(workspace, **POOL)
    try:
        dead = (await wait_for_warm())[0]
        sandbox = next(s for s in await run_on_io(_sandboxes()) if s.record.sandbox_id == dead)
        sandbox.process.kill()  # its runsc died: as a crash, or the OOM killer, would
        deadline = time.monotonic() + 30
        while sandbox.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert sandbox.poll() is not None
        other = await start(Path(str(workspace)), **POOL)
        try:
            assert other.provisioner.sandbox_id != dead
            assert (await probe(other))["uid"] == 1000
        finally:
            await other.shutdown_kernel(now=True)
        assert dead not in {r.sandbox_id for r in records()}
    finally:
        await km.shutdown_kernel(now=True)


async def _sandboxes():
    return warm_pool(log).waiting()


async def test_a_quota_refusal_gives_the_sandbox_back(pool, workspace, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[default]\nmax_kernels = 1\n")
    km = await start(workspace, policy_file=str(policy), **POOL)
    try:
        waiting = await wait_for_warm()
        second = AsyncIOLoopKernelManager(
            kernel_name=BACKENDS["gvisor"],
            config=Config({"GVisorProvisioner": {"policy_file": str(policy), **POOL}}),
            log=log,
        )
        with pytest.raises(Exception, match="kernel quota"):
            await second.start_kernel(cwd=str(workspace))
        assert await run_on_io(_waiting()) == waiting, "the refused claim kept the sandbox"
        record = next(r for r in records() if r.sandbox_id == waiting[0])
        assert (record.kernel_id, record.user) == ("", "")
    finally:
        await km.shutdown_kernel(now=True)


async def test_draining_the_pool_leaves_nothing(pool, workspace):
    km = await start(workspace, pool_size=2, pool_memory="2G")
    await km.shutdown_kernel(now=True)
    waiting = await wait_for_warm(2)
    await run_on_io(_drain())
    assert not {r.sandbox_id for r in records()} & set(waiting)
    pool_cgroups = cgroups.ROOT / "memory" / cgroups.POOL.strip("/")
    assert not list(pool_cgroups.glob("jsb-*"))


@pytest.mark.parametrize("planted", ["kernel", "mounts.json"])
def test_the_claim_never_writes_through_what_the_guest_planted(tmp_path, planted):
    """The claim folder is bound read-write into the sandbox, and the guest's root may
    write there: a link it left where the host writes must make the claim fail, never
    be followed (here to a file that stands for any of the host's)."""
    from provisioner.backends.base import SandboxSpec
    from provisioner.backends.gvisor_claim import claim, claim_folder
    from provisioner.limits import Limits

    bundle = tmp_path / "bundle"
    claim_folder(bundle).mkdir(parents=True)
    victim = tmp_path / "host-file"
    victim.write_text("the host's")
    (claim_folder(bundle) / planted).symlink_to(victim)
    spec = SandboxSpec(sandbox_id="jsb-x", kernel_id="k", rootfs=tmp_path, agent_dir=tmp_path,
                       limits=Limits(), user="u", owner=(1000, 1000))  # fmt: skip
    with pytest.raises(FileExistsError):
        claim(spec, bundle, runsc_pid=os.getpid())
    assert victim.read_text() == "the host's"


STARTUP_PROBE = """
import json, os, sys
paths = list(sys.jsb_startup["planted"])
left = [p for p in paths if os.path.exists(p) and "# planted" in open(p).read()]
print(json.dumps({**sys.jsb_startup, "uid_now": os.getuid(), "left": left}))
"""


async def test_the_images_code_before_the_claim_can_leave_nothing_behind(
    pool, hostile_startup_image, kernel_prefix
):
    """A warm kernel process runs the image's code before any kernel claims the sandbox:
    as the kernel's user (part of the pool's shape), never as root. Here the image's Python
    imports a module at its start (a .pth: `images_kit.STARTUP_MODULE`) that tries to plant
    a file where a later process would run or trust it: /etc/ld.so.preload, the agent's
    runtime, /tmp, the home, /run (where the agent writes the connection file at the
    launch). Root's places refuse the user (EACCES); kernel_init remounted the namespace
    read-only first (`freeze`), writable again once the process is checked, so that even
    /tmp, open to all, refused it (EROFS); nothing planted is there after the claim."""
    [name] = kernelspecs(hostile_startup_image, kernel_prefix, "--kernel", "python3", "--backend",
                         "gvisor", "--workspace=none", "--name", "startup-warm")  # fmt: skip
    config = Config({"GVisorProvisioner": POOL})
    fresh = AsyncIOLoopKernelManager(kernel_name=name, config=config, log=log)
    await fresh.start_kernel()
    warm = None
    try:
        [waiting] = await wait_for_warm()
        await asyncio.sleep(SETTLE)
        warm = AsyncIOLoopKernelManager(kernel_name=name, config=config, log=log)
        await warm.start_kernel()
        assert warm.provisioner.sandbox_id == waiting, "the second kernel was not warm"
        kc = warm.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            reply, text, _ = await execute(kc, STARTUP_PROBE)
        finally:
            kc.stop_channels()
        assert reply["status"] == "ok", text
        found = json.loads(text)
        assert found["uid"] == found["uid_now"] == 1000  # before the claim, as the user
        assert len(found["planted"]) == 7, found  # the runtime's json was found, and tried
        # Refused: where the user may not write anyway (root's), and where it may (/tmp,
        # open to all) because the namespace is read-only until the claim.
        assert set(found["planted"].values()) <= {"EACCES", "EROFS"}, found["planted"]
        assert found["planted"]["/tmp/jsb-planted"] == "EROFS", found["planted"]
        assert found["left"] == []
    finally:
        for km in (fresh, warm):
            if km is not None:
                await km.shutdown_kernel(now=True)


def _worker_with_a_pool(workspace: str) -> str:
    """In a forked worker: a kernel with the default pool, then its pool's sandbox id."""

    async def work() -> str:
        km = await start(Path(workspace))
        try:
            return (await wait_for_warm())[0]
        finally:
            await km.shutdown_kernel(now=True)

    return asyncio.run(work())


def test_a_forked_workers_pool_goes_with_it(no_leftovers, workspace):
    """A worker of a fork process pool (papermill's, a grader's) has a pool of its own, on
    by default; multiprocessing ends it with os._exit, past atexit: the pool's sandboxes
    go anyway (pool.py registers its drain with multiprocessing's finalizers too)."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=context) as workers:
        waiting = workers.submit(_worker_with_a_pool, str(workspace)).result(timeout=180)
    assert waiting not in {r.sandbox_id for r in records()}
    assert waiting not in runsc_list()


EXITING = """
import asyncio, logging, sys, time
from jupyter_client.manager import KernelManager
from provisioner.ioloop import io_loop
from provisioner.pool import warm_pool

async def waiting():
    return [s.record.sandbox_id for s in warm_pool(logging.getLogger()).waiting()]

km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel(cwd=sys.argv[2])
deadline = time.monotonic() + 60
while not (found := asyncio.run_coroutine_threadsafe(waiting(), io_loop()).result(10)):
    assert time.monotonic() < deadline, "no pool sandbox"
    time.sleep(0.1)
km.shutdown_kernel(now=True)
print(found[0])
"""


def test_a_process_that_exits_takes_its_pool_with_it(no_leftovers, workspace):
    """A one-shot process (papermill, nbclient, `jupyter execute`) with the default pool
    exits normally while its pool's sandbox waits: the sandbox goes with it. The drain
    runs before the interpreter's shutdown (at its atexit, the threads a removal needs
    were refused: the sandbox stayed)."""
    done = subprocess.run([sys.executable, "-c", EXITING, BACKENDS["gvisor"], str(workspace)],
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    waiting = done.stdout.split()[-1]
    assert waiting.startswith("jsb-pool-")
    assert waiting not in runsc_list()
    assert waiting not in {r.sandbox_id for r in records()}
