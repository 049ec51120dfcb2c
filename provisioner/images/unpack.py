"""Turning untrusted input into a plain directory tree: image layers, and rootfs folders.

An image is untrusted input until it is stored: a layer (a tar stream) or a root
filesystem folder may try to write outside the tree being built, plant device
nodes or setuid programs, claim arbitrary owners, or be far larger than it says.
Everything here writes only below `dest`, and only through directory file
descriptors opened with ``O_NOFOLLOW``: a path is never handed to the kernel
whole, so no symlink (planted by an earlier entry or layer) is ever followed on
the host. What the image asks for is enforced or neutralised as follows:

- Names are cleaned lexically: a leading ``/`` is dropped (absolute names are made
  relative, as docker does: ``/etc/passwd`` in a layer means the image's
  ``/etc/passwd``), ``.`` parts are dropped and ``a/../b`` becomes ``b``; a ``..`` that
  would climb above the image's root, a NUL, a name part over 255 bytes, a name over
  4096 bytes or deeper than `MAX_DEPTH` is refused.
- Symlinks met in an entry's *parents* are resolved as a chroot would (absolute
  targets from `dest`, ``..`` clamped at `dest`, at most `MAX_HOPS` of them), so
  ``evil -> /etc`` then ``evil/passwd`` writes ``dest/etc/passwd``. The entry itself
  is never written through: whatever stands at its name is removed first (an upper
  layer replaces a lower one's entry) and the new one is made with ``O_EXCL``.
- Symlinks are made as they are, absolute targets included: they are only ever
  resolved inside the sandbox. A hard link must name a regular file already in the
  tree (found by the same rules, its last part not followed), else it is refused.
- Device nodes, fifos and sockets are skipped (counted): the sandbox gives a kernel
  the devices it needs; an image has no business bringing its own.
- Owner: everything is root's (uid and gid 0) when this runs as root, as image
  builds do; otherwise the caller's own. The kernel runs as an unprivileged user on
  a read-only root, so it needs no file of its own there, and a root-owned store
  holding files of arbitrary host uids would hand them to whoever has that uid on
  the host.
- Modes are kept, but setuid/setgid bits are cleared (nothing in a kernel may gain
  privileges from a file) and so is the world-write bit, on everything, sticky
  directories (``/tmp``) included (their sticky bit is kept): the store lives on the
  host, where any local user could change a world-writable file or plant one in a
  world-writable directory (``rootfs/tmp/...``) that every kernel of the image then
  sees. The few directories a kernel writes (``/tmp``, its home) are made writable in
  each sandbox's own layer, never in the store.
- OCI whiteouts: ``.wh.NAME`` removes NAME of the lower layers, ``.wh..wh..opq``
  removes a directory's lower content (what this layer itself put there stays);
  neither is ever materialised; other ``.wh..wh.`` names (aufs metadata) are ignored.
- Size: each entry costs its data plus `ENTRY_COST` (a bound on what ``du`` counts
  for it) against a `Budget` shared by every layer of one import, charged *before*
  its data is written, so a decompression bomb stops at the limit instead of filling
  the disk; at most `MAX_ENTRIES` entries. The headers before one entry (pax, GNU
  long names, sparse maps: tarfile reads each chain whole into memory) are refused
  once they pass `MAX_HEADER` bytes in all, before the read that would pass it.
- A corrupt or truncated archive is an ImageError naming the layer.

On any error `dest` holds a partial tree: the caller (which made it, as a
temporary folder) removes it.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ImageError
from .store import images_dir

DEFAULT_MAX_SIZE = 16 << 30
"""Bytes an image may unpack to, unless the operator says otherwise (`--max-size`): a
bound on decompression bombs, gigantic layers and a postBuild filling the disk."""
MAX_ENTRIES = 2_000_000
"""Entries one import may have (all layers together): a real image has far fewer."""
MAX_DEPTH = 256
"""Directory levels an entry may sit at, by its name or once its parents' symlinks are resolved."""
MAX_HOPS = 40
"""Symlinks followed while resolving one entry's parents (Linux's own limit)."""
MAX_NAME = 4096
"""Bytes of an entry's name or a symlink's target (Linux's PATH_MAX)."""
MAX_HEADER = 4 << 20
"""Bytes of the headers before one entry, in all (pax headers, GNU long names, sparse
maps): tarfile holds a chain whole in memory, at several times its size once parsed."""
ENTRY_COST = 4096
"""What each entry costs against the budget besides its data: an inode and the rounding
up of its data to a block, so that a budget bounds the tree's disk use."""
_CHUNK = 1 << 20
_SETID = stat.S_ISUID | stat.S_ISGID
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# What reading a damaged layer raises, from the decompressors and tarfile.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def too_large(max_bytes: int) -> str:
    """The message for an image over its size limit (the same wherever it is noticed)."""
    return f"image larger than the limit of {human_size(max_bytes)} (set with --max-size)"


