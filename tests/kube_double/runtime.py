"""The container runtime: one `runsc run` per container, inside its pod's network namespace.

Each container gets a bundle folder: `config.json` (from `oci.spec`), `rootfs`,
an overlay of the image whose upper layer is a small tmpfs of the bundle (runsc
makes missing mount points there, never in the shared image), and its log.
With `readOnlyRootFilesystem` the root is read-only; otherwise gVisor keeps the
container's writes in its own memory (`--overlay2=root:memory`), charged to the
container's memory limit, as a gVisor node's default.

The container's memory cgroup is made here, before runsc, with its limit: runsc
removes the cgroups it made itself when the sandbox ends, and with them the
count of OOM kills that says the container was OOMKilled.

stdout and stderr go, through a pipe the double reads, into the container's log
file, kept to `LOG_BYTES` (the older half is dropped, as by the kubelet's
rotation), so a container that prints without end fills no disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from provisioner import cgroups, hostcmd, rootfs

from .config import Config
from .network import in_netns

log = logging.getLogger(__name__)

CGROUP_TOP = "/kube-double"
RUN_DIR = Path("/run/kube-double")
"""Per bridge name: its lock, and runsc's state root (short: runsc puts its sockets there)."""
LOG_BYTES = 4 * 1024 * 1024
LAYER_BYTES = 16 * 1024 * 1024
"""The host-side upper layer of a root: only mount points are made there."""
READ_CHUNK = 65536
STATE_POLL = 0.02


@dataclass(frozen=True)
class Exit:
    code: int
    oom: bool
    start_error: str = ""
    """runsc's own complaint when the container could not start at all (StartError)."""


def runsc_root(config: Config) -> Path:
    """runsc's `--root` of this double's containers."""
    return RUN_DIR / config.bridge / "runsc"


def cgroup_top(config: Config) -> str:
    """The parent cgroup of this double's containers (one per bridge name)."""
    return f"{CGROUP_TOP}/{config.bridge}"


