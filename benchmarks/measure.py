"""The measurements: starts, execute round trips, iopub throughput, a noisy neighbour.

Each one alternates between the kernels (starts in turn, blocks of executes in turn,
floods in turn) so that load from elsewhere on the machine hits every kernel alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from kernels import READY_TIMEOUT, Kernel, Kind, Run, running, wait_idle, wait_reply
from memory import process_tree

from provisioner.ioloop import run_on_io
from provisioner.pool import warm_pool

MIB = 1024 * 1024


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, int(-(-p * len(ordered) // 100)))  # ceil(p/100 * n)
    return ordered[rank - 1]


def cpu_seconds(kernel: Kernel) -> float:
    """CPU time of the kernel's processes so far (a sandbox's: its whole cgroup)."""
    if kernel.kind.backend is not None:
        return kernel.km.provisioner.usage()["cpu_seconds"] or 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in process_tree(kernel.km.provisioner.pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def measure_starts(
    run: Run, kinds: dict[str, Kind], counts: dict[str, int], warmup: bool
) -> dict[str, list[float]]:
    """Alternate the kernels' starts, `counts[label]` of each kind (a kind with fewer drops
    out of the later rounds); each kernel is shut down before the next start. With
    `warmup`, one uncounted start of each first."""
    times: dict[str, list[float]] = {label: [] for label in counts}
    for label in counts:
        if kinds[label].warm and not warmup:  # a start makes its pool: one, not counted
            async with running(run, kinds[label]):
                pass
            await pool_ready()
    for i in range(-1 if warmup else 0, max(counts.values())):
        for label, n in counts.items():
            if i >= n:
                continue
            async with running(run, kinds[label]) as kernel:
                if i >= 0:
                    times[label].append(kernel.start_seconds)
            note = " (warm-up, not counted)" if i < 0 else ""
            print(f"  start {label}: {kernel.start_seconds * 1000:.0f} ms{note}", file=sys.stderr)
            if kinds[label].warm:  # its first start (the warm-up) was cold, and made the pool
                await pool_ready()
    await run_on_io(warm_pool(LOG).drain())
    return times


POOL_SETTLE = 6.0
"""Seconds a waiting sandbox gets to boot and its kernel process to import its modules
(about two here) after the pool lists it: the pool hands out sandboxes still booting."""
LOG = logging.getLogger("benchmark")


async def pool_ready() -> None:
    """Wait until the run's warm pool has a sandbox waiting, settled: after a warm start
    (REFILL_AFTER later, the pool starts the next), so that its boot slows no start that
    is measured, and the next warm start finds it ready."""

    async def waiting() -> int:
        return len(warm_pool(LOG).waiting())

    deadline = time.monotonic() + READY_TIMEOUT
    while await run_on_io(waiting()) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool had no sandbox within {READY_TIMEOUT:.0f} s")
        await asyncio.sleep(0.1)
    await asyncio.sleep(POOL_SETTLE)


async def execute_once(kernel: Kernel, code: str = "pass") -> tuple[float, float]:
    """(seconds to the execute_reply, seconds to reply and iopub idle) of one execute."""
    t0 = time.perf_counter()
    msg_id = kernel.kc.execute(code, silent=False)
    reply = await wait_reply(kernel.kc, msg_id)
    t1 = time.perf_counter()
    await wait_idle(kernel.kc, msg_id)
    t2 = time.perf_counter()
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"execute failed: {reply['content']}")
    return t1 - t0, t2 - t0


async def measure_executes(
    kernels: dict[str, Kernel], counts: dict[str, int], warmup: int, block: int
) -> dict[str, dict[str, list[float]]]:
    """`counts[label]` timed executes of each kernel, in alternating blocks: label ->
    {"reply": seconds to the reply, "idle": seconds to reply and idle}.

    The kernel with the most executes does blocks of `block`; the others' blocks are
    scaled down so that all of them spread over the same rounds (200 microVM executes
    beside 1000 local ones: blocks of 20 beside blocks of 100).
    """
    for kernel in kernels.values():
        for _ in range(warmup):
            await execute_once(kernel)
    samples: dict[str, dict[str, list[float]]] = {
        label: {"reply": [], "idle": []} for label in kernels
    }
    rounds = max(1, -(-max(counts.values()) // block))
    sizes = {label: max(1, -(-n // rounds)) for label, n in counts.items()}
    while any(len(samples[label]["idle"]) < n for label, n in counts.items()):
        for label, kernel in kernels.items():
            size = min(sizes[label], counts[label] - len(samples[label]["idle"]))
            for _ in range(size):
                reply, idle = await execute_once(kernel)
                samples[label]["reply"].append(reply)
                samples[label]["idle"].append(idle)
    return samples


async def throughput_once(kernel: Kernel, mib: int) -> dict:
    """A cell writing `mib` MiB to stdout (lines of 1024 bytes), timed until its
    `status: idle`; every byte of the stream is counted and must have arrived."""
    lines = mib * 1024
    expected = lines * 1024
    code = f"import sys\nfor i in range({lines}):\n    sys.stdout.write('x' * 1023 + '\\n')\n"
    received = {"bytes": 0, "messages": 0}
    dates = {}

    def count(msg: dict) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            received["bytes"] += len(msg["content"]["text"])  # ASCII: characters == bytes
            received["messages"] += 1
        elif msg["msg_type"] == "status":
            dates[msg["content"]["execution_state"]] = msg["header"]["date"]

    t0 = time.perf_counter()
    msg_id = kernel.kc.execute(code, silent=False)
    await wait_idle(kernel.kc, msg_id, count)
    seconds = time.perf_counter() - t0
    reply = await wait_reply(kernel.kc, msg_id)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"throughput cell failed: {reply['content']}")
    if received["bytes"] != expected:
        raise RuntimeError(
            f"stdout lost or duplicated: got {received['bytes']} of {expected} bytes"
        )
    return {
        "seconds": seconds,
        "mib_per_s": expected / MIB / seconds,
        "messages": received["messages"],
        "bytes": expected,
        # by the kernel's clock: how long the kernel itself was busy with the cell
        "kernel_busy_s": (dates["idle"] - dates["busy"]).total_seconds(),
    }


async def measure_throughput(
    kernels: dict[str, Kernel], mib: dict[str, int], runs: int
) -> dict[str, list[dict]]:
    """`runs` floods of each kernel, alternating; `mib[label]` MiB each."""
    results: dict[str, list[dict]] = {label: [] for label in kernels}
    for _ in range(runs):
        for label, kernel in kernels.items():
            r = await throughput_once(kernel, mib[label])
            print(f"  throughput {label}: {r['mib_per_s']:.1f} MiB/s", file=sys.stderr)
            results[label].append(r)
    return results


async def measure_neighbour(run: Run, kind: Kind, n: int, warmup: int) -> dict:
    """A kernel's execute p99 with a second kernel of its kind idle, then while that one
    hogs the CPU (`while True: pass`): n executes per phase."""
    async with running(run, kind) as victim, running(run, kind) as hog:
        for _ in range(warmup):
            await execute_once(victim)
        idle = [(await execute_once(victim))[1] for _ in range(n)]
        hog_request = hog.kc.execute("while True: pass")
        await asyncio.sleep(1.0)  # the hog is at full speed
        cpu_before = cpu_seconds(hog)
        t0 = time.perf_counter()
        loaded = [(await execute_once(victim))[1] for _ in range(n)]
        elapsed = time.perf_counter() - t0
        hog_cores = (cpu_seconds(hog) - cpu_before) / elapsed
        await hog.km.interrupt_kernel()
        await wait_reply(hog.kc, hog_request)
    p99_idle, p99_loaded = percentile(idle, 99), percentile(loaded, 99)
    print(
        f"  neighbour {kind.label}: p99 {p99_idle * 1000:.1f} ms idle, "
        f"{p99_loaded * 1000:.1f} ms beside a hog using {hog_cores:.2f} cores",
        file=sys.stderr,
    )
    return {"idle": idle, "loaded": loaded, "hog_cores": hog_cores, "n": n}


INSIDE_CLIENT = """
import json, sys, time
from jupyter_client import BlockingKernelClient
kc = BlockingKernelClient(connection_file=sys.argv[1])
kc.load_connection_file()
kc.start_channels()
def once():
    t0 = time.perf_counter()
    msg_id = kc.execute("pass")
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            break
    while kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
        pass
    return time.perf_counter() - t0
