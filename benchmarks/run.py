#!/usr/bin/env python
"""Benchmark the sandboxed kernels against the local one, in the same run, as ratios.

    sudo .venv/bin/python benchmarks/run.py [--starts 5] [--executes 1000] [--throughput-mb 50]
        [--backends gvisor,microvm] [--microvm-starts 3] [--microvm-executes 200]
        [--microvm-throughput-mb 10]

Measures, for the kernelspecs `python3` (local, unsandboxed) and those of `--backends`
(`python3-gvisor`, `python3-microvm`):

- start: `AsyncKernelManager.start_kernel()` until `client.wait_for_ready()` returns
  (the first kernel_info_reply), median of `--starts` starts; with gVisor, also the
  same start through the sandbox service (`jupyter sandbox serve`, started for the run);
  with the microVM, also the same start booted instead of restored from its shape's
  snapshot (`snapshots = False`, `--microvm-boot-starts` of them);
- execute round trip: `execute_request` for `pass` until both its `execute_reply`
  (shell) and its `status: idle` (iopub) have arrived, p50 and p99; the reply alone
  is reported too;
- iopub throughput: a cell printing `--throughput-mb` MiB to stdout, until its
  `status: idle`, every byte of the stream counted;
- the same execute round trip from a client the kernel starts beside itself (inside
  its sandbox): the part of the ratio the sandbox costs without the tunnel;
- idle memory: PSS of the kernel's processes (see README.md for what is counted);
- noisy neighbour: a kernel's execute round trip p99 while a second kernel of the
  same kind runs `while True: pass` (at its cpu_limit, 1 core by default), against
  its own p99 with the second kernel idle.

The microVM backend is slow under TCG (a start takes 15-30 s, an execute 50-150 ms),
so it gets its own, smaller counts (`--microvm-*`); its ratios are still against the
same local kernel. Measurements are interleaved (alternating starts, alternating
blocks of executes, alternating floods) so that load from elsewhere on the machine
hits every kernel alike.
Prints a markdown table and writes it to `<out>/latest.md`, raw numbers to
`<out>/latest.json`. Every kernel is shut down, and the script checks that none
of its sandboxes is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from provisioner import cgroups
from provisioner.backends.gvisor import runsc_root

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KERNELS = {"local": "python3", "gvisor": "python3-gvisor", "microvm": "python3-microvm",
           "service": "python3-gvisor", "microvm-boot": "python3-microvm"}  # fmt: skip
"""label -> kernelspec ("service": gVisor, made by the sandbox service; "microvm-boot":
microVM, booted instead of restored from a snapshot)"""
NAMES = {"local": "local", "gvisor": "gVisor", "microvm": "microVM", "service": "gVisor (service)",
         "microvm-boot": "microVM (booted)"}  # fmt: skip
BACKENDS = ("gvisor", "microvm")
QEMU = "qemu-system-x86_64"
"""For the report's header only: the provisioner finds its own (`qemu_path`)."""
MIB = 1024 * 1024
READY_TIMEOUT = 120.0
MSG_TIMEOUT = 60.0

TARGETS = {
    # gVisor's targets. metric: (maximum or minimum of gvisor / local, direction)
    "start": (3.0, "max"),
    "execute_p50": (1.5, "max"),
    "throughput": (0.5, "min"),
}
MICROVM_START_TARGET = 10.0
"""microVM's only target: seconds from start_kernel() to ready (absolute, under TCG)."""
NEIGHBOUR_TARGET = 2.0
"""Most a CPU hog next door may stretch a gVisor kernel's execute p99 (loaded / idle).
Shown for microVM too, for information only."""

SERVICE_SOCKET = Path(tempfile.gettempdir()) / f"jsb-bench-service-{os.getpid()}.sock"
"""Where the run's own sandbox service listens (for the "service" starts)."""

started_sandboxes: set[str] = set()
"""Every sandbox id this run created, to check at the end that none is left."""
microvm_accels: set[str] = set()
"""The accelerators ("tcg", "kvm") the microVMs of this run used."""


# -- kernels -------------------------------------------------------------------


