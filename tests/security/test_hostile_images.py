"""Hostile images (issue 16, item 4): each gives a clear error or is neutralised, the
host is never written outside the image's folder, and nothing is left behind. Once
built, an image is still no part of the agent: its OpenSSL configuration never
reaches it (the last test).

Every test runs in a `work` folder holding `dest` and a canary beside it; the fixture
checks, after the test, that the canary is untouched and nothing else is left there.
Symlinks aim at the canary's absolute path (not the host's /etc): a regression then
shows as a failed test, not a damaged host.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BACKENDS, READY_TIMEOUT, execute, require_sandbox, skip_or_fail
from images_kit import kernelspecs
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from oci_kit import Workdir, du, entry, layer, require_tools, write_layout
from provisioner.guest.layout import AGENT_PYTHON

from provisioner.errors import ImageError
from provisioner.images.oci import MAX_LAYERS, _preflight, _unpack_layout, unpack_image
from provisioner.images.unpack import MAX_HEADER, Budget, LayerReport, apply_layer, copy_tree

log = logging.getLogger("test")
MiB = 1 << 20


def apply(work: Workdir, *entries: tuple[tarfile.TarInfo, bytes], budget: int = 64 * MiB,
          ) -> LayerReport:  # fmt: skip
    return apply_layer(io.BytesIO(layer(*entries)), work.dest, Budget(budget), what="layer 1/1")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "./../../x", "a/b/../../../etc/passwd"])
def test_climbing_out_is_refused(work: Workdir, name: str) -> None:
    with pytest.raises(ImageError, match=r"layer 1/1: refused .*climbs out of the image"):
        apply(work, entry(name, b"pwned"))


def test_absolute_paths_are_made_relative(work: Workdir) -> None:
    target = work.canary / "passwd"
    apply(work, entry(str(target), b"pwned"), entry("/etc/passwd", b"root:x:0:0\n"))
    assert (work.dest / str(target).lstrip("/")).read_bytes() == b"pwned"
    assert (work.dest / "etc/passwd").is_file()


def test_symlink_then_write_through(work: Workdir) -> None:
    """A symlink planted by one entry (or layer) never carries a later write outside."""
    budget = Budget(64 * MiB)
    first = layer(entry("evil", type=tarfile.SYMTYPE, linkname=str(work.canary)),
                  entry("up", type=tarfile.SYMTYPE, linkname="../../../../../.."),
                  entry("evil/passwd", b"pwned 1"))  # fmt: skip
    apply_layer(io.BytesIO(first), work.dest, budget, what="layer 1/2")
    second = layer(entry("evil/passwd", b"pwned 2"), entry("up/escaped", b"pwned 3"),
                   entry("up/evil/shadow", b"pwned 4"))  # fmt: skip
    apply_layer(io.BytesIO(second), work.dest, budget, what="layer 2/2")
    inside = work.dest / str(work.canary).lstrip("/")  # where chroot semantics put it
    assert (inside / "passwd").read_bytes() == b"pwned 2"
    assert (inside / "shadow").read_bytes() == b"pwned 4"
    assert (work.dest / "escaped").read_bytes() == b"pwned 3"
    assert (work.dest / "evil").readlink() == work.canary  # kept as it is, for the sandbox


def test_symlink_as_the_entry_itself_is_replaced_not_followed(work: Workdir) -> None:
    apply(work, entry("passwd", type=tarfile.SYMTYPE, linkname=str(work.canary / "passwd")),
          entry("passwd", b"pwned"))  # fmt: skip
    assert (work.dest / "passwd").read_bytes() == b"pwned"
    assert not (work.dest / "passwd").is_symlink()


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("CANARY/passwd", "which is not in the image"),
        ("../../../../CANARY/passwd", "climbs out of the image"),
        ("link", "which is not a regular file"),
        ("dir", "which is not a regular file"),
        ("via/passwd", "which is not in the image"),
    ],
)
def test_hard_links_outside_or_to_non_files_are_refused(work: Workdir, target: str,
                                                         error: str) -> None:  # fmt: skip
    target = target.replace("CANARY", str(work.canary).lstrip("/"))
    with pytest.raises(ImageError, match=error):
        apply(work, entry("link", type=tarfile.SYMTYPE, linkname=str(work.canary / "passwd")),
              entry("via", type=tarfile.SYMTYPE, linkname=str(work.canary)),
              entry("dir", type=tarfile.DIRTYPE, mode=0o755),
              entry("hard", type=tarfile.LNKTYPE, linkname=target))  # fmt: skip
    assert (work.canary / "passwd").stat().st_nlink == 1


def test_device_nodes_and_fifos_are_skipped(work: Workdir) -> None:
    report = apply(work, entry("dev/mem", type=tarfile.CHRTYPE, devmajor=1, devminor=1),
                   entry("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
                   entry("run/fifo", type=tarfile.FIFOTYPE), entry("ok", b"fine"))  # fmt: skip
    assert report.specials_skipped == 3
    assert sorted(p.name for p in work.dest.rglob("*") if not p.is_dir()) == ["ok"]


def test_setid_and_world_write_bits_are_cleared(work: Workdir) -> None:
    """World-write goes everywhere, sticky directories too: in the host's store a local
    user could otherwise plant files (dest/tmp/x) that every kernel of the image sees."""
    report = apply(work, entry("su", b"\x7fELF", mode=0o6755),
                   entry("open", b"x", mode=0o666), entry("tmp", type=tarfile.DIRTYPE, mode=0o1777),
                   entry("dir", type=tarfile.DIRTYPE, mode=0o2777))  # fmt: skip
    assert stat.S_IMODE((work.dest / "su").stat().st_mode) == 0o755
    assert stat.S_IMODE((work.dest / "open").stat().st_mode) == 0o664
    assert stat.S_IMODE((work.dest / "tmp").stat().st_mode) == 0o1775  # sticky bit kept
    assert stat.S_IMODE((work.dest / "dir").stat().st_mode) == 0o775
    assert report.setid_cleared == 2 and report.world_writable_cleared == 3


def test_copy_tree_clears_world_write_too(tmp_path: Path) -> None:
    source, dest = tmp_path / "rootfs", tmp_path / "dest"
    (source / "tmp").mkdir(parents=True)
    (source / "tmp").chmod(0o1777)
    (source / "open").write_text("x")
    (source / "open").chmod(0o666)
    dest.mkdir()
    report = copy_tree(source, dest, Budget(MiB))
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1775
    assert stat.S_IMODE((dest / "open").stat().st_mode) == 0o664
    assert report.world_writable_cleared == 2


def test_owners_are_reset_to_root(work: Workdir) -> None:
    owner = {"uid": 4242, "gid": 4242}
    report = apply(work, entry("home/x/file", b"x", **owner),
                   entry("home/x", type=tarfile.DIRTYPE, mode=0o700, **owner),
                   entry("link", type=tarfile.SYMTYPE, linkname="home", **owner))  # fmt: skip
    for path in (work.dest / "home/x/file", work.dest / "home/x", work.dest / "link"):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
    assert report.ownership_reset == 3


def test_whiteouts(work: Workdir) -> None:
    budget = Budget(64 * MiB)
    lower = layer(entry("a/x", b"x"), entry("a/y", b"y"), entry("b/z", b"z"),
                  entry("b/sub/deep", b"d"), entry("c/d", b"d"))  # fmt: skip
    upper = layer(entry("b/new", b"new"), entry("b/sub/mine", b"m"), entry("a/.wh.x"),
                  entry(".wh.c"), entry("b/.wh..wh..opq"), entry(".wh..wh.plnk"),
                  entry("a/.wh.nothing-there"))  # fmt: skip
    apply_layer(io.BytesIO(lower), work.dest, budget, what="layer 1/2")
    report = apply_layer(io.BytesIO(upper), work.dest, budget, what="layer 2/2")
    files = sorted(str(p.relative_to(work.dest)) for p in work.dest.rglob("*"))
    assert files == ["a", "a/y", "b", "b/new", "b/sub", "b/sub/mine"]
    assert report.whiteouts == 4


def gzip_bomb(files: int, size: int) -> bytes:
    """A gzipped tar of `files` files of `size` zero bytes (about 1/1000 of it compressed)."""
    out = io.BytesIO()
    zeros = bytes(MiB)
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        for i in range(files):
            info = tarfile.TarInfo(f"zero{i}")
            info.size = size
            gz.write(info.tobuf(format=tarfile.PAX_FORMAT))
            for _ in range(size // MiB):
                gz.write(zeros)
        gz.write(bytes(1024))
    return out.getvalue()


def test_decompression_bomb_stops_at_the_limit(work: Workdir) -> None:
    bomb = gzip_bomb(64, 16 * MiB)  # 1 GiB unpacked
    assert len(bomb) < 8 * MiB
    with pytest.raises(ImageError, match=r"image larger than the limit of 64 MiB \(set with "
                                         r"--max-size\)"):  # fmt: skip
        apply_layer(io.BytesIO(bomb), work.dest, Budget(64 * MiB), what="layer 1/1")
    assert du(work.dest) <= 64 * MiB


def test_one_huge_entry_is_refused_before_its_data(work: Workdir) -> None:
    info = tarfile.TarInfo("huge")
    info.size = 1 << 40  # 1 TiB announced; the data never comes
    with pytest.raises(ImageError, match="image larger than the limit of 64 MiB"):
        apply_layer(io.BytesIO(gzip.compress(info.tobuf())), work.dest, Budget(64 * MiB),
                    what="layer 1/1")  # fmt: skip
    assert not any(work.dest.iterdir())


def test_huge_header_is_refused_before_it_is_read(work: Workdir) -> None:
    info, data = entry("f", b"x")
    info.pax_headers = {"comment": "x" * (MAX_HEADER + 1)}
    with pytest.raises(ImageError, match="a header longer than 4 MiB"):
        apply(work, (info, data))


def checksummed(block: bytearray) -> bytes:
    """A tar header block with its checksum (of the block, the checksum field as spaces)."""
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


SPARSE = b"%011o\0" % 1 * 2  # one sparse struct: offset 1, 1 byte


def sparse_chain(blocks: int, *, end: bool = True) -> bytes:
    """A GNU sparse header followed by `blocks` extension blocks, each full of sparse
    structs and saying another follows (tarfile's _proc_sparse keeps them all)."""
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    head = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    head[386 : 386 + 4 * 24] = SPARSE * 4
    head[482] = 1  # extended
    head[483:495] = b"%011o\0" % 1
    ext = SPARSE * 21 + b"\1" + bytes(7)
    return checksummed(head) + ext * blocks + (bytes(1024) if end else b"")


def header_chain(kind: str) -> bytes:
    """A tar whose first entry's headers alone are over 4 MiB, each header under it."""
    if kind == "sparse":
        return sparse_chain(200_000)  # 100 MB of sparse map, under 1 MB gzipped
    if kind == "gnusparse-1.0":  # a pax-announced sparse map read from the entry's data
        info = tarfile.TarInfo("f")
        info.size = 8 * MiB
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "f", "GNU.sparse.realsize": "1"}  # fmt: skip
        number = b"1".rjust(63, b"0") + b"\n"
        return info.tobuf(format=tarfile.PAX_FORMAT) + b"%d\n" % MiB + number * (MiB // 8)
    out = b""  # a chain of pax headers or GNU long names, each 1 MiB
    for _ in range(8):
        info = tarfile.TarInfo("n" * MiB)
        info.pax_headers = {"comment": "c" * MiB}
        fmt = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
        block = info.tobuf(format=fmt)
        out += block[: -tarfile.BLOCKSIZE]  # every header but the entry's own
    return out + tarfile.TarInfo("f").tobuf() + bytes(1024)


@pytest.mark.parametrize("kind", ["sparse", "gnusparse-1.0", "pax", "long-names"])
def test_header_chains_are_bounded(work: Workdir, kind: str) -> None:
    """MAX_HEADER bounds each header chain, not only each header: a 434 KB layer of one
    sparse header and 200 000 extension blocks once took 308 MB in tarfile, and ended
    in a bare IndexError."""
    data = gzip.compress(header_chain(kind), compresslevel=1)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"layer 1/1: refused .*a header longer than 4 MiB"):
            apply_layer(io.BytesIO(data), work.dest, Budget(64 * MiB), what="layer 1/1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MiB, f"{peak / MiB:.0f} MiB"
    assert not any(work.dest.iterdir())


def test_a_header_chain_cut_short_is_corrupt(work: Workdir) -> None:
    """tarfile's bare IndexError (a sparse map cut short) is the corrupt-layer error."""
    with pytest.raises(ImageError, match=r"layer 1/1: corrupt or truncated archive"):
        apply_layer(io.BytesIO(sparse_chain(3, end=False)), work.dest, Budget(MiB),
                    what="layer 1/1")  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not an archive", "empty"])
def test_corrupt_archives(work: Workdir, damage: str) -> None:
    good = layer(*(entry(f"f{i}", bytes(range(256)) * 64) for i in range(20)))
    bad = {
        "truncated": good[: len(good) // 2],
        "flipped": good[:100] + bytes(b ^ 0xFF for b in good[100:200]) + good[200:],
        "not an archive": b"<html>502 Bad Gateway</html>" * 40,
        "empty": b"",
    }[damage]
    with pytest.raises(ImageError, match=r"layer 1/1: corrupt or truncated archive"):
        apply_layer(io.BytesIO(bad), work.dest, Budget(64 * MiB), what="layer 1/1")


ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def test_zstd_layers_are_named(work: Workdir) -> None:
    with pytest.raises(ImageError, match=r"zstd-compressed layers .*v1\.tar\+zstd"):
        apply_layer(io.BytesIO(b"\x28\xb5\x2f\xfd" + bytes(100)), work.dest, Budget(MiB),
                    what="layer 1/1", media_type=ZSTD)  # fmt: skip


class Garbage(http.server.BaseHTTPRequestHandler):
    """A registry answering junk: `/v2/` says yes, a manifest is `MANIFEST`, any blob
    is random-looking bytes that match no digest."""

    MANIFEST = b"\x00\xff{{ not json"

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v2":
            body, kind = b"{}", "application/json"
        elif "/manifests/" in self.path:
            body, kind = self.MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"
        else:
            body, kind = hashlib.sha512(self.path.encode()).digest() * 4, "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Content-Digest", "sha256:" + "0" * 64)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def garbage_registry(request: pytest.FixtureRequest) -> Iterator[int]:
    handler = type("Handler", (Garbage,), {"MANIFEST": request.param})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


VALID_MANIFEST = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 256,
               "digest": "sha256:" + "a" * 64},
    "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 256,
                "digest": "sha256:" + "b" * 64}],
}).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("garbage_registry", "error"),
    [
        (Garbage.MANIFEST, r"the manifest of docker://127\.0\.0\.1:\d+/x:1 is not valid JSON"),
        (VALID_MANIFEST, r"skopeo copy.*Digest did not match"),
    ],
    indirect=["garbage_registry"],
    ids=["junk-manifest", "junk-blobs"],
)
def test_a_registry_answering_garbage(garbage_registry: int, error: str, work: Workdir) -> None:
    require_tools("skopeo")
    with pytest.raises(ImageError, match=error):
        unpack_image(f"docker://127.0.0.1:{garbage_registry}/x:1", work.dest, max_bytes=64 * MiB,
                     log=log, tls_verify=False)  # fmt: skip
    assert not any(work.dest.iterdir())


