"""Several clients on one sandboxed kernel: two AsyncKernelClients, and `jupyter console`.

Each client connection crosses the tunnel as its own stream, so replies must go
to the client that asked, and iopub output to every subscriber.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from conftest import execute
from helpers import bundles_of, sandboxes_of
from jupyter_client.asynchronous import AsyncKernelClient

JUPYTER = Path(sys.executable).with_name("jupyter")


async def output_of(client, msg_id: str, timeout: float = 30) -> str:
    """The stdout that request `msg_id` produced, as `client` saw it on iopub."""
    text = ""
    while True:
        msg = await client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return text


async def reply_to(client, msg_id: str, timeout: float = 30) -> dict:
    """The shell reply to `msg_id`, skipping stale kernel_info replies of wait_for_ready."""
    while True:
        reply = await client.get_shell_msg(timeout=timeout)
        if reply["parent_header"]["msg_id"] == msg_id:
            return reply
        assert reply["msg_type"] == "kernel_info_reply", reply


async def replies_waiting(client) -> list[str]:
    """Ids of the requests whose replies sit unread on `client`'s shell channel."""
    await asyncio.sleep(0.5)
    waiting = []
    while await client.shell_channel.msg_ready():
        waiting.append((await client.get_shell_msg(timeout=1))["parent_header"]["msg_id"])
    return waiting


async def console(connection_file: str, stdin: str, timeout: float = 60) -> str:
    """Run `jupyter console --existing` with `stdin` piped in; return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        str(JUPYTER),
        "console",
        "--existing",
        connection_file,
        "--simple-prompt",
        "--no-confirm-exit",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode(errors="replace")


async def test_two_clients_share_one_kernel(km, kc):
    other = AsyncKernelClient()  # a separate client, as another process would make
    other.load_connection_file(km.connection_file)
    other.start_channels()
    try:
        await other.wait_for_ready(timeout=60)
        assert other.session.session != kc.session.session

        # the first client asks; both see the output, only the first gets the reply
        msg_id = kc.execute("shared = 'from the first client'\nprint(shared)")
        outputs = await asyncio.gather(output_of(kc, msg_id), output_of(other, msg_id))
        assert outputs == ["from the first client\n"] * 2
        reply = await reply_to(kc, msg_id)
        assert reply["content"]["status"] == "ok"
        assert msg_id not in await replies_waiting(other)

        # and the other way round, in the same kernel (same state)
        msg_id = other.execute("print(shared.replace('first', 'second'))")
        outputs = await asyncio.gather(output_of(kc, msg_id), output_of(other, msg_id))
        assert outputs == ["from the second client\n"] * 2
        reply = await reply_to(other, msg_id)
        assert reply["content"]["status"] == "ok"
        assert msg_id not in await replies_waiting(kc)

        # both heartbeats go through the tunnel
        assert await kc.is_alive()
        assert await other.is_alive()
    finally:
        other.stop_channels()
    # the first client is unaffected by the second one leaving
    content, text, _ = await execute(kc, "print(len(shared))")
    assert content["status"] == "ok"
    assert text == "21\n"


async def test_jupyter_console_attaches_to_a_sandboxed_kernel(km, kc):
    out = await console(
        km.connection_file,
        "answer = 6 * 7\nprint(answer)\nimport socket; print(socket.gethostname())\n",
    )
    lines = [line.split(":", 1)[-1].strip() for line in out.splitlines()]
    assert "42" in lines
    assert "sandbox" in lines
    assert "keeping kernel alive" in lines  # --existing: the console leaves it running

    # the console's work is in the shared kernel, which is still alive
    assert await km.is_alive()
    content, text, _ = await execute(kc, "print(answer + 1)")
    assert content["status"] == "ok"
    assert text == "43\n"


async def test_exit_in_console_ends_the_sandbox_and_the_kernel_restarts(km, kc):
    (first,) = sandboxes_of(km.kernel_id)
    out = await console(km.connection_file, "x = 1\nexit\n")
    assert "Shutting down kernel" in out

    # The kernel quit: its sandbox goes, and the restarter (as in jupyter_server)
    # starts a fresh kernel in a fresh sandbox, on the same ports.
    loop = asyncio.get_running_loop()
    # The restarter sees the death within its time_to_dead (3 s); the old sandbox's removal
    # and the new one's start take seconds each, more under the whole suite's load (30 s
    # ran out once in a full run on this 2-core host).
    deadline = loop.time() + 60
    while (current := sandboxes_of(km.kernel_id)) in ([], [first]):
        assert loop.time() < deadline, "the kernel was not restarted"
        await asyncio.sleep(0.2)
    (second,) = current
    assert second != first
    assert bundles_of(km.kernel_id) == [second]

    await kc.wait_for_ready(timeout=60)
    content, _, _ = await execute(kc, "print(x)")
    assert content["status"] == "error"
    assert content["ename"] == "NameError"  # a new kernel: the console's x is gone
    content, text, _ = await execute(kc, "import socket; print(socket.gethostname())")
    assert text == "sandbox\n"
