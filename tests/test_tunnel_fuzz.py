"""Fuzzing the tunnel's host end: a hostile guest writes whatever hypothesis makes up.

The host end (`Tunnel`) runs for real on the test's own loop: real pipes for its
channel, real listeners on 127.0.0.1, real client TCP connections on some of the
kernel's ports (iopub among them, so `IopubFollower` follows what the guest
sends there). The test plays the guest and feeds it a mix of well-formed frames
of every kind, forged ones, raw bytes and frames cut anywhere, with client
connections coming, going, reading and writing in between. After every step
memory stays bounded; after every example either the tunnel broke the way a
violation must end (reason, log, `on_broken` once, every client cut off, ports
gone), or it still relays both ways. No exception may reach the loop.

No sandbox is started. `make test` runs a modest number of examples;
`make fuzz` (`JSB_FUZZ=1`) runs many more, for `JSB_FUZZ_SECONDS` per test.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import importlib
import itertools
import json
import logging
import os
import socket
import struct
import termios
import time
import warnings
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session
from provisioner.guest.protocol import (
    CHANNELS,
    FROM_HOST,
    HEADER,
    MAX_CONTROL_PAYLOAD,
    MAX_GUEST_CONTROL,
    MAX_PAYLOAD,
    U32,
    VERSION,
    WINDOW,
    Frame,
    FrameReader,
    Kind,
    encode,
    encode_json,
)

from provisioner.notices import (
    COMMAND,
    DELIMITER,
    GREETING,
    LONG,
    MAX_KEPT,
    MORE,
    IopubFollower,
    stderr_notice,
    zmtp_message,
)
from provisioner.tunnel import MAX_STREAMS, MAX_UNREAD, Tunnel, reserve

# -- how long: a modest run in `make test`, a long one in `make fuzz` -------------

FUZZ = os.environ.get("JSB_FUZZ", "") not in {"", "0"}
FUZZ_SECONDS = float(os.environ.get("JSB_FUZZ_SECONDS", "300"))
"""Under `make fuzz`: how long each fuzz test keeps running rounds of examples."""

settings.register_profile(
    "jsb-quick",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("jsb-fuzz", settings.get_profile("jsb-quick"), max_examples=1000)
PROFILE = settings.get_profile("jsb-fuzz" if FUZZ else "jsb-quick")
"""Applied to this module's tests only: loading a profile would change every other module's."""


EXAMPLES: collections.Counter[str] = collections.Counter()
"""Examples run, by fuzz function (hypothesis counts its own only under its pytest plugin)."""


def for_the_budget(run) -> None:
    """One hypothesis run of `run`; under `make fuzz`, rounds of them for FUZZ_SECONDS.

    Each round starts from a fresh random seed (and replays the failures saved in
    the example database first).
    """
    start = time.monotonic()
    rounds = 0
    while not rounds or (FUZZ and time.monotonic() < start + FUZZ_SECONDS):
        run()
        rounds += 1
    examples = f", {EXAMPLES[run.__name__]} examples" if run.__name__ in EXAMPLES else ""
    print(f"{run.__name__}: {rounds} round(s){examples} in {time.monotonic() - start:.0f} s")


# -- what the guest sends ------------------------------------------------------------

log = logging.getLogger("jsb-fuzz-tunnel")
log.setLevel(logging.DEBUG)

MAX_CONNS = 8
"""Client connections per example (far below MAX_STREAMS: refusals have their own test)."""


def greeting(mechanism: bytes = b"NULL", version: int = 3) -> bytes:
    signature = b"\xff" + bytes(8) + b"\x7f"
    return signature + bytes([version, 0]) + mechanism.ljust(20, b"\0")[:20] + bytes(32)


texts = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


headers = st.fixed_dictionaries(
    {"msg_id": st.text(max_size=12), "msg_type": st.sampled_from(["stream", "status"])},
    optional={"session": st.text(max_size=8), "date": st.text(max_size=30), "extra": json_values},
)
json_docs = st.one_of(
    headers.map(dumps),
    json_values.map(dumps),
    st.dictionaries(texts, json_values, max_size=4).map(dumps),
    st.integers(0, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.binary(max_size=40),
)
"""What a guest may put in a JSON frame: plausible, odd, non-compliant, nested, not JSON."""

kernel_messages = st.tuples(
    st.lists(st.binary(max_size=20), max_size=2),
    st.binary(max_size=64),
    json_docs,
    json_docs,
    json_docs,
    json_docs,
).map(lambda t: zmtp_message([*t[0], DELIMITER, *t[1:]]))
"""A kernel's message: identities, delimiter, signature, header, parent, metadata, content."""
commands = st.binary(max_size=40).map(lambda body: bytes([COMMAND, len(body)]) + body)
"""READY, PING and the like, between messages."""
zmtp_frames = st.one_of(
    kernel_messages,
    commands,
    st.lists(st.one_of(st.just(DELIMITER), st.binary(max_size=300), json_docs), min_size=1).map(
        zmtp_message
    ),
    # a long frame that says more than ever comes, or a lie about its size
    st.tuples(st.integers(0, 7), st.integers(0, 2**64 - 1), st.binary(max_size=64)).map(
        lambda t: struct.pack("!BQ", t[0] | LONG, t[1]) + t[2]
    ),
    st.binary(max_size=64),
)
iopub_bodies = st.lists(zmtp_frames, max_size=6).map(b"".join)
well_formed_iopub = st.lists(st.one_of(kernel_messages, commands), min_size=1, max_size=4).map(
    b"".join
)
greetings = st.one_of(
    st.just("auto"),  # a NULL greeting before the first bytes of a stream
    st.just(b""),
    st.builds(greeting, st.sampled_from([b"NULL", b"CURVE", b"PLAIN", b""]), st.integers(0, 255)),
    st.binary(min_size=GREETING, max_size=GREETING),
)


