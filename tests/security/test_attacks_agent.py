"""The kernel against the agent's process: its /proc entries, its signals, ptrace.

The agent runs as root in the sandbox and holds the channel to the host. Under
gVisor (whose procfs lets any user list another process's fds and follow them,
and read its environ) the kernel runs in a PID namespace of its own with its own
/proc, so that the agent is not there to find; in a microVM the guest's Linux
refuses a uid 1000 process everything of a root one (ptrace access checks).

Each attack goes for PID 1 by number (where the agent was) and for every process
that is not the kernel's user (the agent, wherever it shows), reports what each
attempt gave, and checks afterwards that the kernel still answers through the agent.
"""

from __future__ import annotations

import collections

import pytest

OTHERS = """
def others():
    '''PID 1 and every process of the guest that is not the kernel's user (kernel
    threads, which have no command line, aside): {pid: command line}.'''
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
            cmdline = open(f"/proc/{name}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
        except OSError:
            continue
        if name == "1" or (uid != os.getuid() and cmdline):
            found[int(name)] = cmdline.strip()
    return found
"""
REFUSED = {"EACCES", "EPERM", "ENOENT", "ESRCH"}


def run(target, code: str) -> dict:
    evidence = target.run("assert_sandboxed()\n" + OTHERS + code)
    assert "1" in evidence["others"], evidence
    return evidence


def still_answers(target) -> None:
    """The agent lives: the kernel's next execute goes through it and back."""
    after = target.run("report(uid=os.getuid(), alive=True)")
    assert after == {"uid": 1000, "alive": True}, after


def errnos(results: dict[str, str]) -> str:
    counts = collections.Counter(results.values())
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def agent_seen(others: dict[str, str]) -> str:
    """How the agent shows to the kernel (for the verdict)."""
    if any("agent.py" in cmd or "pid1.py" in cmd for cmd in others.values()):
        return "the agent is visible as PID 1 (root)"
    return f"the agent is not in the kernel's /proc (PID 1 there: {others['1']!r})"


@pytest.mark.attack(
    "processes", "write frames into the agent's channel: open /proc/1/fd/0 for write"
)
def test_write_agent_stdin(target, verdict):
    found = run(
        target,
        "FORGED = bytes([5, 0, 0, 0, 1, 64, 0, 0, 0]) + b'\\n'\n"
        "opened = {}\n"
        "for pid in [1, *others()]:\n"
        "    fds = attempt(os.listdir, f'/proc/{pid}/fd')\n"
        "    for fd in {'0', *(fds[1] if fds[0] == 'ok' else [])}:  # fd 0 even if unlisted\n"
        "        got = attempt(os.open, f'/proc/{pid}/fd/{fd}', os.O_WRONLY | os.O_NONBLOCK)\n"
        "        if got[0] == 'ok':\n"
        "            got = ('ok', attempt(os.write, got[1], FORGED)[0], os.close(got[1]))\n"
        "        opened[f'{pid}/{fd}'] = got[0]\n"
        "report(others=others(), pid1_fd0=opened['1/0'], opened=opened)",
    )
    assert found["pid1_fd0"] in REFUSED, found
    assert set(found["opened"].values()) <= REFUSED, found
    still_answers(target)
    verdict(
        f"/proc/1/fd/0: {found['pid1_fd0']}; every fd of PID 1 and of other users' processes: "
        f"{errnos(found['opened'])}; {agent_seen(found['others'])}; the kernel still answers"
    )


@pytest.mark.attack("processes", "read the agent's channel or output through /proc/<pid>/fd")
def test_read_agent_fds(target, verdict):
    found = run(
        target,
        "opened = {}\n"
        "for pid in [1, *others()]:\n"
        "    fds = attempt(os.listdir, f'/proc/{pid}/fd')\n"
        "    for fd in {'0', '1', '3', '4', *(fds[1] if fds[0] == 'ok' else [])}:\n"
        "        got = attempt(os.open, f'/proc/{pid}/fd/{fd}', os.O_RDONLY | os.O_NONBLOCK)\n"
        "        if got[0] == 'ok':\n"
        "            os.close(got[1])\n"
        "        opened[f'{pid}/{fd}'] = got[0]\n"
        "report(others=others(), pid1_fd1=opened['1/1'], opened=opened)",
    )
    assert found["pid1_fd1"] in REFUSED, found
    assert set(found["opened"].values()) <= REFUSED, found
    still_answers(target)
    verdict(
        f"/proc/1/fd/1: {found['pid1_fd1']}; every fd of PID 1 and of other users' processes: "
        f"{errnos(found['opened'])}; {agent_seen(found['others'])}"
    )


@pytest.mark.attack("processes", "read or write the agent's memory (/proc/<pid>/mem)")
def test_agent_memory(target, verdict):
    found = run(
        target,
        "mem = {pid: attempt(open, f'/proc/{pid}/mem', 'r+b')[0] for pid in [1, *others()]}\n"
        "mem.update({f'{pid} ro': attempt(open, f'/proc/{pid}/mem', 'rb')[0]"
        " for pid in [1, *others()]})\n"
        "report(others=others(), mem=mem)",
    )
    assert set(found["mem"].values()) <= REFUSED, found
    still_answers(target)
    verdict(f"/proc/<pid>/mem: {errnos(found['mem'])}; {agent_seen(found['others'])}")


