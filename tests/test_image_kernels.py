"""The kernelspecs an image carries: found as the sandbox would see them, each one checked.

An image is untrusted: its kernel.json files may be symlinks to the host's files,
FIFOs, huge, malformed, or climb out with `..`. Each case is built here in a tree
made by the test, and `find_kernels` must read only inside it and keep only what is
valid. No sandbox needed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from provisioner.images.kernels import (
    MAX_KERNEL_JSON,
    find_kernels,
    open_inside,
    parse_kernel_json,
)

LOG = logging.getLogger("test")
IR = {"argv": ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"],
      "display_name": "R", "language": "R"}  # fmt: skip


def kernel(root: Path, base: str, name: str, spec: object, raw: bytes | None = None) -> Path:
    folder = root / base.lstrip("/") / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_bytes(raw if raw is not None else json.dumps(spec).encode())
    return folder


def test_kernels_are_found_in_the_usual_places_environment_first(tmp_path: Path) -> None:
    kernel(tmp_path, "/usr/share/jupyter/kernels", "ir", IR)
    (kernel(tmp_path, "/usr/share/jupyter/kernels", "ir", IR) / "logo-64x64.png").write_bytes(b"x")
    kernel(tmp_path, "/opt/conda/share/jupyter/kernels", "python3",
           {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (conda)", "language": "python"})  # fmt: skip
    kernel(tmp_path, "/usr/local/share/jupyter/kernels", "python3",
           {"argv": ["python3"], "display_name": "Python 3 (system)",
            "language": "python"})  # fmt: skip
    found = find_kernels(tmp_path, LOG)
    assert sorted(found) == ["ir", "python3"]
    assert found["python3"]["display_name"] == "Python 3 (conda)"  # the environment's wins
    assert found["ir"] == {**IR, "interrupt_mode": "signal", "env": {},
                           "resource_dir": "/usr/share/jupyter/kernels/ir",
                           "logos": ["logo-64x64.png"]}  # fmt: skip


def test_a_symlinked_kernels_folder_resolves_inside_the_image(tmp_path: Path) -> None:
    """/usr/share/jupyter -> /opt/jupyter (absolute, as images have them): resolved against
    the image's root, so the host's /opt/jupyter (if any) is never read."""
    kernel(tmp_path, "/opt/jupyter/kernels", "ir", IR)
    (tmp_path / "usr/share").mkdir(parents=True)
    (tmp_path / "usr/share/jupyter").symlink_to("/opt/jupyter")
    assert list(find_kernels(tmp_path, LOG)) == ["ir"]


def test_kernel_json_pointing_at_host_files_reads_the_images_own(tmp_path: Path) -> None:
    """kernel.json -> /etc/passwd and -> ../../../../../../etc/passwd: both mean the image's
    /etc/passwd (which here holds a valid spec), never the host's."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(json.dumps({**IR, "display_name": "inside"}))
    for name, target in (("abs", "/etc/passwd"), ("rel", "../../../../../../../../etc/passwd")):
        folder = tmp_path / "usr/share/jupyter/kernels" / name
        folder.mkdir(parents=True)
        (folder / "kernel.json").symlink_to(target)
    found = find_kernels(tmp_path, LOG)
    assert {k: v["display_name"] for k, v in found.items()} == {"abs": "inside", "rel": "inside"}


def test_hostile_kernel_files_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = "/usr/share/jupyter/kernels"
    kernel(tmp_path, base, "good", IR)
    kernel(tmp_path, base, "huge", None, raw=b" " * (MAX_KERNEL_JSON + 1))
    kernel(tmp_path, base, "garbage", None, raw=b"\x00\xff{not json")
    kernel(tmp_path, base, "deep", None, raw=b"[" * 100_000)
    kernel(tmp_path, base, "argv-not-list", {**IR, "argv": "R --slave"})
    kernel(tmp_path, base, "argv-empty", {**IR, "argv": []})
    kernel(tmp_path, base, "argv-nul", {**IR, "argv": ["R\0x"]})
    kernel(tmp_path, base, "env-bad", {**IR, "env": {"A B": "x"}})
    kernel(tmp_path, base, "name-ctl", {**IR, "display_name": "R\x1b[31m"})
    kernel(tmp_path, base, "no-language", {k: v for k, v in IR.items() if k != "language"})
    kernel(tmp_path, base, "bad-interrupt", {**IR, "interrupt_mode": "kill"})
    kernel(tmp_path, base, "-dash", IR)
    fifo = tmp_path / base.lstrip("/") / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "kernel.json")  # opening it for reading would hang the build
    loop = tmp_path / base.lstrip("/") / "loop"
    loop.mkdir()
    (loop / "kernel.json").symlink_to("kernel.json")
    with caplog.at_level(logging.WARNING):
        found = find_kernels(tmp_path, LOG)
    assert list(found) == ["good"]
    left_out = caplog.text
    for name in ("huge", "garbage", "deep", "argv-not-list", "argv-empty", "argv-nul", "env-bad",
                 "name-ctl", "no-language", "bad-interrupt", "-dash", "fifo", "loop"):  # fmt: skip
        assert f"kernels/{name} left out" in left_out, name


def test_open_inside_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a/up").symlink_to("../../..")
    (tmp_path / "outside").write_text("host")
    (root / "outside").write_text("image")
    fd = open_inside(root, "/a/up/outside")  # up: ../../.. from a/, clamped at the root
    try:
        assert os.read(fd, 10) == b"image"
    finally:
        os.close(fd)


def test_parse_keeps_only_the_fields_it_checks() -> None:
    spec = parse_kernel_json(json.dumps({**IR, "metadata": {"anything": 1}, "x": 2}).encode())
    assert sorted(spec) == ["argv", "display_name", "env", "interrupt_mode", "language"]
