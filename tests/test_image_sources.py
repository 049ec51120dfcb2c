"""Images from OCI layouts, archives, a registry and rootfs folders: the happy paths.

Real parts: the layers are made with tarfile, the archives with skopeo, the registry
is Debian's docker-registry on loopback. What hostile images do is
security/test_hostile_images.py's.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import tarfile
from pathlib import Path

import pytest
from oci_kit import Workdir, entry, layer, require_tools, skopeo_copy, write_layout

from provisioner.errors import ImageError
from provisioner.images.oci import is_oci_source, unpack_image
from provisioner.images.oci_layout import RunConfig
from provisioner.images.unpack import Budget, LayerReport, apply_layer, copy_tree

log = logging.getLogger("test")
MiB = 1 << 20

BASE = layer(
    entry("etc", type=tarfile.DIRTYPE, mode=0o755),
    entry("etc/os-release", b"ID=test\n"),
    entry("usr/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755),
    entry("bin", type=tarfile.SYMTYPE, linkname="usr/bin"),
    entry("tmp", type=tarfile.DIRTYPE, mode=0o1777),
)
TOP = layer(
    entry("etc/os-release", b"ID=top\n"),
    entry("usr/share/jupyter/kernels/ir/kernel.json", b'{"argv": ["R"]}'),
    entry("usr/bin/tool2", type=tarfile.LNKTYPE, linkname="usr/bin/tool"),
)
CONFIG = RunConfig(env=["PATH=/usr/bin", "LANG=C.UTF-8"], working_dir="/home/jovyan",
                   user="1000", cmd=["start-notebook.sh"])  # fmt: skip


def check_tree(dest: Path) -> None:
    """What BASE then TOP make."""
    assert (dest / "etc/os-release").read_text() == "ID=top\n"
    assert (dest / "bin").readlink() == Path("usr/bin")
    tool = (dest / "usr/bin/tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o755 and tool.st_uid == 0
    assert (dest / "usr/bin/tool2").stat().st_ino == tool.st_ino
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1775  # no world-write in the store
    assert (dest / "usr/share/jupyter/kernels/ir/kernel.json").is_file()


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", ""])
def test_layers_in_every_compression(work: Workdir, compression: str) -> None:
    budget = Budget(64 * MiB)
    for i, data in enumerate((BASE, TOP)):
        if compression != "gz":  # the same entries, compressed otherwise
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                items = [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]
            data = layer(*items, compression=compression)
        report = apply_layer(io.BytesIO(data), work.dest, budget, what=f"layer {i}")
        assert isinstance(report, LayerReport)
    check_tree(work.dest)
    assert budget.bytes_left < 64 * MiB


def test_copy_tree(work: Workdir, tmp_path: Path) -> None:
    source = tmp_path / "rootfs"
    (source / "usr/bin").mkdir(parents=True)
    (source / "etc").mkdir()
    (source / "etc/os-release").write_text("ID=top\n")
    (source / "usr/bin/tool").write_text("#!/bin/sh\n")
    (source / "usr/bin/tool").chmod(0o4755)
    os.link(source / "usr/bin/tool", source / "usr/bin/tool2")
    (source / "bin").symlink_to("usr/bin")
    (source / "abs").symlink_to("/etc")  # copied as it is, never followed
    os.mkfifo(source / "fifo")
    report = copy_tree(source, work.dest, Budget(64 * MiB))
    assert report.specials_skipped == 1 and report.setid_cleared == 1
    assert not os.path.lexists(work.dest / "fifo")
    assert (work.dest / "abs").readlink() == Path("/etc")
    tool = (work.dest / "usr/bin/tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o755
    assert (work.dest / "usr/bin/tool2").stat().st_ino == tool.st_ino


def test_copy_tree_refuses_the_host_root_and_the_store(
    work: Workdir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ImageError, match="it is the host's /"):
        copy_tree(Path("/"), work.dest, Budget(MiB))
    monkeypatch.setenv("JUPYTER_SANDBOX_IMAGES_DIR", str(tmp_path / "src/var/images"))
    (tmp_path / "src/var/images").mkdir(parents=True)
    with pytest.raises(ImageError, match="holds the images store"):
        copy_tree(tmp_path / "src", work.dest, Budget(MiB))
    with pytest.raises(ImageError, match="holds the folder being built"):
        copy_tree(work.root, work.dest, Budget(MiB))
    assert not any(work.dest.iterdir())


def test_is_oci_source(tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", [BASE])
    assert is_oci_source(str(tmp_path / "layout"))
    for source in ("oci:/x", "oci-archive:/x.tar", "docker-archive:/x.tar:a:1", "docker://r/x:1"):
        assert is_oci_source(source)
    assert not is_oci_source(str(tmp_path))  # a Binder or rootfs folder


def unpacked(source: str, work: Workdir, **kwargs: object) -> dict[str, object]:
    info = unpack_image(source, work.dest, max_bytes=64 * MiB, log=log, **kwargs)  # type: ignore[arg-type]
    check_tree(work.dest)
    assert info["kind"] == "oci" and info["reference"] == source and info["layers"] == 2
    assert str(info["digest"]).startswith("sha256:")
    return info


def test_oci_layout(work: Workdir, tmp_path: Path) -> None:
    require_tools("skopeo")
    digest = write_layout(tmp_path / "layout", [BASE, TOP], tag="1", config=CONFIG)
    info = unpacked(str(tmp_path / "layout"), work)  # a bare folder: oci:
    assert info["digest"] == digest
    assert info["config"] == {"env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
                              "working_dir": "/home/jovyan", "user": "1000", "entrypoint": [],
                              "cmd": ["start-notebook.sh"]}  # fmt: skip


def test_oci_layout_with_tag(tmp_path: Path) -> None:
    require_tools("skopeo")
    write_layout(tmp_path / "layout", [BASE, TOP], tag="v2")
    (tmp_path / "w").mkdir()
    unpacked(f"oci:{tmp_path / 'layout'}:v2", Workdir(tmp_path / "w"))


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
def test_archives(transport: str, work: Workdir, tmp_path: Path) -> None:
    require_tools("skopeo")
    write_layout(tmp_path / "layout", [BASE, TOP], config=CONFIG)
    archive = f"{transport}:{tmp_path / 'image.tar'}"
    skopeo_copy(f"oci:{tmp_path / 'layout'}:1", archive + (":x:1" if "docker" in transport else ""))
    info = unpacked(archive, work)
    assert info["config"]["cmd"] == ["start-notebook.sh"]  # type: ignore[index]


def test_registry(registry: int, work: Workdir, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", [BASE, TOP], config=CONFIG)
    image = f"docker://127.0.0.1:{registry}/x:1"
    skopeo_copy(f"oci:{tmp_path / 'layout'}:1", image, "--dest-tls-verify=false")
    info = unpacked(image, work, tls_verify=False)
    assert info["config"]["env"] == ["PATH=/usr/bin", "LANG=C.UTF-8"]  # type: ignore[index]
