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

import hmac
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
    each message whose header and parent header frames were kept.

    With `signing` (key, scheme), only for messages whose HMAC signature is right, once
    their content frame is read: a message the kernel would drop unread (Jupyter's
    `Session` checks the same HMAC over header, parent header, metadata and content) is
    not taken for one it got. The frames are hashed as they pass, never kept whole.
    """

    def __init__(
        self,
        on_message: Callable[[bytes, bytes], None] | None = None,
        signing: tuple[bytes, str] | None = None,
    ) -> None:
        self.on_message = on_message
        self._signing = signing
        self._digest: hmac.HMAC | None = None  # of the message being read, once signed
        self._hashing = False  # whether the current frame's body goes into the digest
        self._signature = b""  # of the message being read
        self._parent = b""  # of the message being read
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
                if self._hashing and self._digest is not None:
                    self._digest.update(view[i : i + take])
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
        # only the frames up to the parent header are of use, and those signed
        after = self._index - self._delimiter_at if self._delimiter_at >= 0 else -1
        wanted = self._delimiter_at < 0 or after <= 3
        self._keep = not flags & COMMAND and size <= MAX_KEPT and wanted
        self._hashing = not flags & COMMAND and 2 <= after <= 5
        self._frame.clear()
        self._left = size
        if not size:
            self._frame_done()

    def _frame_done(self) -> None:
        if self._flags & COMMAND:
            return  # READY, PING, ...: between messages, never inside one
        after = self._index - self._delimiter_at if self._delimiter_at >= 0 else -1
        if self._keep:
            if self._delimiter_at < 0 and self._frame == DELIMITER:
                self._delimiter_at = self._index
                if self._signing is not None and self._signing[0]:
                    key, scheme = self._signing
                    self._digest = hmac.new(key, digestmod=scheme.removeprefix("hmac-"))
            elif after == 1:
                self._signature = bytes(self._frame)
            elif after == 2:
                self._header = bytes(self._frame)
            elif after == 3:
                # delimiter, signature, header, parent header: what it answered
                self._parent = bytes(self._frame)
                self.parent = self._parent if self._parent != b"{}" else self.parent
                if self.on_message is not None and self._signing is None:
                    self.on_message(self._header, self._parent)
        if after == 5 and self.on_message is not None and self._signed():
            self.on_message(self._header, self._parent)  # content read: the message is whole
        self._frame.clear()
        if self._flags & MORE:
            self._index += 1
        else:
            self._index, self._delimiter_at, self._header, self._parent = 0, -1, b"", b""
            self._digest, self._signature = None, b""

    def _signed(self) -> bool:
        """Whether the message just read is signed as its `Session` would check it: an
        empty key signs nothing, and checks nothing."""
        if self._signing is None:
            return False
        if not self._signing[0]:
            return True
        digest = self._digest.hexdigest().encode() if self._digest is not None else b""
        return bool(digest) and hmac.compare_digest(digest, self._signature)


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
        """A client sent a message on shell (stream `stream`), signed with the kernel's key
        (the follower checks it): a forged one the kernel drops and never answers, and it
        would name the request a limit's notice is signed for."""
        fields = parent_header(header)
        msg_id = fields.get("msg_id")
        if fields.get("msg_type") == "execute_request" and isinstance(msg_id, str):
            self._pending[msg_id] = (stream, header)
            while len(self._pending) > self.MAX:
                del self._pending[next(iter(self._pending))]

    def answered(self, stream: int, header: bytes, parent: bytes) -> None:
        """The kernel sent a message on shell (stream `stream`): an execute_reply settles
        its request, and those the client sent before it (a kernel answers a client's
        requests in order: one still pending was never read, it cannot be running)."""
        if parent_header(header).get("msg_type") != "execute_reply":
            return
        msg_id = parent_header(parent).get("msg_id")
        if not isinstance(msg_id, str) or msg_id not in self._pending:
            return
        if self._pending[msg_id][0] == stream:
            for earlier in list(self._pending):
                if earlier == msg_id:
                    break
                if self._pending[earlier][0] == stream:
                    del self._pending[earlier]
        del self._pending[msg_id]

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
