"""The provisioner contract against each backend's real sandbox and the real guest image."""

from __future__ import annotations

import asyncio
import time

import zmq
from conftest import READY_TIMEOUT, execute
from helpers import kill_from_outside, microvm_list, runsc_list
from jupyter_client.manager import KernelManager
from provisioner.guest.protocol import CHANNELS

from provisioner.state import records


async def test_kernel_runs_in_a_sandbox(kc, km, workspace):
    content, text, _ = await execute(
        kc, "import os, platform; print(platform.node(), os.getuid(), os.getcwd())"
    )
    assert content["status"] == "ok"
    node, uid, cwd = text.split()
    assert node == "sandbox"
    assert uid == "1000"
    assert cwd == str(workspace)
    assert await km.is_alive()


async def test_interrupt_reaches_busy_loop_and_sleep(kc, km):
    for code in ("while True: pass", "import time; time.sleep(100)"):
        running = asyncio.ensure_future(execute(kc, code, timeout=60))
        await asyncio.sleep(1.5)
        assert not running.done()
        started = time.monotonic()
        await km.interrupt_kernel()
        content, _, _ = await asyncio.wait_for(running, 30)
        assert content["status"] == "error"
        assert content["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 10
    content, text, _ = await execute(kc, "print('still here')")
    assert text == "still here\n"


async def test_restart_gives_a_fresh_sandbox_behind_the_same_ports(kc, km):
    await execute(kc, "open('/home/sandbox/marker', 'w').write('x'); x = 41")
    before_id = km.provisioner.sandbox_id
    before_ports = {c: km.get_connection_info()[f"{c}_port"] for c in CHANNELS}
    await km.restart_kernel()
    await kc.wait_for_ready(timeout=READY_TIMEOUT)
    assert km.provisioner.sandbox_id != before_id
    assert {c: km.get_connection_info()[f"{c}_port"] for c in CHANNELS} == before_ports
    _, text, _ = await execute(
        kc, "import os; print(os.path.exists('/home/sandbox/marker'), 'x' in globals())"
    )
    assert text.split() == ["False", "False"]  # new writable layer, new process
    assert before_id not in runsc_list() + microvm_list()


async def test_autorestart_after_sandbox_killed_from_outside(kc, km):
    old = km.provisioner.sandbox_id
    restarted = asyncio.Event()
    km.add_restart_callback(restarted.set, "restart")
    kill_from_outside(km.provisioner.sandbox)
    await asyncio.wait_for(restarted.wait(), 30)
    deadline = time.monotonic() + 60
    while km.provisioner.sandbox_id == old or not await km.is_alive():
        assert time.monotonic() < deadline, "the kernel did not come back"
        await asyncio.sleep(0.1)
    await kc.wait_for_ready(timeout=READY_TIMEOUT)
    _, text, _ = await execute(kc, "print('back')")
    assert text == "back\n"


async def test_graceful_shutdown_exits_the_kernel(kc, km):
    sandbox = km.provisioner.sandbox
    await km.shutdown_kernel(now=False)
    assert sandbox.poll() == 0  # the kernel exited by itself on shutdown_request
    assert not km.has_kernel


async def test_overlapping_cleanups_both_end_with_the_sandbox_gone(km):
    """The restarter cleaning up a kernel that died while a shutdown cleans it up too: the
    second cleanup finds nothing left to take, and must still return only once the first
    one's removal has ended (a caller checking for leftovers then finds none)."""
    provisioner = km.provisioner
    sandbox_id = provisioner.sandbox.record.sandbox_id
    first = asyncio.create_task(provisioner.cleanup())
    await asyncio.sleep(0)  # the first has taken the sandbox and begun to remove it
    assert provisioner.sandbox is None and not first.done()
    await provisioner.cleanup()
    assert sandbox_id not in runsc_list() + microvm_list()
    assert not any(r.sandbox_id == sandbox_id for r in records())
    await first


async def test_poll_is_cheap(km):
    started = time.perf_counter()
    for _ in range(1000):
        assert await km.provisioner.poll() is None
    assert time.perf_counter() - started < 0.5


async def test_provisioner_info_round_trips(km):
    info = await km.provisioner.get_provisioner_info()
    assert info["sandbox_id"] == km.provisioner.sandbox_id
    assert info["kernel_id"] == km.kernel_id
    other = type(km.provisioner)(kernel_id="x", kernel_spec=km.kernel_spec, parent=None)
    await other.load_provisioner_info(info)
    assert other.sandbox_id == info["sandbox_id"]
    assert other.connection_info == info["connection_info"]


async def test_flood_does_not_hold_up_heartbeat_control_or_interrupt(kc, km):
    flood = asyncio.ensure_future(
        execute(kc, "import sys\nwhile True: sys.stdout.write('x' * 1000 + '\\n')", timeout=120)
    )
    await asyncio.sleep(2)
    assert not flood.done()
    # heartbeat: echoed by the kernel's own thread, so this times the tunnel under the flood
    hb = zmq.Context.instance().socket(zmq.REQ)
    hb.linger = 0
    hb.connect(f"tcp://127.0.0.1:{km.hb_port}")
    echoes = []
    try:
        for _ in range(10):
            started = time.monotonic()
            hb.send(b"ping")
            assert await asyncio.to_thread(hb.recv) == b"ping"
            echoes.append(time.monotonic() - started)
    finally:
        hb.close()
    # control: a kernel_info_request answered while iopub floods (the kernel's own
    # control thread competes with the flooding one for the GIL, so allow seconds)
    started = time.monotonic()
    msg = kc.session.msg("kernel_info_request")
    kc.control_channel.send(msg)
    while True:
        reply = await asyncio.wait_for(kc.control_channel.get_msg(), 20)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            break
    control_latency = time.monotonic() - started
    await km.interrupt_kernel()
    content, text, _ = await asyncio.wait_for(flood, 60)
    assert content["ename"] == "KeyboardInterrupt"
    assert len(text) > 1_000_000  # it really flooded
    assert sorted(echoes)[5] < 0.5, echoes
    assert control_latency < 10


async def test_sync_manager_cleans_up(no_leftovers, workspace, kernel_name):
    """The blocking KernelManager runs no loop between calls; the tunnel still works."""
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(cwd=str(workspace))
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=READY_TIMEOUT)
        time.sleep(0.5)  # nothing runs the caller's loop now
        reply = kc.execute_interactive("print(6 * 7)", timeout=30)
        assert reply["content"]["status"] == "ok"
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


