"""Writing OCI images as an image layout folder: what skopeo then copies anywhere.

An OCI image layout (the image-spec's "image-layout") is a folder holding ``oci-layout``,
``index.json`` and ``blobs/sha256/``: each layer, the image's config and its manifest
stored under their own digest. This module writes one, the way the project makes
images of its own (the Kubernetes agent image, provisioner/kubernetes/agent_image.py)
and the tests and benchmarks make the images they import: `add_layer` stores a layer
made elsewhere (a tar, maybe gzipped), `add_tree_layer` makes one from a folder,
`write_image` writes the config (`RunConfig`), manifest and index naming those layers,
and `image_from_tree` does it all for a folder that is the whole image.

A layer made from a folder is reproducible: the same tree gives the same bytes, so the
same digest (entries sorted, one mtime for all, numeric owners given by the caller,
no user or group names, a gzip header without name or time). The config and the
manifest are JSON with sorted keys, no "created" date and no history.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import ImageError

TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
TAG_ANNOTATION = "org.opencontainers.image.ref.name"
"""The annotation of index.json that names an image's tag (``oci:LAYOUT:TAG``)."""
MTIME = 0
"""The mtime of every entry of a layer made from a folder, unless the caller says."""
GZIP_LEVEL = 6
"""zlib's default: nearly the size of 9 at about half the time."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    """A layer stored in a layout: the manifest's descriptor of it and the config's
    diff_id (the digest of its uncompressed tar)."""

    media_type: str
    digest: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class RunConfig:
    """How a container of the image runs, as the image's config says (the image-spec's
    Env, Entrypoint, Cmd, WorkingDir, User and Labels); empty ones are left out."""

    env: Sequence[str] = ()
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        """The config's ``config`` object."""
        fields = {"Env": list(self.env), "Entrypoint": list(self.entrypoint),
                  "Cmd": list(self.cmd), "WorkingDir": self.working_dir, "User": self.user,
                  "Labels": dict(self.labels)}  # fmt: skip
        return {key: value for key, value in fields.items() if value}


class _Hashing:
    """A write-only file that hashes and counts what goes through it to `out` (tarfile
    asks where it is, so it answers `tell`)."""

    def __init__(self, out: BinaryIO | gzip.GzipFile) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.out.write(data)

    def tell(self) -> int:
        return self.size


def _blobs(layout: Path) -> Path:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    return blobs


