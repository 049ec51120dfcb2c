"""Bad settings and failed starts: a clear message, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import BACKENDS, KERNEL, our_sandboxes, require_sandbox
from helpers import microvm_list
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

from provisioner import accel, cgroups, limits
from provisioner.errors import SandboxError, SettingError
from provisioner.images.boot import find_boot_files
from provisioner.state import records

REPO = Path(__file__).resolve().parent.parent
JUPYTER_SANDBOX = [str(Path(sys.executable).parent / "jupyter"), "sandbox"]


def listening_ports() -> set[int]:
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize(
    "text, size",
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("2Gi", 2 << 30),
        ("1048576", 1 << 20),
    ],
)
def test_sizes_as_operators_write_them(text, size):
    assert limits.parse_size(text) == size


@pytest.mark.parametrize("text", ["2 GB", "2GB", "-1G", "0", "lots", "", "1.5.2G"])
def test_sizes_rejected_with_the_accepted_form(text):
    with pytest.raises(ValueError, match='"512M"'):
        limits.parse_size(text)


def make_km(workspace_config: dict, **kw) -> AsyncIOLoopKernelManager:
    return AsyncIOLoopKernelManager(
        kernel_name=KERNEL, config=Config({"GVisorProvisioner": workspace_config}), **kw
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"memory_limit": "2 GB"}, r"memory_limit.*\"512M\""),
        ({"memory_limit": "-512M"}, r"memory_limit"),
        ({"cpu_limit": -1.0}, r"cpu_limit.*cores"),
        ({"pids_limit": 3}, r"pids_limit.*>= 64"),
        ({"open_files_limit": 10}, r"open_files_limit.*>= 64"),
        ({"disk_limit": "1 TB"}, r"disk_limit.*\"512M\""),
        ({"kernel_uid": 0}, r"kernel_uid.*> 0"),
        ({"workspace": "rwx"}, r"workspace"),
    ],
)
async def test_bad_setting_fails_the_start_naming_it(no_leftovers, workspace, setting, message):
    ports_before = listening_ports()
    km = make_km(setting)
    with pytest.raises(SettingError, match=message):
        await km.start_kernel(cwd=str(workspace))
    assert not km.has_kernel
    assert listening_ports() - ports_before == set()


async def test_unknown_kernelspec_setting_is_refused(
    no_leftovers, tmp_path, workspace, monkeypatch
):
    spec = json.loads((REPO / "kernelspecs/python3-gvisor/kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = {"memory_limt": "1G"}
    folder = tmp_path / "kernels" / "typo-gvisor"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(spec))
    km = AsyncIOLoopKernelManager(
        kernel_name="typo-gvisor",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]),
    )
    with pytest.raises(
        ValueError,
        match=r"unknown GVisorProvisioner setting memory_limt; known settings: .*memory_limit",
    ):
        await km.start_kernel(cwd=str(workspace))


async def test_missing_runsc_points_to_doctor(no_leftovers, workspace):
    km = make_km({"runsc_path": "/nonexistent/runsc"})
    before = {r.sandbox_id for r in records() if r.owner_pid == os.getpid()}
    with pytest.raises(SandboxError, match="jupyter sandbox doctor"):
        await km.start_kernel(cwd=str(workspace))
    assert {r.sandbox_id for r in records() if r.owner_pid == os.getpid()} == before


async def test_missing_image_points_to_image_build(no_leftovers, workspace):
    km = make_km({"image": "no-such-image"})
    with pytest.raises(RuntimeError, match="jupyter sandbox image build"):
        await km.start_kernel(cwd=str(workspace))


@pytest.mark.parametrize("folder", ["/etc", "/usr/local", "/var/lib", "/", "/home", "/tmp"])
async def test_system_folder_is_never_mounted(no_leftovers, folder):
    km = make_km({})
    with pytest.raises(SandboxError, match="system folder"):
        await km.start_kernel(cwd=folder)


async def test_kernel_that_cannot_start_is_reported_and_removed(no_leftovers, tmp_path, workspace):
    spec = json.loads((REPO / "kernelspecs/python3-gvisor/kernel.json").read_text())
    spec["argv"][0] = "/opt/venv/bin/no-such-python"
    folder = tmp_path / "kernels" / "broken-gvisor"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(spec))
    ports_before = listening_ports()
    km = AsyncIOLoopKernelManager(
        kernel_name="broken-gvisor",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]),
    )
    with pytest.raises(SandboxError, match="no-such-python"):
        await km.start_kernel(cwd=str(workspace))
    assert listening_ports() - ports_before == set()


async def test_microvm_that_does_not_boot_in_time_is_killed_and_reported(no_leftovers, workspace):
    require_sandbox("microvm")
    km = AsyncIOLoopKernelManager(
        kernel_name=BACKENDS["microvm"],
        # booted: a VM restored from its snapshot can start the kernel within 1 s
        config=Config({"MicroVMProvisioner": {"startup_timeout": 1.0, "snapshots": False}}),
    )
    started = time.monotonic()
    try:
        with pytest.raises(SandboxError, match=r"did not start the kernel within 1 s"):
            await km.start_kernel(cwd=str(workspace))
    finally:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    assert time.monotonic() - started < 15  # killed, not waited for
    assert not [sid for sid in microvm_list() if km.kernel_id in sid]  # its QEMU is gone


def test_the_kvm_probe_decides_by_a_real_boot(sandbox_host):
    require_sandbox("microvm")
    qemu, kernel = shutil.which("qemu-system-x86_64"), find_boot_files().kernel
    under_tcg = accel.probe(qemu, kernel, "tcg", timeout=60)
    assert (under_tcg.name, under_tcg.reason.split(" in ")[0]) == (
        "tcg",
        "a probe guest booted under TCG",
    )
    verdict = accel.choose(qemu, kernel)  # what VMs get here: cached for the host's uptime
    assert verdict == accel.choose(qemu, kernel, "auto")
    assert verdict.name in ("kvm", "tcg") and verdict.reason
    assert accel.choose(qemu, kernel, "tcg").reason == "set by configuration (accel)"


def kvm_node(folder: Path, mode: int, gid: int) -> Path:
    """A node of /dev/kvm's numbers with its own mode and group (the host's is never touched)."""
    node = folder / f"kvm-{mode:o}-{gid}"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(10, 232))
    os.chown(node, 0, gid)
    node.chmod(mode)
    return node


def test_qemu_gets_kvm_only_with_the_group_it_needs_to_open_it(sandbox_host, tmp_path, monkeypatch):
    """Issue 14's audit: QEMU runs as the kernel's user with its groups cleared, so root's
    probe opening /dev/kvm proved nothing. Where only root may open it (0600: here), KVM is
    not for QEMU; where its group may (0660 root:kvm: Debian), QEMU gets that group only."""
    require_sandbox("microvm")
    from provisioner.backends import microvm

    assert accel.kvm_group(kvm_node(tmp_path, 0o666, 0)) is None
    shared = kvm_node(tmp_path, 0o660, 4321)
    assert accel.kvm_group(shared) == 4321
    for mode, gid in ((0o600, 0), (0o660, 0), (0o600, 4321)):  # never group root
        with pytest.raises(PermissionError, match="may not open it"):
            accel.kvm_group(kvm_node(tmp_path, mode, gid))
    qemu, kernel = shutil.which("qemu-system-x86_64"), find_boot_files().kernel
    argv = [qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "64", "-nodefaults",
            "-no-user-config", "-nographic", "-no-reboot", "-kernel", str(kernel)]  # fmt: skip
    device = Path("/dev/kvm")
    device_mode = device.stat().st_mode
    if device_mode & 0o066 == 0:  # this host: accel = 'kvm' is refused, not tried
        with pytest.raises(SandboxError, match="accel kvm: /dev/kvm is crw------- "):
            microvm.qemu_groups(argv)
    # Real QEMU as uid 1000 meets a 0660 root:4321 /dev/kvm (in a mount namespace of its own).
    bind = [
        "unshare",
        "--mount",
        "sh",
        "-c",
        'mount --bind "$0" /dev/kvm && ls -l /dev/kvm && exec "$@"',
        str(shared),
    ]
    opened = {}
    for told in (shared, kvm_node(tmp_path, 0o666, 4321)):  # the second: told "anyone may"
        monkeypatch.setattr(accel, "KVM_DEVICE", told)
        with tempfile.TemporaryFile() as output:
            process = microvm.spawn(argv, 1000, 1000, prefix=bind, stdout=output)
            try:
                process.wait(timeout=5)  # PVM-only KVM here: QEMU aborts once KVM is open
            except subprocess.TimeoutExpired:  # it opened KVM and runs
                process.kill()
                process.wait()
            output.seek(0)
            said = output.read().decode(errors="replace")
        assert "/dev/kvm" in said  # the bind mount happened (its `ls`)
        opened[told.name] = "Could not access KVM kernel module: Permission denied" not in said
    assert opened == {shared.name: True, "kvm-666-4321": False}
    assert device.stat().st_mode == device_mode  # nothing chmods the host's


async def test_port_taken_fails_cleanly(no_leftovers, workspace):
    km = make_km({})
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    km.shell_port = blocker.getsockname()[1]
    km.cache_ports = False
    try:
        with pytest.raises(SandboxError, match="cannot listen"):
            await km.start_kernel(cwd=str(workspace))
    finally:
        blocker.close()


def test_gc_reaps_sandboxes_of_a_server_that_died(sandbox_host, workspace):
    """A 'server' is SIGKILLed with a kernel running; `jupyter sandbox gc` removes all of it."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from jupyter_client.manager import AsyncKernelManager
        async def main():
            km = AsyncKernelManager(kernel_name={KERNEL!r})
            await km.start_kernel(cwd={str(workspace)!r})
            print(km.provisioner.sandbox_id, flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id = server.stdout.readline().strip()
        assert sandbox_id.startswith("jsb-")
        ps = subprocess.run([*JUPYTER_SANDBOX, "ps"], capture_output=True, text=True, check=True)
        line = next(line for line in ps.stdout.splitlines() if line.startswith(sandbox_id))
        assert "gvisor" in line and str(server.pid) in line and "(gone)" not in line
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    ps = subprocess.run([*JUPYTER_SANDBOX, "ps"], capture_output=True, text=True)
    assert "(gone)" in next(line for line in ps.stdout.splitlines() if line.startswith(sandbox_id))
    gc = subprocess.run([*JUPYTER_SANDBOX, "gc"], capture_output=True, text=True, check=True)
    assert "removed" in gc.stdout
    assert sandbox_id not in our_sandboxes()
    assert sandbox_id not in {r.sandbox_id for r in records()}
    assert cgroups.find(sandbox_id) == ""


def test_missing_runsc_or_qemu_fails_under_ci_instead_of_skipping(tmp_path):
    """A skipped isolation test would be a hidden failure: under CI=true it must fail."""
    bin_dir = tmp_path / "bin"  # a PATH with python but without runsc and QEMU
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bin_dir), "CI": "true"}
    test = "tests/test_isolation.py::test_kernel_is_not_root_and_has_no_capabilities"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout
    assert "runsc is not installed" in run.stdout  # the test's gVisor run
    assert "QEMU is not installed" in run.stdout  # and its microVM run
    assert "2 errors" in run.stdout
    env["CI"] = ""
    local = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "2 skipped" in local.stdout


