"""The guest agent: PID 1 of every sandbox.

It speaks the tunnel protocol on its stdin/stdout (the sandbox's byte channel),
or, in a Kubernetes pod (JSB_LISTEN set), on one TLS connection it accepts on the
pod's network (`listen_tls`); takes the kernel's launch as a LAUNCH message, starts
the kernel as an unprivileged user with a guest-side connection file (ipc
transport: no network needed inside), joins each stream the host opens to the
kernel's matching ipc socket, delivers signals, and exits with the kernel's exit
status.

Stdlib only; runs on its own Python (layout.AGENT_PYTHON), never the image's. Logs go
to stderr, which the host reads into its own log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import warm_kernel
from layout import CLAIM_DIR, CLAIMED, KERNEL_WRITABLE, WARM_ENV, WARM_USER_ENV
from protocol import (
    CHANNELS,
    FROM_HOST,
    MAX_CONTROL_PAYLOAD,
    VERSION,
    Frame,
    FrameReader,
    Kind,
    ProtocolError,
    encode,
    encode_json,
)
from streams import Mux, Stream

RUNTIME_DIR = Path("/run/kernel")
CONNECTION_FILE = RUNTIME_DIR / "connection.json"
WARM_SCRIPT = str(Path(__file__).parent / "warm_kernel.py")
LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWPID = 0x20000000
PR_SET_DUMPABLE = 4
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MAX_CLAIM = 64 << 10
"""Bound of each file of a claim (`read_claim`): a kernel's user and a few folders."""

KERNEL_INIT = (Path(__file__).parent / "kernel_init.py").read_bytes()
"""kernel_init.py, read now: a microVM unmounts the agent's folder before the launch."""
START_TIMEOUT = 30.0
"""Seconds kernel_init gets to start the kernel (it needs milliseconds)."""
CONNECT_TIMEOUT = 120.0
"""How long a stream waits for the kernel to bind its socket."""
TOKEN_BYTES = 32
"""The per-kernel token a TLS client sends first (`listen_tls`): its proof of being the
kernel's owner, beside the certificate that proves to it that this is its kernel."""
AUTH_TIMEOUT = 10.0
"""Seconds a TLS client gets to complete its handshake and send the token."""


def oom_kills() -> int:
    """How often the (guest) kernel's OOM killer struck so far; 0 where it does not say."""
    try:
        with open("/proc/vmstat") as vmstat:
            for line in vmstat:
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def log(msg: str) -> None:
    sys.stderr.write(f"agent: {msg}\n")
    sys.stderr.flush()


def kernel_user(value: str | None = None) -> tuple[int, int, dict[int, int]]:
    """The kernel's uid, gid and rlimits, from `value` or JSB_KERNEL ("uid,gid,nproc,nofile").

    Whoever made the sandbox set it (the VM's kernel command line, a pod's env, or for
    gVisor the host's claim: `read_claim`); LAUNCH never does, for whoever holds the
    channel writes LAUNCH, and a kernel of another uid or gid could leave that user's
    files (setuid ones too) in a workspace on the host.
    """
    try:
        text = os.environ["JSB_KERNEL"] if value is None else value
        uid, gid, nproc, nofile = (int(n) for n in text.split(","))
    except (KeyError, ValueError):
        raise ValueError("the sandbox did not say which user the kernel runs as") from None
    if uid <= 0 or gid <= 0:
        raise ValueError(f"the kernel may not run as uid {uid}, gid {gid}")
    limits = {resource.RLIMIT_NOFILE: nofile}
    if nproc > 0:
        limits[resource.RLIMIT_NPROC] = nproc
    return uid, gid, limits


def _claim_file(name: str) -> str:
    with open(Path(CLAIM_DIR, name), encoding="utf-8") as f:
        return f.read(MAX_CLAIM)


