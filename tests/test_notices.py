"""Following real libzmq iopub bytes to a message boundary, and hostile bytes never hurting."""

from __future__ import annotations

import itertools
import json
import socket
import struct
import time
from functools import partial

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session

from provisioner.notices import MAX_KEPT, IopubFollower, Requests, stderr_notice, zmtp_message

KEY = b"secret-key"


def greeting(mechanism: bytes = b"NULL") -> bytes:
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + bytes(32)


def command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name
    for key, value in properties.items():
        body += bytes([len(key)]) + key + struct.pack("!I", len(value)) + value
    return bytes([0x04, len(body)]) + body


def capture_iopub(messages: list[tuple[dict, str]]) -> tuple[bytes, list[dict]]:
    """Raw bytes a real libzmq PUB socket sends a subscriber, as the tunnel relays them.

    The last message's text ends the capture.
    """
    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    session = Session(key=KEY)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    received = b""

    def receive_until(done) -> None:
        nonlocal received
        while not done():
            chunk = raw.recv(1 << 20)
            assert chunk, "the PUB socket closed the connection"
            received += chunk

    try:  # a SUB peer by hand, step by step: greeting, READY, subscribe to everything
        raw.sendall(greeting())
        receive_until(lambda: len(received) >= 64)
        raw.sendall(command(b"READY", {b"Socket-Type": b"SUB"}))
        receive_until(lambda: b"READY" in received)
        raw.sendall(b"\x00\x01\x01")
        time.sleep(0.2)  # a PUB drops what it sends before the subscription arrived
        parents = []
        for content, parent_id in messages:
            parent = session.msg_header("execute_request") | {"msg_id": parent_id}
            session.send(pub, "stream", content, parent=parent, ident=b"stream")
            parents.append(parent)
        end = json.dumps(messages[-1][0]["text"]).encode()[-20:] + b"}"
        receive_until(lambda: received.endswith(end))
        return received, parents
    finally:
        raw.close()
        pub.close(linger=0)


@pytest.fixture(scope="module")
def iopub_bytes() -> tuple[bytes, list[dict]]:
    return capture_iopub(
        [
            ({"name": "stdout", "text": "small"}, "request-1"),
            ({"name": "stdout", "text": "x" * (3 * MAX_KEPT)}, "request-2"),  # long frames
            ({"name": "stdout", "text": "after"}, "request-3"),
        ]
    )


@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=30))
@settings(max_examples=60, deadline=None)
def test_follows_real_libzmq_bytes_however_they_are_cut(iopub_bytes, cuts):
    data, parents = iopub_bytes
    follower = IopubFollower()
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        follower.feed(data[start:end])
    assert not follower.lost
    assert follower.at_boundary
    assert json.loads(follower.parent)["msg_id"] == parents[-1]["msg_id"]


def test_not_at_a_boundary_inside_a_message(iopub_bytes):
    data, _ = iopub_bytes
    follower = IopubFollower()
    follower.feed(data[:-1])
    assert not follower.lost and not follower.at_boundary


def test_the_notice_is_a_signed_message_for_the_parent_a_client_accepts(iopub_bytes):
    data, parents = iopub_bytes
    follower = IopubFollower()
    follower.feed(data)
    notice = stderr_notice("limit hit", follower.parent, KEY, "hmac-sha256")
    # what a client's SUB socket would see after the kernel's own messages
    again = IopubFollower()
    again.feed(data + notice)
    assert again.at_boundary
    frames, rest = [], notice
    while rest:
        flags = rest[0]
        size, head = (struct.unpack_from("!Q", rest, 1)[0], 9) if flags & 2 else (rest[1], 2)
        frames.append(rest[head : head + size])
        rest = rest[head + size :]
    session = Session(key=KEY)
    _, wire = session.feed_identities(frames)
    message = session.deserialize(wire)  # checks the HMAC signature
    assert message["content"] == {"name": "stderr", "text": "limit hit"}
    assert message["parent_header"]["msg_id"] == parents[-1]["msg_id"]
    with pytest.raises(ValueError, match="Invalid Signature"):
        Session(key=b"another-key").deserialize(wire)


def test_curve_streams_are_left_alone():
    follower = IopubFollower()
    follower.feed(greeting(b"CURVE"))
    assert follower.lost and not follower.at_boundary


def test_a_huge_frame_is_counted_not_kept():
    follower = IopubFollower()
    follower.feed(greeting() + b"\x03" + struct.pack("!Q", 1 << 60) + bytes(1 << 20))
    assert not follower.lost and not follower.at_boundary
    assert len(follower._frame) == 0


@given(st.lists(st.binary(max_size=300), max_size=40))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_raise_nor_pile_up(chunks):
    follower = IopubFollower()
    follower.feed(greeting())
    for chunk in chunks:
        follower.feed(chunk)
    assert len(follower._frame) <= MAX_KEPT and len(follower._head) <= 9
    assert len(follower.parent) <= MAX_KEPT


def shell_bytes(*messages: tuple[dict, bytes]) -> bytes:
    """A DEALER client's shell connection: greeting, READY, each (message, signing key)."""
    out = greeting() + command(b"READY", {b"Socket-Type": b"DEALER"})
    for message, key in messages:
        out += zmtp_message(Session(key=key).serialize(message))
    return out


def follow_shell(requests: Requests, stream: int, data: bytes, step: int = 1 << 20) -> None:
    """`data` fed to a follower of the client's side of shell, as the tunnel does."""
    follower = IopubFollower(partial(requests.sent, stream), (KEY, "hmac-sha256"))
    for start in range(0, len(data), step):
        follower.feed(data[start : start + step])
    assert not follower.lost


def test_a_forged_request_never_becomes_the_running_one():
    """The kernel drops a badly signed request unanswered: the host must not sign a notice
    under a parent header of the forger's choosing."""
    session = Session(key=KEY)
    forged = session.msg("execute_request", {"code": "forged"})
    tampered = session.msg("execute_request", {"code": "1"})
    wire = bytearray(shell_bytes((forged, b"a-guessed-key"), (tampered, KEY)))
    assert wire.endswith(b'"1"}')
    wire[-3:-2] = b"2"  # the content, signed as "1"
    requests = Requests()
    follow_shell(requests, 1, bytes(wire))
    assert requests.running == b""
    signed = session.msg("execute_request", {"code": "x" * (2 * MAX_KEPT)})  # a long frame
    follow_shell(requests, 1, shell_bytes((signed, KEY)), step=7)
    assert json.loads(requests.running)["msg_id"] == signed["header"]["msg_id"]


def test_a_reply_settles_its_request_and_the_clients_earlier_ones():
    session = Session(key=KEY)
    first, second, other = (session.msg("execute_request", {"code": c}) for c in "abc")
    requests = Requests()
    follow_shell(requests, 1, shell_bytes((first, KEY), (second, KEY)))
    follow_shell(requests, 2, shell_bytes((other, KEY)))
    assert json.loads(requests.running)["msg_id"] == first["header"]["msg_id"]
    reply = session.msg("execute_reply", {"status": "ok"}, parent=second)
    kernel = IopubFollower(partial(requests.answered, 1))
    kernel.feed(greeting() + zmtp_message(session.serialize(reply)))
    # `first` was never answered, yet the kernel is past it: `other` is the one running
    assert json.loads(requests.running)["msg_id"] == other["header"]["msg_id"]
