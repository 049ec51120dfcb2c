"""The tunnel's host end: the kernel's five ports on 127.0.0.1, carried over one channel.

Runs on the shared I/O loop (see `ioloop`). Each TCP connection a client makes
to one of the ports becomes a stream; the guest agent joins it to the kernel's
socket of the same channel. ZMTP passes through untouched, so HMAC signing and
CurveZMQ work end to end.

The guest is hostile: every frame is validated (kind, size, stream id, credit),
buffers are bounded by the protocol's windows, and a violation closes this one
tunnel and reports it, never more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial

from .guest.protocol import (
    CHANNELS,
    FROM_GUEST,
    I32,
    MAX_GUEST_CONTROL,
    VERSION,
    Frame,
    FrameReader,
    Kind,
    ProtocolError,
    encode,
    encode_json,
)
from .guest.streams import Mux, Stream
from .notices import IopubFollower, Requests, stderr_notice

MAX_STREAMS = 64
"""Concurrent client connections per kernel; more are refused."""
EXPLAIN_TRIES, EXPLAIN_INTERVAL = 10, 0.05
"""How long a closed channel waits for a limit's trace before it is taken as no limit's doing."""
MAX_UNREAD = 8 * 1024 * 1024
"""Bytes queued for a guest that does not read its channel before it counts as broken."""
CONNECT_TIMEOUT = 30.0
"""Seconds a TLS handshake with an agent on the network may take (`connect`)."""


_GUEST_JSON = frozenset({Kind.HELLO, Kind.STARTED, Kind.EXIT, Kind.ERROR})


def reserve(ip: str, ports: dict[str, int]) -> dict[str, socket.socket]:
    """Listen on each channel's port on `ip` (0: any free one), accepting nothing yet.

    Held from before the sandbox starts until `Tunnel.listen` serves them, the
    ports cannot be taken meanwhile by another kernel or server (they would be
    chosen, then bound, seconds later otherwise); a client that connects early
    waits in the backlog. Raises TunnelError naming a port that is taken.
    """
    bound: dict[str, socket.socket] = {}
    try:
        for channel in CHANNELS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            bound[channel] = sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((ip, ports[channel]))
                sock.listen(100)  # bound but not listening, another SO_REUSEADDR bind could win
            except OSError as e:
                raise TunnelError(
                    f"cannot listen on {ip}:{ports[channel]} for {channel}: {e.strerror or e}"
                ) from None
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound


ACCEPT_BATCH = 32
"""Connections taken per wake-up: a client connecting in a loop cannot hog the I/O loop."""
ACCEPT_PAUSE = 1.0
"""Seconds a port is not watched after accept() failed for want of descriptors or memory."""


class TunnelError(RuntimeError):
    """The guest did not come up, or broke the protocol."""


class _ClientStream(Stream):
    """A client's TCP connection to one of the kernel's ports."""

    def __init__(self, tunnel: Tunnel, sid: int, channel: str) -> None:
        super().__init__(tunnel.mux, sid)
        self.tunnel = tunnel
        self.channel = channel
        self.follower = IopubFollower() if channel == "iopub" else None
        shell = channel == "shell"
        requests, signing = tunnel.requests, tunnel.signing
        self.requests = IopubFollower(partial(requests.sent, sid), signing) if shell else None
        """Follows what the client asks on shell (signed requests only: the kernel drops
        the others unanswered), replies too: which cell the kernel runs."""
        self.replies = IopubFollower(partial(requests.answered, sid)) if shell else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.tunnel.send(encode(Kind.OPEN, self.sid, self.channel.encode()))

    def data_received(self, data: bytes) -> None:
        if self.requests is not None:
            self.requests.feed(data)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.requests is not None:
            self.tunnel.requests.forget(self.sid)
        super().connection_lost(exc)

    def peer_data(self, payload: bytes) -> None:
        super().peer_data(payload)
        if self.follower is not None:
            self.follower.feed(payload)
        elif self.replies is not None:
            self.replies.feed(payload)

    def peer_closed(self) -> None:
        if self.follower is not None and not self.tunnel.closed:
            # The kernel's iopub socket went away (it exited). Hold the client's
            # connection until the exit is explained: the notebook may need telling.
            self._flush_local()
            self.closed = True
            self.tunnel.held.append(self)
            return
        super().peer_closed()

    def tell(self, text: str, key: bytes, signature_scheme: str, parent: bytes = b"") -> bool:
        """Send `text` to the client's stderr after all the kernel sent, and close.

        `parent`: the header of the request it answers; by default, the one the kernel's
        last message on this connection answered.

        Returns False where no whole message can be added (gone, or cut mid-message).
        """
        follower, transport = self.follower, self.transport
        self._flush_local()
        told = (
            follower is not None
            and transport is not None
            and not transport.is_closing()
            and follower.at_boundary
        )
        if told:
            parent = parent or follower.parent
            transport.write(stderr_notice(text, parent, key, signature_scheme))
        self.release()
        return told

    def release(self) -> None:
        """Close the client's connection once what was written to it is out."""
        self.closed = True
        self.mux.closed_here(self)
        if self.transport is not None:
            self.transport.close()


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Tunnel(asyncio.Protocol):
    """Host end of one sandbox's channel. Create and use it on the I/O loop only."""

    def __init__(
        self,
        log: logging.Logger,
        name: str,
        on_broken: Callable[[], Awaitable[None]],
        explain: Callable[[], str] = str,
        signing: tuple[bytes, str] = (b"", "hmac-sha256"),
    ) -> None:
        self.log = log
        self.name = name
        self.on_broken = on_broken
        """Stops the sandbox; called once the channel is broken or gone."""
        self.explain = explain
        """Why a limit stopped the sandbox, or "": told to the notebook when the channel ends."""
        self.signing = signing
        """The kernel's key and signature scheme, to sign what the host tells the notebook."""
        self.held: list[_ClientStream] = []
        """iopub connections whose kernel socket closed, kept until the exit is explained."""
        self.requests = Requests()
        """Execute requests the kernel has not answered: the oldest is the running cell."""
        self.exit_report: dict = {}
        """What the agent said of the kernel's end (EXIT): status, oom_killed."""
        self._seen: set[Kind] = set()
        """Which of HELLO, STARTED and EXIT the agent sent: each comes once (`_once`)."""
        self.explained = False
        self.ending = False
        """The channel closed; the tunnel closes once the end is explained."""
        self._tasks: set[asyncio.Task] = set()
        self.reader = FrameReader(FROM_GUEST)
        self.mux = Mux(self.send)
        self.out: asyncio.WriteTransport | None = None
        self.listening: list[socket.socket] = []
        """The kernel's ports, once served (`listen`): closed with the tunnel."""
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        """Ports not watched for a while (`_take_connections`), and when they are again."""
        self._loop = asyncio.get_running_loop()
        """The I/O loop: the kernel's ports are watched on it, and let go of by `close`."""
        self.next_sid = 1
        self.closed = False
        self.transport_in: asyncio.ReadTransport | None = None
        self.broken_reason = ""
        self._hello: asyncio.Future[None] = self._loop.create_future()
        self._started: asyncio.Future[int] = self._loop.create_future()

    async def attach(self, read_fd: int, write_fd: int) -> None:
        """Take over the channel's two pipe ends: they are the tunnel's to close from now on."""
        loop = asyncio.get_running_loop()
        reader = os.fdopen(read_fd, "rb", buffering=0)
        writer = os.fdopen(write_fd, "wb", buffering=0)
        try:
            self.out, _ = await loop.connect_write_pipe(asyncio.Protocol, writer)
            self.transport_in, _ = await loop.connect_read_pipe(lambda: self, reader)
        except BaseException:
            reader.close()
            writer.close()
            raise

    async def connect(self, host: str, port: int, context: ssl.SSLContext,
                      server_hostname: str, token: bytes) -> None:  # fmt: skip
        """Take the channel as a TLS connection to an agent listening on the network (a
        Kubernetes pod's, `agent.listen_tls`): `context` trusts only the kernel's own
        certificate, whose name is `server_hostname`; `token` is the kernel's proof that
        this is its owner, sent first. OSError (ssl.SSLError among them) if it fails."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(
            lambda: self, host, port, ssl=context, server_hostname=server_hostname,
            ssl_handshake_timeout=CONNECT_TIMEOUT,
        )  # fmt: skip
        sock = transport.get_extra_info("socket")
        if sock is not None:  # one small frame per keystroke: no Nagle delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert isinstance(transport, asyncio.WriteTransport | asyncio.ReadTransport)
        self.out = transport  # type: ignore[assignment]
        self.transport_in = transport  # type: ignore[assignment]
        transport.write(token)

    async def launch(self, request: dict, timeout: float) -> int:
        """Hand the kernel's launch to the agent; return the kernel's pid in the guest."""
        try:
            return await asyncio.wait_for(self._launch(request), timeout)
        except asyncio.TimeoutError:
            raise TunnelError(
                f"the sandbox did not start the kernel within {timeout:.0f} s"
            ) from None

    async def _launch(self, request: dict) -> int:
        await self._hello
        self.send(encode_json(Kind.LAUNCH, request))
        return await self._started

    async def listen(self, sockets: dict[str, socket.socket]) -> None:
        """Listen on the kernel's ports (sockets from `reserve`, names from `CHANNELS`).

        The tunnel owns the sockets from now on. Raises TunnelError if the channel is
        already closed: a guest may break the protocol in the very chunk that carried
        its STARTED, and a closed tunnel must own no listening socket (its `close` has
        already run); the sockets are closed then, as they would be by `close` once
        served. Nothing is awaited (no close can come in between); a coroutine all
        the same, as its callers on the I/O loop await it.
        """
        if self.closed:
            for sock in sockets.values():
                sock.close()
            raise TunnelError(self.broken_reason or "the sandbox closed its channel")
        for channel in CHANNELS:
            sock = sockets[channel]
            sock.setblocking(False)
            self._loop.add_reader(sock, self._take_connections, channel, sock)
            self.listening.append(sock)

    def _take_connections(self, channel: str, listener: socket.socket) -> None:
        """Accept what is waiting on a kernel's port, each connection a stream.

        Not `loop.create_server`: on Python 3.11 a `Server` closed while connections it
        accepted are still being set up fails their transports (an assertion in
        `Server._attach`), and those connections are never closed (ResourceWarning:
        unclosed transport). Here every accepted socket is either a stream's or closed.
        """
        for _ in range(ACCEPT_BATCH):
            if self.closed:
                return
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the client's handshake completed, it
                # waits in the backlog, so the port stays readable. Watched on, it would
                # wake the loop at once, again and again; look again in a while (as
                # asyncio's own servers do).
                why = f"cannot accept on {channel}: {e}; again in {ACCEPT_PAUSE:.0f} s"
                self.log.warning("sandbox %s: %s", self.name, why)
                self._loop.remove_reader(listener)
                self._paused[listener] = self._loop.call_later(
                    ACCEPT_PAUSE, self._resume, channel, listener
                )
                return
            self._spawn(self._connect(channel, conn))

    def _resume(self, channel: str, listener: socket.socket) -> None:
        """Watch a paused port again (`close` cancels this, and the check is for safety)."""
        self._paused.pop(listener, None)
        if not self.closed:
            self._loop.add_reader(listener, self._take_connections, channel, listener)

    async def _connect(self, channel: str, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self._accept(channel), conn
            )
        except BaseException:
            conn.close()
            raise

    def signal(self, signum: int) -> bool:
        """Ask the agent to signal the kernel's process group; False if the channel is gone."""
        if self.closed:
            return False
        self.send(encode(Kind.SIGNAL, 0, I32.pack(signum)))
        return True

    def send(self, frame: bytes) -> None:
        out = self.out
        if out is None or self.closed or out.is_closing():
            return
        if out.get_write_buffer_size() > MAX_UNREAD:
            self._broken(f"the guest stopped reading its channel ({MAX_UNREAD} bytes queued)")
            return
        out.write(frame)

    def close(self) -> None:
        """Stop listening, drop every stream and let go of the channel. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for handle in self._paused.values():
            handle.cancel()
        self._paused.clear()
        for listener in self.listening:
            self._loop.remove_reader(listener)
            listener.close()
        self.listening.clear()
        for stream in self.held:
            stream.release()
        self.held.clear()
        self.mux.close_all()
        if self.out is not None:
            self.out.close()
        for waiter in (self._hello, self._started):
            if not waiter.done():
                waiter.set_exception(TunnelError("the sandbox closed its channel"))
                waiter.exception()  # mark retrieved: nobody may be waiting any more

    # -- channel input (asyncio.Protocol) ----------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for frame in self.reader.feed(data):
                self._on_frame(frame)
        except ProtocolError as e:
            self._broken(f"protocol violation from the guest: {e}")
        except Exception as e:  # guest input must never raise into the loop
            self._broken(f"unhandled guest input ({type(e).__name__}: {e})")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport_in is not None:
            self.transport_in.close()
        if not self.closed and not self.ending:
            # The agent let go of its channel: the kernel is gone or unreachable.
            self.log.debug("sandbox %s closed its channel", self.name)
            self.ending = True
            self._spawn(self._end_of_channel())

    async def _end_of_channel(self) -> None:
        """Explain, close, stop. The host's OOM killer counts its kill only after it sent
        the signal, so a channel closed by that kill may be seen first: look again, briefly."""
        for _ in range(EXPLAIN_TRIES):
            if self.explained or self.closed or self.explain():
                break
            await asyncio.sleep(EXPLAIN_INTERVAL)
        self._explain_end()
        self.close()
        await self.on_broken()

    def _explain_end(self) -> None:
        """Once the kernel ended: tell the notebooks if a limit ended it, let go of held ones."""
        if self.explained:
            return
        self.explained = True
        reason = self.explain()
        iopub = [
            s
            for s in self.mux.streams.values()
            if isinstance(s, _ClientStream) and s.channel == "iopub"
        ]
        if not reason:
            for stream in self.held:
                stream.release()
            self.held.clear()
            return
        key, scheme = self.signing
        line = f"\n[jupyter-sandbox] The sandbox stopped this kernel: {reason}.\n"
        running = self.requests.running
        untold = sum(not stream.tell(line, key, scheme, running) for stream in [*iopub, *self.held])
        self.held.clear()
        if untold:
            self.log.warning("sandbox %s: %d notebook(s) not told: %s", self.name, untold, reason)

    def _on_frame(self, frame: Frame) -> None:
        kind = frame.kind
        if kind in _GUEST_JSON and len(frame.payload) > MAX_GUEST_CONTROL:
            raise ProtocolError(f"{kind.name} frame of {len(frame.payload)} bytes")
        if kind is Kind.HELLO:
            version = frame.json().get("version")
            self._once(kind)
            if version != VERSION:
                raise ProtocolError(f"agent speaks version {version!r}, expected {VERSION}")
            if not self._hello.done():
                self._hello.set_result(None)
        elif kind is Kind.STARTED:
            pid = frame.json().get("pid")
            self._once(kind)
            if not isinstance(pid, int):
                raise ProtocolError("STARTED without a pid")
            if not self._started.done():
                self._started.set_result(pid)
        elif kind is Kind.ERROR:
            if self._started.done():
                raise ProtocolError("ERROR once the launch was settled")
            error = str(frame.json().get("error", "unknown error"))[:2000]
            self._started.set_exception(TunnelError(error))
        elif kind is Kind.EXIT:
            report = frame.json()
            self._once(kind)
            self.exit_report = report if isinstance(report, dict) else {}
            status = self.exit_report.get("status")
            self.log.info("sandbox %s: the kernel exited with status %r", self.name, status)
            self._explain_end()
        else:
            self.mux.on_frame(frame)

    def _once(self, kind: Kind) -> None:
        """Note a frame the agent sends once: a second is a violation, not work (a log line)."""
        if kind in self._seen:
            raise ProtocolError(f"a second {kind.name}")
        self._seen.add(kind)

    def _accept(self, channel: str) -> asyncio.Protocol:
        # held connections count: each keeps its client's socket open
        if self.closed or len(self.mux.streams) + len(self.held) >= MAX_STREAMS:
            self.log.warning("sandbox %s: refusing a connection to %s", self.name, channel)
            return _Refused()
        sid = self.next_sid
        self.next_sid += 1
        stream = _ClientStream(self, sid, channel)
        self.mux.add(stream)
        return stream

    def _broken(self, reason: str) -> None:
        if self.closed:
            return
        self.log.error("sandbox %s: %s; closing its tunnel", self.name, reason)
        self.broken_reason = reason
        self.close()
        self._stop_sandbox()

    def _stop_sandbox(self) -> None:
        self._spawn(self.on_broken())

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