def read_claim() -> tuple[str, dict]:
    """What the host wrote into `CLAIM_DIR` when a kernel claimed this sandbox: the
    kernel's JSB_KERNEL, and its folders (attached by the host at `CLAIM_DIR`/<n>, already
    read-only, nosuid, nodev and idmapped as they must be on the host) with their places,
    for kernel_init to mount in the kernel's own mount namespace (`mount_folders`).

    Every gVisor sandbox starts before it knows its kernel, so that a warm one and a fresh
    one are the same. The host wrote all of this before anyone could send LAUNCH; it is
    checked all the same.
    """
    kernel = _claim_file("kernel").strip()
    places = json.loads(_claim_file("mounts.json"))
    if not isinstance(places, list):
        raise ValueError("the claim's mounts are not a list")
    mounts = []
    for index, place in enumerate(places):
        destination, read_only = place["destination"], place["read_only"]
        if (not isinstance(destination, str) or not destination.startswith("/")
                or ".." in Path(destination).parts or type(read_only) is not bool):  # fmt: skip
            raise ValueError(f"the claim names a folder at {destination!r}")
        mounts.append({"source": f"{CLAIM_DIR}/{index}", "destination": destination,
                       "read_only": read_only})  # fmt: skip
    return kernel, {"folder": CLAIM_DIR, "mounts": mounts}


