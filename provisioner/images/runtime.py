"""The agent's own Python, put into every image at `AGENT_RUNTIME` (guest/layout.py).

The agent (and the microVM's pid1 and kernel_init) is Python; the kernel may not be.
An image imported from anywhere (an R-only image, a distroless one, one whose Python
is 3.8 or has a broken ``site``) must still run the agent, so the agent never uses
the image's interpreter. It brings its own: the default image's CPython with the
standard library and exactly the shared libraries it loads, relocated under
`AGENT_RUNTIME`, its ELF interpreter and library path rewritten (``patchelf``) to
point there. It then runs in any x86_64 root, whatever libc the image has (or none).

Why a copy inside each image rather than a mount: both backends then find it the
same way (gVisor uses the image's rootfs as is, the microVM's root disk is made from
it), and the image's content hash covers it. It is read-only like the rest of the
root; the kernel can read it and gains nothing from it (~42 MB per image).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import ImageError
from ..guest.layout import AGENT_PYTHON, AGENT_RUNTIME
from ..hostcmd import run
from .install import clear_path

STDLIB_LEFT_OUT = ("test", "idlelib", "tkinter", "lib2to3", "ensurepip", "turtledemo",
                   "pydoc_data", "venv", "__phello__",
                   "sitecustomize.py", "usercustomize.py")  # fmt: skip
"""Parts of the standard library no agent needs: less to copy into every image. Debian's
sitecustomize.py is a link to /etc/python3.X/, which in a sandbox is the *image's*: the
agent (root there) must never run a file of the image (it also runs with -S)."""
MODULES_LEFT_OUT = re.compile(
    r"^(_test|_xx|xxlimited|_ctypes_test|_curses|readline|_dbm|nis|ossaudiodev|_tkinter)"
)
"""Extension modules left out, and with them the libraries only they load
(ncurses, readline, Berkeley DB, NIS, Kerberos)."""
AGENT_NEEDS = ("asyncio", "ctypes", "json", "hashlib", "_hashlib", "hmac", "secrets", "resource",
               "socket", "ssl", "_ssl", "subprocess")  # fmt: skip
"""Modules the agent needs that load shared libraries or the runtime's own parts, imported
in the check that the runtime runs alone. `_hashlib` and `_ssl` by name: hashlib falls
back to its built-in hashes without OpenSSL, and on Kubernetes the agent speaks TLS."""
_LIB_RE = re.compile(r"=>\s*(/\S+)|^\s*(/\S+)\s+\(")
_FACT_TIMEOUT = 120
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _python_version(source: Path) -> str:
    """The X.Y of `source`'s /usr/bin/python3 (the default image's: we built it)."""
    link = source / "usr/bin/python3"
    target = str(link.readlink()) if link.is_symlink() else ""
    match = re.fullmatch(r"python(3\.\d+)", target)
    if not match:
        raise ImageError(
            f"{source}/usr/bin/python3 is not a link to python3.X; "
            "rebuild the default image with `jupyter sandbox image build --force`"
        )
    return match.group(1)


def _libraries(source: Path, binaries: list[str], log: logging.Logger) -> list[str]:
    """The shared libraries `binaries` (paths inside `source`) load, as paths inside it.

    Asks `ldd` inside a chroot of `source`: only ever the default image, which this
    project built from Debian's archive, never an imported image.
    """
    out = run(
        ["chroot", str(source), "ldd", *binaries],
        "listing the agent runtime's libraries (ldd)", error=ImageError,
        timeout=_FACT_TIMEOUT, env=_CHROOT_ENV,
        fix="Rebuild the default image with `jupyter sandbox image build --force`.",
    )  # fmt: skip
    found: set[str] = set()
    for line in out.splitlines():
        if "not found" in line:
            raise ImageError(f"the agent runtime misses a library: {line.strip()}")
        match = _LIB_RE.search(line)
        if match:
            found.add(match.group(1) or match.group(2))
    log.debug("agent runtime libraries: %s", ", ".join(sorted(found)))
    return sorted(found)


def build_runtime(source: Path, dest_root: Path, log: logging.Logger) -> None:
    """Make `AGENT_RUNTIME` inside `dest_root` from the default image's tree `source`.

    `source` may be `dest_root` itself (the default image's own build). The result
    runs with no file of `dest_root` outside `AGENT_RUNTIME`: checked by running it in
    a chroot holding nothing else.
    """
    version = _python_version(source)
    python = f"usr/bin/python{version}"
    dynload = source / f"usr/lib/python{version}/lib-dynload"
    modules = sorted(
        f"/{p.relative_to(source)}"
        for p in dynload.glob("*.so")
        if not MODULES_LEFT_OUT.match(p.name)
    )
    libraries = _libraries(source, [f"/{python}", *modules], log)
    staging = dest_root.parent / f".runtime-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        top = staging / AGENT_RUNTIME.lstrip("/")
        (top / "bin").mkdir(parents=True)
        shutil.copy2(source / python, top / "bin/python3")
        stdlib = top / f"lib/python{version}"
        shutil.copytree(
            source / f"usr/lib/python{version}", stdlib, symlinks=True,
            ignore=lambda d, names: [n for n in names if n in STDLIB_LEFT_OUT
                                     or (n.endswith(".so") and MODULES_LEFT_OUT.match(n))],
        )  # fmt: skip
        for lib in libraries:
            shutil.copy2(
                source / lib.lstrip("/"), top / "lib" / Path(lib).name, follow_symlinks=True
            )
        interpreter = [lib for lib in libraries if Path(lib).name.startswith("ld-linux")]
        if len(interpreter) != 1:
            raise ImageError(f"expected one dynamic loader among {libraries}")
        run(
            ["patchelf", "--set-interpreter", f"{AGENT_RUNTIME}/lib/{Path(interpreter[0]).name}",
             "--force-rpath", "--set-rpath", f"{AGENT_RUNTIME}/lib", str(top / "bin/python3")],
            "relocating the agent runtime (patchelf)", error=ImageError, timeout=_FACT_TIMEOUT,
            fix="Install patchelf (scripts/install-host.sh), then build the image again.",
        )  # fmt: skip
        _check_links(top)
        # Proof that it needs nothing outside itself: run it where nothing else exists.
        (staging / "tmp").mkdir()
        run(
            ["chroot", str(staging), AGENT_PYTHON, "-I", "-B", "-c",
             f"import {', '.join(AGENT_NEEDS)}\nctypes.CDLL(None)"],
            "checking the agent runtime alone", error=ImageError, timeout=_FACT_TIMEOUT,
            env=_CHROOT_ENV,
            fix="Rebuild the default image with `jupyter sandbox image build --force`.",
        )  # fmt: skip
        top.rename(clear_path(dest_root, AGENT_RUNTIME.lstrip("/")))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_links(top: Path) -> None:
    """ImageError for a symlink in the runtime that leads out of it: in a sandbox it would
    lead into the image, whose files the agent must never load."""
    for path in top.rglob("*"):
        if path.is_symlink():
            target = os.path.normpath(path.parent / path.readlink())
            if not (target + "/").startswith(str(top) + "/"):
                raise ImageError(
                    f"the agent runtime's {path.relative_to(top)} links out of it "
                    f"({path.readlink()}); rebuild the default image with --force"
                )


def copy_runtime(default_rootfs: Path, dest_root: Path) -> None:
    """Put the default image's built runtime into another image's tree `dest_root`."""
    source = default_rootfs / AGENT_RUNTIME.lstrip("/")
    if not (default_rootfs / AGENT_PYTHON.lstrip("/")).is_file():
        raise ImageError(
            f"the default image has no agent runtime ({source}); "
            "rebuild it with `jupyter sandbox image build --force`"
        )
    shutil.copytree(source, clear_path(dest_root, AGENT_RUNTIME.lstrip("/")), symlinks=True)
