"""The image store's own rules, pure: no sandbox, no build, everything in tmp folders.

What an untrusted tree may hold once a postBuild wrote it (install.check_tree), how the
content hash walks a tree (store.tree_digest), where image locks live and that they
outlive the folders they guard, and how kernels using an image are found.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.errors import ImageError
from provisioner.images import imports, install, unpack
from provisioner.images.store import tree_digest
from provisioner.state import Record

log = logging.getLogger(__name__)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


@pytest.fixture(autouse=True)
def tmp_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty image store and runtime folder (no sandbox records) of this test's own."""
    store = tmp_path / "images"
    store.mkdir()
    monkeypatch.setenv("JUPYTER_SANDBOX_IMAGES_DIR", str(store))
    monkeypatch.setenv("JUPYTER_SANDBOX_RUNTIME_DIR", str(tmp_path / "run"))
    yield store


def _nest(top: Path, names: list[str]) -> int:
    """Make top/names[0]/names[1]/... through directory fds (no PATH_MAX limit); return
    an fd of the deepest one (the caller closes it)."""
    fd = os.open(top, _DIR)
    for name in names:
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, _DIR, dir_fd=fd)
        os.close(fd)
        fd = sub
    return fd


def test_a_tree_too_deep_is_refused_and_still_removable(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    os.close(_nest(root, ["d"] * 1200))
    with pytest.raises(ImageError, match=f"deeper than {unpack.MAX_DEPTH} directories"):
        install.check_tree(root, max_bytes=1 << 30, log=log)
    install.remove_tree(root, log)  # shutil.rmtree's recursion gives up at ~1000 levels
    assert not os.path.lexists(root)


def test_setid_bits_are_cleared_past_path_max(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    fd = _nest(root, [f"{i:02d}" + "x" * 248 for i in range(20)])  # > 5000 bytes of path
    try:
        os.close(os.open("su", os.O_WRONLY | os.O_CREAT, 0o755, dir_fd=fd))
        os.chmod("su", 0o6755, dir_fd=fd)
        assert os.lstat("su", dir_fd=fd).st_mode & stat.S_ISUID
        counts = install.check_tree(root, max_bytes=1 << 30, log=log)
        assert stat.S_IMODE(os.lstat("su", dir_fd=fd).st_mode) == 0o755
    finally:
        os.close(fd)
    assert counts["setid_cleared"] == 1
    assert counts["entries"] == 21


def test_a_sparse_huge_file_is_refused_before_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "build" / "rootfs"
    root.mkdir(parents=True)
    with open(root / "bomb", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, no block on disk
    monkeypatch.setattr(install, "tree_digest", lambda root: pytest.fail("hashed"))
    started = time.monotonic()
    with pytest.raises(ImageError, match="larger than the limit of 1 GiB"):
        install.store("sparse", root.parent, {}, log, max_bytes=1 << 30)
    assert time.monotonic() - started < 5


def test_devices_fifos_and_sockets_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "dev").mkdir(parents=True)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    (root / "kept").write_text("x")
    (root / "link").symlink_to("/dev/null")
    counts = install.check_tree(root, max_bytes=1 << 30, log=log)
    assert counts["specials_removed"] == 4
    assert sorted(p.name for p in root.rglob("*")) == ["dev", "kept", "link"]


def test_world_write_is_cleared_everywhere_and_sticky_kept(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    for folder, mode in (("tmp", 0o1777), ("shared", 0o2777), ("plain", 0o755)):
        (root / folder).mkdir(parents=True)
        (root / folder).chmod(mode)
    (root / "plain/open").write_text("x")
    (root / "plain/open").chmod(0o666)
    (root / "plain/link").symlink_to("open")
    install.check_tree(root, max_bytes=1 << 30, log=log)
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}
    assert modes["tmp"] == 0o1775
    assert modes["shared"] == 0o775
    assert modes["plain"] == 0o755
    assert modes["open"] == 0o664


def test_too_many_entries_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    for i in range(5):
        (root / str(i)).touch()
    monkeypatch.setattr(unpack, "MAX_ENTRIES", 4)
    with pytest.raises(ImageError, match="more than 4 files"):
        install.check_tree(root, max_bytes=1 << 30, log=log)


def _old_tree_digest(root: Path) -> tuple[str, int]:
    """store.tree_digest as it was (recursive), kept to prove the new one hashes alike."""
    outer = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    seen: set[tuple[int, int]] = set()
    size = 0

    def walk(dir_fd: int, rel: bytes) -> None:
        nonlocal size
        for entry_name in sorted(os.listdir(dir_fd)):
            name = os.fsencode(entry_name)
            path = rel + b"/" + name if rel else name
            st = os.lstat(name, dir_fd=dir_fd)
            mode = st.st_mode
            if stat.S_ISREG(mode):
                inner = hashlib.sha256()
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    while n := os.readv(fd, [buf]):
                        inner.update(view[:n])
                finally:
                    os.close(fd)
                data = inner.hexdigest().encode()
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_size
            elif stat.S_ISLNK(mode):
                data = os.fsencode(os.readlink(name, dir_fd=dir_fd))
                size += st.st_size
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                data = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}".encode()
            else:
                data = b""
            outer.update(b"%s\0%o\0%d\0%d\0%s\n" % (path, mode, st.st_uid, st.st_gid, data))
            if stat.S_ISDIR(mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    walk(sub, path)
                finally:
                    os.close(sub)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk(top, b"")
    finally:
        os.close(top)
    return outer.hexdigest(), size


def test_tree_digest_hashes_as_the_recursive_walk_did(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr/lib/python3/site").mkdir(parents=True)
    (root / "usr/bin").mkdir()
    (root / "etc").mkdir()
    (root / "empty").mkdir()
    (root / "usr/bin/python3").write_bytes(os.urandom(3 << 20))  # more than one buffer
    os.link(root / "usr/bin/python3", root / "usr/bin/python3.11")
    (root / "usr/bin/python").symlink_to("python3")
    (root / "usr/lib/dangling").symlink_to("/etc/../nowhere")
    (root / "usr/lib/python3/site/a.py").write_text("print(1)\n")
    (root / "usr/lib/python3/site/b-c.py").write_text("")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc/passwd").chmod(0o600)
    (root / "a b").write_text("space")
    (root / "Z").write_text("upper sorts first")
    assert tree_digest(root) == _old_tree_digest(root)


def test_image_locks_outlive_the_image_folder(tmp_store: Path) -> None:
    with pytest.raises(RuntimeError), install.building("first", log) as tmp:
        (tmp / "rootfs").mkdir()
        raise RuntimeError("the build failed")
    assert not os.path.lexists(tmp_store / "first")  # a first build that failed
    assert (tmp_store / ".locks/first.lock").is_file()

    (tmp_store / "kept/rootfs").mkdir(parents=True)
    (tmp_store / "kept/manifest.json").write_text("{}")
    install.remove_image("kept", log)
    assert sorted(p.name for p in tmp_store.iterdir()) == [".locks"]
    assert (tmp_store / ".locks/kept.lock").is_file()
    with pytest.raises(ImageError, match="no image 'kept'"):
        install.remove_image("kept", log)


def test_users_of_matches_a_path_spelt_another_way(tmp_store: Path, tmp_path: Path) -> None:
    (tmp_store / "img/rootfs").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_store)
    Record("sb1", "kernel-1", "gvisor", image=f"{tmp_store}/img/rootfs/").save()
    Record("sb2", "kernel-2", "gvisor", image=str(tmp_path / "alias/img/rootfs")).save()
    Record("sb3", "kernel-3", "gvisor", image=f"{tmp_store}/img/rootfsx").save()
    Record("sb4", "kernel-4", "gvisor").save()
    assert sorted(install.users_of("img")) == ["kernel-1", "kernel-2"]


def test_store_undoes_its_swap_if_a_kernel_started_meanwhile(
    tmp_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(content: str) -> Path:
        tmp = tmp_store / "img" / f".build-{content}"
        (tmp / "rootfs").mkdir(parents=True)
        (tmp / "rootfs/version").write_text(content)
        return tmp

    (tmp_store / "img").mkdir()
    install.store("img", build("old"), {"v": "old"}, log, max_bytes=1 << 30)
    answers = iter([[], ["kernel-1"]])  # free when checked first, used once swapped
    monkeypatch.setattr(install, "users_of", lambda name: next(answers))
    with pytest.raises(ImageError, match="in use by 1 kernel"):
        install.store("img", build("new"), {"v": "new"}, log, max_bytes=1 << 30)
    assert (tmp_store / "img/rootfs/version").read_text() == "old"
    assert '"v": "old"' in (tmp_store / "img/manifest.json").read_text()
    assert (tmp_store / "img/.build-new/rootfs/version").read_text() == "new"


def test_add_kernel_user_replaces_a_passwd_folder(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc/passwd/sub").mkdir(parents=True)
    imports.add_kernel_user(root)
    assert (root / "etc/passwd").read_text().startswith("root:x:0:0:")


def test_import_failures_from_the_host_are_image_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src/usr").mkdir(parents=True)

    def fail(*args: object, **kwargs: object) -> None:
        raise shutil.Error([("a", "b", "permission denied")])

    monkeypatch.setattr(imports, "_import", fail)
    with pytest.raises(ImageError, match="image mine: cannot build it from"):
        imports.import_image("mine", str(tmp_path / "src"), log=log)