@dataclass
class Conn:
    """A client's TCP connection to one of the kernel's ports, as a non-blocking socket."""

    channel: str
    sock: socket.socket
    sid: int
    """The host's stream id for it (0: refused)."""
    closed_by_us: bool = False
    eof: bool = False
    greeted: bool = False
    received: int = 0
    tail: bytes = b""

    def drain(self) -> None:
        while not self.eof and not self.closed_by_us:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:  # reset: the host aborted it
                data = b""
            if not data:
                self.eof = True
                return
            self.received += len(data)
            self.tail = (self.tail + data)[-4096:]

    def close(self) -> None:
        self.closed_by_us = True
        self.sock.close()


# Stream ids a frame may name: a client connection's (open, closed or refused, as it
# is by then), one the host has not opened yet, or any number at all.
targets = st.one_of(
    st.tuples(st.just("conn"), st.integers(0, MAX_CONNS - 1)),
    st.tuples(st.just("next"), st.integers(0, 2)),
    st.tuples(st.just("sid"), st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1))),
)


@dataclass(frozen=True)
class Data:
    target: tuple
    payload: bytes
    repeat: int = 1

    def wire(self, h: Harness) -> bytes:
        return encode(Kind.DATA, h.sid(self.target), self.payload) * self.repeat


@dataclass(frozen=True)
class IopubData:
    """ZMTP as a kernel's iopub socket sends it (or not quite), to an iopub connection."""

    conn: int
    greeting: bytes | str
    body: bytes

    def wire(self, h: Harness) -> bytes:
        iopub = [c for c in h.conns if c.channel == "iopub"] or h.conns
        sid, data = 1, self.body
        if iopub:
            conn = iopub[self.conn % len(iopub)]
            sid = conn.sid
            if self.greeting == "auto":
                data = (b"" if conn.greeted else greeting()) + data
            else:
                data = self.greeting + data
            conn.greeted = True
        return b"".join(
            encode(Kind.DATA, sid, data[i : i + MAX_PAYLOAD])
            for i in range(0, len(data), MAX_PAYLOAD)
        )


@dataclass(frozen=True)
class Credit:
    target: tuple
    amount: int | str
    """A number, or "refill": what the host has used of its window, as an honest guest grants."""

    def wire(self, h: Harness) -> bytes:
        sid = h.sid(self.target)
        amount = self.amount
        if amount == "refill":
            stream = h.tunnel.mux.streams.get(sid)
            amount = WINDOW - stream.send_credit if stream is not None else 1
            if not amount:
                return b""  # nothing to grant
        return encode(Kind.CREDIT, sid, U32.pack(amount))


@dataclass(frozen=True)
class Forged:
    """Any frame: CLOSE, CREDIT of the wrong size, kinds the guest may not send, unknown kinds."""

    kind: int
    target: tuple
    payload: bytes

    def wire(self, h: Harness) -> bytes:
        return HEADER.pack(self.kind, h.sid(self.target), len(self.payload)) + self.payload


