"""Images the benchmarks import, the way an operator brings their own, and remove again.

The default image's rootfs becomes an uncompressed layer of an OCI layout, with
layers of the caller's own on top; skopeo turns the layout into a `docker-archive`
(what `docker save` writes), and `jupyter sandbox image build NAME --from
docker-archive:FILE` imports it. Every image made here is removed with `jupyter
sandbox image rm` (`removed`), whatever happened, and every scratch file lives in a
folder under /var/tmp that the caller removes.

run.py starts kernels on such an image (the default one plus a small layer: the
same Python kernel, so its start compares with the default image's); images.py
times the import of a ~1 GiB one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from provisioner.guest.layout import KERNEL_PATH, KERNEL_UID

from provisioner.images.oci_layout import TAR_LAYER, RunConfig, add_layer, write_image
from provisioner.images.store import find_image, image_dir

IMPORTED = "bench-imported"
"""The image run.py imports for its row of starts on an imported image."""
KERNELSPEC = f"python3-gvisor-{IMPORTED}"
"""The kernelspec run.py installs for it (`kernelspec install --image ... --name`)."""
SCRATCH = Path("/var/tmp")
CLI_TIMEOUT = 1800.0
"""Seconds an `image build` may take (a 1 GiB import under load, its root disk too)."""
STOP_TIMEOUT = 120.0
"""Seconds an interrupted `jupyter sandbox` command gets to clean up after SIGINT."""


def sandbox_cli(*args: str, timeout: float = CLI_TIMEOUT) -> tuple[float, list[tuple[float, str]]]:
    """Run `jupyter sandbox ARGS` as the operator does: the seconds it took, and its output
    lines (stdout and its log on stderr, merged), each with the seconds since the start
    at which it arrived.

    RuntimeError with the output's tail if it fails. Interrupted (Ctrl-C, SIGTERM made
    KeyboardInterrupt by the caller) or timed out, it gets SIGINT, so that it removes
    its own partial build, before it is killed."""
    jupyter = Path(sys.executable).parent / "jupyter"
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    process = subprocess.Popen([str(jupyter), "sandbox", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"`jupyter sandbox {' '.join(args)}` took over {timeout:g} s")
        process.wait()
        seconds = time.perf_counter() - t0
    except BaseException:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise
    finally:
        if process.stdout is not None:
            process.stdout.close()
    if process.returncode != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"`jupyter sandbox {' '.join(args)}` failed:\n{tail}")
    return seconds, lines


def small_layer(path: Path, name: str, data: bytes) -> Path:
    """An uncompressed layer at `path` holding one file `name`."""
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.size = 0o644, 1_700_000_000, len(data)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return path


def random_layer(path: Path, total: int, file_size: int = 16 << 20) -> Path:
    """An uncompressed layer at `path` of files of random (incompressible) bytes under
    /opt/bench-data, `total` bytes of content in all."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        index = 0
        while total > 0:
            size = min(file_size, total)
            info = tarfile.TarInfo(f"opt/bench-data/{index:04d}.bin")
            info.mode, info.mtime, info.size = 0o644, 1_700_000_000, size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
            total -= size
            index += 1
    return path


def oci_layout(layout: Path, layers: Iterable[Path]) -> None:
    """An OCI layout (tag `1`): the default image's rootfs as an uncompressed layer, then
    `layers` (uncompressed tar files, moved into the layout), with the default image's
    environment in its config."""
    layout.mkdir(parents=True)
    base = layout / "base.tar"
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(find_image()), "-cf",
                    str(base), "."], check=True, timeout=CLI_TIMEOUT)  # fmt: skip
    stored = [add_layer(layout, path, TAR_LAYER) for path in [base, *layers]]
    config = RunConfig(env=[f"PATH={KERNEL_PATH}", "LANG=C.UTF-8"], working_dir="/",
                       user=str(KERNEL_UID))  # fmt: skip
    write_image(layout, stored, tag="1", config=config)


def docker_archive(scratch: Path, layers: Iterable[Path]) -> Path:
    """`scratch`/image.tar: a docker-archive of the default image plus `layers` (moved
    into a layout in `scratch`, which is removed once skopeo has copied it)."""
    layout = scratch / "layout"
    oci_layout(layout, layers)
    archive = scratch / "image.tar"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:1",
                    f"docker-archive:{archive}:jsb/bench:1"], check=True,
                   timeout=CLI_TIMEOUT)  # fmt: skip
    shutil.rmtree(layout)
    return archive


def remove(name: str) -> None:
    """`jupyter sandbox image rm NAME` if image `name`'s folder exists (a build that was
    interrupted leaves one without a manifest, which `image rm` removes too)."""
    if image_dir(name).exists():
        sandbox_cli("image", "rm", name, timeout=600)


@contextlib.contextmanager
def removed(name: str) -> Iterator[None]:
    """Image `name` removed on the way out, whatever happened in the block; one of that
    name left by an earlier run is removed first (the name is the benchmark's own)."""
    remove(name)
    try:
        yield
    finally:
        remove(name)


@contextlib.contextmanager
def jupyter_path(folder: Path) -> Iterator[None]:
    """`folder` first on JUPYTER_PATH (where jupyter_client looks for kernelspecs) in the
    block, as it was afterwards."""
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder), *([saved] if saved else [])])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = saved


@contextlib.contextmanager
def imported_kernel(name: str = IMPORTED, kernelspec: str = KERNELSPEC) -> Iterator[dict]:
    """Image `name`, the default image plus a small layer imported from a docker-archive,
    and its `python3` kernel installed as kernelspec `kernelspec` (gVisor) under a
    temporary prefix that JUPYTER_PATH names in the block. Yields what the report says
    of it: the archive's size, the build's seconds, the stored tree's size. The image,
    the kernelspec and the scratch files are removed on the way out, whatever happened.
    """
    with removed(name):
        scratch = Path(tempfile.mkdtemp(prefix="jsb-bench-imported-", dir=SCRATCH))
        try:
            extra = small_layer(scratch / "extra.tar", "etc/jsb-bench-layer",
                                b"from the benchmark's own layer\n")  # fmt: skip
            archive = docker_archive(scratch, [extra])
            source_bytes = archive.stat().st_size
            print(f"importing the image {name} ({source_bytes / 1e6:.0f} MB docker-archive)",
                  file=sys.stderr)  # fmt: skip
            seconds, _ = sandbox_cli("image", "build", name, "--from", f"docker-archive:{archive}")
            archive.unlink()
            prefix = scratch / "prefix"
            sandbox_cli("kernelspec", "install", "--image", name, "--kernel", "python3",
                        "--name", kernelspec, "--prefix", str(prefix), timeout=300)  # fmt: skip
            manifest = json.loads((image_dir(name) / "manifest.json").read_text())
            facts = {
                "name": name,
                "kernelspec": kernelspec,
                "source_bytes": source_bytes,
                "build_seconds": seconds,
                "size_bytes": manifest.get("size_bytes"),
            }
            with jupyter_path(prefix / "share" / "jupyter"):
                yield facts
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
