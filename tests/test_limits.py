"""Each limit holds against a kernel that tries to exceed it; the host and neighbours stay fine."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT, execute
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner import cgroups
from provisioner.backends.gvisor import host_pids_limit


@contextlib.asynccontextmanager
async def kernel(
    workspace, kernel_name: str, **settings
) -> AsyncIterator[tuple[AsyncIOLoopKernelManager, object]]:
    km = AsyncIOLoopKernelManager(
        kernel_name=kernel_name, config=Config({"SandboxProvisioner": settings}), autorestart=False
    )
    await km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        yield km, kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


JUPYTER_SANDBOX = [str(Path(sys.executable).parent / "jupyter"), "sandbox"]


def cgroup_of(km) -> str:
    return km.provisioner.sandbox.record.cgroup


async def test_fork_bomb_is_held_at_the_pids_limit(no_leftovers, workspace, kernel_name):
    async with kernel(workspace, kernel_name, pids_limit=64) as (km, kc):
        _, text, _ = await execute(
            kc,
            "import subprocess\n"
            "procs, error = [], None\n"
            "try:\n"
            "    for _ in range(500):\n"
            "        procs.append(subprocess.Popen(['sleep', '60']))\n"
            "except OSError as e:\n"
            "    error = type(e).__name__\n"
            "print(len(procs), error)\n"
            "for p in procs:\n"
            "    p.kill(); p.wait()\n",
            timeout=120,
        )
        started, error = text.split()
        assert error == "BlockingIOError"  # fork failed with EAGAIN: the limit, not a crash
        assert 20 < int(started) < 64  # the kernel's own threads count too
        assert await km.is_alive()
        _, text, _ = await execute(kc, "print('still answering')")
        assert text == "still answering\n"


async def test_open_files_are_held_at_the_limit(no_leftovers, workspace, kernel_name):
    async with kernel(workspace, kernel_name, open_files_limit=256) as (_km, kc):
        _, text, _ = await execute(
            kc,
            "import errno\n"
            "files = []\n"
            "try:\n"
            "    for _ in range(10000):\n"
            "        files.append(open('/etc/hostname'))\n"
            "except OSError as e:\n"
            "    print(len(files), errno.errorcode[e.errno])\n"
            "for f in files:\n"
            "    f.close()\n",
        )
        opened, code = text.split()
        assert code == "EMFILE"
        assert 150 < int(opened) < 256  # the kernel itself holds some files


async def test_disk_filling_stops_at_the_disk_limit(no_leftovers, workspace, kernel_name):
    async with kernel(workspace, kernel_name, disk_limit="100M") as (km, kc):
        _, text, _ = await execute(
            kc,
            "import errno, os\n"
            "path = '/home/sandbox/fill'\n"
            "try:\n"
            "    with open(path, 'wb') as f:\n"
            "        for _ in range(1000):\n"
            "            f.write(b'x' * 2**20); f.flush()\n"
            "except OSError as e:\n"
            "    print(os.path.getsize(path) >> 20, errno.errorcode[e.errno])\n"
            "os.remove(path)\n"
            "open(path, 'wb').write(b'y' * 2**20)\n"
            "print(os.path.getsize(path) >> 20)",
            timeout=120,
        )
        written, code, after = text.split()
        assert code == "ENOSPC"
        assert 90 <= int(written) <= 100
        assert after == "1"  # space comes back when the kernel deletes its files
        assert await km.is_alive()


async def test_cpu_hog_is_held_to_its_cpu_limit(no_leftovers, workspace, kernel_name):
    async with kernel(workspace, kernel_name, cpu_limit=0.5) as (km, kc):
        hog = asyncio.ensure_future(execute(kc, "while True: pass", timeout=60))
        await asyncio.sleep(1)
        cgroup = cgroup_of(km)
        used, started = cgroups.cpu_seconds(cgroup), time.monotonic()
        await asyncio.sleep(5)
        share = (cgroups.cpu_seconds(cgroup) - used) / (time.monotonic() - started)
        await km.interrupt_kernel()
        await asyncio.wait_for(hog, 30)
    assert share == pytest.approx(0.5, rel=0.2)


async def test_memory_bomb_dies_and_the_neighbour_does_not_notice(
    no_leftovers, workspace, kernel_name
):
    async with (
        kernel(workspace, kernel_name, memory_limit="512M") as (bomb_km, bomb),
        kernel(workspace, kernel_name) as (_, neighbour),
    ):
        # b"x" * n touches every page (a bare bytearray(n) would not use memory yet)
        request = bomb.execute("chunks = []\nwhile True: chunks.append(b'x' * (50 * 2**20))")
        deadline = time.monotonic() + 60
        slowest = 0.0
        while await bomb_km.is_alive():
            assert time.monotonic() < deadline, "the memory bomb was not stopped"
            started = time.monotonic()
            _, text, _ = await execute(neighbour, "print(sum(range(1000)))")
            slowest = max(slowest, time.monotonic() - started)
            assert text == "499500\n"
        assert await bomb_km.provisioner.poll() != 0
        reason = "it exceeded its memory limit, memory_limit = 512M"
        assert bomb_km.provisioner.stop_reason == reason  # what the server log says
        assert slowest < 2.0
        # and the notebook is told, under the cell that ran the bomb
        told = []
        with contextlib.suppress(queue.Empty):
            while not told:
                message = await bomb.get_iopub_msg(timeout=5)
                if (
                    message["msg_type"] == "stream"
                    and "jupyter-sandbox" in message["content"]["text"]
                ):
                    told.append(message)
        assert told, "the notebook was not told why its kernel died"
        assert told[0]["content"]["name"] == "stderr"
        assert reason in told[0]["content"]["text"]
        assert told[0]["parent_header"]["msg_id"] == request


def test_the_host_backstop_leaves_room_for_gvisor_itself():
    # measured: ~30 host tasks at idle and ~2 per guest process
    assert host_pids_limit(64) >= 30 + 2 * 64
    assert host_pids_limit(512) >= 30 + 2 * 512


async def test_usage_from_python_and_from_ps(no_leftovers, workspace, kernel_name):
    async with kernel(workspace, kernel_name, cpu_limit=1.0, memory_limit="1G") as (km, kc):
        idle = km.provisioner.usage()
        assert idle["memory"] > 20 * 2**20  # a real sandbox holds tens of MiB
        assert idle["memory_limit"] == 2**30
        hog = asyncio.ensure_future(execute(kc, "while True: pass", timeout=60))
        await asyncio.sleep(1)
        ps = await asyncio.create_subprocess_exec(
            *JUPYTER_SANDBOX, "ps", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await ps.communicate()
        busy = km.provisioner.usage()
        await km.interrupt_kernel()
        await asyncio.wait_for(hog, 30)
    assert busy["cpu_seconds"] > idle["cpu_seconds"] + 0.5
    line = next(
        line for line in out.decode().splitlines() if line.startswith(km.provisioner.sandbox_id)
    )
    cpu = next(cell for cell in line.split() if cell.endswith("%"))
    assert 50 <= int(cpu[:-1]) <= 130  # one busy core, under a 1-CPU limit