@dataclass(frozen=True)
class Control:
    """HELLO, STARTED, EXIT or ERROR with any content, of any size."""

    kind: Kind
    payload: bytes
    stream: int = 0

    def wire(self, h: Harness) -> bytes:
        return encode(self.kind, self.stream, self.payload)


@dataclass(frozen=True)
class Oversized:
    kind: int
    stream: int
    length: int
    rest: bytes

    def wire(self, h: Harness) -> bytes:
        return HEADER.pack(self.kind, self.stream, self.length) + self.rest


@dataclass(frozen=True)
class Raw:
    data: bytes

    def wire(self, h: Harness) -> bytes:
        return self.data


@dataclass(frozen=True)
class Cut:
    """A frame of which only the first `keep` bytes are ever sent."""

    frame: Data | Control | Forged
    keep: int

    def wire(self, h: Harness) -> bytes:
        whole = self.frame.wire(h)
        return whole[: self.keep % max(1, len(whole))]


@dataclass(frozen=True)
class Connect:
    channel: str


@dataclass(frozen=True)
class ClientSends:
    conn: int
    size: int


@dataclass(frozen=True)
class ClientReads:
    conn: int


@dataclass(frozen=True)
class ClientCloses:
    conn: int


@dataclass(frozen=True)
class Yield:
    """Let the loop run: flushes, acknowledgements, client sockets' events."""

    times: int


