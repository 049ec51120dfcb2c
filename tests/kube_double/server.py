"""The double as a process: take the host's resources, serve, and give everything back.

`serve` locks the state folder and the bridge's name (one double each), sweeps
what a crashed run left, makes the bridge, fills the store with what the
cluster's operator made (namespaces, RuntimeClasses, the node), listens on
127.0.0.1, writes `<state>/ready.json` ({"port", "pid"}) once it answers, and
runs until SIGTERM or SIGINT. Then it ends every watch, kills every pod,
removes all of it from the host and checks that nothing is left (exit status
1 if something is).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from . import cleanup
from .api import Api
from .config import Config
from .kinds import NAMESPACE, NODE, RUNTIME_CLASS
from .kubelet import Kubelet
from .network import Network
from .runtime import RUN_DIR
from .store import Store

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 5.0
"""How long open requests (watches) get to finish when the double stops."""


class Busy(Exception):
    """Another double holds the state folder or the bridge's name."""


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{what} is in use by another kube double") from None
        yield


def _operator_objects(config: Config, store: Store) -> None:
    """What a cluster's operator made before anyone came: namespaces, classes, the node."""
    for name, labels in config.namespaces.items():
        store.create(
            NAMESPACE,
            {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/metadata.name": name, **labels},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            },
        )
    for name, handler in config.runtime_classes.items():
        store.create(
            RUNTIME_CLASS,
            {
                "kind": "RuntimeClass",
                "apiVersion": "node.k8s.io/v1",
                "metadata": {"name": name},
                "handler": handler,
            },
        )
    store.create(
        NODE,
        {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {
                "name": config.node,
                "labels": {
                    "kubernetes.io/hostname": config.node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": config.gateway},
                    {"type": "Hostname", "address": config.node},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                    }
                ],
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": "",
                    "containerRuntimeVersion": "containerd://1.7.0 (runsc)",
                    "kernelVersion": os.uname().release,
                    "kubeProxyVersion": "",
                    "kubeletVersion": "v1.31.0-kube-double",
                    "machineID": "",
                    "operatingSystem": "linux",
                    "osImage": "kube double",
                    "systemUUID": "",
                },
            },
        },
    )


async def _serve(config: Config, state: Path, port: int) -> None:
    store = Store(config.watch_history)
    network = Network(config)
    await asyncio.to_thread(network.setup)
    _operator_objects(config, store)
    kubelet = Kubelet(config, state, store, network)
    api = Api(config, store, kubelet)
    runner = web.AppRunner(
        api.app(), handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS, access_log=None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        address: Any = runner.addresses[0]
        api.address = f"{address[0]}:{address[1]}"
        ready = state / "ready.json"
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": address[1], "pid": os.getpid()}))
        tmp.replace(ready)
        log.info("kube double listening on %s", api.address)
        await stop.wait()
        log.info("stopping")
    finally:
        store.end_watches()
        await runner.cleanup()
        await kubelet.shutdown()
        (state / "ready.json").unlink(missing_ok=True)


def serve(config: Config, state: Path, port: int) -> int:
    """Run the double until SIGTERM or SIGINT: the process's exit status (0: all clean)."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    try:
        with (
            _locked(state / "double.lock", f"state folder {state}"),
            _locked(RUN_DIR / f"{config.bridge}.lock", f"bridge {config.bridge}"),
        ):
            (state / "ready.json").unlink(missing_ok=True)  # a crashed run's
            cleanup.sweep(config, state)
            try:
                asyncio.run(_serve(config, state, port))
            finally:
                cleanup.sweep(config, state)
                left = cleanup.leftovers(config, state)
            if left:
                log.error("left on the host: %s", "; ".join(left))
                return 1
            return 0
    except Busy as e:
        log.error("%s", e)
        return 2


def clean(config: Config, state: Path) -> list[str]:
    """Sweep what a double that is not running left; return what could not be removed."""
    with (
        _locked(state / "double.lock", f"state folder {state}"),
        _locked(RUN_DIR / f"{config.bridge}.lock", f"bridge {config.bridge}"),
    ):
        cleanup.sweep(config, state)
        return cleanup.leftovers(config, state)
