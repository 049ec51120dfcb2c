"""What the kernel must not see or reach. Each attack first proves it really ran."""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT, execute
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner.images.store import find_image


@pytest.fixture
def planted_secret():
    """A file only the host has, outside any workspace."""
    path = Path("/root") / f"jsb-secret-{secrets.token_hex(6)}"
    value = secrets.token_hex(16)
    path.write_text(value)
    yield path, value
    path.unlink()


@pytest.fixture
async def km_with_server_secret(no_leftovers, workspace, monkeypatch, kernel_name):
    """A kernel started by a 'server' whose environment holds a token."""
    token = f"secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", token)
    km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
    await km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=READY_TIMEOUT)
    yield km, kc, token
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


async def test_host_file_is_invisible(kc, planted_secret):
    path, value = planted_secret
    # The value is sent reversed so that the cell's own source (kept in the
    # kernel's history) does not contain what the search looks for.
    code = (
        "import os, subprocess\n"
        f"print(os.path.exists('/root'), os.path.exists({str(path)!r}))\n"
        f"needle = {value[::-1]!r}[::-1]\n"
        "hits = subprocess.run(['grep', '-rl', needle, "
        "'/', '--exclude-dir=proc', '--exclude-dir=sys', '--exclude-dir=dev'], "
        "capture_output=True, text=True).stdout\n"
        "print(repr(hits))"
    )
    content, text, _ = await execute(kc, code, timeout=120)
    assert content["status"] == "ok"
    lines = text.splitlines()
    assert lines[0] == "True False"  # the guest has its own /root; the host's file is absent
    assert lines[1] == "''"  # a search of the whole guest filesystem finds nothing


async def test_server_environment_does_not_reach_the_kernel(km_with_server_secret):
    _km, kc, token = km_with_server_secret
    _, text, _ = await execute(kc, "import os, json; print(json.dumps(dict(os.environ)))")
    env = json.loads(text)
    assert "PATH" in env  # the environment was really read
    assert "JUPYTERHUB_API_TOKEN" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert token not in text


async def test_no_network_not_even_the_hosts_loopback(kc):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "def attempt(addr):\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        "    try:\n"
        "        s.connect(addr); return 'connected'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        f"print(attempt(('127.0.0.1', {port})))\n"
        "try:\n"
        "    socket.getaddrinfo('deb.debian.org', 80); print('resolved')\n"
        "except OSError as e:\n"
        "    print('no dns')\n"
        "print(sorted(name for _, name in socket.if_nameindex()))\n"
    )
    try:
        content, text, _ = await execute(kc, code, timeout=60)
    finally:
        listener.close()
    assert content["status"] == "ok"
    loopback, dns, interfaces = text.splitlines()
    assert loopback == "ConnectionRefusedError"  # the guest's own loopback, nothing listens
    assert dns == "no dns"
    assert interfaces == "['lo']"


async def test_kernel_is_not_root_and_has_no_capabilities(kc):
    _, text, _ = await execute(
        kc,
        "import os\n"
        "print(os.getuid(), os.geteuid(), os.getgid())\n"
        "print([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm'))])\n"
        "try:\n"
        "    os.setuid(0); print('became root')\n"
        "except PermissionError:\n"
        "    print('setuid refused')\n",
    )
    ids, caps, setuid = text.splitlines()
    assert ids == "1000 1000 1000"
    assert "CapEff:\\t0000000000000000" in caps
    assert "CapPrm:\\t0000000000000000" in caps
    assert setuid == "setuid refused"


async def test_writable_layer_is_thrown_away_and_image_untouched(kc):
    rootfs = find_image("python3")
    _, text, _ = await execute(
        kc,
        "open('/home/sandbox/scratch.txt', 'w').write('temp')\n"
        "import os; print(os.path.exists('/home/sandbox/scratch.txt'))\n"
        "try:\n"
        "    open('/usr/lib/evil', 'w')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n",
    )
    assert text.split() == ["True", "PermissionError"]
    assert not (rootfs / "home/sandbox/scratch.txt").exists()
    assert not (rootfs / "usr/lib/evil").exists()


async def test_workspace_is_shared_at_the_same_path(kc, workspace):
    (workspace / "from-host.txt").write_text("hello from the host")
    _, text, _ = await execute(
        kc,
        "print(open('from-host.txt').read())\n"
        "open('from-kernel.txt', 'w').write('hello from the kernel')\n",
    )
    assert text == "hello from the host\n"
    assert (workspace / "from-kernel.txt").read_text() == "hello from the kernel"
    # the mount point was made in this sandbox's own root view, not in the shared image
    assert not (find_image("python3") / str(workspace).lstrip("/")).exists()


async def test_workspace_read_only_and_none(no_leftovers, workspace, kernel_name):
    (workspace / "data.txt").write_text("data")
    os.chown(
        workspace / "data.txt", 1000, 1000
    )  # writable for the kernel's user, but for the mount
    for mode, expected in (("ro", "data EROFS"), ("none", "absent /home/sandbox")):
        config = Config({"SandboxProvisioner": {"workspace": mode}})
        km = AsyncIOLoopKernelManager(kernel_name=kernel_name, config=config)
        await km.start_kernel(cwd=str(workspace))
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            _, text, _ = await execute(
                kc,
                "import os\n"
                f"p = {str(workspace / 'data.txt')!r}\n"
                "if os.path.exists(p):\n"
                "    try:\n"
                "        open(p, 'a').write('x'); print(open(p).read(), 'writable')\n"
                "    except OSError as e:\n"
                "        import errno; print(open(p).read(), errno.errorcode[e.errno])\n"
                "else:\n"
                "    print('absent', os.getcwd())\n",
            )
            assert text.strip() == expected
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    assert (workspace / "data.txt").read_text() == "data"


async def test_host_processes_are_invisible(kc):
    host = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
    assert any(b"pytest" in cmdline for cmdline in host)  # the host runs this test...
    _, text, _ = await execute(
        kc,
        "import os\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit():\n"
        "        try: print(p, open(f'/proc/{p}/cmdline').read().replace(chr(0), ' '))\n"
        "        except OSError: pass\n",
    )
    guest = dict(line.partition(" ")[::2] for line in text.splitlines())
    assert len(guest) >= 2  # the listing really saw the sandbox's own processes
    assert not [c for c in guest.values() if "pytest" in c]  # ...not here
    # PID 1 is ours, not the host's init: the init of the kernel's own PID namespace
    # (kernel_init, which hides the agent), or in a VM's warm kernel pid1.py and the agent
    assert " -I -S -B - kernel_init " in guest["1"] or "/run/jsb/pid1.py" in guest["1"], guest
    if "kernel_init" in guest["1"]:
        assert not [c for c in guest.values() if "agent.py" in c]