def _add_blob(layout: Path, data: bytes) -> tuple[str, int]:
    """Store `data` in `layout`'s blobs (made if need be): its digest and size."""
    digest = hashlib.sha256(data).hexdigest()
    (_blobs(layout) / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _json_blob(layout: Path, media_type: str, value: object) -> dict[str, object]:
    """Store `value` as canonical JSON; its descriptor."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    digest, size = _add_blob(layout, data)
    return {"mediaType": media_type, "digest": digest, "size": size}


def add_layer(layout: Path, source: bytes | Path, media_type: str = GZIP_LAYER) -> Layer:
    """Store a layer made elsewhere: the bytes `source`, or the file `source`, which is
    moved into the blobs (a large tar is not copied). `media_type` says what it is: an
    uncompressed tar (`TAR_LAYER`, its diff_id is its digest) or a gzipped one."""
    if media_type not in (TAR_LAYER, GZIP_LAYER):
        raise ValueError(f"a layer here is a tar or a gzipped tar, not {media_type}")
    if isinstance(source, bytes):
        digest, size = _add_blob(layout, source)
        raw = gzip.decompress(source) if media_type == GZIP_LAYER else source
        return Layer(media_type, digest, size, f"sha256:{hashlib.sha256(raw).hexdigest()}")
    digest_of, diff_of = hashlib.sha256(), hashlib.sha256()
    with open(source, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest_of.update(chunk)
    if media_type == GZIP_LAYER:
        with gzip.open(source, "rb") as g:
            while chunk := g.read(_CHUNK):
                diff_of.update(chunk)
    else:
        diff_of = digest_of
    digest, size = digest_of.hexdigest(), source.stat().st_size
    source.rename(_blobs(layout) / digest)
    return Layer(media_type, f"sha256:{digest}", size, f"sha256:{diff_of.hexdigest()}")


def _entries(tree: Path) -> list[Path]:
    """Every path below `tree` (symlinks not followed), each folder before what it holds,
    siblings by name: an order that depends on the names alone."""
    found = [Path(top, name) for top, dirs, files in os.walk(tree) for name in (*dirs, *files)]
    return sorted(found, key=lambda p: p.relative_to(tree).parts)


def add_tree_layer(layout: Path, tree: Path, *, owner: tuple[int, int] = (0, 0),
                   mtime: int = MTIME) -> Layer:  # fmt: skip
    """Store the folder `tree` as a gzipped layer, its contents at the image's root.

    Entries keep their modes, symlinks their targets, files sharing an inode become
    hard links; every entry gets the numeric `owner` (uid, gid) and `mtime`, and no
    user or group name. ImageError for an entry that is not a folder, a file or a
    symlink (a device, a socket or a fifo has no place in an image made here).
    """
    blobs = _blobs(layout)
    fd, name = tempfile.mkstemp(prefix=".layer-", dir=blobs)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)  # as the other blobs: a layout is there to be copied
        with os.fdopen(fd, "wb") as out:
            compressed = _Hashing(out)
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed,
                               compresslevel=GZIP_LEVEL, mtime=0) as gz:  # fmt: skip
                raw = _Hashing(gz)
                with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for path in _entries(tree):
                        info = tar.gettarinfo(str(path), str(path.relative_to(tree)))
                        if info is None or not (info.isdir() or info.isreg() or info.issym()
                                                or info.islnk()):  # fmt: skip
                            raise ImageError(f"{path}: not a folder, a file or a symlink")
                        info.uid, info.gid = owner
                        info.uname = info.gname = ""
                        info.mtime = mtime
                        if info.isreg():
                            with open(path, "rb") as f:
                                tar.addfile(info, f)
                        else:
                            tar.addfile(info)
        digest = compressed.hash.hexdigest()
        tmp.rename(blobs / digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Layer(GZIP_LAYER, f"sha256:{digest}", compressed.size, f"sha256:{raw.hash.hexdigest()}")


def write_image(layout: Path, layers: Sequence[Layer], *, tag: str,
                config: RunConfig = RunConfig(), architecture: str = "amd64") -> str:  # fmt: skip
    """Write the image of `layers` (stored in `layout` already, bottom first) into the
    layout as `tag`, run as `config` says, for linux on `architecture`: its config, its
    manifest, ``index.json`` (naming this image only) and ``oci-layout``. Returns the
    manifest's digest (the image's, as a registry names it)."""
    image_config = {
        "architecture": architecture,
        "os": "linux",
        "config": config.as_json(),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": _json_blob(layout, CONFIG, image_config),
        "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": x.size} for x in layers],
    }
    described = _json_blob(layout, MANIFEST, manifest)
    index = {"schemaVersion": 2, "manifests": [{**described, "annotations": {TAG_ANNOTATION: tag}}]}
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}', encoding="utf-8")
    return str(described["digest"])


def image_from_tree(layout: Path, tree: Path, *, tag: str, config: RunConfig = RunConfig(),
                    owner: tuple[int, int] = (0, 0)) -> str:  # fmt: skip
    """An image of one layer, the folder `tree` (`add_tree_layer` with `owner`), written
    into the new or empty folder `layout` as `tag` run as `config` (`write_image`); its
    manifest's digest."""
    layout.mkdir(parents=True, exist_ok=True)
    return write_image(layout, [add_tree_layer(layout, tree, owner=owner)], tag=tag, config=config)
