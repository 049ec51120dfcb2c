"""Resource exhaustion: open files, disk, processes, CPU and memory, from a real kernel.

Per backend, one attacker kernel with small limits and one neighbour kernel (a
second sandbox of the same backend, default limits) are started side by side
once for the module; the attacks run in the attacker in turn. Those that may end
the attacker's sandbox (the fork bomb in the kernel process under gVisor, the
memory bomb) come last, and an attack finding its attacker dead restarts it.

Each attack holds what it took for a few seconds while the host measures, in a
loop: the neighbour's execute round trip, the time to spawn a trivial host
process, a TCP round trip on the host's loopback, and the attacker's cgroup
(memory, CPU time). The numbers before and during the attack go into the
verdict; the bounds asserted are generous (a neighbour round trip under 2 s).

Each attack checks twice: that it really ran (how far it got: files opened, MiB
written, processes forked, cores used, MiB allocated) and that it stopped for
the reason the sandbox gives (EMFILE, ENOSPC, EAGAIN, the CPU quota, the memory
limit with the host's notice under the cell).

Under gVisor a fork bomb run by the kernel process itself meets the memory limit
before pids_limit: gVisor copies memory written after a fork in 2 MiB units
(its private allocation unit), so each copy of a busy kernel costs tens of MiB.
The test accepts that end (the sandbox stopped, the notebook told) and says so
in its verdict; a bomb run by a fresh process gets EAGAIN on both backends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BACKENDS,
    READY_TIMEOUT,
    leftover_cgroups,
    leftover_mounts,
    leftover_network,
    our_sandboxes,
    require_sandbox,
)
from jupyter_client.manager import KernelManager
from kit import PRELUDE
from traitlets.config import Config

from provisioner import cgroups

MIB = 2**20
LIMITS = {
    "memory_limit": "512M",
    "pids_limit": 64,
    "disk_limit": "64M",
    "open_files_limit": 256,
    "cpu_limit": 1.0,
}
"""The attacker's limits: small, so that each attack reaches its limit quickly."""
HOLD = 3.0
"""Seconds an attack holds what it took while the host measures."""
NEIGHBOUR_MAX = 2.0
"""The slowest neighbour execute round trip allowed during an attack, seconds."""
HOST_MAX = 2.0
"""The slowest host process spawn or loopback round trip allowed, seconds. As generous
as the neighbour's: the machine may be shared with other work (one core of two for
the attacker, others' tests), and a stall of seconds is what would mean harm."""
MEMORY_REASON = f"it exceeded its memory limit, memory_limit = {LIMITS['memory_limit']}"


# -- the kernels, and measuring the host and the neighbour ---------------------------


