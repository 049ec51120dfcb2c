"""Attacks on the tunnel: from the kernel, and from a compromised agent.

Two attackers:

- the kernel itself, ordinary untrusted code (a non-root uid in the guest): it tries
  to kill the agent and to reach the channel the agent holds, in the kernel the
  security suite shares (`target`, from the `security.kit` plugin). Both first
  check that they run in a sandbox (`assert_sandboxed`): PID 1 must never be the
  host's init.
- a compromised agent, the worst case: code inside owns PID 1. Real sandboxes are
  started (of the target's backend, on its image) whose agent is `HOSTILE_AGENT`, a
  script of this test, in place of guest/agent.py (`security.kit.HOSTILE`: test-only
  subclasses of the provisioners; the production code always takes the installed
  agent). It checks its boot id likewise, does the handshake, then writes
  forged frames: an oversized length, an unknown kind, a stream the host never
  opened, frames without end on a stream the host closed, one-shot frames replayed
  without end, a flood of DATA while it never reads, or it just stops reading while
  the clients send.

For each forged case the host (this test process plays the server) must log the
protocol error and stop that sandbox, leave nothing behind (`no_leftovers`, and
none of its ports listening), keep its own memory bounded, and the suite's kernel,
running beside it, must keep answering executes throughout: `target` is the
neighbour there.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import shutil
import socket
import statistics
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT
from jupyter_client.manager import KernelManager
from provisioner.guest.protocol import CHANNELS, WINDOW
from security.kit import HOST_BOOT_ID, HOSTILE, PRELUDE, Target

from provisioner.errors import SandboxError
from provisioner.provisioner import GVisorProvisioner, MicroVMProvisioner, SandboxProvisioner

MAX_RSS_GROWTH = 64 << 20
"""How much the host process may grow while a hostile sandbox does its worst."""
NEIGHBOUR_MAX_RTT = {"gvisor": 5.0, "microvm": 15.0}
"""Seconds the neighbour's slowest execute round trip may take meanwhile (2 cores, one
of them the hostile sandbox's, and a microVM's guest under TCG)."""
VIOLATION_TIMEOUT = 30.0
"""Seconds the host has to log the protocol error once the attack began."""
STOP_TIMEOUT = 15.0
"""Seconds the host has to stop the hostile sandbox once it logged the error."""


# -- the kernel against the agent and its channel ----------------------------------

ROOT_PROCESSES = textwrap.dedent(
    """
    def root_processes():
        '''The guest's user-space processes that run as root: the agent (PID 1).'''
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status") as status:
                    uid = next(line for line in status if line.startswith("Uid:")).split()[1]
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    user_space = bool(cmdline.read(1))  # a kernel thread has no command line
            except (OSError, StopIteration):
                continue
            if uid == "0" and user_space:
                found.append(int(name))
        return sorted(found)
    """
)

KILL_AGENT = (
    PRELUDE
    + ROOT_PROCESSES
    + textwrap.dedent(
        """
        import signal, time
        assert_sandboxed()  # signals to PID 1 must never reach the host's init
        SYS_PTRACE, PTRACE_ATTACH, SYS_PIDFD_OPEN, SYS_PIDFD_SEND_SIGNAL = 101, 16, 434, 424
        agents = root_processes()
        signals, other = {}, {}
        for pid in agents:
            for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP, signal.SIGINT,
                        signal.SIGHUP, signal.SIGQUIT, signal.SIGSEGV, signal.SIGUSR1):
                signals[f"kill({pid}, {sig.name})"] = attempt(os.kill, pid, sig)[0]
            pidfd, error = syscall(SYS_PIDFD_OPEN, pid, 0)
            if pidfd >= 0:
                result, error = syscall(SYS_PIDFD_SEND_SIGNAL, pidfd, int(signal.SIGKILL), None, 0)
                os.close(pidfd)
                signals[f"pidfd_send_signal({pid}, SIGKILL)"] = error or "ok"
            else:
                other[f"pidfd_open({pid})"] = error
            attached = syscall(SYS_PTRACE, PTRACE_ATTACH, pid, 0, 0)[1]
            other[f"ptrace(ATTACH, {pid})"] = attached or "ok"
            other[f"open /proc/{pid}/mem"] = attempt(open, f"/proc/{pid}/mem", "r+b")[0]
        time.sleep(0.5)
        report(uid=os.getuid(), agents=agents, signals=signals, other=other,
               alive={pid: os.path.exists(f"/proc/{pid}") for pid in agents})
        """
    )
)

REACH_CHANNEL = (
    PRELUDE
    + ROOT_PROCESSES
    + textwrap.dedent(
        """
        import fcntl, glob, stat, struct, sys, time
        assert_sandboxed()
        SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438
        # What the host's tunnel would take for a protocol violation, were it to read it.
        FORGED = struct.pack("!BII", 5, 1, 1 << 30) + b"\\n"

        def kind_of(mode):
            for kind, test in (("fifo", stat.S_ISFIFO), ("chr", stat.S_ISCHR),
                               ("sock", stat.S_ISSOCK), ("reg", stat.S_ISREG),
                               ("dir", stat.S_ISDIR)):
                if test(mode):
                    return kind
            return "other"

        def write_nonblocking(fd, data):
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            except OSError as e:
                return errno.errorcode.get(e.errno, str(e))
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                return attempt(os.write, fd, data)[0]
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)

        agents = root_processes()
        listings, agent_fds, getfd = {}, {}, {}
        for pid in agents:
            # Linux keeps /proc/<pid>/fd to those who may ptrace the process; gVisor
            # lists it to anyone, and checks each open against the file's own mode.
            listing = attempt(os.listdir, f"/proc/{pid}/fd")
            listings[f"/proc/{pid}/fd"] = listing[0]
            # fds 0 and 1 even where unlisted: the channel was there, not long ago
            fds = sorted({0, 1, *map(int, listing[1])}) if listing[0] == "ok" else range(8)
            for fd in fds:
                path = f"/proc/{pid}/fd/{fd}"
                link = attempt(os.readlink, path)
                opened = attempt(os.open, path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
                if opened[0] == "ok":
                    os.close(opened[1])
                agent_fds[f"{pid}/{fd}"] = {
                    "link": link[1] if link[0] == "ok" else None, "open": opened[0]}
            pidfd, error = syscall(SYS_PIDFD_OPEN, pid, 0)
            if pidfd < 0:
                getfd[f"pidfd_open({pid})"] = error
                continue
            for fd in range(8):  # take a copy of the agent's fd: needs ptrace rights over it
                copy, error = syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
                if copy >= 0:
                    os.close(copy)
                getfd[f"pidfd_getfd({pid}, {fd})"] = error or "ok"
            os.close(pidfd)

        # A microVM's channel is two virtio-serial ports: their device nodes, by path.
        devices = {}
        for path in sorted(glob.glob("/dev/vport*") + glob.glob("/dev/hvc*")):
            devices[path] = attempt(os.open, path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)[0]

        table = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fd = int(name)
                table[fd] = [kind_of(os.fstat(fd).st_mode), os.readlink(f"/proc/self/fd/{fd}")]
            except OSError:
                continue  # the listing's own fd, closed by now

        # Write the forged frame to fds 0 and 1, to every fd up to 63 that is not open,
        # and to every pipe and device the kernel holds: were one of them the channel,
        # the host would cut the tunnel and this kernel would answer no more. The
        # kernel's own sockets, epolls and files are left alone (a channel end is a
        # pipe under gVisor, a device in a VM).
        written = {}
        for fd in sorted(set(range(64)) | set(table)):
            kind = table.get(fd, ["closed"])[0]
            if fd in (0, 1) or kind in ("closed", "fifo", "chr"):
                written[fd] = write_nonblocking(fd, FORGED)
        sys.stdout.flush()
        time.sleep(1.0)  # what reached this kernel's own output comes before the report
        report(uid=os.getuid(), agents=agents, listings=listings, agent_fds=agent_fds,
               getfd=getfd, devices=devices, table=table, written=written)
        """
    )
)


def errnos(results: dict[str, str]) -> str:
    """'EACCES x18, EPERM x8': how a set of attempts ended."""
    counts = collections.Counter(results.values())
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


@pytest.mark.attack("tunnel", "kernel code signals the agent (PID 1) to kill it")
def test_kernel_cannot_kill_the_agent(target: Target, verdict) -> None:
    evidence = target.run(KILL_AGENT)
    uid, agents = evidence["uid"], evidence["agents"]
    assert uid != 0, "the kernel runs as root"
    assert 1 in agents, f"PID 1 is not a root process of the guest: {agents}"
    refused = {k: v for k, v in evidence["signals"].items() if v != "EPERM"}
    assert not refused, f"signals to the agent not refused with EPERM: {refused}"
    took = {k: v for k, v in evidence["other"].items() if v == "ok"}
    assert not took, f"the kernel got hold of the agent: {took}"
    assert all(evidence["alive"].values()), f"the agent died: {evidence['alive']}"
    after = target.run(PRELUDE + "report(agent=os.path.exists('/proc/1'), uid=os.getuid())")
    assert after == {"agent": True, "uid": uid}
    other = "; ".join(f"{k}: {v}" for k, v in evidence["other"].items())
    who = "PID 1, the guest's only root process" if agents == [1] else f"root processes {agents}"
    verdict(
        f"the kernel (uid {uid}) sent {len(evidence['signals'])} signals to the agent ({who}): "
        f"{errnos(evidence['signals'])}; {other}; the agent lives on and the kernel still "
        "answers through it"
    )


@pytest.mark.attack("tunnel", "kernel code reaches for the channel's fds (/proc/1/fd, fds 0/1/3..)")
def test_kernel_cannot_reach_the_channel(target: Target, verdict) -> None:
    evidence = target.run(REACH_CHANNEL)
    assert evidence["uid"] != 0
    agent_fds, getfd, devices = evidence["agent_fds"], evidence["getfd"], evidence["devices"]
    assert agent_fds, "no agent process found to attack"
    # Only the agent's /dev/null (its fds 0 and 1, the channel moved away) may open.
    reached = {k: v for k, v in agent_fds.items() if v["open"] == "ok" and v["link"] != "/dev/null"}
    assert not reached, f"the kernel opened the agent's fds: {reached}"
    took = {k: v for k, v in {**getfd, **devices}.items() if v == "ok"}
    assert not took, f"the kernel took the agent's fds or the channel's devices: {took}"
    table = {int(fd): (kind, link) for fd, (kind, link) in evidence["table"].items()}
    links = {link for _, link in table.values()}
    # The agent's other fds, where they can be read (gVisor): the channel among them.
    seen = {k: v["link"] for k, v in agent_fds.items() if int(k.split("/")[1]) > 2}
    channel = {
        link
        for link in seen.values()
        if link and not link.startswith(("socket:", "anon_inode:")) and link != "/dev/null"
    }
    assert not channel & links, f"the kernel holds the agent's {channel & links}"
    devices_held = {fd: link for fd, (_, link) in table.items() if "vport" in link or "hvc" in link}
    assert not devices_held, f"the kernel holds a channel device: {devices_held}"
    written = {int(fd): result for fd, result in evidence["written"].items()}
    assert table[0][1] == "/dev/null", f"the kernel's fd 0 is {table[0]}"
    # The forged frame reached no channel: the tunnel is whole and the kernel answers.
    after = target.run(PRELUDE + "report(alive=True)")
    assert after == {"alive": True}
    taken = sorted(fd for fd, result in written.items() if result == "ok")
    kinds = collections.Counter(kind for kind, _ in table.values())
    listings = ", ".join(f"{path}: {result}" for path, result in evidence["listings"].items())
    verdict(
        f"listing {listings}; opening the agent's fds: {by_target(agent_fds)}"
        + (f"; {min(getfd).split('(')[0]}: {errnos(getfd)}" if getfd else "")
        + (f"; the virtio ports: {errnos(devices)}" if devices else "")
        + f". The kernel's {len(table)} fds ({', '.join(f'{n} {k}' for k, n in kinds.items())})"
        + (f" hold neither channel end ({', '.join(sorted(channel))})" if channel else "")
        + (" hold no virtio port" if devices and not channel else "")
        + f"; a forged frame written to its fds {taken} (/dev/null, its own output, the "
        f"console) and {len(written) - len(taken)} others "
        f"({errnos({k: v for k, v in written.items() if v != 'ok'})}) never reached the host: "
        "the kernel still answers"
    )


def by_target(agent_fds: dict[str, dict]) -> str:
    """'/dev/null x2: ok; host:[1], host:[2]: EACCES; socket x8: ENXIO', of the agent's fds."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for fd in agent_fds.values():
        link = fd["link"] or "fd"
        groups[fd["open"]].append("socket" if link.startswith("socket:") else link)
    return "; ".join(
        ", ".join(
            f"{what} x{n}" if n > 1 else what
            for what, n in sorted(collections.Counter(whats).items())
        )
        + f": {result}"
        for result, whats in groups.items()
    )


# -- a compromised agent ------------------------------------------------------------

HOSTILE_AGENT = '''\
"""A compromised agent, for the tunnel's attack tests: not the project's agent.

It does the handshake, then breaks the protocol the way the environment of the
LAUNCH request (JSB_HOSTILE) says, and stays up: the host must stop it.
"""

import json
import os
import struct
import sys
import threading
import time

HEADER = struct.Struct("!BII")
HELLO, LAUNCH, STARTED, OPEN, DATA, CLOSE, CREDIT, SIGNAL, EXIT, ERROR = range(1, 11)
HOST_BOOT_ID = @HOST_BOOT_ID@


def log(text):
    sys.stderr.write(f"hostile agent: {text}\\n")
    sys.stderr.flush()


def frame(kind, stream=0, payload=b""):
    return HEADER.pack(kind, stream, len(payload)) + payload


def write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise EOFError("the host closed the channel")
        data += chunk
    return data


def read_frame():
    kind, stream, length = HEADER.unpack(read_exact(HEADER.size))
    return kind, stream, read_exact(length)


class Host:
    """Reads the host's frames on a thread, noting the streams it opens and closes."""

    def __init__(self):
        self.cond = threading.Condition()
        self.opened = {}  # stream id: channel
        self.closed = set()
        self.deaf = False
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        try:
            while not self.deaf:
                kind, stream, payload = read_frame()
                with self.cond:
                    if kind == OPEN:
                        self.opened[stream] = payload.decode()
                    elif kind == CLOSE:
                        self.closed.add(stream)
                    self.cond.notify_all()
        except (EOFError, OSError) as e:
            log(f"reader: {e}")

    def opens(self, channel):
        """The id of the first stream the host opens to `channel` (the test's client)."""
        with self.cond:
            self.cond.wait_for(lambda: channel in self.opened.values())
            return min(s for s, c in self.opened.items() if c == channel)

    def closes(self, channel):
        """The id of the first stream to `channel`, once the host closed it."""
        sid = self.opens(channel)
        with self.cond:
            self.cond.wait_for(lambda: sid in self.closed)
        return sid


def flood(*frames):
    data = b"".join(frames) * max(1, 65536 // len(b"".join(frames)))
    sent = 0
    try:
        while True:
            write(data)
            sent += len(data)
    except OSError as e:
        log(f"flood stopped after {sent} bytes: {e}")


def main():
    try:
        boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot_id = ""
    if boot_id == HOST_BOOT_ID:  # not in a sandbox: do nothing at all
        write(frame(ERROR, 0, b'{"error": "NOT SANDBOXED"}'))
        return
    write(frame(HELLO, 0, b'{"version": 1}'))
    while True:
        kind, _, payload = read_frame()
        if kind == LAUNCH:
            break
    case = json.loads(payload)["env"].get("JSB_HOSTILE", "")
    log(f"case {case}")
    started = frame(STARTED, 0, b'{"pid": 2}')
    if case == "oversized":  # in the same write as STARTED: the host reads both at once
        write(started + HEADER.pack(DATA, 1, 1 << 30) + b"x" * 4096)
    else:
        write(started)
    if case == "deaf":  # never read the channel again
        log("deaf")
        while True:
            time.sleep(3600)
    host = Host()
    if case == "unknown-kind":
        write(HEADER.pack(99, host.opens("hb"), 0))
    elif case == "unknown-stream":
        write(frame(DATA, host.opens("hb") + 1000, b"x"))
    elif case == "guest-open":  # a stream of its own, which only the host may open
        write(frame(OPEN, host.opens("hb") + 1000, b"shell"))
    elif case == "late":  # the host closed the stream: keep it going without end
        sid = host.closes("stdin")
        flood(frame(DATA, sid, b"z" * 1024), frame(CREDIT, sid, struct.pack("!I", 1)),
              frame(CLOSE, sid))
    elif case == "replay":  # one-shot frames, again and again
        flood(frame(HELLO, 0, b'{"version": 1}'), started, frame(EXIT, 0, b'{"status": 0}'))
    elif case == "flood":  # stop reading the channel, write as fast as it goes
        sid = host.opens("iopub")
        host.deaf = True
        flood(frame(DATA, sid, b"y" * 65536))
    log("done; waiting to be stopped")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
'''.replace("@HOST_BOOT_ID@", repr(HOST_BOOT_ID))


@pytest.fixture(scope="module")
def hostile_agent() -> Iterator[Path]:
    """A folder with the hostile agent.py, readable by a microVM's QEMU (not root)."""
    folder = Path(tempfile.mkdtemp(prefix="jsb-hostile-agent-", dir="/tmp"))
    folder.chmod(0o755)
    agent = folder / "agent.py"
    agent.write_text(HOSTILE_AGENT)
    agent.chmod(0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def rss() -> int:
    """This process's resident memory, in bytes: the server's, here."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Neighbour:
    """The suite's kernel beside the hostile sandbox: executes in a loop on a thread,
    timing each round trip, while another thread samples this process's RSS."""

    def __init__(self, target: Target) -> None:
        self.kc = target.kc
        self.rtts: list[float] = []
        self.errors: list[str] = []
        self.rss_before = rss()
        self.rss_peak = self.rss_before
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._execute, daemon=True),
            threading.Thread(target=self._sample, daemon=True),
        ]

    def execute(self) -> float:
        started = time.monotonic()
        reply = self.kc.execute_interactive("pass", timeout=60, output_hook=lambda _msg: None)
        if reply["content"]["status"] != "ok":
            raise AssertionError(f"the neighbour's execute failed: {reply['content']}")
        return time.monotonic() - started

    def _execute(self) -> None:
        while not self._stop.is_set():
            try:
                self.rtts.append(self.execute())
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                return
            self._stop.wait(0.1)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.rss_peak = max(self.rss_peak, rss())

    def __enter__(self) -> Neighbour:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


