"""Processes and privilege: the kernel's user has no way up and nothing of the host to touch.

System calls are made raw (ctypes), so that what answers is the sandbox's kernel,
not a library's check. Each harmful one runs only after `assert_sandboxed()`.
Under gVisor a call it does not implement answers ENOSYS; in a microVM the guest's
own Linux answers, as it would for an unprivileged user (EPERM / EACCES).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

# x86_64 system call numbers
SYS = {
    "ptrace": 101,
    "setuid": 105,
    "chroot": 161,
    "settimeofday": 164,
    "mount": 165,
    "reboot": 169,
    "init_module": 175,
    "clock_settime": 227,
    "add_key": 248,
    "unshare": 272,
    "perf_event_open": 298,
    "finit_module": 313,
    "bpf": 321,
}
DENIED = {"EPERM", "EACCES", "ENOSYS"}


def raw(name: str, *args: str) -> str:
    """Kernel code for one raw system call, giving its errno name ("" on success)."""
    return f"syscall({SYS[name]}{''.join(', ' + a for a in args)})[1]"


def run_calls(target, calls: dict[str, str]) -> dict[str, str]:
    code = "assert_sandboxed()\nreport(**{" + ", ".join(f"{k!r}: {v}" for k, v in calls.items())
    return target.run(code + "})")


@pytest.mark.attack("processes", "see the host's processes")
def test_host_processes(target, verdict):
    found = target.run(
        "cmds = {}\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        cmds[pid] = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ')"
        ".decode()\n"
        "    except OSError:\n"
        "        pass\n"
        "report(cmds=cmds)"
    )
    cmds = [c for c in found["cmds"].values() if c]  # a VM's kernel threads have none
    assert any("ipykernel" in c for c in cmds)  # it sees its own kernel
    assert not [c for c in cmds if "pytest" in c or "runsc" in c or "qemu" in c], cmds
    assert len(cmds) < 20, cmds
    verdict(f"{len(cmds)} processes, all the sandbox's own; none of the host's")


@pytest.mark.attack("processes", "signal a host process by its pid")
def test_signal_host_process(target, verdict):
    victim = subprocess.Popen(["sleep", "300"])
    try:
        found = target.run(
            "assert_sandboxed()\n"
            f"report(kill=attempt(os.kill, {victim.pid}, 9)[0], own=attempt(os.kill, os.getpid(), 0)[0])"  # noqa: E501
        )
        time.sleep(0.2)
        assert victim.poll() is None, "the host process was killed"
    finally:
        victim.kill()
        victim.wait()
    assert found["own"] == "ok"
    assert found["kill"] in {"ESRCH", "EPERM"}, found
    verdict(f"{found['kill']}: host pid {victim.pid} does not exist in the sandbox; it lived")


@pytest.mark.attack("processes", "ptrace the sandbox's PID 1 (its agent)")
def test_ptrace_pid1(target, verdict):
    found = run_calls(target, {"attach": raw("ptrace", "16", "1", "0", "0")})
    assert found["attach"] in DENIED, found
    verdict(f"PTRACE_ATTACH: {found['attach']} (PID 1 runs as root, the kernel does not)")


@pytest.mark.attack("processes", "mount a filesystem")
def test_mount(target, verdict):
    found = run_calls(
        target,
        {"tmpfs": raw("mount", "b'none'", "b'/tmp'", "b'tmpfs'", "0", "None"),
         "proc": raw("mount", "b'proc'", "b'/tmp'", "b'proc'", "0", "None")},
    )  # fmt: skip
    assert set(found.values()) <= DENIED, found
    verdict(f"tmpfs: {found['tmpfs']}, proc: {found['proc']}")


@pytest.mark.attack("processes", "unshare into new user, mount and network namespaces")
def test_unshare(target, verdict):
    clone_newns, clone_newnet = 0x00020000, 0x40000000
    found = run_calls(
        target,
        {"mount": raw("unshare", str(clone_newns)), "net": raw("unshare", str(clone_newnet))},
    )
    # A user namespace needs a single-threaded process: a fresh one, root inside.
    userns = target.run(
        "r = subprocess.run(['unshare', '--user', '--map-root-user', 'sh', '-c',"
        " 'id -u; mount -t tmpfs none /mnt && echo MOUNTED'], capture_output=True, text=True)\n"
        "report(rc=r.returncode, out=r.stdout.split(), err=r.stderr.strip())"
    )
    assert found["mount"] in DENIED and found["net"] in DENIED, found
    assert "MOUNTED" not in userns["out"] and userns["rc"] != 0, userns
    if target.backend == "microvm":
        # the guest kernel allows none (max_user_namespaces = 0)
        assert "unshare failed" in userns["err"] and not userns["out"], userns
        how = f"user namespace refused ({userns['err'][:60]})"
    else:
        # gVisor emulates user namespaces in its own kernel; root there owns nothing
        assert userns["out"] == ["0"] and "permission denied" in userns["err"], userns
        how = "a user namespace of gVisor's own: root in it, yet mount there is denied"
    verdict(f"mount ns: {found['mount']}, net ns: {found['net']}; {how}")


@pytest.mark.attack("processes", "load a kernel module")
def test_load_module(target, verdict):
    found = run_calls(
        target,
        {"init": raw("init_module", "b'\\x7fELF'", "4", "b''"),
         "finit": raw("finit_module", "0", "b''", "0")},
    )  # fmt: skip
    assert set(found.values()) <= DENIED, found
    verdict(f"init_module: {found['init']}, finit_module: {found['finit']}")


@pytest.mark.attack("processes", "gain root through a setuid-root program")
def test_setuid_programs(target, verdict):
    found = target.run(
        "assert_sandboxed()\n"
        "setuid = subprocess.run(['find', '/usr', '/bin', '/sbin', '-xdev', '-perm', '-4000',"
        " '-user', 'root'], capture_output=True, text=True).stdout.split()\n"
        "mount = subprocess.run(['mount', '-t', 'tmpfs', 'none', '/mnt'], capture_output=True,"
        " text=True)\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines()"
        " if ':\\t' in l)\n"
        "report(setuid=setuid, mount=mount.stderr.strip(), rc=mount.returncode,"
        " nnp=status.get('NoNewPrivs', '?').strip(), uid=os.getuid())"
    )
    assert found["uid"] != 0
    assert found["rc"] != 0, found
    # util-linux names the effective uid it ran with: not root, whatever the setuid bit
    assert "effective UID is 0" not in found["mount"], found
    assert found["setuid"] == [], found  # the image build clears the bits
    assert found["nnp"] in {"1", "?"}, found  # and would keep them from working
    verdict(
        f"no setuid-root program in the image; no_new_privs = {found['nnp']}; "
        f"mount: {found['mount'][:70]!r}"
    )


@pytest.mark.attack("processes", "set the clock")
def test_set_clock(target, verdict):
    before = time.time()
    found = run_calls(
        target,
        {"clock_settime": "syscall(227, 0, (ctypes.c_long * 2)(0, 0))[1]",
         "settimeofday": "syscall(164, (ctypes.c_long * 2)(0, 0), None)[1]"},
    )  # fmt: skip
    assert abs(time.time() - before) < 60, "the host's clock moved"
    assert set(found.values()) <= DENIED, found
    verdict(f"clock_settime: {found['clock_settime']}, settimeofday: {found['settimeofday']}")


@pytest.mark.attack("processes", "add a key to a kernel keyring (keyctl)")
def test_keyctl(target, verdict):
    description = f"jsb-attack-{os.getpid()}"
    found = run_calls(
        target,
        {"add_key": f"syscall(248, b'user', b'{description}', b'x', 1, -3)[1]"},  # session ring
    )
    host_keys = Path("/proc/keys").read_text()
    assert description not in host_keys, "the key landed in the host's kernel"
    if target.backend == "gvisor":
        assert found["add_key"] in DENIED, found
        verdict(f"{found['add_key']}: gVisor has no keyrings")
    else:
        assert found["add_key"] in DENIED | {""}, found
        verdict(
            f"{found['add_key'] or 'allowed'} in the guest's own kernel; "
            "the host's /proc/keys does not have it"
        )


@pytest.mark.attack("processes", "load a BPF program or map")
def test_bpf(target, verdict):
    found = run_calls(
        target,
        {"map_create": "syscall(321, 0, (ctypes.c_uint32 * 32)(1, 4, 4, 1), 128)[1]",
         "prog_load": "syscall(321, 5, (ctypes.c_uint32 * 32)(), 128)[1]"},
    )  # fmt: skip
    assert set(found.values()) <= DENIED, found
    verdict(f"BPF_MAP_CREATE: {found['map_create']}, BPF_PROG_LOAD: {found['prog_load']}")


@pytest.mark.attack("processes", "open a perf event on the CPU")
def test_perf_event(target, verdict):
    found = run_calls(
        target, {"perf": "syscall(298, (ctypes.c_uint32 * 32)(0, 128), -1, 0, -1, 0)[1]"}
    )
    assert found["perf"] in DENIED | {"ENOENT", "ENODEV"}, found
    verdict(f"perf_event_open: {found['perf']}")


@pytest.mark.attack("processes", "become root: setuid(0), chroot, reboot")
def test_become_root(target, verdict):
    found = run_calls(
        target,
        {"setuid": raw("setuid", "0"), "chroot": raw("chroot", "b'/tmp'"),
         "reboot": "syscall(169, 0xfee1dead, 672274793, 0x4321fedc, None)[1]"},
    )  # fmt: skip
    assert set(found.values()) <= DENIED, found
    verdict(", ".join(f"{k}: {v}" for k, v in found.items()))


@pytest.mark.attack("processes", "write the kernel's tunables (core_pattern, sysrq, hostname)")
def test_kernel_tunables(target, verdict):
    found = target.run(
        "assert_sandboxed()\n"
        "def write(p):\n"
        "    with open(p, 'w') as f:\n"
        "        f.write('|/tmp/jsb-attack')\n"
        "report(**{p: attempt(write, p)[0] for p in ('/proc/sys/kernel/core_pattern',"
        " '/proc/sysrq-trigger', '/proc/sys/kernel/hostname', '/proc/sys/vm/drop_caches')})"
    )
    assert set(found.values()) <= {"EACCES", "EPERM", "EROFS", "ENOENT"}, found
    assert "jsb-attack" not in Path("/proc/sys/kernel/core_pattern").read_text()
    verdict(", ".join(f"{p.rsplit('/', 1)[1]}: {e}" for p, e in found.items()))


@pytest.mark.attack("processes", "escape through the cgroup filesystem (release_agent)")
def test_cgroup_escape(target, verdict):
    found = target.run(
        "assert_sandboxed()\n"
        "def write(p):\n"
        "    with open(p, 'w') as f:\n"
        "        f.write('/tmp/jsb-attack')\n"
        "paths = subprocess.run(['find', '/sys/fs/cgroup', '-maxdepth', '3', '-name',"
        " 'release_agent'], capture_output=True, text=True).stdout.split()\n"
        "paths += ['/sys/fs/cgroup/release_agent', '/sys/fs/cgroup/memory/release_agent']\n"
        "report(**{p: attempt(write, p)[0] for p in paths}, cgroup=attempt(os.listdir,"
        " '/sys/fs/cgroup')[0])"
    )
    found.pop("cgroup")
    assert set(found.values()) <= {"EACCES", "EPERM", "EROFS", "ENOENT"}, found
    verdict(", ".join(sorted(set(found.values()))) + " for every release_agent")


@pytest.mark.attack("processes", "kill the sandbox's agent (PID 1)")
def test_kill_the_agent(target, verdict):
    found = target.run(
        "assert_sandboxed()\n"
        "import signal\n"
        f"report(kill=attempt(os.kill, 1, {int(signal.SIGKILL)})[0],"
        " term=attempt(os.kill, 1, 15)[0])"
    )
    alive = target.run("report(alive=True)")
    assert found["kill"] in {"EPERM"} and found["term"] in {"EPERM"}, found
    assert alive["alive"]
    verdict(f"SIGKILL: {found['kill']}, SIGTERM: {found['term']}; the kernel still answers")