class Echo:
    """A TCP echo server on the host's loopback, in a thread: one probe of the host."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.client = socket.create_connection(self.server.getsockname())
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(64):
                    conn.sendall(data)

    def round_trip(self) -> float:
        started = time.perf_counter()
        self.client.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += self.client.recv(64)
        return time.perf_counter() - started

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.thread.join(5)


def spawn_time() -> float:
    """Seconds to run a trivial process on the host: another probe of the host."""
    started = time.perf_counter()
    subprocess.run(["/bin/true"], check=True)
    return time.perf_counter() - started


def output_text(messages: list[dict]) -> str:
    parts = []
    for msg in messages:
        if msg["msg_type"] == "stream":
            parts.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            parts.append("\n".join(msg["content"]["traceback"]))
    return "".join(parts)


def last_json(text: str) -> dict:
    lines = text.strip().splitlines()
    assert lines, "the attack reported nothing"
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise AssertionError(f"the attack did not report: {text[-2000:]}") from None


def printed_numbers(messages: list[dict]) -> list[int]:
    """The numbers a cell printed to stdout, one a line (its progress)."""
    return [
        int(line)
        for m in messages
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        for line in m["content"]["text"].split()
        if line.isdigit()
    ]


@dataclass
class Kernel:
    km: KernelManager
    kc: Any
    reply: dict | None = None

    def send(self, code: str) -> str:
        self.reply = None
        return self.kc.execute(code, store_history=False)

    def replied(self, msg_id: str) -> bool:
        """Whether the reply to `msg_id` has come (other shell messages are dropped)."""
        while self.reply is None and self.kc.shell_channel.msg_ready():
            msg = self.kc.get_shell_msg(timeout=1)
            if msg["parent_header"].get("msg_id") == msg_id:
                self.reply = msg
        return self.reply is not None

    def messages(self, msg_id: str, timeout: float) -> list[dict]:
        """The iopub messages of `msg_id` up to its idle (or a silence of `timeout`)."""
        messages: list[dict] = []
        with contextlib.suppress(Exception):  # queue.Empty: the kernel died meanwhile
            while not (
                messages
                and messages[-1]["msg_type"] == "status"
                and messages[-1]["content"]["execution_state"] == "idle"
            ):
                msg = self.kc.get_iopub_msg(timeout=timeout)
                if msg["parent_header"].get("msg_id") == msg_id:
                    messages.append(msg)
        return messages

    def round_trip(self) -> float:
        started = time.perf_counter()
        reply = self.kc.execute_interactive("pass", timeout=30, output_hook=lambda _: None)
        assert reply["content"]["status"] == "ok"
        return time.perf_counter() - started


@dataclass
class Usage:
    """One sample of the attacker's sandbox, from the host, and of the host's idle time."""

    time: float
    memory: int | None
    cpu: float | None
    throttled: int
    """periods in which the sandbox's CPU quota stopped it, so far"""
    host_idle: float
    """seconds all the host's CPUs were idle, so far"""

    @classmethod
    def now(cls, sandbox: Any) -> Usage:
        memory = cpu = None
        throttled = 0
        if sandbox is not None:
            memory, cpu = sandbox.memory_usage(), sandbox.cpu_seconds()
            for folder in cgroups.directories(sandbox.record.cgroup):
                with contextlib.suppress(OSError, ValueError):
                    stat = (folder / "cpu.stat").read_text().split()
                    throttled = max(throttled, int(stat[stat.index("nr_throttled") + 1]))
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        idle = (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")  # idle + iowait
        return cls(time.monotonic(), memory, cpu, throttled, idle)


@dataclass
class Measured:
    """Round trips (seconds) and the attacker's cgroup, sampled while something ran."""

    neighbour: list[float] = field(default_factory=list)
    spawn: list[float] = field(default_factory=list)
    loopback: list[float] = field(default_factory=list)
    usage: list[Usage] = field(default_factory=list)
    sent: float = 0.0
    """When the attack was sent (monotonic)."""

    @staticmethod
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.0f}/{max(values) * 1000:.0f} ms"

    @property
    def peak_memory(self) -> int:
        return max((u.memory for u in self.usage if u.memory is not None), default=0)

    def cpu_window(self, start: float, end: float) -> tuple[float, float, int]:
        """Between two monotonic times: the cores the attacker's sandbox used (from its
        cgroup), the host's idle cores, and how often the CPU quota throttled it."""
        window = [u for u in self.usage if start <= u.time <= end and u.cpu is not None]
        assert len(window) >= 2, "too few samples of the attacker's cgroup"
        first, last = window[0], window[-1]
        seconds = last.time - first.time
        return (
            (last.cpu - first.cpu) / seconds,
            (last.host_idle - first.host_idle) / seconds,
            last.throttled - first.throttled,
        )