class HostLog(logging.Handler):
    """The hostile kernel's provisioner log: its warnings and errors, a count of the rest."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[tuple[float, str]] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        message = record.getMessage()
        self.tail.append(message[:300])
        if record.levelno >= logging.ERROR:
            self.errors.append((time.monotonic(), message))


class Clients:
    """Raw TCP connections to the hostile kernel's ports, as a notebook's would be."""

    def __init__(self, info: dict) -> None:
        self.info = info
        self.sockets: list[socket.socket] = []
        self.sent = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def connect(self, channel: str) -> socket.socket | None:
        """A new connection, or None if the port no longer listens (the tunnel was cut)."""
        try:
            sock = socket.create_connection(("127.0.0.1", self.info[f"{channel}_port"]), 5)
        except ConnectionRefusedError:
            return None
        self.sockets.append(sock)
        return sock

    def push(self, channel: str, connections: int, each: int) -> None:
        """Send `each` bytes on each of `connections` new connections, on a thread."""
        socks = [s for s in (self.connect(channel) for _ in range(connections)) if s]
        chunk = b"q" * 65536

        def run() -> None:
            left = dict.fromkeys(socks, each)
            for sock in socks:
                sock.setblocking(False)
            while left and not self._stop.is_set():
                for sock in list(left):
                    try:
                        n = sock.send(chunk[: left[sock]])
                    except BlockingIOError:
                        continue
                    except OSError:
                        n = left[sock]
                    self.sent += n
                    left[sock] -= n
                    if not left[sock]:
                        del left[sock]
                self._stop.wait(0.005)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        for sock in self.sockets:
            sock.close()


def listening(ports: list[int]) -> list[int]:
    """Those of `ports` that still accept connections on 127.0.0.1."""
    found = []
    for port in ports:
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                found.append(port)
    return found


@dataclasses.dataclass
class Outcome:
    """What the host did about one hostile sandbox, and what it cost the neighbour."""

    backend: str
    case: str
    sandbox_id: str = ""
    start_error: str = ""
    reason: str = ""
    """The protocol error the host logged."""
    violation_after: float | None = None
    """Seconds from the attack's start to the host's error (None: it came before that)."""
    stopped_after: float | None = None
    """Seconds from the host's error to the end of the sandbox's host process."""
    ports_left: list[int] = dataclasses.field(default_factory=list)
    rss_growth: int = 0
    baseline: list[float] = dataclasses.field(default_factory=list)
    during: list[float] = dataclasses.field(default_factory=list)
    after: list[float] = dataclasses.field(default_factory=list)
    neighbour_errors: list[str] = dataclasses.field(default_factory=list)
    log_lines: int = 0
    log_tail: list[str] = dataclasses.field(default_factory=list)
    sent: int = 0
    """Bytes the test's clients sent to the hostile kernel's ports."""
    queued: int = 0
    """The most the host was seen to hold for the guest in its channel's write buffer."""

    def check(self, expected: str) -> None:
        during = sorted(self.during) or [0.0]
        context = (
            f"{self.case} on {self.backend}; neighbour: {len(self.during)} executes, p50 "
            f"{statistics.median(during):.3f} s, max {during[-1]:.3f} s; host RSS "
            f"+{self.rss_growth / 2**20:.1f} MiB; host queue {self.queued / 2**20:.1f} MiB; "
            f"clients sent {self.sent / 2**20:.1f} MiB; start error {self.start_error!r}; "
            f"{self.log_lines} log lines, ending:\n" + "\n".join(self.log_tail)
        )
        assert self.reason, f"no protocol error logged within {VIOLATION_TIMEOUT:.0f} s: {context}"
        assert re.search(expected, self.reason), f"unexpected error {self.reason!r}: {context}"
        if self.start_error:  # the start failed for it, and says so
            assert self.reason in self.start_error, self.start_error
        assert self.stopped_after is not None, f"the sandbox still ran: {context}"
        assert not self.ports_left, f"ports left listening: {self.ports_left}"
        assert self.rss_growth < MAX_RSS_GROWTH, (
            f"the host grew by {self.rss_growth / 2**20:.1f} MiB: {context}"
        )
        assert not self.neighbour_errors, f"the neighbour failed: {self.neighbour_errors}"
        assert self.during, "the neighbour ran no execute beside the hostile sandbox"
        slowest = max(self.during + self.after)
        assert slowest < NEIGHBOUR_MAX_RTT[self.backend], (
            f"the neighbour's execute took {slowest:.2f} s (before: {self.baseline})"
        )

    def summary(self) -> str:
        if self.start_error:
            when = "during the start, which failed and removed the sandbox"
        elif self.violation_after is None:
            when = "before the start returned"
        else:
            when = f"{1000 * self.violation_after:.0f} ms after the attack began"
        stop = (
            ""
            if self.start_error
            else f"; stopped the sandbox {1000 * self.stopped_after:.0f} ms later"
        )
        ms = [1000 * t for t in self.during]
        return (
            f"host logged '{self.reason}' {when}{stop}; nothing left; host RSS "
            f"+{self.rss_growth / 2**20:.1f} MiB; the neighbour answered {len(ms)} executes "
            f"meanwhile (p50 {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms; before "
            f"{1000 * statistics.median(self.baseline):.0f} ms)"
        )


