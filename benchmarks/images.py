#!/usr/bin/env python
"""Import time and disk use of a ~1 GiB image, with a small Binder folder for reference.

    sudo .venv/bin/python benchmarks/images.py [--total-gib 1.0] [--out benchmarks/results]

Builds, as an operator does (`jupyter sandbox image build NAME --from SOURCE`):

- a docker-archive of the default image's rootfs (one uncompressed layer) plus a layer
  of random, incompressible files, sized so that the archive is about `--total-gib`
  GiB (imported.py makes it: an OCI layout turned into a docker-archive by skopeo);
- a Binder folder whose requirements.txt names one small wheel (six), built on the
  default image, for reference.

For each: the source's size, the whole `image build`, its steps timed by the arrival
of its log lines (unpack + store; for the archive, the layers apart from the runtime,
kernel user, set-id bits, kernelspecs, content hash and swap-in), the content hash
alone (run again on the stored tree afterwards, with the page cache warm), the
microVM boot files (root.img apart), and the disk use of the stored image's folder
(`du` of rootfs/ and microvm/, root.img apart). The default image's disk use is shown
beside them.

Writes `<out>/images-<day>.md` and `.json`, copied to `images-latest.md` and `.json`.
Every image it builds is removed with `jupyter sandbox image rm`, its scratch files
(under /var/tmp) too, whatever happens. Not part of `make test`: `make bench-images`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import report
from imported import SCRATCH, docker_archive, random_layer, removed, sandbox_cli

from provisioner.images.boot import boot_dir
from provisioner.images.store import (
    DEFAULT_IMAGE,
    find_image,
    image_dir,
    images_dir,
    load_manifest,
    tree_digest,
)

ARCHIVE_IMAGE = "bench-1gib"
BINDER_IMAGE = "bench-binder"
BINDER_REQUIREMENTS = "six  # one small pure-Python wheel\n"
LAYER_RE = re.compile(r"\blayer \d+/\d+ ")
PREFIX_RE = re.compile(r"^\[[^\]]*\]\s*")
"""The log line's prefix (`[I 2026-12-07 ... ImageBuildApp]`), left out of the report."""


def du(path: Path, apparent: bool = False) -> int:
    """Bytes `path` takes on disk (`du -s`), or its apparent size."""
    argv = ["du", "-s", "-B1", *(["--apparent-size"] if apparent else []), str(path)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    return int(out.stdout.split()[0])


def disk_use(name: str) -> dict[str, int]:
    """What image `name`'s folder takes on disk: its rootfs/, its microvm/ (du), and
    root.img's own blocks and apparent size."""
    root_img = boot_dir(name) / "root.img"
    return {
        "rootfs_du_bytes": du(image_dir(name) / "rootfs"),
        "microvm_du_bytes": du(boot_dir(name)),
        "root_img_du_bytes": du(root_img),
        "root_img_bytes": root_img.stat().st_size,
    }


def first(lines: list[tuple[float, str]], pattern: str | re.Pattern[str]) -> float | None:
    """When the first line holding `pattern` (a substring or a regex) arrived."""
    for at, text in lines:
        if pattern.search(text) if isinstance(pattern, re.Pattern) else pattern in text:
            return at
    return None


def between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def build(name: str, source: str) -> dict[str, Any]:
    """`image build NAME --from SOURCE`, timed; its steps from its log lines' arrival."""
    print(f"image build {name} --from {source}", file=sys.stderr)
    seconds, lines = sandbox_cli("image", "build", name, "--from", source)
    steps = [{"at": round(at, 3), "line": PREFIX_RE.sub("", text)} for at, text in lines]
    started = first(lines, f"image {name}: ")  # unpacking the OCI image / the Binder folder
    stored = first(lines, f"image {name} stored")
    layers = [at for at, text in lines if LAYER_RE.search(text)]
    root_disk = first(lines, "making the root disk")
    t0 = time.perf_counter()
    digest, _ = tree_digest(find_image(name))
    hash_seconds = time.perf_counter() - t0
    manifest = json.loads((image_dir(name) / "manifest.json").read_text())
    if digest != manifest["content_hash"]:
        raise RuntimeError(f"image {name}: its content hash changed since it was stored")
    return {
        "build_seconds": seconds,
        "import_seconds": between(started, stored),
        "layers_seconds": between(first(lines, "fetching"), layers[-1]) if layers else None,
        "finish_seconds": between(layers[-1], stored) if layers else None,
        "hash_seconds": hash_seconds,
        "boot_files_seconds": between(stored, seconds),
        "root_disk_seconds": between(root_disk, seconds),
        "size_bytes": manifest["size_bytes"],
        **disk_use(name),
        "steps": steps,
    }


def measure(total_bytes: int, scratch: Path) -> dict[str, Any]:
    """Both builds (and the default image's disk use); the images removed at the end."""
    manifest = load_manifest() or {}
    results: dict[str, Any] = {"default": {"size_bytes": manifest.get("size_bytes"),
                                           **disk_use(DEFAULT_IMAGE)}}  # fmt: skip
    with removed(ARCHIVE_IMAGE):
        print("making the docker-archive", file=sys.stderr)
        t0 = time.perf_counter()
        # the default image's tar is about its apparent size (headers aside)
        extra = max(1 << 20, total_bytes - du(find_image(), apparent=True))
        archive = docker_archive(scratch, [random_layer(scratch / "random.tar", extra)])
        made = time.perf_counter() - t0
        results["docker_archive"] = {
            "source_bytes": archive.stat().st_size,
            "random_layer_bytes": extra,
            "source_made_seconds": made,
            **build(ARCHIVE_IMAGE, f"docker-archive:{archive}"),
        }
        archive.unlink()
    with removed(BINDER_IMAGE):
        folder = scratch / "binder"
        folder.mkdir()
        (folder / "requirements.txt").write_text(BINDER_REQUIREMENTS)
        results["binder"] = {
            "source_bytes": du(folder, apparent=True),
            "requirements": BINDER_REQUIREMENTS.split("#")[0].strip(),
            **build(BINDER_IMAGE, str(folder)),
        }
    return results


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e6:.0f} MB"