def test_doctor_passes_here_and_says_how_to_fix_a_missing_runsc(sandbox_host):
    tun_mode = Path("/dev/net/tun").stat().st_mode  # 0600 root on a fresh Debian machine
    ok = subprocess.run([*JUPYTER_SANDBOX, "doctor"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    # the tap check asks what the server needs (root opens the tun driver), whatever the mode
    assert "[ok] microVM: tap devices: /dev/net/tun opens as uid 0" in ok.stdout
    assert "chmod" not in ok.stdout
    assert Path("/dev/net/tun").stat().st_mode == tun_mode
    for check in ("runsc", "platform systrap", "cgroups", "image", "microVM: qemu",
                  "workspaces of other owners (idmapped mounts)",
                  "microVM: tap devices", "microVM: boot files",
                  "microVM: accelerator"):  # fmt: skip
        assert f"[ok] {check}" in ok.stdout
    accelerator = next(line for line in ok.stdout.splitlines() if "accelerator" in line)
    assert ": KVM: a probe guest booted" in accelerator or ": TCG: " in accelerator  # and why
    assert "content verified" in ok.stdout
    broken = subprocess.run(
        [*JUPYTER_SANDBOX, "doctor", "--runsc=/nonexistent/runsc"], capture_output=True, text=True
    )
    assert broken.returncode == 1
    assert "[FAIL] runsc" in broken.stdout
    assert "fix: run `make setup`" in broken.stdout
