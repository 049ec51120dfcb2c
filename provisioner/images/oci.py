"""OCI images as a root filesystem tree: from a layout, an archive or a registry.

SOURCE is what skopeo reads: ``oci:/layout[:tag]`` (or a bare folder holding an
``oci-layout`` file), ``oci-archive:/file.tar[:tag]``, ``docker-archive:/file.tar[:ref]``
(what ``docker save`` writes) or ``docker://registry/repo:tag``. Debian's skopeo does
everything that speaks a registry or an archive format (never a hand-written client
here): it copies the image, for linux/amd64, into a private OCI layout in a temporary
folder next to `dest`. This module then reads that layout as untrusted data (bounded
reads, validated fields and digests) and applies its layers with unpack.py, which
holds every rule about what a layer may write.

Signature policy: skopeo runs with a policy of its own (accept anything), written in
the temporary folder, not the host's ``/etc/containers/policy.json`` (absent on many
hosts, or meant for other tools). The trust decision is the operator's choice of
SOURCE; the manifest digest returned is what was verified and is recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..errors import ImageError
from ..hostcmd import run
from .unpack import Budget, apply_layer, human_size, too_large

TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:", "docker://")
"""The SOURCE prefixes this module takes (and a bare folder with an ``oci-layout`` file)."""
COPY_TIMEOUT = 3600
"""Seconds `skopeo copy` may take: a large image from a slow registry."""
INSPECT_TIMEOUT = 300
"""Seconds `skopeo inspect` may take: one manifest."""
MAX_JSON = 4 << 20
"""Bytes of an index, a manifest or a config read (skopeo's own manifest limit)."""
MAX_LAYERS = 256
"""Layers an image may have (docker stops at 127)."""
PLATFORM = ("linux", "amd64")
"""The only platform a sandbox runs."""

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_INDEXES = {_OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"}
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",  # refused by unpack.py, by name
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}
_TAG = "image"
_FIX = "check SOURCE with `skopeo inspect SOURCE`"


def is_oci_source(source: str) -> bool:
    """Whether `source` names an OCI image (by its transport, or a folder with an
    ``oci-layout`` file) rather than a Binder or root filesystem folder."""
    return source.startswith(TRANSPORTS) or (Path(source) / "oci-layout").is_file()


def reference(source: str) -> str:
    """skopeo's name for `source` (an image read, or written): as given, or ``oci:`` + a
    bare layout folder's path."""
    if source.startswith(TRANSPORTS):
        return source
    path = str(Path(source).resolve())
    if ":" in path:  # skopeo would take what follows the ':' for a tag
        raise ImageError(f"{source}: name the OCI layout as oci:PATH[:TAG] (its path has a ':')")
    return "oci:" + path


def unpack_image(source: str, dest: Path, *, max_bytes: int, log: logging.Logger,
                 tls_verify: bool = True) -> dict[str, Any]:  # fmt: skip
    """Unpack the OCI image `source` (see the module) into the existing empty folder
    `dest`, at most `max_bytes` (unpacked, as unpack.Budget counts; checked against
    the compressed layer sizes before any is fetched, where the manifest tells).

    `tls_verify` False lets a registry answer over plain HTTP or with a certificate
    that does not verify (a registry on loopback). Returns what the stored image's
    manifest says of its source: ``{"kind": "oci", "reference": source, "digest":
    manifest digest, "config": {"env", "working_dir", "user", "entrypoint", "cmd"},
    "layers": n}``. ImageError on any failure, with skopeo's last output where it
    failed; the temporary folder is removed in every case, `dest` is then partial
    (the caller removes it).
    """
    ref = reference(source)
    tmp = Path(tempfile.mkdtemp(prefix=".oci-", dir=dest.parent))
    try:
        skopeo, env = skopeo_command(tmp)
        _check_size(skopeo, ref, tls_verify, max_bytes, env)
        log.info("fetching %s with skopeo", source)
        try:
            run(
                ["prlimit", f"--fsize={max_bytes}", *skopeo, "copy", "--quiet",
                 f"--src-tls-verify={str(tls_verify).lower()}",
                 "--dest-oci-accept-uncompressed-layers", ref, f"oci:{tmp / 'layout'}:{_TAG}"],
                f"copying {source} (skopeo copy)", error=ImageError, timeout=COPY_TIMEOUT,
                env=env, fix=_FIX,
            )  # fmt: skip
        except ImageError as e:
            # RLIMIT_FSIZE: SIGXFSZ (exit status -25), or "file too large" if it is ignored.
            if "exit status -25" in str(e) or "file too large" in str(e):
                raise ImageError(f"{source}: {too_large(max_bytes)}") from None
            raise
        return _unpack_layout(tmp / "layout", source, dest, max_bytes, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def skopeo_command(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """How to run skopeo (the command before its verb, and its environment) with every
    file of its own in the private temporary folder `tmp`, which the caller removes: its
    signature policy (see the module) and its temporary files. It picks linux/amd64 out
    of a multi-platform image."""
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(_POLICY), encoding="utf-8")
    command = ["skopeo", "--policy", str(policy), "--override-os", PLATFORM[0],
               "--override-arch", PLATFORM[1]]  # fmt: skip
    return command, {**os.environ, "TMPDIR": str(tmp)}


def _check_size(skopeo: list[str], ref: str, tls_verify: bool, max_bytes: int,
                env: dict[str, str]) -> None:  # fmt: skip
    """Refuse, before fetching its layers, an image `_preflight` refuses (a multi-platform
    index is followed to its linux/amd64 manifest on a registry)."""

    def inspect(what: str) -> dict[str, Any]:
        out = run([*skopeo, "inspect", "--raw", f"--tls-verify={str(tls_verify).lower()}", what],
                  f"reading the manifest of {what} (skopeo inspect)", error=ImageError,
                  timeout=INSPECT_TIMEOUT, env=env, fix=_FIX)  # fmt: skip
        return _parse(out.encode(), f"the manifest of {what}")

    manifest = inspect(ref)
    if manifest.get("mediaType") in _INDEXES or "manifests" in manifest:
        digest = _pick_platform(manifest, ref)
        if not ref.startswith("docker://"):
            return  # a local index: skopeo copy picks the same, bounded by RLIMIT_FSIZE
        manifest = inspect(f"{_untagged(ref)}@{digest}")
    _preflight(manifest, ref, max_bytes)


def _preflight(manifest: dict[str, Any], ref: str, max_bytes: int) -> None:
    """Refuse the image whose (single-platform) manifest is `manifest` before fetching it:
    a docker schema 1 manifest, more than `MAX_LAYERS` layers, or compressed layers
    alone over `max_bytes`. From a registry (``docker://``) the manifest must give
    every layer's size, or nothing would bound the fetch but RLIMIT_FSIZE; a local
    source's manifest (an archive's, made up by skopeo) may not, its files being
    bounded already."""
    if manifest.get("schemaVersion") == 1 or "fsLayers" in manifest:
        raise ImageError(
            f"{ref}: schema 1 manifests are not supported: push the image again with a "
            "current Docker/skopeo"
        )
    layers = manifest.get("layers")
    if isinstance(layers, list) and len(layers) > MAX_LAYERS:
        raise ImageError(f"{ref}: the image has {len(layers)} layers, more than {MAX_LAYERS}")
    if not isinstance(layers, list) or not all(
        isinstance(x, dict) and type(x.get("size")) is int and x["size"] >= 0 for x in layers
    ):
        if ref.startswith("docker://"):
            raise ImageError(f"{ref}: its manifest does not give every layer's size; {_FIX}")
        return
    total = sum(x["size"] for x in layers)
    if total > max_bytes:
        raise ImageError(
            f"{ref}: {too_large(max_bytes)}: its layers alone are {human_size(total)} compressed"
        )


def _pick_platform(index: dict[str, Any], ref: str) -> str:
    """The digest of the linux/amd64 image a multi-platform index lists."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{ref}: its image index has no list of manifests")
    found = []
    for entry in entries:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(platform, dict):
            continue
        pair = (platform.get("os"), platform.get("architecture"))
        if pair == PLATFORM:
            return _digest(entry.get("digest"), f"{ref}: index entry")
        found.append("/".join(map(str, pair)))
    raise ImageError(
        f"{ref} has no {'/'.join(PLATFORM)} image (it has: {', '.join(found) or 'none'}); "
        "sandboxes run linux/amd64"
    )


def _untagged(ref: str) -> str:
    """A docker:// reference without its tag or digest."""
    name = ref.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else name


def _parse(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON:
        raise ImageError(f"{what} is larger than {human_size(MAX_JSON)}")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise ImageError(f"{what} is not valid JSON: {data[:200]!r}") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise ImageError(f"{what}: digest {value!r} is not sha256:<64 hex digits>")
    return value


def _descriptor(value: object, what: str, media_types: set[str] | None = None) -> dict[str, Any]:
    """A validated OCI descriptor (media type, digest, size)."""
    if not isinstance(value, dict):
        raise ImageError(f"{what}: not a descriptor")
    media_type, size = value.get("mediaType"), value.get("size")
    if not isinstance(media_type, str) or (media_types and media_type not in media_types):
        raise ImageError(f"{what}: unsupported media type {media_type!r}")
    if type(size) is not int or size < 0:
        raise ImageError(f"{what}: size {size!r} is not a byte count")
    return {"mediaType": media_type, "digest": _digest(value.get("digest"), what), "size": size}


def _open_blob(layout: Path, desc: dict[str, Any]) -> BinaryIO:
    """A blob of the layout, by its (validated) digest: only ever under blobs/sha256/."""
    path = layout / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(fd, "rb")


def _read_json_blob(layout: Path, desc: dict[str, Any], what: str) -> dict[str, Any]:
    if desc["size"] > MAX_JSON:
        raise ImageError(f"{what} is larger than {human_size(MAX_JSON)}")
    with _open_blob(layout, desc) as f:
        data = f.read(MAX_JSON + 1)
    if len(data) != desc["size"] or f"sha256:{hashlib.sha256(data).hexdigest()}" != desc["digest"]:
        raise ImageError(f"{what} does not match its digest {desc['digest']}")
    return _parse(data, what)


def _string(value: object, field: str, limit: int = 4096) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise ImageError(f"image config: {field} is not a string of at most {limit} characters")
    return value


def _strings(value: object, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 1024:
        raise ImageError(f"image config: {field} is not a list of at most 1024 strings")
    return [_string(v, field, 32768) for v in value]


def _config(layout: Path, desc: dict[str, Any]) -> dict[str, Any]:
    """What of the image's config the stored manifest keeps, validated."""
    config = _read_json_blob(layout, desc, "the image config")
    platform = (config.get("os", PLATFORM[0]), config.get("architecture", PLATFORM[1]))
    if platform != PLATFORM:
        raise ImageError(
            f"the image is for {'/'.join(map(str, platform))}; sandboxes run {'/'.join(PLATFORM)}"
        )
    run_config = config.get("config") or {}
    if not isinstance(run_config, dict):
        raise ImageError("image config: 'config' is not an object")
    return {
        "env": _strings(run_config.get("Env"), "Env"),
        "working_dir": _string(run_config.get("WorkingDir"), "WorkingDir"),
        "user": _string(run_config.get("User"), "User", 256),
        "entrypoint": _strings(run_config.get("Entrypoint"), "Entrypoint"),
        "cmd": _strings(run_config.get("Cmd"), "Cmd"),
    }


class _Verified:
    """A blob read once, hashed and counted on the way (for apply_layer)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


def _unpack_layout(layout: Path, source: str, dest: Path, max_bytes: int,
                   log: logging.Logger) -> dict[str, Any]:  # fmt: skip
    """Apply the image tagged `_TAG` in the OCI layout `layout` (untrusted: every read is
    bounded, every field and digest checked) onto `dest`; see unpack_image."""
    try:
        with open(layout / "index.json", "rb") as f:
            index = _parse(f.read(MAX_JSON + 1), "the layout's index.json")
    except OSError as e:
        raise ImageError(f"{source}: skopeo left no readable OCI layout: {e}") from None
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError("the layout's index.json has no list of manifests")
    tagged = [
        e
        for e in entries
        if isinstance(e, dict)
        and (e.get("annotations") or {}).get("org.opencontainers.image.ref.name") == _TAG
    ]
    if len(tagged) != 1:
        raise ImageError(f"the layout's index.json names {len(tagged)} images tagged {_TAG!r}")
    mdesc = _descriptor(tagged[0], "the image manifest", {_OCI_MANIFEST})
    manifest = _read_json_blob(layout, mdesc, "the image manifest")
    config = _config(layout, _descriptor(manifest.get("config"), "the image config", {_OCI_CONFIG}))
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise ImageError(f"the image manifest has no list of at most {MAX_LAYERS} layers")
    descs = [_descriptor(x, f"layer {i + 1}", _LAYER_TYPES) for i, x in enumerate(layers)]
    total = sum(d["size"] for d in descs)
    if total > max_bytes:
        raise ImageError(f"{too_large(max_bytes)}: its layers alone are {human_size(total)}")
    budget = Budget(max_bytes)
    for i, desc in enumerate(descs):
        what = f"layer {i + 1}/{len(descs)} ({desc['digest'][:19]}...)"
        with _open_blob(layout, desc) as f:
            blob = _Verified(f)
            report = apply_layer(cast(BinaryIO, blob), dest, budget, what=what,
                                 media_type=desc["mediaType"])  # fmt: skip
            while blob.read(1 << 20):  # the rest (tar padding) still counts for the digest
                pass
        if blob.size != desc["size"] or f"sha256:{blob.hash.hexdigest()}" != desc["digest"]:
            raise ImageError(f"{what}: the blob does not match its digest {desc['digest']}")
        log.info("%s: %s", what, report)
    return {
        "kind": "oci",
        "reference": source,
        "digest": mdesc["digest"],
        "config": config,
        "layers": len(descs),
    }
