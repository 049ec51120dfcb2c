"""The tunnel's host end against a hostile guest: real pipes, real sockets, forged frames."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session
from provisioner.guest.protocol import (
    FROM_GUEST,
    HEADER,
    MAX_GUEST_CONTROL,
    MAX_PAYLOAD,
    WINDOW,
    FrameReader,
    Kind,
    ProtocolError,
    encode,
    encode_json,
)
from test_notices import command, greeting

from provisioner.notices import zmtp_message
from provisioner.tunnel import MAX_STREAMS, Tunnel, TunnelError, reserve

log = logging.getLogger("test-tunnel")
READY = command(b"READY", {b"Socket-Type": b"DEALER"})


def shell_request(message: dict, key: bytes) -> bytes:
    """`message` as a DEALER client sends it on shell, signed with `key`, in ZMTP bytes."""
    return zmtp_message(Session(key=key).serialize(message))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class FakeGuest:
    """The guest side of the channel, played by the test: writes whatever it likes."""

    def __init__(self) -> None:
        self.to_host_r, self.to_host_w = os.pipe()
        self.from_host_r, self.from_host_w = os.pipe()
        os.set_blocking(self.from_host_r, False)
        self.reader = FrameReader(frozenset(Kind), max_payload=1 << 20)

    async def write(self, data: bytes) -> None:
        """Write from a thread: the host end reads on this test's own loop."""

        def write_all() -> None:
            with contextlib.suppress(BrokenPipeError):  # the host closed the channel
                os.write(self.to_host_w, data)

        await asyncio.to_thread(write_all)

    async def frames(self, timeout: float = 5.0) -> list:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                data = os.read(self.from_host_r, 1 << 20)
            except BlockingIOError:
                data = b""
            if data:
                return list(self.reader.feed(data))
            if asyncio.get_running_loop().time() > deadline:
                return []
            await asyncio.sleep(0.01)

    def close(self) -> None:
        for fd in (self.to_host_w, self.from_host_r):
            with contextlib.suppress(OSError):
                os.close(fd)


async def started(
    behind_started: bytes = b"", signing: tuple[bytes, str] = (b"", "hmac-sha256")
) -> tuple[Tunnel, FakeGuest, dict, list[str]]:
    """A tunnel whose fake guest said HELLO and STARTED (followed by `behind_started`, in the
    same write); the list collects why the sandbox was stopped, once per stop."""
    broken: list[str] = []

    async def stop_sandbox() -> None:
        broken.append(tunnel.broken_reason)

    tunnel = Tunnel(log, "test", stop_sandbox, signing=signing)
    guest = FakeGuest()
    await tunnel.attach(guest.to_host_r, guest.from_host_w)
    ports = dict(zip(("shell", "iopub", "stdin", "control", "hb"), free_ports(5), strict=True))
    await guest.write(encode_json(Kind.HELLO, {"version": 1}))
    launch = asyncio.ensure_future(tunnel.launch({"argv": []}, timeout=5))
    frames = await guest.frames()
    assert frames and frames[0].kind is Kind.LAUNCH
    await guest.write(encode_json(Kind.STARTED, {"pid": 7}) + behind_started)
    assert await launch == 7
    return tunnel, guest, ports, broken


@pytest.fixture
async def tunnel_and_guest():
    tunnel, guest, ports, broken = await started()
    await tunnel.listen(reserve("127.0.0.1", ports))
    yield tunnel, guest, ports, broken
    tunnel.close()
    guest.close()


def test_frame_reader_rejects_oversized_length_before_buffering():
    reader = FrameReader(FROM_GUEST)
    with pytest.raises(ProtocolError, match="exceeds"):
        list(reader.feed(HEADER.pack(Kind.DATA, 1, MAX_PAYLOAD + 1)))


def test_frame_reader_rejects_kinds_the_guest_may_not_send():
    reader = FrameReader(FROM_GUEST)
    with pytest.raises(ProtocolError, match="not allowed"):
        list(reader.feed(encode(Kind.LAUNCH, 0, b"{}")))
    with pytest.raises(ProtocolError, match="unknown frame kind"):
        list(FrameReader(FROM_GUEST).feed(HEADER.pack(200, 0, 0)))