def tampered_layout(path: Path) -> None:
    """A layout whose layer blob no longer matches the digest its manifest names."""
    write_layout(path, [layer(entry("good", b"good"))], tag="image")  # the tag unpack_image uses
    manifest = json.loads(
        (path / "blobs/sha256" / json.loads((path / "index.json").read_text())["manifests"][0][
            "digest"].split(":")[1]).read_text()
    )  # fmt: skip
    blob = path / "blobs/sha256" / manifest["layers"][0]["digest"].split(":")[1]
    blob.write_bytes(layer(entry("evil", b"evil!")))


def test_a_layer_that_does_not_match_its_digest(work: Workdir, tmp_path: Path) -> None:
    require_tools("skopeo")
    tampered_layout(tmp_path / "layout")
    with pytest.raises(ImageError, match=r"skopeo copy.*[Dd]igest"):
        unpack_image(str(tmp_path / "layout"), work.dest, max_bytes=64 * MiB, log=log)
    assert not any(work.dest.iterdir())
    # And if skopeo let one through, reading the layout checks each layer's digest itself.
    with pytest.raises(ImageError, match=r"layer 1/1 .*does not match its digest"):
        _unpack_layout(tmp_path / "layout", "test", work.dest, 64 * MiB, log)


def test_too_large_is_refused_before_fetching(work: Workdir, tmp_path: Path) -> None:
    require_tools("skopeo")
    write_layout(tmp_path / "layout", [layer(entry("noise", os.urandom(2 * MiB)))])
    with pytest.raises(ImageError, match=r"larger than the limit of 1 MiB .*compressed"):
        unpack_image(str(tmp_path / "layout"), work.dest, max_bytes=MiB, log=log)
    assert not any(work.dest.iterdir())


