"""The Jupyter kernels an image carries: its kernelspecs, read safely.

An image is untrusted input, and so is every kernel.json in it. Each is found by
resolving paths inside the image's tree as the sandbox would (a symlink resolved
against the image's root, never the host's), read with a size bound, and kept only
if every field it uses is of the right type and size. What is kept goes into the
image's manifest (install.py), where `jupyter sandbox kernelspec install --image`
finds it (provisioner/kernelspecs.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ImageError

KERNELSPEC_DIRS = (
    "/opt/venv/share/jupyter/kernels",
    "/opt/conda/share/jupyter/kernels",
    "/usr/local/share/jupyter/kernels",
    "/usr/share/jupyter/kernels",
)
"""Where images keep kernelspecs, in Jupyter's order of precedence (an environment's own
before the system's): the first kernel of a name wins, as in `jupyter kernelspec list`."""
MAX_KERNEL_JSON = 64 * 1024
MAX_KERNELS = 64
MAX_ARGS = 64
MAX_ARG = 4096
MAX_ENV = 64
MAX_TEXT = 200
MAX_HOPS = 40
LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
MAX_LOGO = 256 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def open_inside(root: Path, path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of `path` as the image sees it: symlinks resolved against `root`
    (absolute ones from `root`, `..` stopping at it), never leading out of it.

    OSError as the sandbox would see it (ENOENT, ELOOP after MAX_HOPS links, ...).
    """
    parts = list(PurePosixPath(path).parts)
    if parts and parts[0] == "/":
        parts.pop(0)
    top = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack = [top]  # the directories walked so far, for ".."
    hops = 0
    try:
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            last = not parts
            st = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_HOPS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts[:0] = [p for p in PurePosixPath(target).parts if p != "/"]
                continue
            mode = (flags | os.O_NOFOLLOW) if last else (os.O_PATH | os.O_DIRECTORY)
            stack.append(os.open(part, mode | os.O_CLOEXEC, dir_fd=stack[-1]))
        if len(stack) == 1:  # `path` is the root itself
            return os.open(root, flags | os.O_CLOEXEC)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def read_inside(root: Path, path: str, limit: int) -> bytes:
    """The content of regular file `path` of the image, at most `limit` bytes (else
    ImageError): a FIFO or device planted there is refused, never opened for reading."""
    fd = open_inside(root, path, os.O_PATH)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"{path} is not a regular file")
        real = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)
    try:
        data = os.read(real, limit + 1)
    finally:
        os.close(real)
    if len(data) > limit:
        raise ImageError(f"{path} is larger than {limit} bytes")
    return data


def which_inside(root: Path, program: str, path: str) -> str | None:
    """Where `program` (a bare name) is on `path` (a PATH value) in the image: the first
    executable regular file, by the path the sandbox will exec; None if there is none."""
    for folder in path.split(":"):
        if not folder.startswith("/"):
            continue
        candidate = f"{folder.rstrip('/')}/{program}"
        try:
            fd = open_inside(root, candidate, os.O_PATH)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
    return None


def _list_inside(root: Path, path: str) -> list[str]:
    try:
        fd = open_inside(root, path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        return sorted(os.listdir(fd))  # noqa: PTH208 (a descriptor: no Path for it)
    finally:
        os.close(fd)


def _text(spec: dict[str, Any], key: str, default: str | None = None) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise ImageError(f"{key} must be a string of 1 to {MAX_TEXT} characters")
    if any(ord(c) < 32 for c in value):
        raise ImageError(f"{key} holds control characters")
    return value


def parse_kernel_json(data: bytes) -> dict[str, Any]:
    """The fields of a kernel.json that a sandboxed kernel uses, checked; ImageError if any
    is missing, of the wrong type or too large (the rest is dropped)."""
    try:
        spec = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ImageError(f"not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ImageError("not a JSON object")
    argv = spec.get("argv")
    if (
        not isinstance(argv, list)
        or not 1 <= len(argv) <= MAX_ARGS
        or not all(isinstance(a, str) and 0 < len(a) <= MAX_ARG and "\0" not in a for a in argv)
    ):
        raise ImageError(f"argv must be a list of 1 to {MAX_ARGS} non-empty strings")
    env = spec.get("env", {})
    if (
        not isinstance(env, dict)
        or len(env) > MAX_ENV
        or not all(
            isinstance(k, str) and _ENV_NAME_RE.fullmatch(k) and isinstance(v, str)
            and len(v) <= MAX_ARG and "\0" not in v
            for k, v in env.items()
        )
    ):  # fmt: skip
        raise ImageError(f"env must map at most {MAX_ENV} variable names to strings")
    interrupt = spec.get("interrupt_mode", "signal")
    if interrupt not in ("signal", "message"):
        raise ImageError("interrupt_mode must be signal or message")
    return {
        "argv": argv,
        "display_name": _text(spec, "display_name"),
        "language": _text(spec, "language"),
        "interrupt_mode": interrupt,
        "env": dict(env),
    }


def find_kernels(root: Path, log: logging.Logger) -> dict[str, dict[str, Any]]:
    """The kernelspecs in the image tree `root`, by name, for its manifest.

    Each entry has the checked kernel.json fields, `resource_dir` (its folder, as the
    image sees it) and `logos` (the logo files there). A kernel.json that is not
    usable is logged and left out, never fatal: the image may still be run by a
    kernelspec the operator writes.
    """
    found: dict[str, dict[str, Any]] = {}
    for base in KERNELSPEC_DIRS:
        for name in _list_inside(root, base):
            if name in found or len(found) >= MAX_KERNELS:
                continue
            folder = f"{base}/{name}"
            try:
                if not _NAME_RE.fullmatch(name):
                    raise ImageError("the folder's name is not a kernel name")
                spec = parse_kernel_json(
                    read_inside(root, f"{folder}/kernel.json", MAX_KERNEL_JSON)
                )
            except FileNotFoundError:
                continue
            except (ImageError, OSError) as e:
                log.warning("image kernelspec %s left out: %s", folder, e)
                continue
            spec["resource_dir"] = folder
            spec["logos"] = [logo for logo in LOGOS if logo in _list_inside(root, folder)]
            found[name] = spec
    return found