def cover(folder: str) -> None:
    """An empty read-only tmpfs over `folder` (the claim folder, with the kernel's folders
    in it), in the agent's mount namespace: a link that code run before the claim left
    where the agent writes (/tmp, /run/kernel) cannot lead the agent, root, into them.
    kernel_init uncovers it in the kernel's namespace to mount them."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if LIBC.mount(b"none", folder.encode(), b"tmpfs", flags, b"size=4k,mode=0755") != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cover {folder}: {os.strerror(errno)}")


def write_connection_file(data: bytes, uid: int, gid: int) -> None:
    """Write `CONNECTION_FILE` (mode 0400) in `RUNTIME_DIR` (0700), both the kernel's.

    Through descriptors, never following a link: in a warm pool's sandbox the image's code
    has run before the launch (as the kernel's user); had it left a link at either path,
    a root agent would have given its target to the kernel's user. A root agent refuses a
    folder there that root did not make (the kernel does not start). An agent that is not
    root (a pod's, already the kernel's user) gives nothing away: its folder may be a
    volume the kubelet made."""
    with contextlib.suppress(FileExistsError):
        RUNTIME_DIR.mkdir(0o700)
    folder = os.open(RUNTIME_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.geteuid() == 0:
            if os.fstat(folder).st_uid != 0:
                raise OSError(f"{RUNTIME_DIR} was made by someone else before the launch")
            os.fchmod(folder, 0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        file = os.open(CONNECTION_FILE.name, flags, 0o400, dir_fd=folder)
        try:
            os.write(file, data)
            if os.geteuid() == 0:
                os.fchown(file, uid, gid)
        finally:
            os.close(file)
        if os.geteuid() == 0:
            os.fchown(folder, uid, gid)
    finally:
        os.close(folder)


def writable_folders() -> None:
    """Make `KERNEL_WRITABLE` writable for the kernel (1777), in this sandbox's own layer."""
    for folder in KERNEL_WRITABLE:
        try:
            Path(folder).mkdir(mode=0o755, parents=True, exist_ok=True)
            Path(folder).chmod(0o1777)
        except OSError as e:
            log(f"cannot make {folder} writable for the kernel: {e}")


class Agent(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = FrameReader(FROM_HOST, max_payload=MAX_CONTROL_PAYLOAD)
        self.out: asyncio.WriteTransport | None = None
        self.mux = Mux(self.send)
        self.kernel_pid: int | None = None
        self.kernel_exit = self.loop.create_future()
        self.launched = asyncio.Event()
        self.launch: dict = {}
        self.done = self.loop.create_future()
        self.oom_kills_at_start = 0
        self.warm_init: tuple[subprocess.Popen, socket.socket] | None = None
        """kernel_init holding the warm kernel process (a gVisor pool's sandbox: `WARM_ENV`)."""

    def send(self, frame: bytes) -> None:
        assert self.out is not None
        if not self.out.is_closing():
            self.out.write(frame)

    # -- channel input ----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self.reader.feed(data):
                self.on_frame(frame)
        except ProtocolError as e:
            log(f"protocol error from host: {e}")
            self.finish(70)

    def eof_received(self) -> bool:
        self.finish(0)  # the host let go: nothing may outlive it
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish(0)

    def on_frame(self, frame: Frame) -> None:
        if frame.kind is Kind.LAUNCH:
            if not self.launched.is_set():
                self.launch = frame.json()
                self.launched.set()
        elif frame.kind is Kind.OPEN:
            self.open_stream(frame.stream, frame.payload.decode("ascii", "replace"))
        elif frame.kind is Kind.SIGNAL:
            self.signal_kernel(frame.i32())
        else:
            self.mux.on_frame(frame)

    # -- kernel -----------------------------------------------------------

    async def start_kernel(self) -> None:
        spec = self.launch
        claim = None
        if os.environ.get("JSB_KERNEL") == CLAIMED:
            os.environ["JSB_KERNEL"], claim = read_claim()
            cover(CLAIM_DIR)  # nothing the agent writes from here on can land in a folder
        uid, gid, rlimits = kernel_user()
        if os.geteuid() == 0:
            writable_folders()
        connection = dict(spec["connection"])
        connection.update(
            transport="ipc",
            ip=str(RUNTIME_DIR / "kernel"),
            **{f"{name}_port": n for n, name in enumerate(CHANNELS, 1)},
        )
        connection_file = CONNECTION_FILE
        write_connection_file(json.dumps(connection).encode(), uid, gid)
        argv = [arg.replace("{connection_file}", str(connection_file)) for arg in spec["argv"]]
        launch = {
            "argv": argv, "env": spec["env"], "cwd": spec["cwd"], "uid": uid, "gid": gid,
            "rlimits": list(rlimits.items()), "connection_file": str(connection_file),
        }  # fmt: skip
        if claim is not None:
            launch["claim"] = claim

        self.oom_kills_at_start = oom_kills()
        if self.warm_init is not None:  # gVisor's pool: kernel_init holds the warm process
            python = os.environ.get(WARM_ENV, "")
            launch["warm"] = warm_kernel.wanted(python, spec["argv"], spec["env"])
            self.kernel_pid = self.launch_init(*self.warm_init, launch)
        else:
            warm = warm_kernel.find()  # a microVM's, from its snapshot
            if warm is not None and warm.accepts(spec["argv"], spec["env"]):
                try:
                    warm.hand_over(launch)
                    self.kernel_pid = warm.pid
                except OSError as e:  # e.g. a folder only root may enter: as Popen does
                    log(f"the warm kernel process could not be the kernel ({e}); starting one")
            if self.kernel_pid is None:
                if warm is not None:
                    warm.discard()
                self.kernel_pid = self.spawn(launch)
        self.reap_children()  # in case it ended before the handler could see it

    def spawn(self, launch: dict) -> int:
        """Start the kernel afresh as its user, in a PID namespace of its own; the pid of
        that namespace's init (kernel_init.py), which passes signals on and exits as the
        kernel does. The kernel sees none of this sandbox's processes but its own.

        An agent that is not root (a Kubernetes pod under Pod Security `restricted` runs
        every process as the kernel's user) can neither change user nor make namespaces:
        it starts the kernel as its own child (`spawn_as_self`)."""
        if os.geteuid() != 0:
            return Agent.spawn_as_self(launch)
        return self.launch_init(*self.start_init(), launch)

    @staticmethod
    def start_init(*warm: str) -> tuple[subprocess.Popen, socket.socket]:
        """Start kernel_init as the first process of a new PID namespace, and its control
        socket. `warm` (the kernel's Python, warm_kernel.py, the connection file, the claim
        folder, the kernel's user as JSON): it starts the warm kernel process at once, to
        hand it the launch when it comes, and hides the claim folder from it until then."""
        if LIBC.unshare(CLONE_NEWPID) != 0:  # for our children: kernel_init is their PID 1
            errno = ctypes.get_errno()
            raise OSError(errno, f"unshare the PID namespace: {os.strerror(errno)}")
        ours, theirs = socket.socketpair()
        try:
            # "kernel_init" names it in `ps` (its code comes on stdin)
            argv = [sys.executable, "-I", "-S", "-B", "-", "kernel_init", str(theirs.fileno())]
            init = subprocess.Popen(
                [*argv, *(("warm", *warm) if warm else ())],
                stdin=subprocess.PIPE,
                stdout=sys.stderr,
                stderr=sys.stderr,
                pass_fds=(theirs.fileno(),),
                env={},  # its /proc/1/environ: nothing
                cwd="/",
                start_new_session=True,
            )
        finally:
            theirs.close()
        assert init.stdin is not None
        init.stdin.write(KERNEL_INIT)
        init.stdin.close()
        if warm:  # its mount namespace must be made before the agent covers the claim
            ours.settimeout(START_TIMEOUT)
            if ours.recv(len(b"ready\n"), socket.MSG_WAITALL) != b"ready\n":
                init.kill()
                init.wait()
                ours.close()
                raise OSError("kernel_init did not get ready")
        return init, ours

    @staticmethod
    def launch_init(init: subprocess.Popen, ours: socket.socket, launch: dict) -> int:
        """Hand `launch` to kernel_init; its pid once it started the kernel, else OSError."""
        with ours:
            ours.settimeout(START_TIMEOUT)
            ours.sendall(json.dumps(launch).encode() + b"\n")
            ours.shutdown(socket.SHUT_WR)
            answer = ours.recv(4096).decode(errors="replace")
        if answer != "ok":
            raise OSError(answer or "kernel_init ended")
        return init.pid

    @staticmethod
    def spawn_as_self(launch: dict) -> int:
        """Start the kernel as this agent's own child, in a session of its own: for an
        agent that already runs as the kernel's user and may not change it. It holds none
        of the agent's descriptors; the pod's no_new_privs and dropped capabilities were
        set by the runtime before the agent started."""
        uid, gid = launch["uid"], launch["gid"]
        if (os.getuid(), os.getgid()) != (uid, gid):
            raise OSError(f"the agent runs as {os.getuid()}:{os.getgid()}, not as the "
                          f"kernel's user {uid}:{gid}, and is not root")  # fmt: skip

        def limit() -> None:
            os.umask(0o077)
            for which, value in launch["rlimits"]:
                resource.setrlimit(which, (value, value))

        kernel = subprocess.Popen(
            launch["argv"],
            env=launch["env"],
            cwd=launch["cwd"],
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            stderr=sys.stderr,
            start_new_session=True,
            preexec_fn=limit,  # the agent runs no threads: safe before exec
        )
        return kernel.pid

    def reap_children(self) -> None:
        """As PID 1, collect every exited process: orphans too, or they pile up as zombies."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.kernel_pid:
                code = os.waitstatus_to_exitcode(status)
                if not self.kernel_exit.done():
                    # a shell's convention: 128 + signal number for a killed kernel
                    self.kernel_exit.set_result(128 - code if code < 0 else code)

    def signal_kernel(self, signum: int) -> None:
        if self.kernel_pid is None or self.kernel_exit.done():
            return
        try:
            os.killpg(self.kernel_pid, signum)
        except (OSError, ValueError) as e:
            log(f"signal {signum} not delivered: {e}")

    # -- streams ----------------------------------------------------------

    def open_stream(self, sid: int, channel: str) -> None:
        if channel not in CHANNELS:
            self.send(encode(Kind.CLOSE, sid))
            return
        stream = Stream(self.mux, sid)
        self.mux.add(stream)
        port = CHANNELS.index(channel) + 1
        self.loop.create_task(self.connect(stream, RUNTIME_DIR / f"kernel-{port}"))

    async def connect(self, stream: Stream, path: Path) -> None:
        deadline = self.loop.time() + CONNECT_TIMEOUT
        while not stream.closed:
            try:
                await self.loop.create_unix_connection(lambda: stream, str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if self.loop.time() > deadline or (self.kernel_exit.done()):
                    break
                await asyncio.sleep(0.02)
            except OSError as e:
                log(f"cannot connect to {path}: {e}")
                break
        stream.connection_lost(None)  # tells the host the stream is gone

    # -- life -------------------------------------------------------------

    def finish(self, status: int) -> None:
        if not self.done.done():
            self.done.set_result(status)

    async def over_pipes(self, tunnel_in: int, tunnel_out: int) -> None:
        """Take the channel on two pipe ends (the sandbox's stdin and stdout)."""
        loop = self.loop
        self.out, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(tunnel_out, "wb", buffering=0)
        )
        await loop.connect_read_pipe(lambda: self, os.fdopen(tunnel_in, "rb", buffering=0))

    async def run(self, open_channel: Callable[[Agent], Awaitable[None]]) -> int:
        loop = self.loop
        await open_channel(self)
        python = os.environ.get(WARM_ENV, "")
        if python and os.geteuid() == 0:
            try:
                # The pool's shape names the kernel's user: the same for any kernel of it.
                uid, gid, rlimits = kernel_user(os.environ.get(WARM_USER_ENV, ""))
                user = json.dumps({"uid": uid, "gid": gid, "rlimits": list(rlimits.items())})
                warm = (python, WARM_SCRIPT, str(CONNECTION_FILE), CLAIM_DIR, user)
                self.warm_init = self.start_init(*warm)
            except (OSError, ValueError) as e:
                log(f"no warm kernel process: {e}")
        self.send(encode_json(Kind.HELLO, {"version": VERSION}))
        launched = loop.create_task(self.launched.wait())
        await asyncio.wait([launched, self.done], return_when=asyncio.FIRST_COMPLETED)
        if self.done.done():
            return self.done.result()
        loop.add_signal_handler(signal.SIGCHLD, self.reap_children)
        try:
            await self.start_kernel()
        except (OSError, KeyError, TypeError, ValueError, subprocess.SubprocessError) as e:
            self.send(encode_json(Kind.ERROR, {"error": f"cannot start the kernel: {e}"}))
            await self.drain()
            return 127
        self.send(encode_json(Kind.STARTED, {"pid": self.kernel_pid}))
        await asyncio.wait([self.kernel_exit, self.done], return_when=asyncio.FIRST_COMPLETED)
        if not self.kernel_exit.done():  # the host went away: take the kernel down with us
            self.signal_kernel(signal.SIGKILL)
            await self.kernel_exit
            return self.done.result()
        status = self.kernel_exit.result()
        self.mux.close_all()
        # In a VM the guest kernel's own OOM killer may have ended the kernel.
        oom_killed = status == 128 + signal.SIGKILL and oom_kills() > self.oom_kills_at_start
        self.send(encode_json(Kind.EXIT, {"status": status, "oom_killed": oom_killed}))
        await self.drain()
        return status

    async def drain(self) -> None:
        """Let queued frames reach the host before the sandbox goes away."""
        assert self.out is not None
        for _ in range(200):
            if self.out.is_closing() or self.out.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.01)


class _Gate(asyncio.Protocol):
    """A TLS client's connection until it proved itself: TOKEN_BYTES bytes equal to the
    kernel's token, within AUTH_TIMEOUT. Then the connection is the agent's channel;
    anything else is closed without a word (the NetworkPolicy should have kept the
    client out already: this holds where the cluster does not enforce it)."""

    def __init__(self, agent: Agent, token: bytes, taken: asyncio.Future[None]) -> None:
        self.agent, self.token, self.taken = agent, token, taken
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(AUTH_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.timer is not None
        self.buffer += data[: TOKEN_BYTES + MAX_CONTROL_PAYLOAD]
        if len(self.buffer) < TOKEN_BYTES:
            return
        self.timer.cancel()
        proof, rest = self.buffer[:TOKEN_BYTES], self.buffer[TOKEN_BYTES:]
        if self.taken.done() or not hmac.compare_digest(proof, self.token):
            log("refused a TLS client without the kernel's token")
            self.transport.abort()
            return
        self.transport.set_protocol(self.agent)
        self.agent.out = self.transport
        self.taken.set_result(None)
        if rest:
            self.agent.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


def listen_tls(port: int, tls_dir: Path) -> Callable[[Agent], Awaitable[None]]:
    """The channel as one TLS connection on the pod's network (Kubernetes): listen on
    `port` with the kernel's own certificate (`tls_dir`/tls.crt, tls.key), take the first
    client that sends the kernel's token (`tls_dir`/token) as the channel, and stop
    listening. The host connects to the pod, never the reverse: the API server is not
    in the channel's path (docs/kubernetes.md says why)."""

    async def open_channel(agent: Agent) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
        token = (tls_dir / "token").read_bytes().strip()
        taken = agent.loop.create_future()
        server = await agent.loop.create_server(
            lambda: _Gate(agent, bytes.fromhex(token.decode()), taken), port=port, ssl=context,
            ssl_handshake_timeout=AUTH_TIMEOUT, reuse_address=True,
        )  # fmt: skip
        try:
            await taken
        finally:
            server.close()  # nobody else gets in; the channel's connection stays open

    return open_channel


def main() -> None:
    # Keep the channel out of reach of the kernel: move it off fds 0/1 (os.dup's
    # copies are not inherited) and leave /dev/null in their place.
    tunnel_in, tunnel_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    # Nothing of ours to the kernel's user through /proc or ptrace, whatever its uid.
    if LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot make the agent undumpable")
    listen = os.environ.get("JSB_LISTEN", "")
    if listen:
        open_channel = listen_tls(int(listen), Path(os.environ["JSB_TLS_DIR"]))
    else:

        async def open_channel(agent: Agent) -> None:
            await agent.over_pipes(tunnel_in, tunnel_out)

    async def run() -> int:
        return await Agent().run(open_channel)

    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
