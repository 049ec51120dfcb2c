"""Streams multiplexed over the tunnel's byte channel, with credit flow control.

Used by both ends (stdlib only, shipped into every sandbox). One `Stream` joins
one local socket (a client's TCP connection on the host, a connection to the
kernel's ipc socket in the guest) to its twin on the other side of the channel.

Memory stays bounded whatever the peer does: a stream never receives more than
`WINDOW` unacknowledged bytes (more is a protocol violation), and stops reading
its local socket while it has no credit to forward what it read. Frames for a
stream this side closed are bounded too: the peer may send only what it could
have had in flight when it learnt of the close (see `Mux.closed_here`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

try:  # imported as provisioner.guest.streams on the host, as a script's sibling in the guest
    from .protocol import MAX_PAYLOAD, U32, WINDOW, Frame, Kind, ProtocolError, encode
except ImportError:
    from protocol import MAX_PAYLOAD, U32, WINDOW, Frame, Kind, ProtocolError, encode  # type: ignore[no-redef]

CREDIT_BATCH = WINDOW // 8
"""Acknowledge received bytes in batches of this size."""


class Mux:
    """The streams of one channel. `send` writes an encoded frame to the channel."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send = send
        self.streams: dict[int, Stream] = {}
        self.highest_opened = 0
        self.late_allowance = 0
        """What the peer may still send on streams closed on this side, in bytes of DATA
        and CREDIT (a frame costs at least 1): grown by `closed_here`, spent by late frames."""

    def add(self, stream: Stream) -> None:
        self.streams[stream.sid] = stream
        self.highest_opened = max(self.highest_opened, stream.sid)

    def discard(self, sid: int) -> None:
        """Forget a stream the peer closed: it sends nothing more on it."""
        self.streams.pop(sid, None)

    def closed_here(self, stream: Stream) -> None:
        """Forget a stream closed on this side. Until the peer learns of it, it may still
        send DATA up to the credit it has, CREDIT for what this side sent, and its own
        CLOSE: the late allowance grows by that much. No-op for a stream already gone."""
        if self.streams.pop(stream.sid, None) is stream:
            self.late_allowance += 2 * WINDOW - stream.unacked - stream.send_credit + 1

    def close_all(self) -> None:
        for stream in list(self.streams.values()):
            self.closed_here(stream)
            stream.abort()

    def on_frame(self, frame: Frame) -> None:
        """Handle DATA, CREDIT and CLOSE. Frames for closed streams are late and dropped."""
        stream = self.streams.get(frame.stream)
        if stream is None:
            if frame.stream == 0 or frame.stream > self.highest_opened:
                raise ProtocolError(f"{frame.kind.name} for stream {frame.stream} never opened")
            if frame.kind is Kind.DATA:
                cost = len(frame.payload)
            elif frame.kind is Kind.CREDIT:
                cost = frame.u32()
            else:
                cost = 0
            self.late_allowance -= max(cost, 1)
            if self.late_allowance < 0:
                raise ProtocolError(
                    f"{frame.kind.name} for stream {frame.stream} after it closed, beyond "
                    "what could still have been in flight"
                )
            return
        if frame.kind is Kind.DATA:
            stream.peer_data(frame.payload)
        elif frame.kind is Kind.CREDIT:
            stream.peer_credit(frame.u32())
        elif frame.kind is Kind.CLOSE:
            self.discard(stream.sid)
            stream.peer_closed()
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} on a stream")


class Stream(asyncio.Protocol):
    """One local socket joined to one stream id."""

    def __init__(self, mux: Mux, sid: int) -> None:
        self.mux = mux
        self.sid = sid
        self.transport: asyncio.Transport | None = None
        self.send_credit = WINDOW
        self.unsent = b""
        self.reading_paused = False
        self.outbox: list[bytes] = []  # peer data not yet written to the local socket
        self.flush_scheduled = False
        self.unacked = 0  # bytes received from the peer and not yet acknowledged
        self.owed = 0  # bytes written locally whose credit is not yet returned
        self.writing_paused = False
        self.closed = False

    # -- local socket side ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.closed:
            transport.close()
            return
        self._flush_local()

    def data_received(self, data: bytes) -> None:
        if self.unsent:
            self.unsent += data
        else:
            self.unsent = data
        self._flush()

    def eof_received(self) -> bool:
        return False  # close the local socket: streams have no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.mux.closed_here(self)
            self.mux.send(encode(Kind.CLOSE, self.sid))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._ack()

    def abort(self) -> None:
        """Drop the stream without telling the peer (the channel is gone)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- peer side --------------------------------------------------------

    def peer_data(self, payload: bytes) -> None:
        if not payload:
            raise ProtocolError(f"empty DATA on stream {self.sid}")
        self.unacked += len(payload)
        if self.unacked > WINDOW:
            raise ProtocolError(f"stream {self.sid} sent beyond its credit window")
        # Written once per loop pass: a peer sending many tiny frames costs one
        # send() per pass, not one per frame.
        self.outbox.append(payload)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_local)

    def peer_credit(self, n: int) -> None:
        if n == 0:
            raise ProtocolError(f"zero CREDIT on stream {self.sid}")
        self.send_credit += n
        if self.send_credit > WINDOW:
            raise ProtocolError(f"stream {self.sid} granted credit beyond its window")
        self._flush()

    def peer_closed(self) -> None:
        self.closed = True
        if self.transport is not None:
            self._flush_local()
            self.transport.close()  # flushes what is buffered first

    # -- internals --------------------------------------------------------

    def _flush_local(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        if transport is None or not self.outbox:
            return  # not connected yet: connection_made flushes
        data = b"".join(self.outbox)
        self.outbox.clear()
        if transport.is_closing():
            return
        transport.write(data)
        self.owed += len(data)
        self._ack()

    def _ack(self) -> None:
        """Return credit in batches for bytes handed to the local socket, unless it is backed up.

        Batching keeps small messages to one frame each. It cannot stall the peer:
        the peer stops only with WINDOW bytes unacknowledged, which is a full batch.
        """
        if self.writing_paused:
            return
        if self.owed >= CREDIT_BATCH:
            self.mux.send(encode(Kind.CREDIT, self.sid, U32.pack(self.owed)))
            self.unacked -= self.owed
            self.owed = 0

    def _flush(self) -> None:
        if self.closed:
            self.unsent = b""
            return
        if self.unsent and self.send_credit > 0:
            n = min(len(self.unsent), self.send_credit)
            chunk, self.unsent = self.unsent[:n], self.unsent[n:]
            self.send_credit -= n
            view = memoryview(chunk)
            for start in range(0, n, MAX_PAYLOAD):
                self.mux.send(encode(Kind.DATA, self.sid, view[start : start + MAX_PAYLOAD]))
        transport = self.transport
        if transport is None:
            return
        if self.unsent and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not self.unsent and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