def test_an_image_for_another_platform(work: Workdir, tmp_path: Path) -> None:
    require_tools("skopeo")
    write_layout(tmp_path / "layout", [layer(entry("f", b"x"))], architecture="arm64")
    with pytest.raises(ImageError, match="arm64"):
        unpack_image(str(tmp_path / "layout"), work.dest, max_bytes=MiB, log=log)


def test_copy_tree_refuses_a_bind_mount_inside(tmp_path: Path) -> None:
    """A bind mount from the same filesystem (same st_dev) is still refused."""
    if os.geteuid() != 0:
        skip_or_fail("mounting needs root")
    source, dest, secret = tmp_path / "rootfs", tmp_path / "dest", tmp_path / "secret"
    for path in (source / "etc", dest, secret):
        path.mkdir(parents=True)
    (secret / "key").write_text("host secret")
    subprocess.run(["mount", "--bind", str(secret), str(source / "etc")], check=True)
    try:
        with pytest.raises(ImageError, match=r"rootfs/etc is mounted inside it"):
            copy_tree(source, dest, Budget(MiB))
    finally:
        subprocess.run(["umount", str(source / "etc")], check=True)
    assert not any(dest.iterdir())


def test_copy_tree_refuses_a_hard_link_to_someone_elses_file(tmp_path: Path) -> None:
    """With fs.protected_hardlinks=0 a user may hard-link root's files (/etc/shadow) into
    a folder of theirs; root copying that folder must not read them into the image."""
    if os.geteuid() != 0:
        skip_or_fail("owning files as another user needs root")
    source, dest = tmp_path / "rootfs", tmp_path / "dest"
    (source / "etc").mkdir(parents=True)
    dest.mkdir()
    shadow = tmp_path / "shadow"
    shadow.write_text("root:secret")
    shadow.chmod(0o600)
    os.link(shadow, source / "etc/shadow")
    (source / "mine").write_text("a file of the folder's owner, linked twice")
    os.link(source / "mine", source / "mine2")
    for path in (source, source / "etc", source / "mine"):
        os.chown(path, 4242, 4242)
    with pytest.raises(ImageError, match=r"refused 'etc/shadow': a hard link to a file of uid 0"):
        copy_tree(source, dest, Budget(MiB))
    assert not (dest / "etc/shadow").exists()
    (source / "etc/shadow").unlink()  # the owner's own hard links are copied as links
    shutil.rmtree(dest)
    dest.mkdir()
    copy_tree(source, dest, Budget(MiB))
    assert (dest / "mine").stat().st_ino == (dest / "mine2").stat().st_ino