async def test_orphans_are_reaped_by_the_agent(kc):
    """Background processes whose parent exits land on PID 1, which must collect them."""
    _, text, _ = await execute(
        kc,
        "import subprocess, time\n"
        "for _ in range(20):\n"
        "    subprocess.run('sleep 0.1 &', shell=True)\n"
        "time.sleep(1.5)\n"
        "states = [open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0]\n"
        "          for p in __import__('os').listdir('/proc') if p.isdigit()]\n"
        "print(len(states), states.count('Z'))",
    )
    processes, zombies = map(int, text.split())
    assert processes >= 2  # the listing really saw the sandbox's processes
    assert zombies == 0


async def test_signals_reach_the_kernel_as_they_would_a_local_one(kc, km):
    """The kernel starts with the signal dispositions a local kernel has (none left ignored
    by whatever started it), so a kernel that sends itself SIGTERM dies, and is seen dead."""
    code = (
        "import signal\n"
        "print(sorted(s.name for s in signal.valid_signals()"
        " if signal.getsignal(s) is signal.SIG_IGN))"
    )
    local = KernelManager(kernel_name="python3")
    local.start_kernel()
    try:
        local_client = local.blocking_client()
        local_client.start_channels()
        local_client.wait_for_ready(timeout=60)
        said: list[str] = []
        local_client.execute_interactive(
            code, output_hook=lambda m: said.append(m["content"].get("text", ""))
        )
        local_client.stop_channels()
    finally:
        local.shutdown_kernel(now=True)
    _, text, _ = await execute(kc, code)
    assert "SIGTERM" not in text
    assert text == "".join(said)
    # The manager's restarter would start a new kernel once it sees this one dead (and
    # race the teardown's shutdown doing so): this test is about the death itself.
    km.stop_restarter()
    kc.execute("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    deadline = time.monotonic() + 15
    while await km.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not await km.is_alive(), "the kernel ignored its own SIGTERM"