def human_size(n: int) -> str:
    """`n` bytes for a person: "64 MiB", "1.5 GiB", "900 bytes"."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f}".removesuffix(".0") + f" {name}"
    return f"{n} bytes"


class Budget:
    """What one import may still write: bytes (file data plus `ENTRY_COST` per entry)
    and entries, shared by every layer of it. Charging past either is an ImageError."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes_left = max_bytes
        self.entries_left = MAX_ENTRIES

    def charge(self, n: int) -> None:
        """Take `n` bytes, or raise the size limit's ImageError (taking nothing)."""
        if n > self.bytes_left:
            raise ImageError(too_large(self.max_bytes))
        self.bytes_left -= n

    def entry(self, size: int) -> None:
        """Take one entry holding `size` bytes of data."""
        if self.entries_left <= 0:
            raise ImageError(f"image has more than {MAX_ENTRIES} files, the most allowed")
        self.charge(ENTRY_COST + size)
        self.entries_left -= 1


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What one layer (or folder) brought and what of it was neutralised."""

    entries: int = 0
    """Entries made in the tree (files, directories, links)."""
    data_bytes: int = 0
    """Bytes of file data written."""
    specials_skipped: int = 0
    """Device nodes, fifos and sockets not made."""
    setid_cleared: int = 0
    """Entries whose setuid/setgid bits were cleared."""
    world_writable_cleared: int = 0
    """Entries whose world-write bit was cleared."""
    ownership_reset: int = 0
    """Entries the image said belonged to someone other than root."""
    whiteouts: int = 0
    """Whiteouts and opaque whiteouts applied."""


_FIELDS = frozenset(f.name for f in dataclasses.fields(LayerReport))


class _Counts:
    """LayerReport's counts while a layer or folder is applied (by field name)."""

    def __init__(self) -> None:
        self._n = dict.fromkeys(_FIELDS, 0)

    def add(self, field: str, n: int = 1) -> None:
        """Add `n` to the LayerReport field `field` (KeyError if there is none)."""
        self._n[field] += n

    def report(self) -> LayerReport:
        return LayerReport(**self._n)

    def mode(self, mode: int, *, uid: int, gid: int) -> int:
        """The permission bits to give an entry the image gave `mode`, counted."""
        mode = stat.S_IMODE(mode)
        if mode & _SETID:
            self.add("setid_cleared")
            mode &= ~_SETID
        if mode & stat.S_IWOTH:
            self.add("world_writable_cleared")
            mode &= ~stat.S_IWOTH
        self.owner(uid, gid)
        return mode

    def owner(self, uid: int, gid: int) -> None:
        """Count an entry the image gave to someone other than root."""
        if uid or gid:
            self.add("ownership_reset")


class _Refused(Exception):
    """An entry this module will not make; the message says why."""


class _Corrupt(Exception):
    """Reading the layer failed; the cause is the decompressor's or tarfile's error."""


def _clean(name: str) -> tuple[bytes, ...]:
    """An entry's name as parts relative to the image's root (see the module's rules)."""
    raw = os.fsencode(name)
    if b"\0" in raw:
        raise _Refused("NUL in the name")
    if len(raw) > MAX_NAME:
        raise _Refused(f"name longer than {MAX_NAME} bytes")
    parts: list[bytes] = []
    for part in raw.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise _Refused("the name climbs out of the image ('..')")
            parts.pop()
            continue
        if len(part) > 255:
            raise _Refused("a part of the name is longer than 255 bytes")
        parts.append(part)
    if len(parts) > MAX_DEPTH:
        raise _Refused(f"deeper than {MAX_DEPTH} directories")
    return tuple(parts)