@dataclass
class Pair:
    """An attacker kernel with small limits and its neighbour, of one backend."""

    backend: str
    attacker: Kernel
    neighbour: Kernel
    echo: Echo
    workspace: Path
    """The attacker's workspace, on the host: where an attack may leave its progress."""

    def sample(self, into: Measured) -> None:
        into.neighbour.append(self.neighbour.round_trip())
        into.spawn.append(spawn_time())
        into.loopback.append(self.echo.round_trip())
        provisioner = self.attacker.km.provisioner
        into.usage.append(Usage.now(provisioner.sandbox if provisioner else None))

    def baseline(self, n: int = 8) -> Measured:
        measured = Measured()
        for _ in range(n):
            self.sample(measured)
            time.sleep(0.05)
        return measured

    def revive(self) -> None:
        """Restart the attacker if an earlier attack ended it (a fresh sandbox)."""
        if not self.attacker.km.is_alive():
            self.attacker.km.restart_kernel(now=True)
            self.attacker.kc.wait_for_ready(timeout=READY_TIMEOUT)

    def launch(self, code: str, timeout: float) -> tuple[str, Measured, Measured]:
        """Send `code` (after the prelude) to the attacker and measure until it replies
        or its sandbox is stopped: its msg_id, the measurements before, and during."""
        before = self.baseline()
        attacker = self.attacker
        during = Measured(sent=time.monotonic())
        msg_id = attacker.send(PRELUDE + code)
        deadline = time.monotonic() + timeout

        def running() -> bool:
            return not attacker.replied(msg_id) and attacker.km.is_alive()

        while running() or len(during.neighbour) < 3:
            assert time.monotonic() < deadline, "the attack was not stopped"
            self.sample(during)
            time.sleep(0.05)
        return msg_id, before, during

    def attack(self, code: str, timeout: float = 120) -> tuple[dict, Measured, Measured]:
        """Run an attack that leaves the attacker alive; its report, and the measurements."""
        msg_id, before, during = self.launch(textwrap.dedent(code), timeout)
        assert self.attacker.replied(msg_id), "the attacker died: " + self.attacker_fate()
        reply = self.attacker.reply["content"]
        text = output_text(self.attacker.messages(msg_id, timeout=30))
        assert reply["status"] == "ok", text
        return last_json(text), before, during

    def attacker_fate(self) -> str:
        provisioner = self.attacker.km.provisioner
        return (provisioner.stop_reason if provisioner else "") or "no reason given"

    def killed_by_memory(self, messages: list[dict]) -> str:
        """Assert the host stopped the attacker for its memory limit and told the notebook."""
        assert self.attacker.km.provisioner.stop_reason == MEMORY_REASON  # the server log's
        notices = [
            m
            for m in messages
            if m["msg_type"] == "stream" and "jupyter-sandbox" in m["content"]["text"]
        ]
        assert notices, "the notebook was not told why its kernel died"
        assert notices[0]["content"]["name"] == "stderr"
        assert MEMORY_REASON in notices[0]["content"]["text"]
        tunnel = self.attacker.km.provisioner.tunnel
        if tunnel is not None and tunnel.exit_report.get("oom_killed") is True:
            how = "the guest kernel's OOM killer ended the kernel (the agent said so)"
        else:
            how = "the host's OOM killer struck in the sandbox's memory cgroup"
        return f'{how}, the host stopped the sandbox and told the notebook "{MEMORY_REASON}"'

    def responsive(self, before: Measured, during: Measured) -> str:
        """Assert the neighbour and the host stayed responsive; the numbers, for a verdict."""
        assert max(during.neighbour) < NEIGHBOUR_MAX, f"neighbour stalled: {during.neighbour}"
        assert max(during.spawn) < HOST_MAX, f"host process spawn stalled: {during.spawn}"
        assert max(during.loopback) < HOST_MAX, f"host loopback stalled: {during.loopback}"
        return (
            f"neighbour execute p50/max {Measured.ms(during.neighbour)}"
            f" (before {Measured.ms(before.neighbour)}),"
            f" host spawn {Measured.ms(during.spawn)} (before {Measured.ms(before.spawn)}),"
            f" loopback {Measured.ms(during.loopback)}, n={len(during.neighbour)}"
        )


def start(kernel_name: str, workspace: Path, settings: dict) -> Kernel:
    km = KernelManager(
        kernel_name=kernel_name, config=Config({"SandboxProvisioner": settings}), autorestart=False
    )
    km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=READY_TIMEOUT)
    except BaseException:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise
    return Kernel(km, kc)