for _ in range({warmup}):
    once()
print(json.dumps([once() for _ in range({n})]))
"""


async def measure_inside(kernel: Kernel, n: int, warmup: int) -> list[float]:
    """Execute round trips of a client started by the kernel itself, beside it.

    In a sandbox that client talks to the kernel's own sockets, without the tunnel:
    what is left is the cost of running the kernel (and this client) in the sandbox.
    The cell that starts the client returns at once, so the kernel is free to answer.
    """
    code = INSIDE_CLIENT.format(warmup=warmup, n=n)
    start = (
        "import subprocess as _sp, sys as _sys, tempfile as _tf\n"
        "from ipykernel.connect import get_connection_file as _cf\n"
        "_inside_out = _tf.TemporaryFile()\n"
        f"_inside = _sp.Popen([_sys.executable, '-c', {code!r}, _cf()],\n"
        "    stdout=_inside_out, stderr=_sp.STDOUT)\n"
    )
    msg_id = kernel.kc.execute(start)
    await wait_reply(kernel.kc, msg_id)
    while True:
        await asyncio.sleep(1.0)
        msg_id = kernel.kc.execute("_inside.poll()", user_expressions={"rc": "_inside.poll()"})
        reply = await wait_reply(kernel.kc, msg_id)
        if reply["content"]["user_expressions"]["rc"]["data"]["text/plain"] != "None":
            break
    printed: list[str] = []
    msg_id = kernel.kc.execute("_inside_out.seek(0); print(_inside_out.read().decode())")
    await wait_idle(
        kernel.kc,
        msg_id,
        lambda m: printed.append(m["content"]["text"]) if m["msg_type"] == "stream" else None,
    )
    try:
        samples = json.loads("".join(printed))
    except ValueError:
        output = "".join(printed)[-2000:]
        raise RuntimeError(
            f"the client inside the {kernel.label} kernel failed:\n{output}"
        ) from None
    if len(samples) != n:
        raise RuntimeError(f"the client inside the {kernel.label} kernel measured {len(samples)}")
    return samples
