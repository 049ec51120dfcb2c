"""Shared fixtures: the real runsc, the real guest image, real kernel managers.

A test that needs a sandbox skips when runsc or the image is missing, except
under CI (`CI=true`), where it fails: a skipped isolation test is a hidden failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attack_report
import pytest
from helpers import microvm_list, runsc_list
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from provisioner import cgroups
from provisioner.errors import ImageError
from provisioner.images.boot import find_boot_files
from provisioner.images.store import find_image
from provisioner.ioloop import io_loop
from provisioner.network import gc as network_gc
from provisioner.pool import warm_pool
from provisioner.state import records, sandboxes_dir

pytest_plugins = ["oci_kit", "images_kit", "security.kit", "kube_kit"]
"""Plugins: the OCI image tests' registry and work folder; imported images made once per
session; the security suite's shared attack target (one kernel per target: each backend,
and gVisor on an imported image). In this order: each imports the one before it, which
pytest must have loaded first to rewrite its asserts."""

BACKENDS = {"gvisor": "python3-gvisor", "microvm": "python3-microvm"}
"""Every backend and its kernelspec: tests that take `kernel_name` run against each."""
KERNEL = BACKENDS["gvisor"]
"""For tests of what only the gVisor backend has."""
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
READY_TIMEOUT = 180
"""A microVM under TCG may take a minute to be ready on a loaded machine."""


def require_sandbox(backend: str | None = "gvisor") -> None:
    """Skip (locally) or fail (under CI) when this host cannot run `backend`'s sandboxes
    (None: what every backend needs)."""
    problems = []
    if backend == "gvisor" and shutil.which("runsc") is None:
        problems.append("runsc is not installed")
    if backend == "microvm" and shutil.which("qemu-system-x86_64") is None:
        problems.append("QEMU is not installed")
    if os.geteuid() != 0:
        problems.append("sandboxes need root")
    try:
        find_image("python3")
        if backend == "microvm":
            find_boot_files("python3")
    except ImageError as e:
        problems.append(str(e))
    if problems:
        skip_or_fail("; ".join(problems) + " (run `make setup`)")


def skip_or_fail(message: str) -> None:
    """Skip locally; under CI fail, for a skipped test there is a hidden failure."""
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def our_sandboxes() -> set[str]:
    """Sandboxes recorded by this test process, plus containers and VMs with no record."""
    # Listed before the records are read: a sandbox starting meanwhile has its
    # record by then, so it is not taken for an orphan.
    listing = runsc_list() + microvm_list()
    recorded = {r.sandbox_id: r.owner_pid for r in records()}
    mine = {sid for sid, pid in recorded.items() if pid == os.getpid()}
    return mine | {sid for sid in listing if sid not in recorded}


def leftover_cgroups() -> list[Path]:
    """cgroups of sandboxes that have no record (any recorded one is still in use), and
    users' cgroups left empty by their last sandbox."""
    live = records()
    sandboxes = {r.sandbox_id for r in live}
    users = {cgroups.user_cgroup(r.user).rsplit("/", 1)[1] for r in live}
    found = []
    for base in cgroups.directories(f"{cgroups.SANDBOXES}/users"):
        for user in base.iterdir():
            if not user.is_dir():
                continue
            children = [c for c in user.iterdir() if c.is_dir()]
            found += [c for c in children if c.name not in sandboxes]
            if not children and user.name not in users:
                found.append(user)
    for base in cgroups.directories(cgroups.POOL):  # a warm pool's (provisioner/pool.py)
        found += [c for c in base.iterdir() if c.is_dir() and c.name not in sandboxes]
    return found


def leftover_mounts() -> list[str]:
    """Sandbox root mounts whose sandbox has no record."""
    live = {r.sandbox_id for r in records()}
    base = str(sandboxes_dir()) + "/"
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    return [p for p in points if p.startswith(base) and p[len(base) :].split("/")[0] not in live]