def stop(kernel: Kernel) -> None:
    kernel.kc.stop_channels()
    if kernel.km.has_kernel:
        kernel.km.shutdown_kernel(now=True)
    else:
        kernel.km.cleanup_resources()


@pytest.fixture(scope="module", params=list(BACKENDS))
def kernels(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """An attacker and a neighbour of one backend, started side by side."""
    require_sandbox(request.param)
    before = our_sandboxes()
    # Not under /tmp, as a user's workspace is not (/home/alice/notebooks): a mount point
    # there once hid that gVisor's /tmp escaped disk_limit (test_disk_filling, rootfs.tmp).
    folders = [Path(tempfile.mkdtemp(prefix="jsb-attack-", dir="/srv")) for _ in range(2)]
    for folder in folders:
        os.chown(folder, 1000, 1000)
    name = BACKENDS[request.param]
    started: list[Kernel] = []
    echo = Echo()
    try:
        # Both at once: a microVM under TCG takes half a minute to boot.
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(start, name, folders[0], LIMITS),
                pool.submit(start, name, folders[1], {}),
            ]
            for future in futures:
                with contextlib.suppress(Exception):
                    started.append(future.result())
            for future in futures:
                future.result()  # raises the first failure, once both are done
        attacker, neighbour = started
        for _ in range(3):  # a kernel's first executes are slow: not a baseline
            neighbour.round_trip()
        yield Pair(request.param, attacker, neighbour, echo, folders[0])
    finally:
        for kernel in started:
            with contextlib.suppress(Exception):  # what is left is found below
                stop(kernel)
        echo.close()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    assert not our_sandboxes() - before, "a sandbox of the attack was left behind"
    assert not leftover_cgroups(), f"cgroups left behind: {leftover_cgroups()}"
    assert not leftover_mounts(), f"mounts left behind: {leftover_mounts()}"
    assert not leftover_network(), f"network left behind: {leftover_network()}"


@pytest.fixture
def pair(kernels: Pair) -> Pair:
    """The module's pair, its attacker restarted if an earlier attack ended it. Ask for
    it before `no_leftovers`: the restarted sandbox belongs to the module, not the test."""
    kernels.revive()
    return kernels


# -- the attacks, in this order ----------------------------------------------------


@pytest.mark.attack("resources", "exhaust file descriptors (open until EMFILE, raise the rlimit)")
def test_file_descriptor_exhaustion(pair: Pair, no_leftovers, verdict):
    evidence, before, during = pair.attack(
        f"""
        assert_sandboxed()
        import resource, time
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        raised = attempt(resource.setrlimit, resource.RLIMIT_NOFILE, (hard * 16, hard * 16))
        held, error = [], None
        while error is None and len(held) < 100_000:
            try:
                held.append(os.open("/etc/hostname", os.O_RDONLY))
            except OSError as e:
                error = errno.errorcode.get(e.errno, str(e.errno))
        others = {{"socket": attempt(socket.socket)[0], "pipe": attempt(os.pipe)[0],
                   "dup": attempt(os.dup, held[0])[0]}}
        time.sleep({HOLD})  # holding every descriptor while the host measures
        for fd in held:
            os.close(fd)
        again = attempt(lambda: os.close(os.open("/etc/hostname", os.O_RDONLY)))[0]
        report(opened=len(held), error=error, soft=soft, hard=hard, raised=raised[0],
               others=others, again=again)
        """
    )
    limit = LIMITS["open_files_limit"]
    assert evidence["soft"] == evidence["hard"] == limit
    assert evidence["raised"] in {"ValueError", "EPERM"}  # the hard limit cannot be raised
    assert evidence["error"] == "EMFILE"
    assert limit - 100 < evidence["opened"] < limit  # the kernel itself holds some files
    assert evidence["others"] == {"socket": "EMFILE", "pipe": "EMFILE", "dup": "EMFILE"}
    assert evidence["again"] == "ok"  # and the kernel can open files again afterwards
    verdict(
        f"EMFILE after {evidence['opened']} files opened (open_files_limit {limit}; sockets,"
        f" pipes and dup too); raising RLIMIT_NOFILE: {evidence['raised']};"
        f" {pair.responsive(before, during)}"
    )


