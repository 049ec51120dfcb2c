"""A pod's volumes on the host, as the kubelet lays them out.

- emptyDir: a folder of the pod (mode 0777, as the kubelet makes it), or a tmpfs
  for `medium: Memory` (sized by `sizeLimit` when given; a disk emptyDir's
  `sizeLimit` is only recorded, as the kubelet enforces it by eviction).
- secret, configMap: the kubelet's atomic-writer layout: the files in a
  timestamped folder, `..data` pointing to it, and each key a link into
  `..data`; modes from `defaultMode` or `items[].mode`; always read-only.
- persistentVolumeClaim: the claim's host folder from the config, bound as it
  is (like a hostPath- or NFS-backed volume: no ownership change); `readOnly`
  honoured. A claim the config does not know leaves the pod Pending.
- fsGroup: the files of emptyDir, secret and configMap volumes get that group,
  with group read (and write for emptyDir) and set-group-id folders, as the
  kubelet's SetVolumeOwnership does.

`subPath` mounts are binds of a descriptor opened without following links, so a
link planted in a volume by an earlier container cannot lead outside it.
"""

from __future__ import annotations

import base64
import datetime
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .kinds import CONFIG_MAP, SECRET
from .mounts import bind_fd, tmpfs
from .store import Store
from .validation import quantity

Obj = dict[str, Any]
RW_MASK, RO_MASK, EXEC_MASK = 0o660, 0o440, 0o110


class Unavailable(Exception):
    """A volume's source is not there (yet): the kubelet keeps the pod waiting and retries."""


@dataclass(frozen=True)
class HostVolume:
    path: Path
    read_only: bool
    """The volume itself is read-only (secret, configMap, a read-only claim)."""


def _set_ownership(top: Path, gid: int, read_only: bool) -> None:
    """The kubelet's SetVolumeOwnership: group `gid`, group read (write unless read-only),
    set-group-id on folders. Links are re-grouped, not followed."""
    mask = RO_MASK if read_only else RW_MASK
    for path in [top, *top.rglob("*")]:
        info = path.lstat()
        os.lchown(path, -1, gid)
        if stat.S_ISLNK(info.st_mode):
            continue
        extra = mask | (stat.S_ISGID | EXEC_MASK if stat.S_ISDIR(info.st_mode) else 0)
        path.chmod(stat.S_IMODE(info.st_mode) | extra)


def _write_atomic(top: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """The kubelet's atomic-writer layout: the files in `..<timestamp>/`, `..data` linking
    to it, and each top-level name a link into `..data`."""
    top.mkdir(mode=0o755)
    top.chmod(0o755)  # whatever the umask: as the kubelet's volume root
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    data = top / stamp
    data.mkdir(mode=0o755)
    for relative, (content, mode) in files.items():
        target = data / relative
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        target.write_bytes(content)
        target.chmod(mode)
    (top / "..data").symlink_to(stamp)
    for first in sorted({relative.split("/", 1)[0] for relative in files}):
        (top / first).symlink_to(f"..data/{first}")


class Volumes:
    """The host side of one pod's volumes, under `pod_dir`/volumes."""

    def __init__(self, pod_dir: Path, pod: Obj, store: Store, config: Config) -> None:
        self.pod_dir = pod_dir
        self.pod = pod
        self.store = store
        self.config = config
        self.namespace = pod["metadata"]["namespace"]
        self.fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")

    def prepare(self) -> dict[str, HostVolume]:
        """Every volume of the pod on the host, by name. Unavailable if a secret, config map
        or claim is missing (the caller retries); what was made stays for the retry and goes
        with the pod folder."""
        made = {}
        top = self.pod_dir / "volumes"
        top.mkdir(mode=0o755, exist_ok=True)
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            path = top / name
            if "persistentVolumeClaim" in volume:
                made[name] = self._claim(volume["persistentVolumeClaim"])
            elif path.exists():
                made[name] = HostVolume(path, "emptyDir" not in volume)
            elif "emptyDir" in volume:
                made[name] = self._empty_dir(path, volume["emptyDir"] or {})
            elif "secret" in volume:
                made[name] = self._projected(path, SECRET, volume["secret"], "secretName")
            else:
                made[name] = self._projected(path, CONFIG_MAP, volume["configMap"], "name")
        return made

    def _claim(self, source: Obj) -> HostVolume:
        folder = self.config.claim(self.namespace, source["claimName"])
        if folder is None:
            raise Unavailable(f'persistentvolumeclaim "{source["claimName"]}" not found')
        return HostVolume(folder, bool(source.get("readOnly")))

    def _empty_dir(self, path: Path, source: Obj) -> HostVolume:
        path.mkdir(mode=0o777)
        path.chmod(0o777)
        if source.get("medium") == "Memory":
            size = int(quantity(source["sizeLimit"])) if source.get("sizeLimit") else None
            tmpfs(path, size, 0o777)
        if self.fs_group is not None:
            _set_ownership(path, int(self.fs_group), read_only=False)
        return HostVolume(path, read_only=False)

    def _projected(self, path: Path, kind: Any, source: Obj, name_key: str) -> HostVolume:
        name = source[name_key]
        obj = self.store.find(kind, self.namespace, name)
        if obj is None:
            if source.get("optional"):
                _write_atomic(path, {})
                return HostVolume(path, read_only=True)
            raise Unavailable(f'{kind.kind.lower()} "{name}" not found')
        contents = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        if kind is CONFIG_MAP:
            contents = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            contents.update(
                {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
            )
        default_mode = int(source.get("defaultMode", 0o644)) & 0o777
        items = source.get("items")
        files: dict[str, tuple[bytes, int]] = {}
        if items:
            for item in items:
                if item["key"] not in contents:
                    if source.get("optional"):
                        continue
                    raise Unavailable(
                        f"couldn't find key {item['key']} in {kind.kind} {self.namespace}/{name}"
                    )
                mode = int(item.get("mode", default_mode)) & 0o777
                files[item["path"]] = (contents[item["key"]], mode)
        else:
            files = {key: (value, default_mode) for key, value in contents.items()}
        _write_atomic(path, files)
        if self.fs_group is not None:
            _set_ownership(path, int(self.fs_group), read_only=True)
        return HostVolume(path, read_only=True)


def sub_path(volume: HostVolume, sub: str, target: Path) -> None:
    """Bind `sub` of `volume` onto `target` (made here, a folder or an empty file as
    `sub` is), never following a link on the way; missing folders of `sub` are made
    (0750), as the kubelet makes them."""
    fd = os.open(volume.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in sub.split("/") if p not in ("", ".")]:
            try:
                step = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o750, dir_fd=fd)
                step = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = step
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise Unavailable(f"subPath {sub!r} leads through a symbolic link")
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            target.mkdir(mode=0o700)
        else:
            target.touch(mode=0o600)
        bind_fd(fd, target)
    finally:
        os.close(fd)