def _own(fd: int) -> None:
    if os.geteuid() == 0:
        os.fchown(fd, 0, 0)


def _set_mtime(fd: int, mtime: float) -> None:
    """Keep the image's modification time where it is representable (a build reproduces)."""
    try:
        ns = int(mtime * 1_000_000_000)
        os.utime(fd, ns=(ns, ns))
    except (OverflowError, ValueError, OSError):
        pass


def _names(dir_fd: int) -> list[bytes]:
    """The names in the directory `dir_fd`, sorted (a build is reproducible)."""
    with os.scandir(dir_fd) as entries:
        return sorted(os.fsencode(e.name) for e in entries)


def _remove(dir_fd: int, name: bytes) -> None:
    """Remove `name` in `dir_fd` and, if it is a directory, all below it; never follows a
    symlink. Missing is fine."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
        try:
            for child in _names(fd):
                _remove(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _make_room(dir_fd: int, name: bytes, *, for_dir: bool) -> bool:
    """Clear `name` for a new entry (an upper layer replaces a lower one's); True if a
    directory stands there and a directory is wanted (it is kept, with its content)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if for_dir and stat.S_ISDIR(st.st_mode):
        return True
    _remove(dir_fd, name)
    return False


class _Tree:
    """The tree being built: its root's fd and chroot-style resolution below it.

    Directories it makes on the way to an entry are charged to `budget` like entries.
    `made` holds the (device, inode) of what the current layer made, for opaque
    whiteouts (which remove only what lower layers made); `dirs` the modes and
    times of this layer's directories, applied at the end (a read-only directory
    must not stop this layer's later entries from going into it).
    """

    def __init__(self, dest: Path, budget: Budget) -> None:
        self.root = os.open(dest, _OPEN_DIR)
        self.budget = budget
        self.made: set[tuple[int, int]] = set()
        self.dirs: dict[tuple[bytes, ...], tuple[int, float]] = {}

    def close(self) -> None:
        os.close(self.root)

    def mark(self, st: os.stat_result) -> None:
        self.made.add((st.st_dev, st.st_ino))

    def walk(self, parts: tuple[bytes, ...], *, create: bool) -> int | None:
        """A new fd of the directory `parts` names, resolved as inside a chroot at the
        root: symlinks followed from the root (absolute) or in place (relative), ``..``
        clamped at the root. Missing directories are made when `create` (else None);
        anything else than a directory on the way is refused."""
        todo = list(reversed(parts))
        stack = [os.dup(self.root)]
        hops = 0
        try:
            while todo:
                part = todo.pop()
                if part in (b"", b"."):
                    continue
                if part == b"..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                here = stack[-1]
                try:
                    st = os.lstat(part, dir_fd=here)
                except FileNotFoundError:
                    if not create:
                        return None
                    self.budget.entry(0)  # a directory the layer implies costs as one it names
                    os.mkdir(part, 0o755, dir_fd=here)
                    st = os.lstat(part, dir_fd=here)
                    self.mark(st)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_HOPS:
                        raise _Refused(f"more than {MAX_HOPS} symlinks on the way")
                    target = os.readlink(part, dir_fd=here)
                    if target.startswith(b"/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                    todo.extend(reversed(target.split(b"/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise _Refused(f"{os.fsdecode(part)!r} on the way is not a directory")
                if len(stack) > MAX_DEPTH:
                    raise _Refused(f"deeper than {MAX_DEPTH} directories")
                if create:  # on the way to an entry of this layer: this layer has it too
                    self.mark(st)
                stack.append(os.open(part, _OPEN_DIR, dir_fd=here))
            return stack.pop()
        finally:
            for fd in stack:
                os.close(fd)

    def clear_lower(self, dir_fd: int) -> None:
        """An opaque whiteout: remove what lower layers put below `dir_fd`."""
        for name in _names(dir_fd):
            st = os.lstat(name, dir_fd=dir_fd)
            if (st.st_dev, st.st_ino) not in self.made:
                _remove(dir_fd, name)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
                try:
                    self.clear_lower(fd)
                finally:
                    os.close(fd)

    def finish_dirs(self) -> None:
        """Give this layer's directories their modes and times, deepest first."""
        for parts, (mode, mtime) in sorted(self.dirs.items(), key=lambda i: -len(i[0])):
            parent = self.walk(parts[:-1], create=False)
            if parent is None:
                continue
            try:
                fd = os.open(parts[-1], _OPEN_DIR, dir_fd=parent)
            except OSError:  # removed or replaced by a later entry of the layer
                continue
            finally:
                os.close(parent)
            try:
                os.fchmod(fd, mode)
                _own(fd)
                _set_mtime(fd, mtime)
            finally:
                os.close(fd)
        self.dirs.clear()


def _write_file(dir_fd: int, name: bytes, chunks: Iterator[bytes], mode: int, mtime: float,
                charge: Callable[[int], None] | None) -> tuple[os.stat_result, int]:  # fmt: skip
    """Make a regular file from `chunks` (after `charge` took each, if given): its stat
    and size."""
    fd = os.open(name, _CREATE_FILE, 0o600, dir_fd=dir_fd)
    size = 0
    try:
        for chunk in chunks:
            if charge:
                charge(len(chunk))
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            size += len(chunk)
        os.fchmod(fd, mode)
        _own(fd)
        _set_mtime(fd, mtime)
        return os.fstat(fd), size
    finally:
        os.close(fd)


def _make_symlink(dir_fd: int, name: bytes, target: bytes) -> os.stat_result:
    if b"\0" in target or not target or len(target) > MAX_NAME:
        raise _Refused("symlink target empty, longer than 4096 bytes or holding a NUL")
    os.symlink(target, name, dir_fd=dir_fd)
    if os.geteuid() == 0:
        os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)
    return os.lstat(name, dir_fd=dir_fd)


class _Prefixed:
    """A stream whose first bytes were already read (to see how it is compressed)."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out = self._head if n < 0 else self._head[:n]
            self._head = self._head[len(out) :]
            return out
        return self._rest.read(n)


class _Forward:
    """What tarfile reads: the decompressed layer, forward only (seeking ahead reads and
    drops).

    In header mode (while `_open_tar` and `_next` read an entry's headers) it refuses a
    read that would bring the headers read since the mode was turned on past
    `MAX_HEADER` bytes: tarfile reads a header chain (pax headers, GNU long names, a
    sparse map and its extension blocks) whole into memory, one read per header or
    block, so no single read's bound would bound the chain. An entry's data
    is read, and skipped by `seek`, outside header mode: the Budget bounds it.
    """

    def __init__(self, source: BinaryIO | _Prefixed) -> None:
        self._source = source
        self._pos = 0
        self._headers: int | None = None  # bytes of headers read; None: not in header mode

    def header_mode(self, on: bool) -> None:
        """Start counting a new header chain (`on`), or stop counting."""
        self._headers = 0 if on else None

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            raise _Refused("tar asked to read the layer whole")
        if self._headers is not None:
            if self._headers + n > MAX_HEADER:
                raise _Refused(f"a header longer than {human_size(MAX_HEADER)} (pax headers, "
                               "long names or a sparse map, in all)")  # fmt: skip
            self._headers += n
        return self._read(n)

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            try:
                data = self._source.read(n - len(out))
            except _READ_ERRORS as e:
                raise _Corrupt(e) from e
            if not data:
                break
            out += data
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self._pos:
            raise _Corrupt(OSError("tar stream asked to seek backwards"))
        while self._pos < pos and self._read(min(_CHUNK, pos - self._pos)):
            pass
        return self._pos


# What tarfile's header parsing lets through on a malformed header (a sparse map cut
# short: IndexError; a number it cannot parse: ValueError; ...) besides its TarError.
_HEADER_ERRORS = (IndexError, ValueError, RecursionError, EOFError, OSError)


def _open_tar(source: _Forward) -> tarfile.TarFile:
    """tarfile reading `source`; opening reads the first entry's headers, in header mode."""
    source.header_mode(True)
    try:
        return tarfile.open(fileobj=source, mode="r:", encoding="utf-8",  # type: ignore[call-overload]
                            errors="surrogateescape")  # fmt: skip
    except _HEADER_ERRORS as e:
        raise _Corrupt(e) from e
    finally:
        source.header_mode(False)


def _next(tar: tarfile.TarFile, source: _Forward) -> tarfile.TarInfo | None:
    """The layer's next entry, its headers read in `source`'s header mode."""
    source.header_mode(True)
    try:
        return tar.next()
    except _HEADER_ERRORS as e:
        raise _Corrupt(e) from e
    finally:
        source.header_mode(False)


def _decompressed(stream: BinaryIO, media_type: str) -> BinaryIO | _Prefixed:
    """The layer's tar bytes, whichever of gzip, bzip2, xz or none it is compressed with
    (told by its first bytes; the media type is only used to name a zstd layer)."""
    head = stream.read(6)
    raw = _Prefixed(head, stream)
    if head.startswith(b"\x28\xb5\x2f\xfd") or media_type.endswith("zstd"):
        raise ImageError(
            f"zstd-compressed layers ({media_type or 'zstd'}) are not supported; "
            "recompress the image with gzip (e.g. `skopeo copy --dest-compress-format gzip`)"
        )
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)  # type: ignore[arg-type]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)  # type: ignore[arg-type]
    return raw


def apply_layer(stream: BinaryIO, dest: Path, budget: Budget, *, what: str,
                media_type: str = "") -> LayerReport:  # fmt: skip
    """Apply one layer (a tar stream, plain or gzip/bzip2/xz-compressed) onto `dest`.

    `dest` is an existing directory, empty or holding the lower layers; nothing is
    written outside it (see the module's rules). `what` names the layer in errors
    ("layer 2/5 (sha256:...)"); `media_type`, if given, names a zstd layer in its
    error. The stream is read once, forward, to the end of the archive only (the
    caller drains the rest, e.g. to finish a digest). ImageError on anything refused,
    on a damaged archive and past `budget`; `dest` is then partial (the caller
    removes it).
    """
    counts = _Counts()
    tree = _Tree(dest, budget)
    name = "(start)"
    try:
        source = _Forward(_decompressed(stream, media_type))
        with _open_tar(source) as tar:
            while (member := _next(tar, source)) is not None:
                tar.members.clear()  # tarfile keeps every member read; this only streams
                name = member.name
                _apply_member(tar, member, tree, budget, counts)
        tree.finish_dirs()
    except _Refused as e:
        raise ImageError(f"{what}: refused {name!r}: {e}") from None
    except _Corrupt as e:
        raise ImageError(f"{what}: corrupt or truncated archive (after {name!r}): "
                         f"{e.__cause__ or e}") from None  # fmt: skip
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise ImageError(f"{what}: corrupt or truncated archive (after {name!r}): {e}") from None
    except ImageError as e:
        raise ImageError(f"{what}: {e}") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot write {name!r}: {e}") from None
    finally:
        tree.close()
    return counts.report()


def _apply_member(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: _Tree, budget: Budget,
                  counts: _Counts) -> None:  # fmt: skip
    parts = _clean(member.name)
    budget.entry(member.size)
    if not parts:
        if not member.isdir():
            raise _Refused("the image's root must be a directory")
        return  # the root's mode is the store's to set
    base = parts[-1]
    if base.startswith(b".wh."):
        if base.startswith(b".wh..wh.") and base != b".wh..wh..opq":
            return  # aufs metadata (.wh..wh.plnk, ...): nothing to apply
        parent = tree.walk(parts[:-1], create=False)
        if parent is None:
            return  # nothing there to hide
        try:
            if base == b".wh..wh..opq":
                tree.clear_lower(parent)
            elif base[4:] in (b".", b".."):
                raise _Refused("whiteout of '.' or '..'")
            else:
                _remove(parent, base[4:])
        finally:
            os.close(parent)
        counts.add("whiteouts")
        return
    if member.ischr() or member.isblk() or member.isfifo():
        counts.add("specials_skipped")
        return
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise _Refused(f"unsupported tar entry type {member.type!r}")
    parent = tree.walk(parts[:-1], create=True)
    assert parent is not None
    try:
        _make_member(tar, member, parts, parent, tree, counts)
    finally:
        os.close(parent)
    counts.add("entries")


def _make_member(tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[bytes, ...],
                 parent: int, tree: _Tree, counts: _Counts) -> None:  # fmt: skip
    name = parts[-1]
    if member.issym():
        counts.owner(member.uid, member.gid)
        _make_room(parent, name, for_dir=False)
        tree.mark(_make_symlink(parent, name, os.fsencode(member.linkname)))
        return
    mode = counts.mode(member.mode, uid=member.uid, gid=member.gid)
    if member.isdir():
        if not _make_room(parent, name, for_dir=True):
            os.mkdir(name, 0o700, dir_fd=parent)
        tree.mark(os.lstat(name, dir_fd=parent))
        tree.dirs[parts] = (mode, member.mtime)
    elif member.islnk():
        _make_hardlink(member.linkname, parent, name, tree)
    else:
        data = tar.extractfile(member)
        assert data is not None

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    chunk = data.read(_CHUNK)
                except _READ_ERRORS as e:
                    raise _Corrupt(e) from e
                if not chunk:
                    return
                yield chunk

        _make_room(parent, name, for_dir=False)
        st, size = _write_file(parent, name, chunks(), mode, member.mtime, None)
        tree.mark(st)
        counts.add("data_bytes", size)


def _make_hardlink(linkname: str, parent: int, name: bytes, tree: _Tree) -> None:
    target = _clean(linkname)
    if not target:
        raise _Refused("hard link to the image's root")
    where = tree.walk(target[:-1], create=False)
    if where is None:
        raise _Refused(f"hard link to {linkname!r}, which is not in the image")
    try:
        try:
            st = os.lstat(target[-1], dir_fd=where)
        except FileNotFoundError:
            raise _Refused(f"hard link to {linkname!r}, which is not in the image") from None
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"hard link to {linkname!r}, which is not a regular file")
        try:
            if os.lstat(name, dir_fd=parent).st_ino == st.st_ino:
                return  # already that file
        except FileNotFoundError:
            pass
        _make_room(parent, name, for_dir=False)
        os.link(target[-1], name, src_dir_fd=where, dst_dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(where)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if mnt == prefix or mnt.startswith(prefix + "/"):
                    found.append(mnt)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def copy_tree(source: Path, dest: Path, budget: Budget) -> LayerReport:
    """Copy a root filesystem folder into `dest` by the same rules as a layer.

    The source is read through directory fds without following any symlink in it
    (they are copied as symlinks), hard links within it are kept, and a source with
    anything mounted below it (``/proc`` in a chroot, a bind mount of a host folder,
    even from the same filesystem) is refused, as is a directory on another
    filesystem met while copying. Refused too: a source that is ``/``, that holds the
    images store, or that holds `dest`; and, when the source is not root's, a hard
    link to a file not of the source's owner: where ``fs.protected_hardlinks`` is 0,
    anyone may hard-link a file they cannot read (``/etc/shadow``) into a folder they
    can write, and this copy, run by root, would read it into the image.
    ImageError on these, past `budget` and on a read or write error; `dest` is then
    partial (the caller removes it).
    """
    real = os.path.realpath(source)
    for inside, why in (
        ("/", "it is the host's /"),
        (os.path.realpath(images_dir()), "it holds the images store"),
        (os.path.realpath(dest), "it holds the folder being built"),
    ):
        if inside == real or inside.startswith(real.rstrip("/") + "/"):
            raise ImageError(f"cannot use {source} as a root filesystem: {why}")
    mounted = [m for m in mounts_under(Path(real)) if m != real]
    if mounted:
        raise ImageError(
            f"cannot use {source} as a root filesystem: {mounted[-1]} is mounted inside it "
            "(unmount what is mounted below it, or copy it without them)"
        )
    try:
        src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot read the root filesystem folder {source}: {e}") from None
    counts = _Counts()
    tree = _Tree(dest, budget)
    copier = _Copier(src, tree, budget, counts)
    try:
        copier.copy_dir(src, tree.root, b"", 0)
    except _Refused as e:
        raise ImageError(f"{source}: refused {os.fsdecode(copier.at)!r}: {e}") from None
    except ImageError as e:
        raise ImageError(f"{source}: {e}") from None
    except OSError as e:
        raise ImageError(f"{source}: cannot copy {os.fsdecode(copier.at)!r}: {e}") from None
    finally:
        tree.close()
        os.close(src)
    return counts.report()


class _Copier:
    """One copy_tree: walks the source by fds, writes into the tree by fds."""

    def __init__(self, src: int, tree: _Tree, budget: Budget, counts: _Counts) -> None:
        top = os.fstat(src)
        self.device, self.owner = top.st_dev, top.st_uid
        self.tree, self.budget, self.counts = tree, budget, counts
        self.links: dict[tuple[int, int], bytes] = {}
        self.at = b""

    def copy_dir(self, src: int, dst: int, rel: bytes, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise _Refused(f"deeper than {MAX_DEPTH} directories")
        for name in _names(src):
            self.at = rel + b"/" + name if rel else name
            st = os.lstat(name, dir_fd=src)
            self.budget.entry(0)
            kind = stat.S_IFMT(st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                self.counts.add("specials_skipped")
                continue
            if kind == stat.S_IFLNK:
                self.counts.owner(st.st_uid, st.st_gid)
                _make_room(dst, name, for_dir=False)
                _make_symlink(dst, name, os.readlink(name, dir_fd=src))
                self.counts.add("entries")
                continue
            self.counts.add("entries")
            if (st.st_dev, st.st_ino) in self.links:  # a hard link to a file copied already
                _make_room(dst, name, for_dir=False)
                os.link(self.links[st.st_dev, st.st_ino], name, src_dir_fd=self.tree.root,
                        dst_dir_fd=dst, follow_symlinks=False)  # fmt: skip
                continue
            mode = self.counts.mode(st.st_mode, uid=st.st_uid, gid=st.st_gid)
            if kind == stat.S_IFDIR:
                self.copy_subdir(src, dst, name, st, mode, depth)
            else:
                self.copy_file(src, dst, name, st, mode)

    def copy_subdir(self, src: int, dst: int, name: bytes, st: os.stat_result, mode: int,
                    depth: int) -> None:  # fmt: skip
        if st.st_dev != self.device:
            raise _Refused("a mount point (another filesystem): unmount it or copy without it")
        if not _make_room(dst, name, for_dir=True):
            os.mkdir(name, 0o700, dir_fd=dst)
        sub_src = os.open(name, _OPEN_DIR, dir_fd=src)
        try:
            sub_dst = os.open(name, _OPEN_DIR, dir_fd=dst)
            try:
                self.copy_dir(sub_src, sub_dst, self.at, depth + 1)
                os.fchmod(sub_dst, mode)
                _own(sub_dst)
                _set_mtime(sub_dst, st.st_mtime)
            finally:
                os.close(sub_dst)
        finally:
            os.close(sub_src)

    def copy_file(self, src: int, dst: int, name: bytes, st: os.stat_result, mode: int) -> None:
        _make_room(dst, name, for_dir=False)
        # O_NONBLOCK: had the entry become a fifo since lstat, open must not hang on it.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=src)  # fmt: skip
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or now.st_ino != st.st_ino:
                raise _Refused("it changed while being copied")
            if self.owner != 0 and now.st_nlink > 1 and now.st_uid != self.owner:
                raise _Refused(
                    f"a hard link to a file of uid {now.st_uid} in a folder of uid {self.owner} "
                    "(it may be a file its owner cannot read): copy the file instead of linking"
                )

            def chunks() -> Iterator[bytes]:
                while chunk := os.read(fd, _CHUNK):
                    yield chunk

            _, size = _write_file(dst, name, chunks(), mode, st.st_mtime, self.budget.charge)
        finally:
            os.close(fd)
        self.counts.add("data_bytes", size)
        if st.st_nlink > 1:
            self.links[st.st_dev, st.st_ino] = self.at