@pytest.mark.attack("processes", "read the agent's environment (/proc/<pid>/environ)")
def test_agent_environ(target, verdict):
    found = run(
        target,
        "def environ(pid):\n"
        "    with open(f'/proc/{pid}/environ', 'rb') as f:\n"
        "        return f.read().decode(errors='replace')\n"
        "got = {pid: attempt(environ, pid) for pid in [1, *others()]}\n"
        "report(others=others(), got=got)",
    )
    results = {pid: r[0] if r[0] != "ok" else ("empty" if not r[1] else "read") for pid, r in
               found["got"].items()}  # fmt: skip
    # The agent's own environment names the kernel's user and limits (JSB_KERNEL).
    assert not any("JSB_" in str(r[1]) for r in found["got"].values()), found
    assert set(results.values()) <= REFUSED | {"empty"}, found
    still_answers(target)
    verdict(f"environ: {errnos(results)}; {agent_seen(found['others'])}")


@pytest.mark.attack("processes", "signal the agent's processes (PID 1 and every root process)")
def test_signal_agent(target, verdict):
    found = run(
        target,
        "import signal, time\n"
        "sent = {}\n"
        "for pid in [1, *others()]:\n"
        "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP,"
        " signal.SIGHUP, signal.SIGUSR1):\n"
        "        sent[f'{pid} {sig.name}'] = attempt(os.kill, pid, sig)[0]\n"
        "time.sleep(0.5)\n"
        "report(others=others(), sent=sent)",
    )
    assert set(found["sent"].values()) <= {"EPERM"}, found
    still_answers(target)
    verdict(f"kill(): {errnos(found['sent'])}; {agent_seen(found['others'])}; it lives on")


@pytest.mark.attack(
    "processes", "ptrace-attach to the agent's processes (PID 1 and every root one)"
)
def test_ptrace_agent(target, verdict):
    found = run(
        target,
        "attached = {pid: syscall(101, 16, pid, 0, 0)[1] or 'ok' for pid in [1, *others()]}\n"
        "report(others=others(), attached=attached)",
    )
    assert set(found["attached"].values()) <= {"EPERM"}, found
    still_answers(target)
    verdict(f"PTRACE_ATTACH: {errnos(found['attached'])}; {agent_seen(found['others'])}")


UNCOVER = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def umount(flags):
    return "ok" if libc.umount2(b"/proc", flags) == 0 else errno.errorcode[ctypes.get_errno()]
def attempt(fn):
    try:
        return "ok", fn()
    except OSError as e:
        return errno.errorcode[e.errno], str(e)
found = {"uid": os.getuid(), "umount": umount(0), "detach": umount(2)}
found["pid1"] = attempt(lambda: open("/proc/1/cmdline", "rb").read().decode(errors="replace"))
found["fds"] = attempt(lambda: os.listdir("/proc/1/fd"))
found["environ"] = attempt(lambda: open("/proc/1/environ", "rb").read().decode(errors="replace"))
print(json.dumps(found))
"""


@pytest.mark.attack(
    "processes", "unmount the kernel's own /proc in a user namespace to find the agent's under it"
)
def test_uncover_agent_proc(target, verdict):
    found = run(
        target,
        "import sys\n"
        f"inner = {UNCOVER!r}\n"
        "r = subprocess.run(['unshare', '-Urm', sys.executable, '-c', inner],"
        " capture_output=True, text=True)\n"
        "report(others=others(), rc=r.returncode, err=r.stderr[-400:],"
        " inner=json.loads(r.stdout) if r.returncode == 0 else None)",
    )
    inner = found["inner"]
    if target.backend == "gvisor":
        # gVisor lets the kernel's user make a user namespace and be its root ...
        assert inner is not None and inner["uid"] == 0, found
        # ... but the /proc it inherited is locked to it (EINVAL, as Linux's MNT_LOCKED),
        # and below it there is no other /proc: the agent's is detached (kernel_init).
        assert inner["umount"] in {"EINVAL", "EPERM"}, found
        assert inner["detach"] in {"EINVAL", "EPERM"}, found
        assert "agent.py" not in str(inner["pid1"]) and "JSB_" not in str(inner["environ"])
        assert inner["fds"][0] in REFUSED or inner["fds"][1] == [], found
        how = f"a user namespace as its root, umount /proc: {inner['umount']}"
        how += f", MNT_DETACH: {inner['detach']}; /proc/1 is still {inner['pid1'][1]!r}"
    else:
        # The guest's Linux has user namespaces off: the attempt ends at unshare(2).
        assert inner is None and "unshare failed" in found["err"], found
        how = f"unshare -Urm: {found['err'].strip().splitlines()[-1]}"
    still_answers(target)
    verdict(f"{how}; {agent_seen(found['others'])}")