@pytest.mark.attack("resources", "fill the disk (the writable layer: /home, /tmp, /var/tmp)")
def test_disk_filling(pair: Pair, no_leftovers, verdict):
    evidence, before, during = pair.attack(
        f"""
        assert_sandboxed()
        import time
        chunk, written, error = b"x" * 2**20, 0, None
        with open("/home/sandbox/jsb-fill-0", "wb", buffering=0) as f:
            while error is None and written < 2**40:
                try:
                    written += f.write(chunk)
                except OSError as e:
                    error = errno.errorcode.get(e.errno, str(e.errno))
        # keep at it while the host measures: small files anywhere writable
        deadline, extra, errors, n = time.monotonic() + {HOLD}, 0, set(), 0
        while time.monotonic() < deadline:
            n += 1
            time.sleep(0.01)
            for folder in ("/tmp", "/var/tmp", "/home/sandbox"):
                try:
                    with open(f"{{folder}}/jsb-fill-{{n}}", "wb", buffering=0) as f:
                        extra += f.write(b"y" * 65536)
                except OSError as e:
                    errors.add(errno.errorcode.get(e.errno, str(e.errno)))
        for folder in ("/tmp", "/var/tmp", "/home/sandbox"):
            for name in os.listdir(folder):
                if name.startswith("jsb-fill-"):
                    os.remove(os.path.join(folder, name))
        after = attempt(lambda: open("/home/sandbox/jsb-fill-after", "wb").write(chunk))[0]
        os.remove("/home/sandbox/jsb-fill-after")
        report(mib=written / 2**20, error=error, extra=extra, errors=sorted(errors),
               after=after)
        """
    )
    limit = 64
    assert evidence["error"] in {"ENOSPC", "EDQUOT"}
    assert limit * 0.75 <= evidence["mib"] <= limit  # it filled the layer, no further
    assert evidence["extra"] <= 2 * MIB  # the last scraps, then nothing
    assert evidence["errors"] and set(evidence["errors"]) <= {"ENOSPC", "EDQUOT"}
    assert evidence["after"] == "ok"  # space comes back when the kernel deletes its files
    verdict(
        f"{evidence['error']} after {evidence['mib']:.0f} MiB (disk_limit 64M), then"
        f" {'/'.join(evidence['errors'])} for {HOLD:.0f} s of retries in /tmp, /var/tmp and"
        f" /home; space came back on delete; {pair.responsive(before, during)}"
    )


FORK_BOMB = textwrap.dedent(
    r"""
    import contextlib, ctypes, errno, os, time, warnings

    def fork_bomb(hold, progress=None):
        # Every process forks until refused, for `hold` seconds; then all exit.
        libc = ctypes.CDLL(None, use_errno=True)
        release_r, release_w = os.pipe()  # the bomb's processes wait on it, then exit
        count_r, count_w = os.pipe()  # b"+" per process born, b"E<errno>\n" per refusal
        os.set_blocking(count_r, False)
        deadline, log = time.monotonic() + hold, bytearray()

        def drain():
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(count_r, 65536):
                    log.extend(chunk)

        def spread(top):
            refused, shown = set(), 0
            while time.monotonic() < deadline:
                try:
                    pid = os.fork()
                except OSError as e:
                    name = errno.errorcode.get(e.errno, str(e.errno))
                    if name not in refused:
                        refused.add(name)
                        os.write(count_w, b"E" + name.encode() + b"\n")
                    time.sleep(0.01)
                else:
                    if pid == 0:
                        try:
                            for fd in (release_w, count_r):
                                with contextlib.suppress(OSError):
                                    os.close(fd)
                            os.write(count_w, b"+")
                            spread(False)
                            os.read(release_r, 1)
                        finally:
                            os._exit(0)
                if top and progress is not None:
                    drain()
                    if (born := log.count(b"+")) != shown:
                        progress(shown := born)

        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to be reaped
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                spread(True)
            time.sleep(0.5)
            drain()
        finally:
            os.close(release_w)
            reaped = 0
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, 0):
                    reaped += 1
            libc.prctl(36, 0, 0, 0, 0)
            for fd in (release_r, count_r, count_w):
                os.close(fd)
        refusals = {}
        for line in log.decode().replace("+", "").splitlines():
            refusals[line[1:]] = refusals.get(line[1:], 0) + 1
        return {"born": log.count(b"+"), "refusals": refusals, "reaped": reaped}
    """
)
"""A tree fork bomb that cleans up after itself: every process it makes forks too."""


