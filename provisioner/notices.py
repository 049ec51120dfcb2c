"""Telling the notebook why the sandbox stopped its kernel.

The tunnel passes ZMTP through untouched, so when a limit kills a kernel the
notebook would only learn that it died. To say why, the host follows each
iopub connection's ZMTP framing just far enough to know where one message ends
(and which request the last one answered), and at such a boundary writes a
stream message of its own, signed with the kernel's key, to stderr of that
request. Only for the NULL mechanism: with CurveZMQ the host stays out.

The bytes come from the guest: the parser never raises and keeps at most one
small frame; on anything it does not expect it stops following that stream.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from jupyter_client.session import Session

GREETING = 64
SIGNATURE_END = 0x7F
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
MAX_KEPT = 64 * 1024
"""Frames longer than this (never a header) are counted, not kept."""
DELIMITER = b"<IDS|MSG>"


class IopubFollower:
    """Follows the bytes of one direction of one connection (named for its first use:
    kernel to client on iopub). `on_message(header, parent)` is called at the end of
    each message whose header and parent header frames were kept."""

    def __init__(self, on_message: Callable[[bytes, bytes], None] | None = None) -> None:
        self.on_message = on_message
        self._header = b""  # of the message being read
        self.lost = False
        """True once the stream did something unexpected: it is never written to then."""
        self._head = bytearray()  # greeting, or the header of the frame being read
        self._greeted = False
        self._left = 0  # bytes of the current frame's body still to come
        self._flags = 0
        self._frame = bytearray()  # the current frame, if it is kept
        self._keep = False
        self._index = 0  # of the current frame in its message
        self._delimiter_at = -1  # index of <IDS|MSG> in the current message, once seen
        self.parent: bytes = b""
        """The header of the request the kernel's last complete message answered."""

    @property
    def at_boundary(self) -> bool:
        """Whether a whole message may be written now without cutting one in two."""
        return (
            not self.lost
            and self._greeted
            and not self._head
            and self._left == 0
            and self._index == 0
        )

    def feed(self, data: bytes) -> None:
        view, i, n = memoryview(data), 0, len(data)
        while i < n and not self.lost:
            if not self._greeted:
                take = min(GREETING - len(self._head), n - i)
                self._head += view[i : i + take]
                i += take
                if len(self._head) == GREETING:
                    self._check_greeting(bytes(self._head))
                    self._head.clear()
                    self._greeted = True
            elif self._left:
                take = min(self._left, n - i)
                if self._keep:
                    self._frame += view[i : i + take]
                i += take
                self._left -= take
                if not self._left:
                    self._frame_done()
            else:
                self._head.append(view[i])
                i += 1
                self._read_frame_header()

    def _check_greeting(self, greeting: bytes) -> None:
        signature_ok = greeting[0] == 0xFF and greeting[9] == SIGNATURE_END
        version_ok = greeting[10] >= 3
        self.lost = not (signature_ok and version_ok and greeting[12:32].rstrip(b"\0") == b"NULL")

    def _read_frame_header(self) -> None:
        flags = self._head[0]
        if flags & ~(MORE | LONG | COMMAND):
            self.lost = True
            return
        want = 9 if flags & LONG else 2
        if len(self._head) < want:
            return
        size = struct.unpack_from("!Q", self._head, 1)[0] if flags & LONG else self._head[1]
        self._head.clear()
        self._flags = flags
        # only the frames up to the parent header are of use
        wanted = self._delimiter_at < 0 or self._index <= self._delimiter_at + 3
        self._keep = not flags & COMMAND and size <= MAX_KEPT and wanted
        self._frame.clear()
        self._left = size
        if not size:
            self._frame_done()

    def _frame_done(self) -> None:
        if self._flags & COMMAND:
            return  # READY, PING, ...: between messages, never inside one
        if self._keep:
            if self._delimiter_at < 0 and self._frame == DELIMITER:
                self._delimiter_at = self._index
            elif self._delimiter_at >= 0 and self._index == self._delimiter_at + 2:
                self._header = bytes(self._frame)
            elif self._delimiter_at >= 0 and self._index == self._delimiter_at + 3:
                # delimiter, signature, header, parent header: what it answered
                self.parent = bytes(self._frame) if self._frame != b"{}" else self.parent
                if self.on_message is not None:
                    self.on_message(self._header, bytes(self._frame))
        self._frame.clear()
        if self._flags & MORE:
            self._index += 1
        else:
            self._index, self._delimiter_at, self._header = 0, -1, b""


class Requests:
    """The execute requests clients sent on shell that the kernel has not answered yet.

    The kernel runs them in order, so the oldest is the cell that was running when the
    kernel died. Its own messages about that cell (busy, execute_input) may never have
    left it: its I/O thread needs the interpreter's lock, which a cell allocating in one
    C call does not let go of before the kill. The notice is told under that cell then.
    """

    MAX = 64
    """Requests kept at most (the oldest go first): a kernel answers every one."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[int, bytes]] = {}  # msg_id: (stream, header)

    def sent(self, stream: int, header: bytes, _parent: bytes) -> None:
        """A client sent a message on shell (stream `stream`)."""
        fields = parent_header(header)
        msg_id = fields.get("msg_id")
        if fields.get("msg_type") == "execute_request" and isinstance(msg_id, str):
            self._pending[msg_id] = (stream, header)
            while len(self._pending) > self.MAX:
                del self._pending[next(iter(self._pending))]

    def answered(self, header: bytes, parent: bytes) -> None:
        """The kernel sent a message on shell: an execute_reply settles its request."""
        if parent_header(header).get("msg_type") == "execute_reply":
            msg_id = parent_header(parent).get("msg_id")
            if isinstance(msg_id, str):
                self._pending.pop(msg_id, None)

    def forget(self, stream: int) -> None:
        """A client's shell connection closed: the kernel's replies cannot reach it."""
        self._pending = {k: v for k, v in self._pending.items() if v[0] != stream}

    @property
    def running(self) -> bytes:
        """The header of the oldest unanswered request, or b""."""
        return next(iter(self._pending.values()))[1] if self._pending else b""


def zmtp_message(frames: list[bytes]) -> bytes:
    """`frames` as one ZMTP 3 message."""
    out = bytearray()
    for index, frame in enumerate(frames):
        flags = MORE if index < len(frames) - 1 else 0
        if len(frame) > 255:
            out += struct.pack("!BQ", flags | LONG, len(frame))
        else:
            out += struct.pack("!BB", flags, len(frame))
        out += frame
    return bytes(out)


def parent_header(parent: bytes) -> dict:
    """The header `parent` (guest bytes) if a message can carry it as it is, else {}.

    Never raises: whatever JSON it holds, however nested, with NaN or lone surrogates.
    """
    try:
        header = json.loads(parent)
        json.dumps(header, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        return {}
    return header if isinstance(header, dict) else {}


def stderr_notice(text: str, parent: bytes, key: bytes, signature_scheme: str) -> bytes:
    """A signed iopub stream message showing `text` on stderr of the request `parent`."""
    session = Session(key=key, signature_scheme=signature_scheme, username="jupyter-sandbox")
    message = session.msg("stream", {"name": "stderr", "text": text})
    # Set here, not passed as `parent=`: Session.msg would take it apart (KeyError, TypeError).
    message["parent_header"] = parent_header(parent)
    return zmtp_message(session.serialize(message, ident=b"stream"))