class Kernel:
    """One kernel and its client. `stop()` is safe to call whatever state it is in."""

    def __init__(self, label: str, cwd: str) -> None:
        self.label = label
        self.cwd = cwd
        config = Config()
        if label == "service":
            config.GVisorProvisioner.mode = "service"
            config.GVisorProvisioner.service_socket = str(SERVICE_SOCKET)
        if label == "microvm-boot":
            config.MicroVMProvisioner.snapshots = False
        self.km = AsyncKernelManager(kernel_name=KERNELS[label], config=config)
        self.kc = None
        self.start_kwargs: dict = {}

    async def start(self) -> float:
        """Start the kernel; return seconds from start_kernel() to the first kernel_info_reply."""
        t0 = time.perf_counter()
        try:
            await self.km.start_kernel(cwd=self.cwd, **self.start_kwargs)
        finally:
            if self.sandbox_id:
                started_sandboxes.add(self.sandbox_id)
        accel = getattr(getattr(self.km.provisioner, "sandbox", None), "accel", None)
        if accel is not None:
            microvm_accels.add(accel.name)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=READY_TIMEOUT)
        return time.perf_counter() - t0

    async def stop(self) -> None:
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
            self.kc = None
        try:
            if self.km.has_kernel:
                await asyncio.wait_for(self.km.shutdown_kernel(now=True), 60)
            else:
                await asyncio.wait_for(self.km.cleanup_resources(), 60)
        except Exception as e:  # keep going: the leftover check at the end will tell
            print(f"warning: shutting down the {self.label} kernel: {e!r}", file=sys.stderr)

    def cpu_seconds(self) -> float:
        """CPU time of the kernel's processes so far (sandboxes: their whole cgroup)."""
        if self.label == "local":
            ticks = os.sysconf("SC_CLK_TCK")
            total = 0.0
            for pid in process_tree(self.km.provisioner.pid):
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / ticks
            return total
        return self.km.provisioner.usage()["cpu_seconds"] or 0.0

    @property
    def sandbox_id(self) -> str:
        return getattr(self.km.provisioner, "sandbox_id", "") if self.km.provisioner else ""


@contextlib.asynccontextmanager
async def running(label: str, cwd: str):
    kernel = Kernel(label, cwd)
    try:
        kernel.start_seconds = await kernel.start()
        yield kernel
    finally:
        await kernel.stop()


def parent_id(msg: dict) -> str | None:
    return msg.get("parent_header", {}).get("msg_id")


async def wait_reply(kc, msg_id: str) -> dict:
    while True:
        msg = await kc.get_shell_msg(timeout=MSG_TIMEOUT)
        if parent_id(msg) == msg_id:
            return msg


