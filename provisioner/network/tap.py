"""Attaching to a microVM's tap device from inside its sandbox's network namespace.

A microVM's network ends in a persistent tap device `tap0` in the sandbox's
namespace (made by `sandbox.SandboxNetwork`), with no owner: only root may
attach to it. The backend attaches (`open_tap`) and hands QEMU the descriptor,
so QEMU, which runs unprivileged, never opens /dev/net/tun.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

TAP_IF = "tap0"
TUN_DEVICE = Path("/dev/net/tun")
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TAP_FLAGS = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
"""What the tap is attached with: frames without tun's packet header, with virtio-net's
(QEMU's virtio-net then passes offloads through, as under libvirt)."""


def open_tap(netns: Path, name: str = TAP_IF) -> int:
    """A descriptor attached to the existing tap `name` in the namespace at `netns`, for
    QEMU's `-netdev tap,fd=N`. The caller owns it: it closes it once QEMU has it, and on
    every failure. Needs CAP_NET_ADMIN (the tap has no owner) and /dev/net/tun readable:
    the backend's privileges, never QEMU's, so /dev/net/tun may stay root's alone (0600).

    A tun descriptor belongs to the namespace that was current when /dev/net/tun was opened
    (TUNSETIFF looks the name up there), and Python 3.11 has no os.setns: a thread of its
    own joins the namespace with libc's setns (which moves only the calling thread), opens
    and attaches, and ends; no other code ever runs in that namespace, and the descriptor
    stays valid in the whole process. Raises OSError (the step's errno) on failure."""
    outcome: list[int | OSError] = []

    def attach() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            namespace = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(namespace, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns into {netns}: {os.strerror(code)}")
            finally:
                os.close(namespace)
            try:  # it must exist: TUNSETIFF would make a new one
                socket.if_nametoindex(name)
            except OSError:
                raise OSError(errno.ENODEV, f"no device {name} there") from None
            tap = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(tap, _TUNSETIFF, struct.pack("16sH22x", name.encode(), TAP_FLAGS))
            except BaseException:
                os.close(tap)
                raise
            outcome.append(tap)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=attach, name="sandbox-tap", daemon=True)
    thread.start()
    thread.join()
    if not outcome or isinstance(outcome[0], OSError):
        error = outcome[0] if outcome else OSError("the tap's thread failed")
        raise OSError(error.errno, f"cannot attach to tap {name} in {netns}: {error}")
    return outcome[0]