def test_preflight_refuses_schema_1_and_too_many_layers() -> None:
    ref = "docker://registry.example/x:1"
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 10,
                  "digest": "sha256:" + "b" * 64}  # fmt: skip
    schema1 = {"schemaVersion": 1, "name": "x", "tag": "1",
               "fsLayers": [{"blobSum": "sha256:" + "b" * 64}]}  # fmt: skip
    with pytest.raises(ImageError, match="schema 1 manifests are not supported: push the image"):
        _preflight(schema1, ref, MiB)
    with pytest.raises(ImageError, match=f"257 layers, more than {MAX_LAYERS}"):
        _preflight({"schemaVersion": 2, "layers": [layer_desc] * 257}, ref, 1 << 40)
    with pytest.raises(ImageError, match="does not give every layer's size"):
        _preflight({"schemaVersion": 2, "layers": [{**layer_desc, "size": "10"}]}, ref, MiB)
    with pytest.raises(ImageError, match="does not give every layer's size"):
        _preflight({"schemaVersion": 2}, ref, MiB)
    with pytest.raises(ImageError, match=r"larger than the limit of 16 bytes .*20 bytes compr"):
        _preflight({"schemaVersion": 2, "layers": [layer_desc] * 2}, ref, 16)
    _preflight({"schemaVersion": 2, "layers": [layer_desc] * MAX_LAYERS}, ref, MiB)
    _preflight({"schemaVersion": 2}, "docker-archive:/x.tar", MiB)  # local: bounded already