control_payloads = st.one_of(
    st.builds(lambda v: dumps({"version": v}), st.one_of(st.just(VERSION), json_values)),
    st.builds(lambda v: dumps({"pid": v}), st.one_of(st.integers(), json_values)),
    st.builds(
        lambda s, oom: dumps({"status": s, "oom_killed": oom}),
        st.one_of(st.integers(-255, 255), json_values),
        st.booleans(),
    ),
    st.builds(lambda e: dumps({"error": e}), st.one_of(texts, json_values)),
    json_docs,
    # at the size limit, either side of it
    st.builds(
        lambda doc, n: doc + b" " * max(0, n - len(doc)),
        st.sampled_from([b'{"version":1}', b'{"pid":7}', b'{"status":0}', b'{"error":"x"}']),
        st.integers(MAX_GUEST_CONTROL - 2, MAX_GUEST_CONTROL + 2),
    ),
)
data_payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda n, b: bytes([b]) * n,
        st.one_of(st.integers(0, MAX_PAYLOAD), st.sampled_from([1, MAX_PAYLOAD])),
        st.integers(0, 255),
    ),
)
any_kind = st.one_of(st.sampled_from(list(Kind)), st.integers(0, 255))
frames = st.one_of(
    st.builds(Data, targets, data_payloads, st.integers(1, 10)),
    st.builds(Forged, st.just(Kind.CLOSE), targets, st.binary(max_size=8)),
    st.builds(Forged, any_kind, targets, st.binary(max_size=16)),
    st.builds(
        Control,
        st.sampled_from([Kind.HELLO, Kind.STARTED, Kind.EXIT, Kind.ERROR]),
        control_payloads,
        st.sampled_from([0, 0, 1, 2**32 - 1]),
    ),
)
hostile_ops = st.one_of(
    frames,
    st.builds(IopubData, st.integers(0, 3), greetings, iopub_bodies),
    st.builds(
        Credit,
        targets,
        st.one_of(
            st.sampled_from([0, 1, WINDOW, WINDOW + 1, 2**32 - 1]), st.integers(0, 2**32 - 1)
        ),
    ),
    st.builds(
        Oversized,
        any_kind,
        st.integers(0, 4),
        st.integers(MAX_PAYLOAD + 1, 2**32 - 1),
        st.binary(max_size=16),
    ),
    st.builds(Raw, st.binary(min_size=1, max_size=64)),
    st.builds(Cut, frames, st.integers(0, 2**16)),
)
clients = st.tuples(st.just("conn"), st.integers(0, MAX_CONNS - 1))
not_iopub = st.tuples(st.just("not iopub"), st.integers(0, MAX_CONNS - 1))
honest_ops = st.one_of(
    st.builds(Data, not_iopub, st.binary(min_size=1, max_size=200)),
    st.builds(Data, not_iopub, data_payloads.filter(bool), st.integers(1, 3)),
    st.builds(IopubData, st.integers(0, 3), st.just("auto"), well_formed_iopub),
    st.builds(IopubData, st.integers(0, 3), st.just("auto"), well_formed_iopub),
    st.builds(Credit, clients, st.just("refill")),
    st.builds(Forged, st.just(Kind.CLOSE), clients, st.just(b"")),
    st.builds(
        Control,
        st.just(Kind.EXIT),
        st.builds(
            lambda status, oom: dumps({"status": status, "oom_killed": oom}),
            st.integers(-255, 255),
            st.booleans(),
        ),
    ),
)
"""What a guest that keeps the protocol may send (to streams open or closed by then).

HELLO, STARTED and ERROR came in the handshake: once more is a violation (`frames`)."""
guest_ops = st.one_of(*[honest_ops] * 5, hostile_ops)
"""Mostly honest, so that many examples get far before (or without) a violation."""
client_ops = st.one_of(
    st.builds(Connect, st.sampled_from(CHANNELS)),
    st.builds(ClientSends, st.integers(0, MAX_CONNS - 1), st.integers(1, 3 * WINDOW // 2)),
    st.builds(ClientReads, st.integers(0, MAX_CONNS - 1)),
    st.builds(ClientCloses, st.integers(0, MAX_CONNS - 1)),
    st.builds(Yield, st.integers(1, 5)),
)
steps = st.lists(
    st.tuples(st.one_of(guest_ops, guest_ops, client_ops), st.integers(0, 24)),
    min_size=4,
    max_size=40,
)
"""Each step: what happens, and how many of the pending bytes the guest holds back (cuts)."""


# -- the harness ------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Harness:
    """One tunnel, its guest (the test) and its clients, on the running loop."""

    via_pipe: bool
    explanation: str
    tunnel: Tunnel = None  # type: ignore[assignment]
    stops: list[str] = field(default_factory=list)
    loop_errors: list[dict] = field(default_factory=list)
    log_records: Records = field(default_factory=Records)
    conns: list[Conn] = field(default_factory=list)
    pending: bytearray = field(default_factory=bytearray)
    granted: dict[int, int] = field(default_factory=dict)
    """CREDIT the host took from the guest per stream: it may send at most WINDOW more."""
    sent_by_host: dict[int, int] = field(default_factory=dict)
    tail_from_host: dict[int, bytes] = field(default_factory=dict)
    host_reader: FrameReader = field(
        default_factory=lambda: FrameReader(FROM_HOST, max_payload=MAX_CONTROL_PAYLOAD)
    )
    ports: dict[str, int] = field(default_factory=dict)
    to_host_w: int = -1
    from_host_r: int = -1

    # -- set up: a handshake, then listening ------------------------------------

    async def start(self, key: bytes) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        log.addHandler(self.log_records)

        async def on_broken() -> None:
            self.stops.append(self.tunnel.broken_reason)

        self.tunnel = Tunnel(
            log, "fuzz", on_broken, explain=lambda: self.explanation, signing=(key, "hmac-sha256")
        )
        to_host_r, self.to_host_w = os.pipe()
        self.from_host_r, from_host_w = os.pipe()
        os.set_blocking(self.from_host_r, False)
        os.set_blocking(self.to_host_w, False)
        await self.tunnel.attach(to_host_r, from_host_w)
        on_frame = self.tunnel._on_frame

        def counting_credit(frame: Frame) -> None:
            on_frame(frame)  # returned: the frame was taken
            if frame.kind is Kind.CREDIT:
                self.granted[frame.stream] = self.granted.get(frame.stream, 0) + frame.u32()

        self.tunnel._on_frame = counting_credit
        await self.feed(encode_json(Kind.HELLO, {"version": VERSION}))
        launch = asyncio.ensure_future(self.tunnel.launch({"argv": []}, timeout=5))
        await self.settle()
        await self.feed(encode_json(Kind.STARTED, {"pid": 7}))
        assert await launch == 7
        self.read_host()
        await self.tunnel.listen(reserve("127.0.0.1", dict.fromkeys(CHANNELS, 0)))
        self.ports = {
            channel: listener.getsockname()[1]
            for channel, listener in zip(CHANNELS, self.tunnel.listening, strict=True)
        }

    async def stop(self) -> None:
        self.tunnel.close()
        for conn in self.conns:
            if not conn.closed_by_us:
                conn.close()
        if self.to_host_w >= 0:  # the transport reading the channel ends with it
            os.close(self.to_host_w)
            self.to_host_w = -1
        for _ in range(100):
            if self.tunnel.transport_in is None or self.tunnel.transport_in.is_closing():
                break
            await asyncio.sleep(0.001)
        await self.settle()
        os.close(self.from_host_r)
        log.removeHandler(self.log_records)

    # -- the guest's side of the channel -----------------------------------------

    def sid(self, target: tuple) -> int:
        how, n = target
        if how in {"conn", "not iopub"}:
            conns = [c for c in self.conns if how == "conn" or c.channel != "iopub"] or self.conns
            return conns[n % len(conns)].sid if conns else 1
        if how == "next":
            return self.tunnel.next_sid + n
        return n

    async def feed(self, data: bytes) -> None:
        """Hand bytes to the host end: straight to data_received, or through its pipe."""
        if not self.via_pipe:
            self.tunnel.data_received(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.to_host_w, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.001)
        for _ in range(1000):  # until the host end has read all of it
            if not struct.unpack("i", fcntl.ioctl(self.to_host_w, termios.FIONREAD, b"\0" * 4))[0]:
                break
            await asyncio.sleep(0.001)

    async def feed_pending(self, hold_back: int = 0) -> None:
        n = max(0, len(self.pending) - hold_back)
        if n:
            data = bytes(self.pending[:n])
            del self.pending[:n]
            await self.feed(data)

    def read_host(self) -> None:
        """What the host sent the guest: well-formed frames, DATA within the credit given."""
        while True:
            try:
                data = os.read(self.from_host_r, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                return
            for frame in self.host_reader.feed(data):  # raises on a malformed frame
                if frame.kind is Kind.DATA:
                    assert 0 < len(frame.payload) <= MAX_PAYLOAD
                    sent = self.sent_by_host.get(frame.stream, 0) + len(frame.payload)
                    self.sent_by_host[frame.stream] = sent
                    assert sent <= WINDOW + self.granted.get(frame.stream, 0), "beyond credit"
                    tail = self.tail_from_host.get(frame.stream, b"") + frame.payload
                    self.tail_from_host[frame.stream] = tail[-256:]

    async def settle(self, passes: int = 3) -> None:
        for _ in range(passes):
            await asyncio.sleep(0)
        self.read_host()

    # -- clients -------------------------------------------------------------------

    async def connect(self, channel: str) -> Conn | None:
        if len(self.conns) >= MAX_CONNS:
            return None
        before = self.tunnel.next_sid
        try:
            sock = socket.create_connection(("127.0.0.1", self.ports[channel]), timeout=1)
        except OSError:
            assert self.tunnel.closed, "the tunnel stopped listening while open"
            return None
        sock.setblocking(False)
        for _ in range(2000):
            if self.tunnel.next_sid > before or self.tunnel.closed:
                break
            await asyncio.sleep(0.001)
        conn = Conn(channel, sock, before if self.tunnel.next_sid > before else 0)
        self.conns.append(conn)
        await self.settle()
        return conn

    def conn(self, n: int) -> Conn | None:
        return self.conns[n % len(self.conns)] if self.conns else None

    async def run(self, op: object) -> None:
        if hasattr(op, "wire"):
            self.pending += op.wire(self)
        elif isinstance(op, Connect):
            await self.connect(op.channel)
        elif isinstance(op, Yield):
            await self.settle(op.times)
        elif (conn := self.conn(op.conn)) is not None and not conn.closed_by_us:
            if isinstance(op, ClientSends):
                with contextlib.suppress(OSError):
                    conn.sock.send(b"c" * op.size)
            elif isinstance(op, ClientReads):
                conn.drain()
            else:
                conn.close()

    # -- properties ------------------------------------------------------------------

    def check_bounds(self) -> None:
        tunnel = self.tunnel
        if not tunnel.closed:  # a partial frame at most: its length was checked
            assert len(tunnel.reader._buf) < HEADER.size + MAX_PAYLOAD
        assert len(tunnel.mux.streams) + len(tunnel.held) <= MAX_STREAMS
        for stream in tunnel.mux.streams.values():
            assert 0 <= stream.unacked <= WINDOW
            assert sum(map(len, stream.outbox)) <= WINDOW
            assert 0 <= stream.send_credit <= WINDOW
            if stream.transport is not None:
                high = stream.transport.get_write_buffer_limits()[1]
                assert stream.transport.get_write_buffer_size() <= high + WINDOW
        if tunnel.out is not None:
            assert tunnel.out.get_write_buffer_size() <= MAX_UNREAD + HEADER.size + MAX_PAYLOAD

    async def finish_partial_frame(self) -> None:
        """Complete the frame the guest left cut (zeros), as a guest that goes on would."""
        await self.feed_pending()
        await self.settle()
        buf = self.tunnel.reader._buf
        if buf and len(buf) < HEADER.size:
            await self.feed(bytes(HEADER.size - len(buf)))
        if buf and not self.tunnel.closed:
            _kind, _stream, length = HEADER.unpack_from(buf)
            await self.feed(bytes(HEADER.size + length - len(buf)))
        await self.settle()
        assert self.tunnel.closed or not self.tunnel.reader._buf

    async def until(self, condition, what: str, seconds: float = 5) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert not self.loop_errors, self.loop_errors
            assert time.monotonic() < deadline, f"hung: {what}"
            for conn in self.conns:
                conn.drain()
            await asyncio.sleep(0.001)
            self.read_host()

    async def check_relays(self) -> None:
        """A tunnel that never broke carries bytes both ways, on a stream it had or a new one."""
        tunnel = self.tunnel
        usable = [
            c
            for c in self.conns
            if not c.closed_by_us
            and not c.eof
            and c.sid in tunnel.mux.streams
            and not tunnel.mux.streams[c.sid].closed
        ]
        # not iopub if it can be helped: bytes that are not ZMTP would make its follower
        # let go, and an EXIT or channel end that comes next could tell the notebook nothing
        usable.sort(key=lambda c: c.channel == "iopub")
        conn = usable[0] if usable and usable[0].channel != "iopub" else None
        conn = conn or await self.connect("shell") or (usable[0] if usable else None)
        if conn is None:  # all MAX_CONNS used, none usable: one more client still gets in
            self.conns.pop(0).close()
            conn = await self.connect("shell")
        assert conn is not None and conn.sid in tunnel.mux.streams, "a new client was refused"
        stream = tunnel.mux.streams[conn.sid]
        marker = b"relay-" + os.urandom(12).hex().encode()
        # guest to client: once the client read what it had, there is room for the marker
        await self.until(lambda: stream.unacked + len(marker) <= WINDOW, "credit never returned")
        await self.feed(encode(Kind.DATA, conn.sid, marker))
        await self.until(lambda: marker in conn.tail, "the client never got the guest's bytes")
        # client to guest: as far as the guest's credit goes, and on once it grants more
        conn.sock.send(marker)

        def arrived() -> bool:
            if marker in self.tail_from_host.get(conn.sid, b""):
                return True
            if stream.unsent and stream.send_credit == 0:
                tunnel.data_received(encode(Kind.CREDIT, conn.sid, U32.pack(WINDOW)))
            return False

        await self.until(arrived, "the guest never got the client's bytes")
        assert not tunnel.closed, tunnel.broken_reason

    async def check_cut_off(self) -> None:
        """A closed tunnel: stopped once, said why, every client cut off, its ports gone."""
        tunnel = self.tunnel
        await self.until(lambda: self.stops, "on_broken never called")
        await self.settle()
        assert len(self.stops) == 1
        assert self.stops == [tunnel.broken_reason]
        if tunnel.broken_reason:
            assert any(
                r.levelno == logging.ERROR and tunnel.broken_reason in r.getMessage()
                for r in self.log_records.records
            )
        assert not tunnel.listening and not tunnel.mux.streams and not tunnel.held
        for conn in self.conns:
            if not conn.closed_by_us:
                await self.until(lambda conn=conn: conn.eof, f"{conn.channel} client left open")
        for port in self.ports.values():
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                pass

    async def close_channel(self) -> None:
        """The guest lets go of its channel: the sandbox is stopped, once, whatever came before."""
        was_broken = self.tunnel.broken_reason
        os.close(self.to_host_w)
        self.to_host_w = -1
        await self.until(lambda: self.tunnel.closed and self.stops, "channel end not noticed")
        await self.check_cut_off()
        assert self.stops == [was_broken]


async def play(
    via_pipe: bool,
    explanation: str,
    key: bytes,
    channels: list[str],
    closed_first: bool,
    script: list[tuple[object, int]],
    close_channel: bool,
) -> Harness:
    h = Harness(via_pipe, explanation)
    await h.start(key)
    try:
        if closed_first:  # a stream that was opened and closed: frames for it are late
            conn = await h.connect("shell")
            conn.close()
            await h.until(lambda: conn.sid not in h.tunnel.mux.streams, "client close unnoticed")
        for channel in channels:
            await h.connect(channel)
        for op, hold_back in script:
            await h.run(op)
            await h.feed_pending(hold_back)
            h.read_host()
            h.check_bounds()
        await h.finish_partial_frame()
        h.check_bounds()
        if h.tunnel.closed:
            assert h.tunnel.broken_reason, "closed without a reason"
            # the catch-all in data_received is a safety net: what lands there is a bug
            assert "unhandled guest input" not in h.tunnel.broken_reason, h.tunnel.broken_reason
            await h.check_cut_off()
        else:
            assert not h.stops
            await h.check_relays()
            h.check_bounds()
        if close_channel:
            await h.close_channel()
        assert not h.loop_errors, h.loop_errors
    finally:
        await h.stop()
    assert not h.loop_errors, h.loop_errors
    return h


scenarios = {
    "explanation": st.sampled_from(["", "the memory limit (256 MiB) was reached"]),
    "key": st.sampled_from([b"", b"secret-key"]),
    "channels": st.lists(st.sampled_from(CHANNELS), max_size=3).map(lambda cs: ["iopub", *cs]),
    "closed_first": st.booleans(),
    "script": steps,
    "close_channel": st.booleans(),
}


@PROFILE
@given(**scenarios)
def fuzz_data_received(explanation, key, channels, closed_first, script, close_channel):
    EXAMPLES["fuzz_data_received"] += 1
    asyncio.run(play(False, explanation, key, channels, closed_first, script, close_channel))


@settings(PROFILE, max_examples=max(10, PROFILE.max_examples // 4))
@given(**scenarios)
def fuzz_through_the_pipe(explanation, key, channels, closed_first, script, close_channel):
    EXAMPLES["fuzz_through_the_pipe"] += 1
    asyncio.run(play(True, explanation, key, channels, closed_first, script, close_channel))


@pytest.mark.fuzz
def test_host_end_takes_any_guest_input():
    for_the_budget(fuzz_data_received)


@pytest.mark.fuzz
def test_host_end_takes_any_guest_input_through_its_pipe():
    for_the_budget(fuzz_through_the_pipe)


# -- the iopub follower alone ---------------------------------------------------------


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(PROFILE, max_examples=PROFILE.max_examples * 2)
@given(
    start=st.one_of(st.just(greeting()), greetings.filter(lambda g: g != "auto")),
    body=st.lists(st.one_of(zmtp_frames, iopub_bodies), max_size=8).map(b"".join),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=12),
    key=st.sampled_from([b"", b"secret-key"]),
)
def fuzz_iopub_follower(start, body, cuts, key):
    EXAMPLES["fuzz_iopub_follower"] += 1
    follower = IopubFollower()
    lost = False
    for piece in cut(start + body, cuts):
        follower.feed(piece)  # documented: never raises
        assert len(follower._head) <= (9 if follower._greeted else GREETING)
        assert len(follower._frame) <= MAX_KEPT
        assert len(follower.parent) <= MAX_KEPT
        assert follower.lost or not lost, "a lost stream is followed again"
        lost = follower.lost
        assert not (follower.lost and follower.at_boundary)
    if follower.at_boundary:
        # what the host would tell the notebook now, whatever the guest put in the parent
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # library code prints nothing, warnings neither
            notice = stderr_notice("the sandbox stopped", follower.parent, key, "hmac-sha256")
        follower.feed(notice)
        assert follower.at_boundary, "the notice is not one whole message"
        frames, rest = [], notice
        while rest:
            flags = rest[0]
            assert not flags & ~(MORE | LONG)
            size, head = (struct.unpack_from("!Q", rest, 1)[0], 9) if flags & LONG else (rest[1], 2)
            frames.append(rest[head : head + size])
            rest = rest[head + size :]
        session = Session(key=key)
        _, wire = session.feed_identities(frames)
        assert session.deserialize(wire)["content"]["text"] == "the sandbox stopped"


@pytest.mark.fuzz
def test_iopub_follower_takes_any_bytes():
    for_the_budget(fuzz_iopub_follower)


if FUZZ:  # `make test` runs these once, in their own modules, with their own settings

    @pytest.mark.fuzz
    @pytest.mark.parametrize(
        "module, name",
        [
            ("test_tunnel", "test_frame_reader_on_arbitrary_bytes_only_raises_protocol_error"),
            ("test_notices", "test_arbitrary_bytes_never_raise_nor_pile_up"),
            ("test_network", "test_dns_parser_takes_any_bytes"),
        ],
    )
    def test_other_parsers_of_guest_bytes(module, name):
        """The other property tests of what a guest sends, in rounds for the budget."""
        for_the_budget(getattr(importlib.import_module(module), name))


# -- regressions: what the fuzzers found --------------------------------------------------


def zmtp_frames_in(data: bytes) -> list[bytes]:
    frames = []
    while data:
        size, head = (struct.unpack_from("!Q", data, 1)[0], 9) if data[0] & LONG else (data[1], 2)
        frames.append(data[head : head + size])
        data = data[head + size :]
    return frames


@pytest.mark.parametrize("end", ["EXIT", "channel closed"])
@pytest.mark.parametrize(
    "parent, told_parent",
    [
        (b'{"":null}', {"": None}),  # found by the fuzzer: KeyError in Session.msg
        (b'{"header": 5}', {"header": 5}),  # TypeError
        (b'{"header": "ab"}', {"header": "ab"}),  # ValueError
        (b"[" * 5000 + b"]" * 5000, {}),  # RecursionError
        (b'{"msg_id": NaN}', {}),  # a warning printed, and a message that is not JSON
        (b'{"msg_id": "\\ud800"}', {}),  # UnicodeEncodeError
        (b'{"msg_id": "m0"}', {"msg_id": "m0"}),
    ],
)
async def test_any_parent_header_from_the_guest_still_gets_the_notebook_told(
    parent, told_parent, end
):
    """A kernel's message whose parent header Session cannot take, then the kernel's end.

    It used to raise out of the notice: on EXIT the tunnel took it for broken; when
    the channel closed, out of connection_lost into the loop, so the tunnel stayed
    open and its sandbox was never stopped.
    """
    h = Harness(via_pipe=False, explanation="the memory limit was reached")
    await h.start(b"secret-key")
    try:
        conn = await h.connect("iopub")
        message = zmtp_message([b"stream", DELIMITER, b"sig", b'{"msg_id": "m"}', parent, b"{}"])
        await h.run(IopubData(0, "auto", message))
        await h.feed_pending()
        await h.settle()
        if end == "EXIT":
            await h.feed(encode_json(Kind.EXIT, {"status": -9}))
            await h.until(lambda: conn.eof, "iopub client not released")
            assert not h.tunnel.closed and not h.tunnel.broken_reason
        else:
            await h.close_channel()  # asserts: closed, stopped once, no loop error
        assert b"the memory limit was reached" in conn.tail
        notice = conn.tail[conn.tail.rindex(b"\x01\x06stream\x01\x09<IDS|MSG>") :]
        session = Session(key=b"secret-key")
        _, wire = session.feed_identities(zmtp_frames_in(notice))
        told = session.deserialize(wire)  # signed with the kernel's key
        assert told["parent_header"] == told_parent
        assert not h.loop_errors
    finally:
        await h.stop()


async def test_connections_held_for_an_explanation_count_against_the_stream_limit():
    """The guest closes each iopub stream at once; held, each kept its client's socket.

    Held connections were not counted: clients could connect without limit and
    the host kept every one open until the kernel's exit was explained.
    """
    h = Harness(via_pipe=False, explanation="")
    await h.start(b"")
    socks = []
    try:
        for _ in range(MAX_STREAMS + 8):
            before = h.tunnel.next_sid
            sock = socket.create_connection(("127.0.0.1", h.ports["iopub"]), timeout=1)
            sock.setblocking(False)
            socks.append(sock)
            for _ in range(200):
                if h.tunnel.next_sid > before or sock.fileno() < 0:
                    break
                await asyncio.sleep(0.001)
                with contextlib.suppress(BlockingIOError):
                    if not sock.recv(1):  # refused: closed by the host
                        break
            if h.tunnel.next_sid > before:
                await h.feed(encode(Kind.CLOSE, before))
            h.check_bounds()
        assert len(h.tunnel.held) + len(h.tunnel.mux.streams) == MAX_STREAMS
        assert not h.tunnel.closed
    finally:
        for sock in socks:
            sock.close()
        await h.stop()