def test_frame_reader_reassembles_split_frames():
    reader = FrameReader(FROM_GUEST)
    wire = encode(Kind.DATA, 3, b"x" * 1000) + encode(Kind.CLOSE, 3)
    frames = []
    for i in range(0, len(wire), 7):
        frames += list(reader.feed(wire[i : i + 7]))
    assert [(f.kind, f.stream, len(f.payload)) for f in frames] == [
        (Kind.DATA, 3, 1000),
        (Kind.CLOSE, 3, 0),
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=3 * HEADER.size + 64), max_size=20))
def test_frame_reader_on_arbitrary_bytes_only_raises_protocol_error(chunks):
    reader = FrameReader(FROM_GUEST)
    try:
        for chunk in chunks:
            for frame in reader.feed(chunk):
                assert len(frame.payload) <= MAX_PAYLOAD
            assert len(reader._buf) < HEADER.size + MAX_PAYLOAD
    except ProtocolError:
        pass


async def test_relays_bytes_both_ways(tunnel_and_guest):
    _tunnel, guest, ports, broken = tunnel_and_guest
    reader, writer = await asyncio.open_connection("127.0.0.1", ports["shell"])
    writer.write(b"ping")
    await writer.drain()
    frames = await guest.frames()
    assert (frames[0].kind, frames[0].payload) == (Kind.OPEN, b"shell")
    sid = frames[0].stream
    data = b"".join(f.payload for f in frames if f.kind is Kind.DATA)
    if not data:
        data = b"".join(f.payload for f in await guest.frames() if f.kind is Kind.DATA)
    assert data == b"ping"
    await guest.write(encode(Kind.DATA, sid, b"pong"))
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"pong"
    writer.close()
    assert not broken


@pytest.mark.parametrize(
    "forged, reason",
    [
        (HEADER.pack(Kind.DATA, 1, 1 << 30), "exceeds"),
        (HEADER.pack(99, 1, 0), "unknown frame kind"),
        (encode(Kind.DATA, 4242, b"x"), "never opened"),
        (encode(Kind.SIGNAL, 0, b"\0\0\0\x09"), "not allowed"),
        (encode(Kind.HELLO, 0, b"not json"), "not JSON"),
        (encode(Kind.EXIT, 0, b"[" * 4000), "not JSON"),  # nesting that breaks json.loads
        (encode(Kind.ERROR, 0, b" " * (MAX_GUEST_CONTROL + 1)), "ERROR frame of"),
    ],
)
async def test_forged_frame_closes_only_this_tunnel(tunnel_and_guest, forged, reason, caplog):
    tunnel, guest, ports, broken = tunnel_and_guest
    await guest.write(forged)
    for _ in range(200):
        if broken:
            break
        await asyncio.sleep(0.01)
    assert broken and reason in broken[0]
    assert tunnel.closed
    with pytest.raises(OSError):  # its ports no longer listen
        await asyncio.open_connection("127.0.0.1", ports["shell"])


async def test_data_beyond_the_credit_window_is_a_violation(tunnel_and_guest):
    _tunnel, guest, ports, broken = tunnel_and_guest
    _reader, writer = await asyncio.open_connection("127.0.0.1", ports["iopub"])
    frames = await guest.frames()
    sid = frames[0].stream
    # The client never reads; the guest floods without waiting for credit. The
    # host acknowledges what the client's socket buffers take; once they are
    # full, anything beyond the window is a violation.
    chunk = encode(Kind.DATA, sid, b"y" * MAX_PAYLOAD)
    for _ in range(2048):  # at most 128 MiB
        if broken:
            break
        await guest.write(chunk)
    assert broken and "credit window" in broken[0]
    writer.close()


async def test_connections_beyond_the_stream_limit_are_refused(tunnel_and_guest):
    tunnel, _guest, ports, broken = tunnel_and_guest
    conns = [await asyncio.open_connection("127.0.0.1", ports["hb"]) for _ in range(MAX_STREAMS)]
    await asyncio.sleep(0.1)
    assert len(tunnel.mux.streams) == MAX_STREAMS
    reader, writer = await asyncio.open_connection("127.0.0.1", ports["hb"])
    assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed by the host
    for _r, w in conns:
        w.close()
    writer.close()
    assert not broken


async def wait_broken(broken: list[str], seconds: float = 5) -> None:
    for _ in range(int(seconds * 100)):
        if broken:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (lambda sid: encode(Kind.DATA, sid), "empty DATA"),
        (lambda sid: encode(Kind.CREDIT, sid, b"\0\0\0\0"), "zero CREDIT"),
    ],
)
async def test_degenerate_frames_on_an_open_stream_are_violations(tunnel_and_guest, frame, reason):
    _tunnel, guest, ports, broken = tunnel_and_guest
    _reader, writer = await asyncio.open_connection("127.0.0.1", ports["shell"])
    sid = (await guest.frames())[0].stream
    await guest.write(frame(sid))
    await wait_broken(broken)
    assert broken and reason in broken[0]
    writer.close()