def fork_bomb_held(evidence: dict, who: str) -> str:
    """Assert the bomb was held at pids_limit; what happened, for a verdict."""
    limit = LIMITS["pids_limit"]
    assert set(evidence["refusals"]) == {"EAGAIN"}, evidence  # refused: the limit
    assert evidence["refusals"]["EAGAIN"] > 1  # the bomb's children were refused too
    assert 20 < evidence["born"] < limit  # the kernel's own threads count too
    assert evidence["reaped"] == evidence["born"]  # every process of the bomb is gone
    assert evidence["again"] == "ok"  # and the kernel can start a process again
    return (
        f"EAGAIN at {evidence['born']} processes forked by {who} (pids_limit {limit}, the"
        f" kernel's threads included), seen by {evidence['refusals']['EAGAIN']} of its processes"
        f" retrying for {HOLD:.0f} s; the kernel lives on"
    )


@pytest.mark.attack("resources", "fork bomb (a process whose every child forks until refused)")
def test_fork_bomb(pair: Pair, no_leftovers, verdict):
    bomb = FORK_BOMB + f"\nimport json\nprint(json.dumps(fork_bomb({HOLD})))\n"
    evidence, before, during = pair.attack(
        f"""
        assert_sandboxed()
        import sys
        ran = subprocess.run([sys.executable, "-I", "-c", {bomb!r}], capture_output=True,
                             text=True, timeout=60)
        evidence = json.loads(ran.stdout) if ran.returncode == 0 else {{"failed": ran.stderr}}
        evidence["again"] = attempt(subprocess.run, ["true"], check=True)[0]
        report(**evidence)
        """,
        timeout=60,
    )
    assert "failed" not in evidence, evidence["failed"]
    held = fork_bomb_held(evidence, "a Python process the kernel started")
    verdict(f"{held}; {pair.responsive(before, during)}")


@pytest.mark.attack("resources", "take every CPU (5 spinning processes)")
def test_cpu_exhaustion(pair: Pair, no_leftovers, verdict):
    spin = 2 * HOLD
    evidence, before, during = pair.attack(
        f"""
        assert_sandboxed()
        import time, warnings
        t0 = os.times()
        deadline, pids = time.monotonic() + {spin}, []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for _ in range(4):
                pid = os.fork()
                if pid == 0:
                    try:
                        while time.monotonic() < deadline:
                            pass
                    finally:
                        os._exit(0)
                pids.append(pid)
        while time.monotonic() < deadline:
            pass
        for pid in pids:
            os.waitpid(pid, 0)
        t1 = os.times()
        used = sum(t1[:4]) - sum(t0[:4])
        report(spinners=len(pids) + 1, cpu_seconds=used, seconds={spin}, cpus=os.cpu_count())
        """
    )
    # from the host: the attacker's cgroup, from 1 s after the start to the spinners' end
    cores, idle, throttled = during.cpu_window(during.sent + 1, during.sent + spin - 0.2)
    limit = LIMITS["cpu_limit"]
    inside = evidence["cpu_seconds"] / evidence["seconds"]
    assert evidence["spinners"] == 5
    assert cores <= 1.2 * limit  # held to its limit: never more
    # and it really spun: it got its limit, unless the host had no CPU left to give
    assert cores >= 0.8 * limit or idle < 0.25, (cores, idle)
    cpus = f"{evidence['cpus']} CPU" + ("s" if evidence["cpus"] != 1 else "")
    held_by = f"the CPU quota (throttled in {throttled} periods)" if throttled else "its CPUs"
    verdict(
        f"held at {cores:.2f} cores by {held_by}, measured from the sandbox's cgroup"
        f" (cpu_limit {limit}; host idle meanwhile {idle:.2f} cores) while 5 processes spun"
        f" for {spin:.0f} s on the {cpus} the sandbox shows (their own count:"
        f" {inside:.2f} CPU-s/s); {pair.responsive(before, during)}"
    )