# -- an image's OpenSSL configuration and the agent ----------------------------------

OPENSSL_PROBE = '''
import json, os, ssl, subprocess

def tls():
    try:
        ssl.create_default_context()
        return "ok"
    except ssl.SSLError as e:
        return e.reason or str(e)

def agent_runtime(**env):
    """The agent's own Python run as the agent runs it (-S -s -E -B), `env` its whole
    environment: what `import ssl` left of a line given on its stdin."""
    done = subprocess.run(
        [AGENT_PYTHON, "-S", "-s", "-E", "-B", "-c", "import ssl, sys; print(sys.stdin.read())"],
        input="# jsb-stdin-canary\\n", capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    return done.stdout.strip() or done.stderr.strip()[-300:]

print(json.dumps({"uid": os.getuid(), "tls": tls(), "OPENSSL_CONF": os.environ.get("OPENSSL_CONF"),
                  "runtime": agent_runtime(),
                  "runtime_dev_null": agent_runtime(OPENSSL_CONF="/dev/null")}))
'''


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_the_images_openssl_config_never_reaches_the_agent(
    backend: str, hostile_openssl_image: str, kernel_prefix: Path, no_leftovers: None
) -> None:
    """The agent runs on its own Python, but that Python's libcrypto (a copy of Debian's)
    reads OPENSSLDIR/openssl.cnf, the *image's* in a sandbox, as soon as the agent imports
    ssl (asyncio does), and a directive there can load a module of the image's into the
    agent, root in a local sandbox. Every agent has OPENSSL_CONF=/dev/null (gVisor's OCI
    spec, the microVM's pid1, a pod's env: guest/layout.py AGENT_OPENSSL_CONF).

    The image's openssl.cnf (`images_kit.HOSTILE_OPENSSL_CNF`) includes /proc/self/fd/0,
    the reader's own stdin, which for the agent is the host's channel (gVisor) or the
    console (a microVM's pid1): an agent that read it would block in `import ssl` before
    its first frame, and the kernel would never start. It also loads a provider module
    with `config_diagnostics = 1`, so that OpenSSL fails to start in whoever reads it.

    The kernel starts and runs code; in the same sandbox the kernel's own ssl (the image's
    libcrypto, no OPENSSL_CONF) is broken by the file, and the agent's runtime, run by the
    kernel without OPENSSL_CONF, swallows a line given on its stdin while importing ssl,
    but keeps it with OPENSSL_CONF=/dev/null: the file is live and would reach the agent
    but for the variable. Tried once by hand: `sleep 5 | chroot ROOT /opt/jupyter-sandbox-
    runtime/bin/python3 -S -s -E -B -c "import ssl"` (ROOT: the runtime and this file)
    takes 5 s, OpenSSL reading the pipe until it closes, and no time with OPENSSL_CONF=
    /dev/null; and with the variable taken out of gVisor's OCI spec this test fails: "the
    sandbox did not start the kernel within 60 s".
    """
    require_sandbox(backend)
    [name] = kernelspecs(hostile_openssl_image, kernel_prefix, "--kernel", "python3",
                         "--backend", backend, "--workspace=none",
                         "--name", f"openssl-{backend}")  # fmt: skip
    km = AsyncIOLoopKernelManager(kernel_name=name)
    await km.start_kernel()
    try:
        assert km.provisioner.image == hostile_openssl_image
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        reply, text, _ = await execute(kc, f"AGENT_PYTHON = {AGENT_PYTHON!r}\n" + OPENSSL_PROBE)
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)
    assert reply["status"] == "ok", text
    found = json.loads(text.strip().splitlines()[-1])
    assert found["uid"] != 0
    # The file is there and in force: the kernel's OpenSSL (the image's) read it ...
    assert found["OPENSSL_CONF"] is None and found["tls"] == "LIBRARY_HAS_NO_CIPHERS", found
    # ... and the agent's runtime reads it too, unless OPENSSL_CONF says otherwise.
    assert found["runtime"] == "", found
    assert found["runtime_dev_null"] == "# jsb-stdin-canary", found