async def test_a_guest_that_stops_reading_is_cut_off(tunnel_and_guest):
    """Clients keep sending; the guest never reads: queued bytes stay bounded."""
    tunnel, _guest, ports, broken = tunnel_and_guest
    clients = [await asyncio.open_connection("127.0.0.1", ports["shell"]) for _ in range(24)]
    for _reader, writer in clients:
        writer.write(b"z" * (512 * 1024))
    await wait_broken(broken, 10)
    assert broken and "stopped reading" in broken[0]
    assert tunnel.closed
    for _reader, writer in clients:
        writer.close()


async def test_a_guest_that_closes_its_channel_gets_its_sandbox_stopped(tunnel_and_guest):
    tunnel, guest, _ports, broken = tunnel_and_guest
    os.close(guest.to_host_w)
    guest.to_host_w = -1
    await wait_broken(broken)
    assert broken == [""]  # stopped, though nothing was violated
    assert tunnel.closed


async def test_a_violation_in_the_chunk_of_started_leaves_no_port_listening():
    """The guest breaks the protocol right behind its STARTED: the start fails, no port stays."""
    tunnel, guest, ports, broken = await started(HEADER.pack(Kind.DATA, 1, 1 << 30))
    with pytest.raises(TunnelError, match="exceeds"):
        await tunnel.listen(reserve("127.0.0.1", ports))
    await wait_broken(broken)
    assert broken and "exceeds" in broken[0]
    for port in ports.values():
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    tunnel.close()
    guest.close()


@pytest.mark.parametrize(
    "again, reason",
    [
        (encode_json(Kind.HELLO, {"version": 1}), "a second HELLO"),
        (encode_json(Kind.STARTED, {"pid": 8}), "a second STARTED"),
        (encode_json(Kind.ERROR, {"error": "late"}), "ERROR once the launch was settled"),
        (encode_json(Kind.EXIT, {"status": 0}) * 2, "a second EXIT"),
    ],
)
async def test_one_shot_frames_come_once(tunnel_and_guest, again, reason):
    """Replayed without end they would cost the host work and log lines, and mean nothing."""
    _tunnel, guest, _ports, broken = tunnel_and_guest
    await guest.write(again)
    await wait_broken(broken)
    assert broken and reason in broken[0]


async def test_late_frames_are_bounded_by_what_could_be_in_flight(tunnel_and_guest):
    """Frames for a stream the host closed are dropped, up to what the guest could still
    have sent; a guest that keeps the stream going is cut off."""
    tunnel, guest, ports, broken = tunnel_and_guest
    _reader, writer = await asyncio.open_connection("127.0.0.1", ports["stdin"])
    sid = (await guest.frames())[0].stream
    writer.close()
    for _ in range(500):
        if sid not in tunnel.mux.streams:
            break
        await asyncio.sleep(0.01)
    assert sid not in tunnel.mux.streams
    in_flight = encode(Kind.DATA, sid, b"x" * MAX_PAYLOAD) * (WINDOW // MAX_PAYLOAD)
    await guest.write(in_flight + encode(Kind.CLOSE, sid))
    await asyncio.sleep(0.2)
    assert not broken, "frames that could have been in flight are a violation"
    await guest.write(encode(Kind.DATA, sid, b"x" * MAX_PAYLOAD))
    await wait_broken(broken)
    assert broken and f"DATA for stream {sid} after it closed" in broken[0]


def test_reserved_ports_cannot_be_taken_meanwhile():
    """From pre_launch until the tunnel serves them, nobody else can bind the kernel's
    ports, not even with SO_REUSEADDR (which a bound but idle socket would allow)."""
    held = reserve("127.0.0.1", dict.fromkeys(("shell", "iopub", "stdin", "control", "hb"), 0))
    try:
        for sock in held.values():
            rival = socket.socket()
            rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with rival, pytest.raises(OSError, match="in use"):
                rival.bind(sock.getsockname())
        port = held["shell"].getsockname()[1]
        with pytest.raises(TunnelError, match=f"cannot listen on 127.0.0.1:{port} for shell"):
            reserve("127.0.0.1", {**dict.fromkeys(held, 0), "shell": port})
    finally:
        for sock in held.values():
            sock.close()


class OutOfFds:
    """The process's descriptors all taken: a low soft RLIMIT_NOFILE, filled with dups.
    The limit is restored and every dup closed on exit."""

    def __enter__(self) -> OutOfFds:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.filler: list[int] = []
        highest = max(int(fd.name) for fd in Path("/proc/self/fd").iterdir())
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, self.limits[1]))
        try:
            while True:
                self.filler.append(os.dup(0))
        except OSError as e:
            if e.errno != errno.EMFILE:
                self.__exit__()
                raise
        return self

    def free(self, count: int | None = None) -> None:
        for _ in range(len(self.filler) if count is None else count):
            os.close(self.filler.pop())

    def __exit__(self, *_exc: object) -> None:
        self.free()
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