@pytest.mark.attack("resources", "fork bomb from the kernel process itself (os.fork in a cell)")
def test_fork_bomb_in_the_kernel(pair: Pair, no_leftovers, verdict):
    # Its progress goes to a file in the workspace (the host reads it even if the
    # sandbox dies): output from a forking kernel may not get out in time.
    progress = pair.workspace / "jsb-fork-bomb-progress"
    progress.unlink(missing_ok=True)
    code = FORK_BOMB + textwrap.dedent(
        f"""
        assert_sandboxed()
        def progress(born):  # appended, never rewritten: a kill mid-write loses one line only
            with open({str(progress)!r}, "a") as f:
                f.write(f"{{born}}\\n")
        evidence = fork_bomb({HOLD}, progress=progress)
        evidence["again"] = attempt(subprocess.run, ["true"], check=True)[0]
        report(**evidence)
        """
    )
    msg_id, before, during = pair.launch(code, timeout=60)
    messages = pair.attacker.messages(msg_id, timeout=5)
    if pair.attacker.km.is_alive():
        assert pair.attacker.replied(msg_id)
        held = fork_bomb_held(last_json(output_text(messages)), "the kernel")
        verdict(f"{held}; {pair.responsive(before, during)}")
        return
    # gVisor copies what either side of a fork then writes in 2 MiB units (its private
    # allocation unit), so each copy of a busy kernel costs tens of MiB: the memory
    # limit may end the bomb before pids_limit does. It is stopped still, and told.
    lines = progress.read_text().splitlines() if progress.exists() else []
    reached = max((int(n) for n in lines if n.isdigit()), default=0)
    assert reached >= 3, f"the bomb forked only {reached} processes"  # it really ran
    how = pair.killed_by_memory(messages)
    peak = during.peak_memory / MIB
    idle = before.peak_memory / MIB
    verdict(
        f"the memory limit came first, at {reached} processes, before EAGAIN: {how}."
        f" Each fork of the kernel cost ~{(peak - idle) / reached:.0f} MiB (sandbox"
        f" {idle:.0f} MiB before, {peak:.0f} MiB at its peak): gVisor copies memory written"
        f" after a fork in 2 MiB units; {pair.responsive(before, during)}"
    )


@pytest.mark.attack("resources", "exhaust memory (allocate and touch until stopped)")
def test_memory_exhaustion(pair: Pair, no_leftovers, verdict):
    code = textwrap.dedent(
        """
        assert_sandboxed()
        chunks = []
        while True:
            chunks.append(b"x" * (16 * 2**20))  # touches every page
            print(len(chunks) * 16, flush=True)
        """
    )
    msg_id, before, during = pair.launch(code, timeout=120)
    messages = pair.attacker.messages(msg_id, timeout=5)
    reached = max(printed_numbers(messages), default=0)
    limit = 512
    assert reached >= limit // 2, f"the bomb allocated only {reached} MiB"  # it really ran
    if pair.attacker.km.is_alive():
        # The kernel survived: then Python was refused the memory.
        errors = [m["content"]["ename"] for m in messages if m["msg_type"] == "error"]
        assert errors == ["MemoryError"], output_text(messages)
        how = "MemoryError"
    else:
        how = pair.killed_by_memory(messages)
    peak = during.peak_memory / MIB
    assert peak <= 2 * limit  # the host never let it grow far past the limit
    verdict(
        f"{how}, after {reached} MiB allocated (memory_limit 512M); sandbox cgroup peak"
        f" {peak:.0f} MiB; {pair.responsive(before, during)}"
    )
