"""The kubelet's prober: startup, readiness and liveness probes, run from the host.

tcpSocket and httpGet probes connect from the host to the pod's IP (the pod's
network namespace is on the host's bridge); exec probes run `runsc exec` in the
container. A startup probe holds the others back until it succeeds; a startup
or liveness probe that fails `failureThreshold` times in a row gets the
container SIGTERM, then SIGKILL after the pod's grace period (with restartPolicy
Never it then stays terminated, and the pod fails).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from .runtime import Container

log = logging.getLogger(__name__)

Obj = dict[str, Any]


def _seconds(probe: Obj, key: str, default: float) -> float:
    return float(probe.get(key, default))


class Prober:
    """The probes of one running container; `run` until cancelled (when it ends)."""

    def __init__(
        self,
        ip: str,
        container: Obj,
        runner: Container,
        grace: float,
        set_ready: Callable[[bool], None],
    ) -> None:
        """`set_ready(ready)`: the readiness probe changed its verdict."""
        self.ip = ip
        self.container = container
        self.runner = runner
        self.grace = grace
        self.set_ready = set_ready

    async def run(self) -> None:
        startup = self.container.get("startupProbe")
        if startup is not None and not await self._startup(startup):
            await self._kill("startup")
            return
        loops = []
        if "readinessProbe" in self.container:
            loops.append(self._readiness(self.container["readinessProbe"]))
        if "livenessProbe" in self.container:
            loops.append(self._liveness(self.container["livenessProbe"]))
        await asyncio.gather(*loops)

    async def _startup(self, probe: Obj) -> bool:
        """Probe until `successThreshold` successes (True) or `failureThreshold` failures
        (False) in a row."""
        await asyncio.sleep(_seconds(probe, "initialDelaySeconds", 0))
        successes = failures = 0
        while True:
            if await self.once(probe):
                successes, failures = successes + 1, 0
                if successes >= int(probe.get("successThreshold", 1)):
                    return True
            else:
                successes, failures = 0, failures + 1
                if failures >= int(probe.get("failureThreshold", 3)):
                    return False
            await asyncio.sleep(_seconds(probe, "periodSeconds", 10))

    async def _readiness(self, probe: Obj) -> None:
        await asyncio.sleep(_seconds(probe, "initialDelaySeconds", 0))
        successes = failures = 0
        ready = False
        while True:
            if await self.once(probe):
                successes, failures = successes + 1, 0
                verdict = ready or successes >= int(probe.get("successThreshold", 1))
            else:
                successes, failures = 0, failures + 1
                verdict = ready and failures < int(probe.get("failureThreshold", 3))
            if verdict != ready:
                ready = verdict
                self.set_ready(ready)
            await asyncio.sleep(_seconds(probe, "periodSeconds", 10))

    async def _liveness(self, probe: Obj) -> None:
        await asyncio.sleep(_seconds(probe, "initialDelaySeconds", 0))
        failures = 0
        while True:
            await asyncio.sleep(_seconds(probe, "periodSeconds", 10))
            failures = 0 if await self.once(probe) else failures + 1
            if failures >= int(probe.get("failureThreshold", 3)):
                await self._kill("liveness")
                return

    async def _kill(self, which: str) -> None:
        log.info("%s probe of %s failed: killing it", which, self.container["name"])
        await self.runner.signal("TERM")
        await asyncio.sleep(self.grace)
        await self.runner.signal("KILL", everything=True)

    async def once(self, probe: Obj) -> bool:
        """One probe: True if it succeeded within `timeoutSeconds`."""
        timeout = _seconds(probe, "timeoutSeconds", 1)
        try:
            if "tcpSocket" in probe:
                port = self._port(probe["tcpSocket"]["port"])
                connecting = asyncio.open_connection(self.ip, port)
                _, writer = await asyncio.wait_for(connecting, timeout)
                writer.close()
                return True
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = f"http://{self.ip}:{self._port(get['port'])}{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                limit = aiohttp.ClientTimeout(total=timeout)
                async with (
                    aiohttp.ClientSession(timeout=limit) as session,
                    session.get(url, headers=headers, allow_redirects=False) as response,
                ):
                    return 200 <= response.status < 400
            if "exec" in probe:
                argv = self.runner.runsc("exec", self.runner.cid, *probe["exec"]["command"])
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                try:
                    return await asyncio.wait_for(process.wait(), timeout) == 0
                except asyncio.TimeoutError:
                    process.kill()
                    await process.wait()
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError):
            pass
        return False

    def _port(self, port: Any) -> int:
        """A probe's port: a number, or the name of one of the container's ports."""
        if isinstance(port, int):
            return port
        for entry in self.container.get("ports") or []:
            if entry.get("name") == port:
                return int(entry["containerPort"])
        if str(port).isdigit():
            return int(port)
        raise ValueError(f"no port named {port!r}")