def connect_waiting(port: int) -> socket.socket:
    """A client whose handshake completes in the listener's backlog (not accepted yet)."""
    client = socket.socket()
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        client.connect(("127.0.0.1", port))
    return client


async def test_out_of_descriptors_the_tunnel_waits_rather_than_spins(tunnel_and_guest, caplog):
    """accept() fails with EMFILE while the client waits in the backlog: the listener stays
    readable, so retrying on every wake-up would spin the I/O loop (a log line each time).
    The tunnel stops watching it for a second, then serves the client once fds are free."""
    _tunnel, guest, ports, broken = tunnel_and_guest
    caplog.set_level(logging.WARNING, logger=log.name)
    with OutOfFds() as fds:
        fds.free(1)  # for the client's socket
        client = connect_waiting(ports["shell"])
        await asyncio.sleep(1.5)
        failures = [r for r in caplog.records if "cannot accept" in r.getMessage()]
        assert 1 <= len(failures) <= 3, f"{len(failures)} failed accepts in 1.5 s"
        fds.free()
        frames = await guest.frames(timeout=3)
        assert frames and (frames[0].kind, frames[0].payload) == (Kind.OPEN, b"shell")
        client.close()
    assert not broken


async def test_a_tunnel_closed_while_out_of_descriptors_never_listens_again(tunnel_and_guest):
    tunnel, _guest, ports, _broken = tunnel_and_guest
    with OutOfFds() as fds:
        fds.free(1)
        client = connect_waiting(ports["hb"])
        await asyncio.sleep(0.2)
        assert tunnel._paused, "accept() did not fail: the case was not tried"
        waiting = list(tunnel._paused.values())
        tunnel.close()
    assert all(handle.cancelled() for handle in waiting) and not tunnel._paused
    client.close()


async def test_only_requests_signed_with_the_kernels_key_count_as_running():
    """Any local process may connect to the shell port. A request it cannot sign, which
    the kernel drops unanswered, must not become the request a limit's notice answers."""
    key = b"the-kernels-key"
    tunnel, guest, ports, broken = await started(signing=(key, "hmac-sha256"))
    await tunnel.listen(reserve("127.0.0.1", ports))
    try:
        forged = Session(key=b"a-guess").msg("execute_request", {"code": "1"})
        signed = Session(key=key).msg("execute_request", {"code": "2"})
        for message, running in ((forged, None), (signed, signed)):
            _reader, writer = await asyncio.open_connection("127.0.0.1", ports["shell"])
            key_of = key if running else b"a-guess"
            writer.write(greeting() + READY + shell_request(message, key_of))
            await writer.drain()
            assert await guest.frames()  # OPEN and DATA: the tunnel read the request
            await asyncio.sleep(0.1)
            if running is None:
                assert tunnel.requests.running == b""
            else:
                assert json.loads(tunnel.requests.running)["msg_id"] == signed["header"]["msg_id"]
            writer.close()
    finally:
        tunnel.close()
        guest.close()
    assert not broken


def test_closed_outside_the_running_loop_it_still_lets_go_of_its_ports():
    """`close` from code not running on the loop (a synchronous teardown): it marked the
    tunnel closed, then failed to find a running loop, and every later `close` returned at
    once, its ports listening for good."""
    loop = asyncio.new_event_loop()
    try:
        tunnel, guest, ports, _broken = loop.run_until_complete(started())
        loop.run_until_complete(tunnel.listen(reserve("127.0.0.1", ports)))
        tunnel.close()
        for port in ports.values():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
        guest.close()
        loop.run_until_complete(asyncio.sleep(0.05))  # the transports' own closing
    finally:
        loop.close()