class Container:
    """One container's sandbox: `start`, then `wait`; `signal` meanwhile; `remove` after."""

    def __init__(self, config: Config, cid: str, bundle: Path, log_path: Path) -> None:
        """`cid`: runsc's id (short: runsc's state paths must stay short); `bundle`: a
        folder to make; `log_path`: where stdout and stderr go (it outlives the bundle)."""
        self.config = config
        self.root = runsc_root(config)
        self.cid = cid
        self.bundle = bundle
        self.cgroup = f"{cgroup_top(config)}/{cid}"
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    def runsc(self, *args: str) -> list[str]:
        return [self.config.runsc, f"--root={self.root}", *args]

    def prepare(self, image: Path, disk: int = LAYER_BYTES) -> Path:
        """The bundle folder and the container's root over `image`; returns the root."""
        self.bundle.mkdir(mode=0o700, parents=True)
        return rootfs.mount(image, self.bundle, disk)

    async def start(self, spec: dict, netns: str, read_only: bool, memory: int | None) -> None:
        """Write the config and start `runsc run` in the pod's namespace."""
        (self.bundle / "config.json").write_text(json.dumps(spec))
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        await asyncio.to_thread(cgroups.set_memory_limit, self.cgroup, memory)
        overlay = "none" if read_only else "root:memory"
        argv = [
            *in_netns(netns),
            *self.runsc(
                f"--platform={self.config.platform}",
                "--network=host",
                f"--overlay2={overlay}",
                "run",
                f"--bundle={self.bundle}",
                self.cid,
            ),
        ]
        self.process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self._pump = asyncio.create_task(self._keep_log(self.process.stdout))

    async def running(self) -> bool:
        """Wait until runsc says the container runs (True), or until it has ended (False):
        the kubelet reports a container running once the runtime has started it."""
        assert self.process is not None
        while self.process.returncode is None:
            state = await asyncio.to_thread(hostcmd.probe, self.runsc("state", self.cid))
            with contextlib.suppress(ValueError, AttributeError):
                if state and json.loads(state).get("status") == "running":
                    return True
            await asyncio.sleep(STATE_POLL)
        return False

    async def _keep_log(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(READ_CHUNK):
            _append(self.log_path, chunk)

    async def wait(self) -> Exit:
        """Until the container has ended: its exit status, and whether it was OOM-killed.

        The host's OOM killer may take one of gVisor's own processes and leave the sandbox
        wedged, running but dead (docs/host-notes.md): as the project's own gVisor backend
        does, and as a node's runtime reports an OOM kill (a shim's TaskOOM), an OOM kill in
        the container's cgroup ends the whole container."""
        assert self.process is not None and self._pump is not None
        ended = asyncio.ensure_future(self.process.wait())
        oom = asyncio.ensure_future(cgroups.wait_for_oom_kill(self.cgroup))
        try:
            await asyncio.wait({ended, oom}, return_when=asyncio.FIRST_COMPLETED)
            if not ended.done() and oom.done() and oom.result():
                await self.signal("KILL", everything=True)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        finally:
            oom.cancel()
        code = await ended
        await asyncio.wait({self._pump}, timeout=5)  # the rest of its output
        oom = await asyncio.to_thread(cgroups.oom_kills, self.cgroup) > 0
        start_error = ""
        if code == 128 and not oom:
            last = self.tail(400).strip().splitlines()
            if last and last[-1].startswith("running container:"):
                start_error = last[-1]
        return Exit(code, oom, start_error)

    def tail(self, size: int) -> str:
        """The last `size` bytes of the log, as text."""
        try:
            with open(self.log_path, "rb") as file:
                file.seek(0, 2)
                file.seek(max(0, file.tell() - size))
                return file.read().decode(errors="replace")
        except OSError:
            return ""

    async def signal(self, name: str, everything: bool = False) -> None:
        """Send signal `name` ("TERM", "KILL") to the container's first process, or to all of
        its processes. A container that has ended meanwhile is fine."""
        if self.process is None or self.process.returncode is not None:
            return
        argv = self.runsc("kill", *(["--all"] if everything else []), self.cid, name)
        await asyncio.to_thread(
            hostcmd.quietly, argv, log, ("not found", "no such", "not running"), level=logging.DEBUG
        )

    async def stop(self) -> None:
        """Kill everything of the container now and wait for runsc to end."""
        if self.process is not None and self.process.returncode is None:
            await self.signal("KILL", everything=True)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()  # runsc run itself; `remove` deletes the sandbox
                await self.process.wait()
        if self._pump is not None:
            await asyncio.wait({self._pump}, timeout=5)  # the rest of its output, if any
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    async def remove(self) -> None:
        """Delete the sandbox, its root mounts and its cgroup; the log stays (the pod's)."""
        await self.stop()
        argv = self.runsc("delete", "--force", self.cid)
        await asyncio.to_thread(
            hostcmd.quietly, argv, log, ("does not exist", "not found"), level=logging.DEBUG
        )
        await asyncio.to_thread(_remove_bundle, self.bundle)
        await asyncio.to_thread(cgroups.remove, self.cgroup)


def _remove_bundle(bundle: Path) -> None:
    try:
        rootfs.remove_bundle(bundle)
    except OSError as e:
        log.error("container bundle %s: %s", bundle, e)


def _append(path: Path, chunk: bytes) -> None:
    """Add `chunk` to the log; past LOG_BYTES keep only its newer half (a small file:
    written on the loop, as the kubelet's own log writes are not worth a thread)."""
    with open(path, "ab") as file:
        file.write(chunk)
        size = file.tell()
    if size > LOG_BYTES:
        with open(path, "rb") as file:
            file.seek(-(LOG_BYTES // 2), 2)
            newer = file.read()
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(newer)
        tmp.replace(path)