def leftover_network() -> network_gc.HostObjects:
    """Our network namespaces, veths and nftables tables whose sandbox has no record."""
    return network_gc.host_objects().without(records())


@pytest.fixture(scope="session", autouse=True)
def closed_warm_pool() -> None:
    """This process's warm pool stays closed (provisioner/pool.py `drain`), so that its
    kernels start cold, as the tests of everything else expect: on by default, the pool
    would boot a second sandbox beside most of them. tests/test_warm_pool.py opens it for
    its own; servers and services the tests start as processes keep theirs (on, by
    default) and must leave nothing behind when they end."""

    async def close() -> None:
        await warm_pool(logging.getLogger("tests")).drain()

    asyncio.run_coroutine_threadsafe(close(), io_loop()).result(60)


@pytest.fixture(scope="session")
def sandbox_host() -> None:
    require_sandbox(None)


@pytest.fixture
def no_leftovers(sandbox_host: None):
    """Assert that the test left no sandbox, bundle, cgroup or network behind."""
    before = our_sandboxes()
    yield
    left = our_sandboxes() - before
    assert not left, f"sandboxes left behind: {left}"
    assert not leftover_cgroups(), f"cgroups left behind: {leftover_cgroups()}"
    assert not leftover_mounts(), f"mounts left behind: {leftover_mounts()}"
    assert not leftover_network(), f"network left behind: {leftover_network()}"


@pytest.fixture
def workspace() -> Iterator[Path]:
    """A notebook folder owned by an ordinary user, as on a real server.

    Not under pytest's tmp_path, which only root may enter: a microVM's QEMU runs
    as the workspace's owner and opens it by path, as it would in a user's home.
    """
    folder = Path(tempfile.mkdtemp(prefix="jsb-work-", dir="/tmp"))
    os.chown(folder, 1000, 1000)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=list(BACKENDS))
def kernel_name(request: pytest.FixtureRequest) -> str:
    """Each backend's kernelspec in turn (the test runs once per backend)."""
    require_sandbox(request.param)
    return BACKENDS[request.param]


@pytest.fixture
async def km(
    no_leftovers: None, workspace: Path, kernel_name: str
) -> AsyncIterator[AsyncIOLoopKernelManager]:
    """A started sandboxed kernel, shut down (and checked for leftovers) afterwards."""
    manager = AsyncIOLoopKernelManager(kernel_name=kernel_name)
    await manager.start_kernel(cwd=str(workspace))
    try:
        yield manager
    finally:
        if manager.has_kernel:
            await manager.shutdown_kernel(now=True)
        else:
            await manager.cleanup_resources()


@pytest.fixture
async def kc(km: AsyncIOLoopKernelManager):
    client = km.client()
    client.start_channels()
    await client.wait_for_ready(timeout=READY_TIMEOUT)
    try:
        yield client
    finally:
        client.stop_channels()


async def execute(client, code: str, timeout: float = 60) -> tuple[dict, str, list[dict]]:
    """Run `code`; return the reply content, the stdout+stderr text, and all iopub messages."""
    messages: list[dict] = []
    reply = await client.execute_interactive(code, timeout=timeout, output_hook=messages.append)
    text = "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")
    return reply["content"], text, messages


# -- the security suite's table (see attack_report) ---------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--attack-table",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the table of the attacks run, and why each failed, to PATH at the end "
        "(`make security-report`: docs/attacks.md); without it the suite writes nothing",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "attack(category, what): an attack of the security suite, with its table row"
    )
    path = config.getoption("attack_table")
    if path is not None:
        config.pluginmanager.register(attack_report.AttackTable(path.resolve()), "attack_table")


@pytest.fixture
def verdict(request: pytest.FixtureRequest):
    """Say why the attack failed; the text goes into the attack table (docs/attacks.md)."""

    def say(text: str) -> None:
        request.node.attack_verdict = text

    return say