def queued(provisioner: SandboxProvisioner) -> int:
    """What the host holds for the guest, not yet written to the channel (a racy read)."""
    tunnel = provisioner.tunnel
    out = tunnel.out if tunnel is not None else None
    return out.get_write_buffer_size() if out is not None else 0


def run_hostile(
    target: Target,
    agent_dir: Path,
    case: str,
    attack: Callable[[Clients], None] = lambda _clients: None,
) -> Outcome:
    """Start a sandbox with the hostile agent beside the neighbour, let it do `case`, and
    note what the host did about it. `attack` plays the notebook's side."""
    backend = target.backend
    outcome = Outcome(backend, case)
    log = logging.getLogger(f"jsb-hostile.{backend}.{case}.{uuid.uuid4().hex[:6]}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    host_log = HostLog()
    log.addHandler(host_log)
    km = KernelManager(kernel_name=target.kernel_name, autorestart=False, log=log)
    km.kernel_id = str(uuid.uuid4())
    # The kernel manager keeps a provisioner it already has (as on a restart).
    provisioner = HOSTILE[backend](
        kernel_id=km.kernel_id,
        kernel_spec=km.kernel_spec,
        parent=km,
        image=target.image,
        workspace="none",
        env={"JSB_HOSTILE": case},
    )
    provisioner.agent_dir = agent_dir
    km.provisioner = provisioner
    neighbour = Neighbour(target)
    outcome.baseline = [neighbour.execute() for _ in range(3)]
    clients: Clients | None = None
    started = False
    with neighbour:
        begun = time.monotonic()
        try:
            try:
                km.start_kernel()
                started = True
            except SandboxError as e:
                outcome.start_error = str(e)
            outcome.sandbox_id = provisioner.sandbox_id
            info = km.get_connection_info()
            if started:
                begun = time.monotonic()
                clients = Clients(info)
                attack(clients)
            deadline = begun + VIOLATION_TIMEOUT
            while not host_log.errors and time.monotonic() < deadline:
                outcome.queued = max(outcome.queued, queued(provisioner))
                time.sleep(0.05)
            if host_log.errors:
                at, message = host_log.errors[0]
                assert outcome.sandbox_id in message, message
                outcome.reason = message.split(": ", 1)[1].removesuffix("; closing its tunnel")
                outcome.violation_after = at - begun if started and at >= begun else None
                sandbox = provisioner.sandbox
                if sandbox is None:  # the start failed, and removed the sandbox
                    outcome.stopped_after = max(0.0, time.monotonic() - at)
                else:
                    while sandbox.poll() is None and time.monotonic() < at + STOP_TIMEOUT:
                        time.sleep(0.05)
                    if sandbox.poll() is not None:
                        outcome.stopped_after = time.monotonic() - at
        finally:
            if clients is not None:
                outcome.sent = clients.sent
                clients.close()
            # What a server does with a kernel that died: shut it down, free its ports.
            if started:
                km.shutdown_kernel(now=True)
            else:
                km.cleanup_resources()
            log.removeHandler(host_log)
    outcome.ports_left = listening([info[f"{c}_port"] for c in CHANNELS])
    outcome.during = neighbour.rtts
    outcome.neighbour_errors = neighbour.errors
    outcome.after = [neighbour.execute() for _ in range(3)]
    outcome.rss_growth = neighbour.rss_peak - neighbour.rss_before
    outcome.log_lines = host_log.lines
    outcome.log_tail = list(host_log.tail)
    return outcome


@pytest.mark.attack("tunnel", "compromised agent: a frame length of 1 GiB, with its STARTED")
def test_oversized_frame_length(target: Target, hostile_agent: Path, no_leftovers, verdict) -> None:
    outcome = run_hostile(target, hostile_agent, "oversized")
    outcome.check(r"protocol violation from the guest: frame of 1073741824 bytes exceeds 65536")
    verdict(outcome.summary())


@pytest.mark.attack("tunnel", "compromised agent: an unknown frame kind (99)")
def test_unknown_frame_kind(target: Target, hostile_agent: Path, no_leftovers, verdict) -> None:
    outcome = run_hostile(target, hostile_agent, "unknown-kind", lambda c: c.connect("hb"))
    outcome.check(r"protocol violation from the guest: unknown frame kind 99")
    verdict(outcome.summary())


@pytest.mark.attack(
    "tunnel", "compromised agent: streams the host never opened (DATA on an unknown id, an OPEN)"
)
def test_streams_the_host_never_opened(
    target: Target, hostile_agent: Path, no_leftovers, verdict
) -> None:
    unknown = run_hostile(target, hostile_agent, "unknown-stream", lambda c: c.connect("hb"))
    unknown.check(r"protocol violation from the guest: DATA for stream \d+ never opened")
    opened = run_hostile(target, hostile_agent, "guest-open", lambda c: c.connect("hb"))
    opened.check(r"protocol violation from the guest: frame kind OPEN not allowed")
    verdict(f"unknown id: {unknown.summary()}. OPEN: {opened.summary()}")


def close_a_stream(clients: Clients) -> None:
    clients.connect("stdin")
    time.sleep(0.3)
    clients.sockets.pop().close()  # the host sends CLOSE


@pytest.mark.attack("tunnel", "compromised agent: frames without end on a stream the host closed")
def test_frames_on_a_closed_stream(
    target: Target, hostile_agent: Path, no_leftovers, verdict
) -> None:
    outcome = run_hostile(target, hostile_agent, "late", close_a_stream)
    outcome.check(r"protocol violation from the guest: .* after it closed")
    verdict(outcome.summary())


@pytest.mark.attack("tunnel", "compromised agent: HELLO, STARTED and EXIT replayed without end")
def test_one_shot_frames_replayed(
    target: Target, hostile_agent: Path, no_leftovers, verdict
) -> None:
    outcome = run_hostile(target, hostile_agent, "replay")
    outcome.check(r"protocol violation from the guest: a second (HELLO|STARTED|EXIT)")
    verdict(f"{outcome.summary()}; {outcome.log_lines} log lines in all")


def flood_both_ways(clients: Clients) -> None:
    clients.connect("iopub")  # the agent floods this stream; its client never reads
    time.sleep(0.3)
    clients.push("shell", connections=24, each=WINDOW)  # while the agent never reads


def push_to_a_deaf_guest(clients: Clients) -> None:
    clients.push("shell", connections=48, each=WINDOW)


@pytest.mark.attack("tunnel", "compromised agent: a flood of DATA, never reading its channel")
def test_flood_without_reading(target: Target, hostile_agent: Path, no_leftovers, verdict) -> None:
    flood = run_hostile(target, hostile_agent, "flood", flood_both_ways)
    flood.check(r"protocol violation from the guest: stream \d+ sent beyond its credit window")
    # Deaf only: the notebook's clients keep sending, and the host may queue no more than
    # MAX_UNREAD (8 MiB) for the guest. Each client sends the credit of its stream, and
    # 24 MiB in all: a VM's serial port and QEMU take up to a few MiB off the queue.
    deaf = run_hostile(target, hostile_agent, "deaf", push_to_a_deaf_guest)
    deaf.check(r"the guest stopped reading its channel \(8388608 bytes queued\)")
    verdict(
        f"flooding: {flood.summary()}. Deaf to 48 clients sending {deaf.sent / 2**20:.0f} "
        f"MiB: {deaf.summary()}"
    )


class _GreedyLaunch:
    """Mixin: the server's side of the channel (a user's own server, in service mode)
    adds to the kernel's LAUNCH what only the sandbox's maker may choose."""

    def _launch_request(self, cmd: list[str], env: dict[str, str], cwd: str) -> dict:
        request = super()._launch_request(cmd, env, cwd)  # type: ignore[misc]
        return {**request, "uid": 0, "gid": 0, "rlimits": {"nproc": 10**6, "nofile": 10**6}}


class GreedyGVisor(_GreedyLaunch, GVisorProvisioner):
    pass


class GreedyMicroVM(_GreedyLaunch, MicroVMProvisioner):
    pass


GREEDY = {"gvisor": GreedyGVisor, "microvm": GreedyMicroVM}
KERNEL_USER = PRELUDE + textwrap.dedent(
    """
    import resource
    report(uid=os.getuid(), gid=os.getgid(), groups=os.getgroups(),
           nproc=resource.getrlimit(resource.RLIMIT_NPROC),
           nofile=resource.getrlimit(resource.RLIMIT_NOFILE))
    """
)


@pytest.mark.attack(
    "tunnel", "the channel's holder asks the agent for a root kernel and higher rlimits"
)
def test_launch_cannot_choose_the_kernels_user_or_limits(
    target: Target, workspace: Path, no_leftovers, verdict
) -> None:
    km = KernelManager(kernel_name=target.kernel_name, autorestart=False)
    km.kernel_id = str(uuid.uuid4())
    km.provisioner = GREEDY[target.backend](
        kernel_id=km.kernel_id,
        kernel_spec=km.kernel_spec,
        parent=km,
        image=target.image,
        pids_limit=128,
    )
    km.start_kernel(cwd=str(workspace))
    try:
        greedy = Target(target.backend, km, km.client(), workspace, image=target.image)
        greedy.kc.start_channels()
        greedy.kc.wait_for_ready(timeout=READY_TIMEOUT)
        seen = greedy.run(KERNEL_USER)
        greedy.kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    owner = workspace.stat()
    assert (seen["uid"], seen["gid"], seen["groups"]) == (owner.st_uid, owner.st_gid, [])
    assert seen["nproc"] == [128, 128] and seen["nofile"] == [4096, 4096]
    verdict(
        f"LAUNCH asked for uid 0, gid 0 and 10^6 processes and files; the kernel ran as "
        f"uid {seen['uid']} gid {seen['gid']} (the workspace's owner, fixed when the sandbox "
        f"was made) with nproc {seen['nproc'][0]} and nofile {seen['nofile'][0]}"
    )
