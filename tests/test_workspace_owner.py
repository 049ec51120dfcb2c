"""A kernel reads and writes its workspace as the workspace's owner would, whoever owns it.

A root server (`jupyter lab --allow-root` in a root-owned clone, a server in a
container) runs its kernels as uid 1000, never as root: the workspace is then
mounted idmapped, root's files shown as the kernel's and the kernel's new files
landing on the host as root's. A folder of another user is that user's kernel's.
What is checked on the host is the folder itself, not what the kernel says.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT, execute
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

OTHER_USER = (4242, 4343)
"""A uid and gid no account has: the kernel runs as them, as it would as a real user."""

KERNEL_CODE = """
import os, stat
print("uid", os.getuid(), os.getgid())
print("read", open("ws.txt").read())
with open("out.csv", "w") as f:
    f.write("a,b\\n1,2\\n")
with open("ws.txt", "a") as f:
    f.write(" and the kernel")
os.mkdir("made")
open("made/inside.txt", "w").write("x")
os.rename("made/inside.txt", "made/renamed.txt")
print("mine", os.stat("out.csv").st_uid == os.getuid())
try:
    os.chmod("out.csv", 0o4755)
except PermissionError:
    print("setuid refused")
try:
    os.close(os.open("setgid.bin", os.O_CREAT | os.O_WRONLY, 0o2755))
except PermissionError:
    print("setgid refused")
print("done")
"""


@pytest.fixture(params=["root-0755", "root-0700", "other-user-0700"])
def owned_workspace(request: pytest.FixtureRequest) -> Iterator[tuple[Path, int, int]]:
    """A workspace owned by root (0755, or 0700 as mkdtemp makes it) or by another user,
    holding `ws.txt` that only its owner may read."""
    owner = (0, 0) if request.param.startswith("root") else OTHER_USER
    mode = 0o755 if request.param.endswith("0755") else 0o700
    folder = Path(tempfile.mkdtemp(prefix="jsb-owned-", dir="/tmp"))
    (folder / "ws.txt").write_text("from the host")
    (folder / "ws.txt").chmod(0o600)
    for path in (folder, folder / "ws.txt"):
        os.chown(path, *owner)
    folder.chmod(mode)
    yield folder, *owner
    shutil.rmtree(folder, ignore_errors=True)


async def test_the_kernel_writes_its_workspace_as_its_owner(
    no_leftovers, kernel_name: str, owned_workspace: tuple[Path, int, int]
) -> None:
    folder, uid, gid = owned_workspace
    km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
    await km.start_kernel(cwd=str(folder))
    try:
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        reply, text, _ = await execute(kc, KERNEL_CODE)
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)
    assert reply["status"] == "ok", text
    kernel_uid = int(text.split("uid ", 1)[1].split()[0])
    assert kernel_uid != 0, "a kernel never runs as root"
    assert kernel_uid == (uid or 1000)
    assert "read from the host" in text
    assert "mine True" in text and "done" in text
    # On the host: what the kernel wrote is there, and its new files are the owner's.
    assert (folder / "ws.txt").read_text() == "from the host and the kernel"
    assert (folder / "out.csv").read_text() == "a,b\n1,2\n"
    assert (folder / "made" / "renamed.txt").read_text() == "x"
    for made in ("out.csv", "made", "made/renamed.txt"):
        found = (folder / made).stat()
        assert (found.st_uid, found.st_gid) == (uid, gid), made
    assert (folder.stat().st_uid, folder.stat().st_gid) == (uid, gid)
    # No set-id bit reaches a file that is root's on the host: gVisor refuses to set one
    # (anywhere), a microVM keeps the guest's modes off an idmapped workspace's files.
    if uid == 0 or kernel_name.endswith("gvisor"):
        for made in ("out.csv", "setgid.bin"):
            if (folder / made).exists():
                assert not (folder / made).stat().st_mode & (stat.S_ISUID | stat.S_ISGID), made
    if kernel_name.endswith("gvisor"):
        assert "setuid refused" in text and "setgid refused" in text


async def test_a_workspace_that_cannot_be_idmapped_gives_a_clear_error(
    no_leftovers, kernel_name: str
) -> None:
    """ramfs has no idmapped mounts: the kernel does not start, says why and what to do,
    and leaves nothing behind (the test's fixture checks)."""
    folder = Path(tempfile.mkdtemp(prefix="jsb-ramfs-", dir="/tmp"))
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0700", "ramfs", str(folder)], check=True)
    try:
        km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
        with pytest.raises(Exception, match="idmapped mount") as raised:
            await km.start_kernel(cwd=str(folder))
        assert "workspace = 'none'" in str(raised.value)
        assert not km.has_kernel
        await km.cleanup_resources()
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()


async def test_a_pinned_kernel_uid_sees_another_owners_folder_as_its_own(
    no_leftovers, kernel_name: str
) -> None:
    """kernel_uid set to someone other than the folder's (ordinary) owner: the folder is
    idmapped owner -> kernel_uid (host root keeping its own id), and new files are the
    owner's on the host."""
    folder = Path(tempfile.mkdtemp(prefix="jsb-pinned-", dir="/tmp"))
    (folder / "ws.txt").write_text("from the host")
    for path in (folder, folder / "ws.txt"):
        os.chown(path, *OTHER_USER)
    (folder / "ws.txt").chmod(0o600)
    config = Config({"SandboxProvisioner": {"kernel_uid": 2000}})
    km = AsyncIOLoopKernelManager(kernel_name=kernel_name, config=config)
    try:
        await km.start_kernel(cwd=str(folder))
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        reply, text, _ = await execute(
            kc, "import os; print(os.getuid(), open('ws.txt').read()); open('new.txt','w')"
        )
        kc.stop_channels()
    finally:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        created = (folder / "new.txt").stat() if (folder / "new.txt").exists() else None
        shutil.rmtree(folder, ignore_errors=True)
    assert reply["status"] == "ok", text
    assert text.split() == ["2000", "from", "the", "host"]
    assert created is not None and (created.st_uid, created.st_gid) == OTHER_USER


async def test_a_folder_holding_the_servers_own_software_is_never_writable(
    no_leftovers, kernel_name: str
) -> None:
    """The clone a root server runs from holds its .venv and this package: a kernel that
    could write there would run code as the server (a .pth file, a changed module). It is
    refused read-write, with what to do, and may be mounted read-only."""
    repo = Path(__file__).resolve().parent.parent
    km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
    with pytest.raises(Exception, match=r"will not mount .* writable") as refused:
        await km.start_kernel(cwd=str(repo))
    assert "workspace = 'ro'" in str(refused.value)
    await km.cleanup_resources()
    config = Config({"SandboxProvisioner": {"workspace": "ro"}})
    km = AsyncIOLoopKernelManager(kernel_name=kernel_name, config=config)
    await km.start_kernel(cwd=str(repo))
    try:
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        reply, text, _ = await execute(
            kc,
            "import os\nprint(os.path.exists('pyproject.toml'))\n"
            "try:\n    open('provisioner/evil.pth', 'w')\nexcept OSError as e:\n"
            "    print(e.strerror)",
        )
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)
    assert reply["status"] == "ok", text
    assert text.split("\n")[0] == "True"
    assert "Read-only file system" in text
    assert not (repo / "provisioner" / "evil.pth").exists()