async def wait_idle(kc, msg_id: str, on_msg=None) -> None:
    while True:
        msg = await kc.get_iopub_msg(timeout=MSG_TIMEOUT)
        if parent_id(msg) != msg_id:
            continue
        if on_msg is not None:
            on_msg(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return


# -- metrics -------------------------------------------------------------------


@contextlib.contextmanager
def sandbox_service():
    """The sandbox service as its own process, for the run; no policy bounds its kernels."""
    policy = SERVICE_SOCKET.with_suffix(".toml")
    policy.write_text("[default]\n")
    argv = [str(Path(sys.executable).parent / "jupyter-sandbox"), "serve",
            f"--socket={SERVICE_SOCKET}", f"--policy={policy}", "--log-level=WARN"]  # fmt: skip
    process = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 30
        while not SERVICE_SOCKET.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sandbox service did not start")
            time.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        policy.unlink()


async def measure_starts(counts: dict[str, int], warmup: bool, cwd: str) -> dict[str, list[float]]:
    """Alternate the kernels' starts, `counts[label]` of each (a kernel with fewer
    drops out of the later rounds); each kernel is shut down before the next start."""
    times: dict[str, list[float]] = {label: [] for label in counts}
    for i in range(-1 if warmup else 0, max(counts.values())):
        for label, n in counts.items():
            if i >= n:
                continue
            async with running(label, cwd) as kernel:
                if i >= 0:
                    times[label].append(kernel.start_seconds)
            note = " (warm-up, not counted)" if i < 0 else ""
            print(f"  start {label}: {kernel.start_seconds * 1000:.0f} ms{note}", file=sys.stderr)
    return times


async def execute_once(kc, code: str = "pass") -> tuple[float, float]:
    """(seconds to the execute_reply, seconds to reply and iopub idle) of one execute."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code, silent=False)
    reply = await wait_reply(kc, msg_id)
    t1 = time.perf_counter()
    await wait_idle(kc, msg_id)
    t2 = time.perf_counter()
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"execute failed: {reply['content']}")
    return t1 - t0, t2 - t0


async def measure_executes(
    kernels: dict[str, Kernel], counts: dict[str, int], warmup: int, block: int
) -> dict:
    """`counts[label]` timed executes of each kernel, in alternating blocks.

    The kernel with the most executes does blocks of `block`; the others' blocks are
    scaled down so that all of them spread over the same rounds (200 microVM executes
    beside 1000 local ones: blocks of 20 beside blocks of 100).
    """
    for kernel in kernels.values():
        for _ in range(warmup):
            await execute_once(kernel.kc)
    samples: dict[str, dict[str, list[float]]] = {
        label: {"reply": [], "idle": []} for label in kernels
    }
    rounds = max(1, -(-max(counts.values()) // block))
    sizes = {label: max(1, -(-n // rounds)) for label, n in counts.items()}
    while any(len(samples[label]["idle"]) < n for label, n in counts.items()):
        for label, kernel in kernels.items():
            size = min(sizes[label], counts[label] - len(samples[label]["idle"]))
            for _ in range(size):
                reply, idle = await execute_once(kernel.kc)
                samples[label]["reply"].append(reply)
                samples[label]["idle"].append(idle)
    return samples


async def throughput_once(kc, mib: int) -> dict:
    lines = mib * 1024  # lines of 1024 bytes
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
    msg_id = kc.execute(code, silent=False)
    await wait_idle(kc, msg_id, count)
    seconds = time.perf_counter() - t0
    reply = await wait_reply(kc, msg_id)
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


async def measure_throughput(kernels: dict[str, Kernel], mib: dict[str, int], runs: int) -> dict:
    """`runs` floods of each kernel, alternating; `mib[label]` MiB each."""
    results: dict[str, list[dict]] = {label: [] for label in kernels}
    for _ in range(runs):
        for label, kernel in kernels.items():
            r = await throughput_once(kernel.kc, mib[label])
            print(f"  throughput {label}: {r['mib_per_s']:.1f} MiB/s", file=sys.stderr)
            results[label].append(r)
    return results


async def measure_neighbour(label: str, cwd: str, n: int, warmup: int) -> dict:
    """A kernel's execute p99 with a second kernel idle, then while it hogs the CPU."""
    async with running(label, cwd) as victim, running(label, cwd) as hog:
        for _ in range(warmup):
            await execute_once(victim.kc)
        idle = [(await execute_once(victim.kc))[1] for _ in range(n)]
        hog_request = hog.kc.execute("while True: pass")
        await asyncio.sleep(1.0)  # the hog is at full speed
        cpu_before = hog.cpu_seconds()
        t0 = time.perf_counter()
        loaded = [(await execute_once(victim.kc))[1] for _ in range(n)]
        elapsed = time.perf_counter() - t0
        hog_cores = (hog.cpu_seconds() - cpu_before) / elapsed
        await hog.km.interrupt_kernel()
        await wait_reply(hog.kc, hog_request)
    p99_idle, p99_loaded = percentile(idle, 99), percentile(loaded, 99)
    print(
        f"  neighbour {label}: p99 {p99_idle * 1000:.1f} ms idle, {p99_loaded * 1000:.1f} ms "
        f"beside a hog using {hog_cores:.2f} cores",
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


# -- memory --------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """Pss, Rss, ... of one process in bytes; {} if it is gone."""
    fields = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
KCMP_VM = 1


def same_mm(a: int, b: int) -> bool:
    """Whether two processes share one address space (kcmp(2) KCMP_VM)."""
    if SYS_KCMP is None:
        return False
    return _libc.syscall(SYS_KCMP, a, b, KCMP_VM, 0, 0) == 0


def address_spaces(pids: list[int]) -> list[int]:
    """One pid per distinct address space.

    gVisor's systrap stubs are processes made with CLONE_VM: several pids share
    one mm, and each one's smaps_rollup reports that whole mm. Summing them all
    would count the same pages several times.
    """
    keep: list[int] = []
    for pid in pids:
        if not any(same_mm(pid, other) for other in keep):
            keep.append(pid)
    return keep


def sum_smaps(pids: list[int]) -> dict[str, int]:
    """Pss (split into anon / file / shmem) and Rss summed over distinct address spaces."""
    total = dict.fromkeys(("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss"), 0)
    for pid in address_spaces(pids):
        rollup = smaps_rollup(pid)
        for key in total:
            total[key] += rollup.get(key, 0)
    return total


def memory_cgroup(sandbox_id: str) -> Path:
    return cgroups.ROOT / "memory" / cgroups.find(sandbox_id).strip("/")


def cgroup_procs(path: Path) -> list[int]:
    pids: set[int] = set()
    for procs in path.rglob("cgroup.procs"):  # the cgroup and any children it has
        pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def measure_memory(kernel: Kernel) -> dict[str, Any]:
    provisioner = kernel.km.provisioner
    if kernel.label == "local":
        pids = process_tree(provisioner.pid)
        mem = sum_smaps(pids)
        return {"pss": mem["Pss"], "rss": mem["Rss"], "smaps": mem, "pids": pids}
    cgroup = memory_cgroup(kernel.sandbox_id)
    cgroup_pids = cgroup_procs(cgroup)
    stat = {}
    for line in (cgroup / "memory.stat").read_text().splitlines():
        name, value = line.split()
        if name in ("rss", "cache", "shmem", "mapped_file", "total_rss", "total_cache"):
            stat[name] = int(value)
    result: dict[str, Any] = {
        "cgroup_usage": int((cgroup / "memory.usage_in_bytes").read_text()),
        "cgroup_stat": stat,
        "cgroup_pids": cgroup_pids,
    }
    if kernel.label == "microvm":
        # QEMU (the shell that starts it execs setpriv, which execs QEMU: one pid)
        # runs inside the VM's cgroup; the guest's memory is QEMU's own.
        pids = process_tree(provisioner.sandbox.process.pid)
    else:
        pids = cgroup_pids
        wrapper = provisioner.sandbox.process.pid  # `runsc run`: outside the sandbox's cgroup
        result["runsc_run_pss"] = sum_smaps([wrapper])["Pss"]
    mem = sum_smaps(pids)
    return {
        "pss": mem["Pss"],
        "rss": mem["Rss"],
        "smaps": mem,
        "pids": pids,
        "address_spaces": address_spaces(pids),
        **result,
    }


# -- reporting -----------------------------------------------------------------


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, int(-(-p * len(ordered) // 100)))  # ceil(p/100 * n)
    return ordered[rank - 1]


def verdict(metric: str, ratio: float) -> str:
    """gVisor's verdict on one of TARGETS."""
    limit, direction = TARGETS[metric]
    ok = ratio <= limit if direction == "max" else ratio >= limit
    return "PASS" if ok else "MISS"


def target_text(metric: str) -> str:
    limit, direction = TARGETS[metric]
    return f"≤ {limit:g}x" if direction == "max" else f"≥ {limit:g}x"


def verdicts(s: dict, backends: list[str]) -> dict[str, dict[str, str]]:
    """backend -> metric -> PASS / MISS. microVM's neighbour verdict is informational."""
    out: dict[str, dict[str, str]] = {}
    if "gvisor" in backends:
        gv, loc = s["gvisor"], s["local"]
        out["gvisor"] = {m: verdict(m, gv[m] / loc[m]) for m in TARGETS}
        out["gvisor"]["neighbour"] = "PASS" if gv["neighbour_ratio"] <= NEIGHBOUR_TARGET else "MISS"
    if "microvm" in backends:
        vm = s["microvm"]
        out["microvm"] = {
            "start": "PASS" if vm["start"] <= MICROVM_START_TARGET else "MISS",
            "neighbour_informational": (
                "PASS" if vm["neighbour_ratio"] <= NEIGHBOUR_TARGET else "MISS"
            ),
        }
    return out


def summarize(raw: dict) -> dict:
    s: dict[str, dict[str, float]] = {}
    for label in raw["labels"]:
        ex = raw["executes"][label]
        tp = raw["throughput"][label]
        s[label] = {
            "start": statistics.median(raw["starts"][label]),
            "execute_p50": percentile(ex["idle"], 50),
            "execute_p99": percentile(ex["idle"], 99),
            "reply_p50": percentile(ex["reply"], 50),
            "reply_p99": percentile(ex["reply"], 99),
            "inside_p50": percentile(raw["inside"][label], 50),
            "throughput": statistics.median(r["mib_per_s"] for r in tp),
            "pss": raw["memory"][label]["pss"],
            "neighbour_idle_p99": percentile(raw["neighbour"][label]["idle"], 99),
            "neighbour_loaded_p99": percentile(raw["neighbour"][label]["loaded"], 99),
            "neighbour_hog_cores": raw["neighbour"][label]["hog_cores"],
        }
        s[label]["neighbour_ratio"] = (
            s[label]["neighbour_loaded_p99"] / s[label]["neighbour_idle_p99"]
        )
    if "service" in raw["starts"]:
        s["gvisor"]["service_start"] = statistics.median(raw["starts"]["service"])
    if raw["starts"].get("microvm-boot"):
        s["microvm"]["boot_start"] = statistics.median(raw["starts"]["microvm-boot"])
    return s


def neighbour_table(raw: dict, s: dict) -> str:
    v = raw["verdicts"]
    lines = [
        "| noisy neighbour (execute p99) | idle neighbour | neighbour hogging "
        "its CPU | loaded / idle | target | result |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for label in raw["labels"]:
        m = s[label]
        ratio = m["neighbour_ratio"]
        target, result = ("", "")
        if label == "gvisor":
            target = f"≤ {NEIGHBOUR_TARGET:g}x"
            result = v["gvisor"]["neighbour"]
        elif label == "microvm":
            target = f"(≤ {NEIGHBOUR_TARGET:g}x, informational)"
            result = f"({v['microvm']['neighbour_informational']})"
        lines.append(
            f"| {NAMES[label]} (n={raw['neighbour'][label]['n']}) | "
            f"{m['neighbour_idle_p99'] * 1000:.2f} ms | "
            f"{m['neighbour_loaded_p99'] * 1000:.2f} ms (hog at "
            f"{m['neighbour_hog_cores']:.2f} cores) | {ratio:.2f}x | {target} | {result} |"
        )
    return "\n".join(lines)


def table(raw: dict, s: dict) -> str:
    plan, backends, v = raw["plan"], raw["backends"], raw["verdicts"]
    loc = s["local"]
    accel = "/".join(sorted(raw["environment"].get("microvm_accel", []))).upper() or "?"

    def line(name: str, local: str, cells: dict[str, tuple[str, str]], targets=(), results=()):
        """cells: backend -> (value, ratio); a backend missing from cells gets empty cells."""
        values = [local]
        for b in backends:
            values += cells.get(b, ("", ""))
        return f"| {name} | {' | '.join(values)} | {'; '.join(targets)} | {', '.join(results)} |"

    def row(name, metric, fmt, gvisor_target=None):
        cells = {b: (fmt(s[b][metric]), f"{s[b][metric] / loc[metric]:.2f}x") for b in backends}
        targets, results = [], []
        if gvisor_target and "gvisor" in backends:
            targets.append(f"gVisor {target_text(gvisor_target)}")
            results.append(f"gVisor {v['gvisor'][gvisor_target]}")
        if metric == "start" and "microvm" in backends:
            targets.append(f"microVM ≤ {MICROVM_START_TARGET:g} s ({accel})")
            results.append(f"microVM {v['microvm']['start']}")
        return line(name, fmt(loc[metric]), cells, targets, results)

    def ms(v):
        return f"{v * 1000:.2f} ms"

    def sec(v):
        return f"{v * 1000:.0f} ms"

    def mibs(v):
        return f"{v:.1f} MiB/s"

    def mib(v):
        return f"{v / MIB:.1f} MiB"

    def split(m):
        sm = m["smaps"]
        return " / ".join(f"{sm[k] / MIB:.1f}" for k in ("Pss_Anon", "Pss_File", "Pss_Shmem"))

    def counts(key: str, unit: str = "") -> str:
        """`5` if every kernel had the same count, else `local 5, microVM 3`."""
        values = {label: plan[label][key] for label in raw["labels"]}
        if len(set(values.values())) == 1:
            return f"{values['local']}{unit}"
        return ", ".join(f"{NAMES[label]} {n}{unit}" for label, n in values.items())

    mem = raw["memory"]
    header = ["metric", "local"]
    for b in backends:
        header += [NAMES[b], f"{NAMES[b]} / local"]
    header += ["target", "result"]
    pss_how = {
        "gvisor": "gVisor: all processes in the sandbox's cgroup",
        "microvm": "microVM: the QEMU process tree",
    }
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 2) + ":---:|",
        row(
            f"start → first kernel_info_reply (median of {counts('starts')})",
            "start",
            sec,
            "start",
        ),
    ]
    if "service_start" in s.get("gvisor", {}):
        start = s["gvisor"]["service_start"]
        lines.append(
            line(
                "the same start, the sandbox made by the sandbox service (`mode = service`)",
                "",
                {"gvisor": (sec(start), f"{start / loc['start']:.2f}x")},
            )
        )
    if "boot_start" in s.get("microvm", {}):
        start = s["microvm"]["boot_start"]
        lines.append(
            line(
                "the same start, the VM booted instead of restored from its shape's snapshot "
                f"(`snapshots = False`; n={len(raw['starts']['microvm-boot'])})",
                "",
                {"microvm": (sec(start), f"{start / loc['start']:.2f}x")},
            )
        )
    lines += [
        row(
            "execute round trip p50 (`pass`, request → reply **and** iopub idle; "
            f"n={counts('executes')})",
            "execute_p50",
            ms,
            "execute_p50",
        ),
        row("execute round trip p99 (same)", "execute_p99", ms),
        row(
            "execute round trip p50, client started by the kernel itself, beside it "
            "(in a sandbox: no tunnel, the sandbox's own cost)",
            "inside_p50",
            ms,
        ),
        row("execute request → execute_reply only, p50", "reply_p50", ms),
        row("execute request → execute_reply only, p99", "reply_p99", ms),
        row(
            f"iopub throughput ({counts('throughput_mb', ' MiB')} stdout → idle, median of "
            f"{raw['args']['throughput_runs']}; ratio = sandbox relative to local)",
            "throughput",
            mibs,
            "throughput",
        ),
        row(
            "idle memory, PSS (local: kernel process tree; "
            + "; ".join(pss_how[b] for b in backends)
            + ")",
            "pss",
            mib,
        ),
        line(
            "idle PSS split: anon / file / shmem",
            split(mem["local"]),
            {b: (split(mem[b]), "") for b in backends},
        ),
        line(
            "sandbox cgroup `memory.usage_in_bytes`",
            "",
            {b: (mib(mem[b]["cgroup_usage"]), "") for b in backends},
        ),
    ]
    if "gvisor" in backends:
        lines.append(
            line(
                "gVisor `runsc run` parent process PSS (outside the cgroup, not counted above)",
                "",
                {"gvisor": (mib(mem["gvisor"]["runsc_run_pss"]), "")},
            )
        )
    return "\n".join(lines)


def report(raw: dict, s: dict) -> str:
    env = raw["environment"]
    title = " vs ".join(NAMES[label] for label in raw["labels"])
    header = [
        f"# jupyter-sandbox benchmark: {title}",
        "",
        f"- run: {env['date']}, git {env['git']}, {env['cpus']} CPUs ({env['cpu_model']}), "
        f"Linux {env['kernel']}, {env['runsc']}",
        f"- load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}",
        f"- command: `{env['command']}`",
    ]
    if "microvm" in raw["backends"]:
        accel = "/".join(sorted(env.get("microvm_accel", []))).upper() or "?"
        header.append(f"- microVM: {env['qemu']}, accelerator {accel}")
    if raw["args"].get("note"):
        header.append(f"- note: {raw['args']['note']}")
    return "\n".join([*header, "", table(raw, s), "", neighbour_table(raw, s), ""])


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def environment(argv: list[str], qemu: bool = False) -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, check=False, cwd=REPO
            ).stdout.strip()
        except OSError:
            return "?"

    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    dirty = " (uncommitted changes)" if run("git", "status", "--porcelain") else ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": run("git", "rev-parse", "--short", "HEAD") + dirty,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "runsc": run("runsc", "--version").splitlines()[0] if shutil.which("runsc") else "no runsc",
        "python": sys.version.split()[0],
        "loadavg_start": loadavg(),
        "command": shlex.join(["python", *argv]),
        "qemu": (run(QEMU, "--version").splitlines() or ["?"])[0] if qemu else "",
    }


# -- leftovers -----------------------------------------------------------------


def runsc_list() -> list[str]:
    if not runsc_root().is_dir():
        return []
    out = subprocess.run(
        ["runsc", f"--root={runsc_root()}", "list", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return out.split()


def qemu_processes(sandbox_ids: set[str]) -> dict[str, list[int]]:
    """sandbox id -> pids of processes started with `-name <sandbox id>,...` (a microVM's
    QEMU, or the shell and setpriv that become it), from /proc/*/cmdline."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            sid = value.split(",", 1)[0]
            if flag == "-name" and sid in sandbox_ids:
                found.setdefault(sid, []).append(int(entry.name))
    return found


def check_leftovers() -> list[str]:
    """Our sandboxes still known to runsc, still owning a cgroup or still with a QEMU
    process; force-remove them. Returns `<sandbox id> (what was left)` for each."""
    known = set(runsc_list())
    qemus = qemu_processes(started_sandboxes)
    left = []
    for sid in sorted(started_sandboxes):
        what = []
        if sid in known:
            what.append("runsc container")
        if cgroups.find(sid):
            what.append("cgroup")
        if sid in qemus:
            what.append(f"QEMU pids {qemus[sid]}")
        if not what:
            continue
        left.append(f"{sid} ({', '.join(what)})")
        if sid in known:
            subprocess.run(
                ["runsc", f"--root={runsc_root()}", "delete", "--force", sid],
                capture_output=True,
                check=False,
            )
        for pid in qemus.get(sid, []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while sid in qemu_processes({sid}) and time.monotonic() < deadline:
            time.sleep(0.05)
        cgroup = cgroups.find(sid)
        if cgroup:
            cgroups.remove(cgroup)
    return left


# -- main ------------------------------------------------------------------------


def plan(args: argparse.Namespace, labels: list[str]) -> dict[str, dict[str, int]]:
    """How many of each measurement each kernel gets: microVM has its own, smaller counts."""
    counts = {}
    for label in labels:
        if label == "microvm":
            counts[label] = {
                "starts": args.microvm_starts,
                "executes": args.microvm_executes,
                "throughput_mb": args.microvm_throughput_mb,
                "neighbour_executes": args.microvm_executes,
            }
        else:
            counts[label] = {
                "starts": args.starts,
                "executes": args.executes,
                "throughput_mb": args.throughput_mb,
                "neighbour_executes": args.neighbour_executes,
            }
    return counts


async def benchmark(args: argparse.Namespace, cwd: str) -> dict:
    labels = ["local", *args.backends]
    counts = plan(args, labels)

    def each(key: str) -> dict[str, int]:
        return {label: counts[label][key] for label in labels}

    def said(key: str) -> str:
        return ", ".join(f"{label} {n}" for label, n in each(key).items())

    raw: dict[str, Any] = {
        "args": dict(vars(args)),
        "labels": labels,
        "backends": list(args.backends),
        "plan": counts,
    }
    print(f"starts ({said('starts')}), alternating", file=sys.stderr)
    starts = each("starts")
    if "gvisor" in args.backends:
        starts["service"] = starts["gvisor"]
    if "microvm" in args.backends and args.microvm_boot_starts > 0:
        starts["microvm-boot"] = args.microvm_boot_starts
    with sandbox_service():
        raw["starts"] = await measure_starts(starts, not args.no_warmup, cwd)

    kernels: dict[str, Kernel] = {}
    try:
        for label in labels:
            kernel = Kernel(label, cwd)
            kernels[label] = kernel
            await kernel.start()
        await asyncio.sleep(args.settle)
        print("memory", file=sys.stderr)
        raw["memory"] = {label: measure_memory(k) for label, k in kernels.items()}
        print(f"executes ({said('executes')})", file=sys.stderr)
        raw["executes"] = await measure_executes(
            kernels, each("executes"), args.warmup_executes, args.block
        )
        print(f"executes from inside each kernel ({said('executes')})", file=sys.stderr)
        raw["inside"] = {
            label: await measure_inside(kernel, counts[label]["executes"], args.warmup_executes)
            for label, kernel in kernels.items()
        }
        print(
            f"throughput (MiB: {said('throughput_mb')}) x {args.throughput_runs}", file=sys.stderr
        )
        raw["throughput"] = await measure_throughput(
            kernels, each("throughput_mb"), args.throughput_runs
        )
    finally:
        for kernel in kernels.values():
            await kernel.stop()
    print(f"noisy neighbour (executes per phase: {said('neighbour_executes')})", file=sys.stderr)
    raw["neighbour"] = {
        label: await measure_neighbour(label, cwd, n, args.warmup_executes)
        for label, n in each("neighbour_executes").items()
    }
    return raw


async def amain(args: argparse.Namespace, cwd: str) -> dict:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await benchmark(args, cwd)


def backend_list(text: str) -> list[str]:
    chosen = list(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(BACKENDS)}, got {text!r}"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends",
        type=backend_list,
        default=list(BACKENDS),
        help="sandboxed kernels to measure besides local, comma-separated "
        f"(default: {','.join(BACKENDS)})",
    )
    parser.add_argument("--starts", type=int, default=5, help="starts of each kernel (median)")
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="count the first start too (by default one uncounted start each)",
    )
    parser.add_argument("--executes", type=int, default=1000, help="timed executes per kernel")
    parser.add_argument(
        "--warmup-executes",
        type=int,
        default=50,
        help="untimed executes per kernel first (and before each noisy-neighbour run)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=100,
        help="executes per kernel before switching to the next kernel (scaled down for "
        "kernels with fewer executes)",
    )
    parser.add_argument("--throughput-mb", type=int, default=50, help="MiB printed per run")
    parser.add_argument(
        "--neighbour-executes", type=int, default=500, help="executes per phase of the neighbour"
    )
    parser.add_argument("--throughput-runs", type=int, default=3, help="runs per kernel (median)")
    parser.add_argument(
        "--microvm-starts", type=int, default=3, help="starts of the microVM kernel (median)"
    )
    parser.add_argument(
        "--microvm-boot-starts",
        type=int,
        default=1,
        help="starts of the microVM kernel booted, not restored from a snapshot (0: none)",
    )
    parser.add_argument(
        "--microvm-executes",
        type=int,
        default=200,
        help="timed executes of the microVM kernel, and per phase of its neighbour",
    )
    parser.add_argument(
        "--microvm-throughput-mb",
        type=int,
        default=10,
        help="MiB the microVM kernel prints per run",
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between ready and the memory reading"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "results", help="folder for latest.md and latest.json"
    )
    parser.add_argument("--note", default="", help="free text for the report's header")
    args = parser.parse_args(argv)
    counts = [args.starts, args.executes, args.throughput_mb, args.throughput_runs]
    counts += [args.neighbour_executes, args.block, args.microvm_starts]
    counts += [args.microvm_executes, args.microvm_throughput_mb]
    if min(counts) < 1:
        parser.error("every count must be at least 1")

    env = environment(["benchmarks/run.py", *argv], qemu="microvm" in args.backends)
    cwd = tempfile.mkdtemp(prefix="jsb-bench-")
    os.chown(cwd, 1000, 1000)  # as a notebook folder: the sandboxed kernel runs as its owner
    raw: dict | None = None
    try:
        raw = asyncio.run(amain(args, cwd))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
        left = check_leftovers()
        if left:
            print(f"ERROR: sandboxes left behind (now force-removed): {left}", file=sys.stderr)
    if raw is None or left:
        return 1

    env["loadavg_end"] = loadavg()
    env["microvm_accel"] = sorted(microvm_accels)
    raw["environment"] = env
    raw["environment"]["sandboxes"] = sorted(started_sandboxes)
    s = summarize(raw)
    raw["summary"] = s
    raw["verdicts"] = verdicts(s, raw["backends"])
    text = report(raw, s)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text)
    raw["args"]["out"] = str(args.out)
    (args.out / "latest.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(f"written to {args.out / 'latest.md'} and latest.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