def markdown(raw: dict[str, Any], raw_file: str) -> str:
    """The report: a header, the table of the builds, each build's steps. A fragment for
    inclusion: no `#` heading."""
    env, r = raw["environment"], raw["results"]
    a, b, d = r["docker_archive"], r["binder"], r["default"]
    rows = [
        ("source", f"{mb(a['source_bytes'])} docker-archive (the default image's rootfs as a "
         f"layer, {mb(a['random_layer_bytes'])} of random data as another)",
         f"a folder with requirements.txt: `{b['requirements']}` (built on the default image)",
         "the project's recipe"),
        ("`image build` in all (the command's wall clock)", seconds(a["build_seconds"]),
         seconds(b["build_seconds"]), ""),
        ("unpack + store (`image NAME: ...` → `image NAME stored`)",
         seconds(a["import_seconds"]), seconds(b["import_seconds"]), ""),
        ("… of which skopeo copy and the layers unpacked (digests checked)",
         seconds(a["layers_seconds"]), "—", ""),
        ("… of which the agent's runtime, kernel user, set-id bits, kernelspecs, content "
         "hash, swap-in", seconds(a["finish_seconds"]), "—", ""),
        ("content hash alone (the stored rootfs hashed again, page cache warm)",
         seconds(a["hash_seconds"]), seconds(b["hash_seconds"]), ""),
        ("microVM boot files (guest kernel, initramfs, root.img)",
         seconds(a["boot_files_seconds"]), seconds(b["boot_files_seconds"]), ""),
        ("… of which root.img (`mkfs.ext4 -d`)", seconds(a["root_disk_seconds"]),
         seconds(b["root_disk_seconds"]), ""),
        ("stored tree, apparent size (the manifest's `size_bytes`)", mb(a["size_bytes"]),
         mb(b["size_bytes"]), mb(d["size_bytes"])),
        ("disk: rootfs/ (`du`)", mb(a["rootfs_du_bytes"]), mb(b["rootfs_du_bytes"]),
         mb(d["rootfs_du_bytes"])),
        ("disk: microvm/ (`du`; the default's holds its snapshots too)",
         mb(a["microvm_du_bytes"]), mb(b["microvm_du_bytes"]), mb(d["microvm_du_bytes"])),
        ("… of which root.img (`du`; apparent size)",
         f"{mb(a['root_img_du_bytes'])} ({mb(a['root_img_bytes'])})",
         f"{mb(b['root_img_du_bytes'])} ({mb(b['root_img_bytes'])})",
         f"{mb(d['root_img_du_bytes'])} ({mb(d['root_img_bytes'])})"),
    ]  # fmt: skip
    lines = [
        f"**Importing images: a {a['source_bytes'] / 2**30:.2f} GiB docker-archive, and a "
        f"Binder folder for reference**, measured {env['date']} at git {env['git']}",
        "",
        f"- host: Linux {env['kernel']}, {env['cpus']} CPUs ({env['cpu_model']}), "
        f"Python {env['python']}; images in {env['images_dir']} ({env['filesystem']})",
        f"- load average (1, 5, 15 min) at start / end: {env['loadavg_start']} / "
        f"{env['loadavg_end']}",
        f"- {env['skopeo']}",
        f"- command: `{env['command']}`; every step in `{raw_file}`",
        "",
        "| | docker-archive | Binder folder | default image |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]
    for title, build_ in (("docker-archive", a), ("Binder folder", b)):
        lines += ["", f"| steps of the {title}'s `image build` (log line) | at | until the next |",
                  "|---|---:|---:|"]  # fmt: skip
        steps = build_["steps"]
        ends = [s["at"] for s in steps[1:]] + [build_["build_seconds"]]
        for step, end in zip(steps, ends, strict=True):
            text = step["line"].replace("|", "\\|")
            text = text if len(text) <= 110 else text[:107] + "..."
            lines.append(f"| {text} | {step['at']:.1f} s | {end - step['at']:.1f} s |")
    return "\n".join(lines) + "\n"


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM: unwind as Ctrl-C does, so that the images and scratch files are removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--total-gib",
        type=float,
        default=1.0,
        help="size of the docker-archive: the default image plus random data",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=report.REPO / report.RESULTS,
        help=f"folder for images-<day>.md and .json (default: {report.RESULTS})",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    env = report.environment(["benchmarks/images.py", *argv], [])
    env["images_dir"] = str(images_dir())
    env["filesystem"] = report.output(["stat", "-f", "-c", "%T", str(images_dir())], "stat")
    env["skopeo"] = report.output(["skopeo", "--version"], "skopeo's version")
    scratch = Path(tempfile.mkdtemp(prefix="jsb-bench-images-", dir=SCRATCH))
    try:
        results = measure(int(args.total_gib * 2**30), scratch)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    env["loadavg_end"] = report.loadavg()
    raw = {"environment": env, "args": {"total_gib": args.total_gib}, "results": results}
    name = f"images-{env['date'][:10]}"
    text = markdown(raw, f"{name}.json")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(raw, indent=1) + "\n"
    for stem in (name, "images-latest"):
        (args.out / f"{stem}.md").write_text(text)
        (args.out / f"{stem}.json").write_text(data)
    print(f"written: {args.out}/{name}.md, .json and images-latest.*", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
