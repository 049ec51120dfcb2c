"""The provisioner contract against the real runsc and the real guest image."""

from __future__ import annotations

import asyncio

from conftest import execute


async def test_kernel_runs_in_a_sandbox(kc, km, workspace):
    content, text, _ = await execute(kc, "import os, platform; print(platform.node(), os.getuid(), os.getcwd())")
    assert content["status"] == "ok"
    node, uid, cwd = text.split()
    assert node == "sandbox"
    assert uid == "1000"
    assert cwd == str(workspace)
    assert await km.is_alive()
