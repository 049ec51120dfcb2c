"""The tunnel's wire protocol, shared by the host end and the guest agent.

Stdlib only: this file is copied verbatim into every sandbox.

One byte channel joins host and guest. It carries frames::

    kind: u8 | stream: u32 | length: u32 | payload: length bytes

Each client TCP connection on the host becomes one *stream*; the host picks
stream ids, in increasing order, so a frame for an id the host never opened is
a protocol violation, while one for an id that was opened and closed is a late
frame and is dropped, up to what could still have been in flight (more is a
violation, see `streams.Mux.closed_here`). HELLO, STARTED and EXIT come once
each. Every stream has a credit window per direction: a side may only send DATA
up to the credit the other side granted, so one flooded stream (iopub) cannot
starve the others (heartbeat, control) or grow memory without bound.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

VERSION = 1
HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 64 * 1024
WINDOW = 512 * 1024
"""Initial credit of each stream in each direction, in bytes."""
MAX_CONTROL_PAYLOAD = 1024 * 1024
"""Frame bound for what the host sends: its LAUNCH message may be larger than a DATA frame."""
MAX_GUEST_CONTROL = 4096
"""Bound for the guest's JSON frames (HELLO, STARTED, EXIT, ERROR)."""

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


class Kind(IntEnum):
    HELLO = 1  # guest -> host: agent is up; payload JSON {"version": int}
    LAUNCH = 2  # host -> guest: payload JSON, see the agent
    STARTED = 3  # guest -> host: kernel process started; payload JSON {"pid": int}
    OPEN = 4  # host -> guest: new stream; payload is the channel name
    DATA = 5  # both: payload bytes of a stream
    CLOSE = 6  # both: the stream is gone
    CREDIT = 7  # both: payload u32, bytes the sender may send again on the stream
    SIGNAL = 8  # host -> guest: payload i32 signal number for the kernel's process group
    EXIT = 9  # guest -> host: payload JSON {"status": int}; the kernel exited
    ERROR = 10  # guest -> host: payload JSON {"error": str}; the launch failed


FROM_GUEST = frozenset(
    {Kind.HELLO, Kind.STARTED, Kind.DATA, Kind.CLOSE, Kind.CREDIT, Kind.EXIT, Kind.ERROR}
)
FROM_HOST = frozenset({Kind.LAUNCH, Kind.OPEN, Kind.DATA, Kind.CLOSE, Kind.CREDIT, Kind.SIGNAL})
U32 = struct.Struct("!I")
I32 = struct.Struct("!i")


class ProtocolError(Exception):
    """The peer broke the protocol; the channel must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    stream: int
    payload: bytes

    def json(self) -> dict:
        """Decode a JSON payload, or raise ProtocolError."""
        try:
            value = json.loads(self.payload)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"{self.kind.name} payload is not JSON") from e
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.kind.name} payload is not a JSON object")
        return value

    def u32(self) -> int:
        if len(self.payload) != U32.size:
            raise ProtocolError(f"{self.kind.name} payload must be 4 bytes")
        return U32.unpack(self.payload)[0]

    def i32(self) -> int:
        if len(self.payload) != I32.size:
            raise ProtocolError(f"{self.kind.name} payload must be 4 bytes")
        return I32.unpack(self.payload)[0]


def encode(kind: Kind, stream: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, len(payload)) + payload


def encode_json(kind: Kind, value: dict, stream: int = 0) -> bytes:
    return encode(kind, stream, json.dumps(value, separators=(",", ":")).encode())


class FrameReader:
    """Incremental decoder. Holds at most one partial frame plus one fed chunk.

    `allowed` is the set of kinds the peer may send; `max_payload` bounds each
    frame, so a hostile length field is rejected before anything is buffered.
    """

    def __init__(self, allowed: frozenset[Kind], max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._allowed = allowed
        self._max_payload = max_payload

    def feed(self, data: bytes) -> Iterator[Frame]:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        try:
            while end - pos >= HEADER.size:
                kind, stream, length = HEADER.unpack_from(buf, pos)
                if length > self._max_payload:
                    raise ProtocolError(f"frame of {length} bytes exceeds {self._max_payload}")
                try:
                    kind = Kind(kind)
                except ValueError:
                    raise ProtocolError(f"unknown frame kind {kind}") from None
                if kind not in self._allowed:
                    raise ProtocolError(f"frame kind {kind.name} not allowed from this peer")
                start = pos + HEADER.size
                if end - start < length:
                    break
                pos = start + length
                yield Frame(kind, stream, bytes(buf[start:pos]))
        finally:
            del buf[:pos]
