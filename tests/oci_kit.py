"""Making OCI images in tests: layers with tarfile, layouts as JSON, archives and a
registry with the real skopeo and docker-registry."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_or_fail
from helpers import free_port, port_open

from provisioner.images.oci_layout import RunConfig, add_layer, write_image


def entry(name: str, data: bytes = b"", **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    """A tar entry: a regular file unless `type` says otherwise (attrs are TarInfo's)."""
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    if info.isreg():
        info.size = len(data)
    return info, data


def layer(*entries: tuple[tarfile.TarInfo, bytes], compression: str = "gz") -> bytes:
    """A layer holding `entries`, compressed with `compression` ("gz", "bz2", "xz" or "")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def write_layout(layout: Path, layers: list[bytes], *, tag: str = "1",
                 config: RunConfig | None = None, architecture: str = "amd64") -> str:  # fmt: skip
    """An OCI image layout at `layout` with `layers` (gzipped tars) tagged `tag`; returns
    the manifest's digest."""
    stored = [add_layer(layout, data) for data in layers]
    return write_image(layout, stored, tag=tag, config=config or RunConfig(),
                       architecture=architecture)  # fmt: skip


def require_tools(*tools: str) -> None:
    """Skip (locally) or fail (under CI) when a tool these tests drive is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed (run scripts/install-host.sh)")


def skopeo_copy(source: str, dest: str, *extra: str) -> None:
    """skopeo copy, as a test's setup: no signature policy, plain HTTP to loopback."""
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", *extra, source, dest],
                   check=True, timeout=300)  # fmt: skip


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[int]:
    """A real registry (Debian's docker-registry) on 127.0.0.1: its port."""
    require_tools("docker-registry", "skopeo")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path / 'registry'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert proc.poll() is None, "docker-registry exited"
            assert time.monotonic() < deadline, "docker-registry did not listen within 30 s"
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Workdir:
    """A folder holding `dest` (where an image is unpacked) and a canary beside it: what
    a test checks was never written, and that nothing else is left there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dest = root / "dest"
        self.dest.mkdir()
        self.canary = root / "canary"
        self.canary.mkdir()
        (self.canary / "passwd").write_text("host file\n")
        self._before = self._state()

    def _state(self) -> list[tuple[str, int, int]]:
        return sorted(
            (str(p.relative_to(self.root)), p.lstat().st_mode, p.lstat().st_size)
            for p in self.canary.rglob("*")
        )

    def check_outside(self) -> None:
        """The canary is as it was, and nothing but dest and the canary is here."""
        assert self._state() == self._before, "something was written outside dest"
        assert (self.canary / "passwd").read_text() == "host file\n"
        left = sorted(p.name for p in self.root.iterdir())
        assert left == ["canary", "dest"], f"something left behind: {left}"


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Workdir]:
    """A Workdir whose outside is checked after the test, whatever it asserted."""
    (tmp_path / "w").mkdir()
    workdir = Workdir(tmp_path / "w")
    yield workdir
    workdir.check_outside()


def du(path: Path) -> int:
    """Bytes on disk below `path` (what `du` counts)."""
    return sum(p.lstat().st_blocks * 512 for p in [path, *path.rglob("*")])
