"""Audit: Debian's own auditing tools, run by the kernel inside its sandbox.

Tools written by others look where we would not think to look; here they look
from where an attacker stands, the kernel's user in a cell:

- lynis, the system auditor, unprivileged (`--pentest`), on the tests that bear on
  the boundary: the kernel it runs on and what that kernel exposes (modules,
  config, binfmt_misc), /proc and mount options, compilers, MAC frameworks (its
  process checks, Docker's among them, need ps or pgrep, which the image has not);
- libcap2-bin's `capsh --print`: the kernel's capability sets (bounding and
  ambient too), securebits and no_new_privs;
- libcap-ng-utils: `pscap -a` (every process that holds a capability), `filecap`
  (every file with file capabilities: a way up that needs no setuid bit) and
  `captest` (reads /etc/shadow itself and through a child);
- and the image's own find(1) for what container escape checkers look for: setuid
  files, sockets (docker, containerd), devices, writable /proc/sys and /sys.

None of the tools is in the guest image or installed on the host: the test fetches
bookworm's packages (the guest's own release) with `apt-get download`, unpacks them
into the kernel's workspace and runs them from a cell, as any notebook could.
lynis runs on its shipped profile less two blocks it does not use here: the sysctl
table (for KRNL-6000, which needs sysctl(8), absent from the image) and the plugin
list (plugins are skipped); parsing them costs two minutes under TCG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import execute, skip_or_fail
from kit import PRELUDE

from provisioner.backends.gvisor import AGENT_CAPABILITIES
from provisioner.images.boot import boot_dir

CACHE = Path("/var/cache/jupyter-sandbox/audit-tools")
PACKAGES = ("lynis", "libcap2-bin", "libcap-ng-utils")
KERNEL_UID = 1000
AUDIT_TIMEOUT = 600
"""Seconds for the cell: lynis is a shell script of thousands of processes, slow under TCG."""

LYNIS_GROUPS = "kernel filesystems hardening mac_frameworks"
LYNIS_TESTS = (
    "KRNL-5677",  # CPU: NX
    "KRNL-5695",  # the kernel's version
    "KRNL-5726",  # loaded kernel modules
    "KRNL-5728",  # kernel config
    "FILE-6344",  # /proc's mount options
    "FILE-6362",  # /tmp's sticky bit
    "FILE-6372",  # / mount options
    "FILE-6374",  # mount options of /dev, /dev/shm, /run, /tmp, /var...
    "HRDN-7220",  # compilers
    "HRDN-7231",  # binfmt_misc: non-native binary formats (an escape path of containers)
    "MACF-6204",  # AppArmor
    "MACF-6232",  # SELinux
    "MACF-6290",  # any MAC framework
)
"""All of lynis takes 7 minutes in gVisor (211 tests) and more under TCG."""
LYNIS_ALWAYS = {"KRNL-5695", "FILE-6362", "FILE-6374", "HRDN-7231", "MACF-6290"}
"""Tests that lynis runs on any Linux, privileged or not."""

HARMLESS_DEVICES = {
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
    "/dev/tty", "/dev/ptmx", "/dev/pts/ptmx",
    # gVisor's own, in its user-space kernel: creating a tun device or mounting
    # FUSE needs CAP_NET_ADMIN / CAP_SYS_ADMIN, which the kernel has not
    "/dev/net/tun", "/dev/fuse",
}  # fmt: skip
"""Character devices the kernel's user may open."""

SETUID_CONTROL, FILECAP_CONTROL = "control-setuid", "control-filecap"
NET_RAW_EP = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
"""security.capability for cap_net_raw=ep (struct vfs_cap_data, revision 2, effective)."""

pytestmark = pytest.mark.timeout(AUDIT_TIMEOUT + 300)


def unpacked(package: str) -> Path:
    """Debian's `package`, downloaded once and unpacked (`dpkg -x`) into the cache."""
    folder = CACHE / package
    if (folder / ".done").exists():
        return folder / "x"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        skip_or_fail("the audit needs a Debian host (apt-get, dpkg) to fetch its tools")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # apt downloads as its own _apt user
    for attempt in range(2):
        result = subprocess.run(
            ["apt-get", "download", "-qq", package], cwd=folder, capture_output=True, text=True
        )
        if result.returncode == 0:
            break
        if attempt == 0:  # a fresh host may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    else:
        pytest.fail(f"apt-get download {package}: {result.stderr.strip()}", pytrace=False)
    folder.chmod(0o755)
    (deb,) = folder.glob("*.deb")
    subprocess.run(["dpkg", "-x", str(deb), str(folder / "x")], check=True)
    deb.unlink()
    (folder / ".done").touch()
    return folder / "x"


@pytest.fixture(scope="session")
def audit_tools() -> dict[str, Path]:
    """Each package's unpacked tree on the host."""
    return {package: unpacked(package) for package in PACKAGES}


@pytest.fixture
def tools_in_workspace(workspace: Path, audit_tools: dict[str, Path]) -> Path:
    """The tools, copied into the workspace (root's files: the kernel may run, not change them)."""
    folder = workspace / "audit"
    for package, tree in audit_tools.items():
        shutil.copytree(tree, folder / package, symlinks=True)
    # lynis run from its own folder (--usecwd) finds include/, db/ and its profile there
    lynis = folder / "lynis"
    shipped = (lynis / "etc/lynis/default.prf").read_text().splitlines()
    profile = [line for line in shipped if not line.startswith(("config-data=", "plugin="))]
    (lynis / "usr/share/lynis/default.prf").write_text("\n".join(profile) + "\n")
    out = folder / "out"
    out.mkdir()
    os.chown(out, KERNEL_UID, KERNEL_UID)
    # Controls, so that an empty finding means the tool looked: a setuid file (not
    # executable) and a file with a file capability (cap_net_raw=ep).
    (folder / SETUID_CONTROL).write_text("control\n")
    (folder / SETUID_CONTROL).chmod(0o4644)
    (folder / FILECAP_CONTROL).write_text("control\n")
    os.setxattr(folder / FILECAP_CONTROL, "security.capability", NET_RAW_EP)
    return folder


CELL = """
import time
tools, out = {tools!r}, {out!r}
runs = {{}}

def run(name, argv, cwd=None, env=None, timeout=300):
    start = time.monotonic()
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", str(e.stdout or ""), str(e.stderr or "")
    runs[name] = {{"rc": rc, "seconds": round(time.monotonic() - start, 1),
                  "stdout": stdout[-20000:], "stderr": stderr[-2000:]}}

capng = tools + "/libcap-ng-utils/usr/bin/"
run("capsh", [tools + "/libcap2-bin/sbin/capsh", "--print"])
run("captest", [capng + "captest", "--text"])
run("pscap", [capng + "pscap", "-a"])
# filecap -a walks / with /proc and /sys, which hold no file capabilities: minutes
# under TCG. The same walk without them, one top-level folder at a time:
tops = sorted(e.path for e in os.scandir("/") if e.is_dir(follow_symlinks=False)
              and e.name not in ("proc", "sys", "dev"))
filecaps, failed = [], {{}}
for top in tops:
    run("filecap " + top, [capng + "filecap", top])
    walk = runs.pop("filecap " + top)
    filecaps += [line for line in walk["stdout"].splitlines() if " /" in " " + line]
    if walk["rc"] != 0:
        failed[top] = walk
runs["filecap"] = {{"tops": tops, "found": filecaps, "failed": failed}}
# The same walk through getxattr(2) itself, which also lists a value that libcap-ng
# rejects for its length (see the test).
walked = {{}}
for top in tops:
    for root, _, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            value = attempt(os.getxattr, path, "security.capability", follow_symlinks=False)
            if value[0] == "ok":
                walked[path] = value[1].hex()
runs["xattr_walk"] = walked
# the control's file capability as the sandbox reports it: the size of its value
_libc.fgetxattr.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
fd = os.open({filecap_control!r}, os.O_RDONLY)
size = _libc.fgetxattr(fd, b"security.capability", None, 0)
runs["control_xattr"] = [size, errno.errorcode.get(ctypes.get_errno(), "") if size < 0 else ""]
os.close(fd)

skip_pseudo = ["(", "-path", "/proc", "-o", "-path", "/sys", ")", "-prune", "-o"]
run("setid", ["find", "/", *skip_pseudo, "-type", "f", "-perm", "/6000", "-print"])
run("sockets", ["find", "/", *skip_pseudo, "-type", "s", "-print"])
run("unix", ["cat", "/proc/net/unix"])
run("devices", ["find", "/dev", "(", "-type", "b", "-o", "-type", "c", ")",
                "-printf", "%y %p\\\\n"])
run("open_devices", ["find", "/dev", "(", "-type", "b", "-o", "-type", "c", ")",
                     "(", "-readable", "-o", "-writable", ")", "-print"])
run("writable", ["find", "/proc/sys", "/sys", "/proc/sysrq-trigger", "-writable", "-print"])
# access(2) calls some /proc/sys files writable by their mode (0666: ns_last_pid);
# the kernel checks the capability only on write: write their value back to see
assert_sandboxed()

def write_back(path):
    with open(path, "rb") as f:
        value = f.read()
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, value)
    finally:
        os.close(fd)

refused = {{}}
for path in runs["writable"]["stdout"].split():
    if path.startswith("/proc/sys/"):
        refused[path] = attempt(write_back, path)[0]
runs["write_back"] = refused
runs["kmsg"] = attempt(open, "/dev/kmsg", "rb")[0]

env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
run("lynis", ["sh", tools + "/lynis/usr/sbin/lynis", "audit", "system", "--usecwd",
              "--pentest", "--quick", "--no-colors", "--skip-plugins",
              "--plugindir", tools + "/lynis/etc/lynis/plugins",
              "--tests-from-group", {groups!r}, "--tests", {tests!r},
              "--logfile", out + "/lynis.log", "--report-file", out + "/lynis-report.dat"],
    cwd=tools + "/lynis/usr/share/lynis", env=env, timeout={timeout})
report(**runs)
"""


def lynis_report(path: Path) -> dict[str, list[str]]:
    """lynis's report: `key=value` and `key[]=value` lines, every value of a key in a list."""
    report: dict[str, list[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            report.setdefault(key.removesuffix("[]"), []).append(value)
    return report


def capsh_print(text: str) -> dict[str, str]:
    """`capsh --print`: its `Name: value` and `Name =value` lines."""
    fields = {}
    for line in text.splitlines():
        m = re.match(r"([A-Za-z][A-Za-z ]*?)\s*(?::|=)\s?(.*)$", line)
        if m:
            fields[m[1]] = m[2].strip()
    return fields


def cap_names(text: str) -> set[str]:
    """`cap_chown,cap_kill` or `chown, kill` -> {"chown", "kill"}."""
    return {c.strip().removeprefix("cap_") for c in text.split(",") if c.strip()}


def pscap_rows(text: str) -> list[dict[str, str]]:
    """`pscap -a`'s table: ppid, pid, name (the user), command, capabilities."""
    rows = []
    for line in text.splitlines()[1:]:
        m = re.match(r"(\d+)\s+(\d+)\s+(\S+)\s+(.{1,19}?)\s{2,}(.*)$", line)
        assert m, f"pscap line not understood: {line!r}"
        ppid, pid, user, command, caps = m.groups()
        rows.append({"ppid": ppid, "pid": pid, "user": user, "command": command, "caps": caps})
    return rows


@pytest.mark.attack(
    "audit",
    "lynis, capsh, pscap, filecap, captest and find(1) audit the sandbox from the kernel",
)
async def test_audit_tools_inside(tools_in_workspace, kc, kernel_name, verdict):
    backend = kernel_name.rsplit("-", 1)[1]
    out = tools_in_workspace / "out"
    code = PRELUDE + textwrap.dedent(
        CELL.format(
            tools=str(tools_in_workspace),
            out=str(out),
            groups=LYNIS_GROUPS,
            tests=" ".join(LYNIS_TESTS),
            timeout=AUDIT_TIMEOUT - 120,
            filecap_control=str(tools_in_workspace / FILECAP_CONTROL),
        )
    )
    content, text, _ = await execute(kc, code, timeout=AUDIT_TIMEOUT)
    assert content["status"] == "ok", text
    runs = json.loads(text.strip().splitlines()[-1])
    found: list[str] = []  # the verdict, finding by finding

    # -- capsh: the kernel's own capability state ---------------------------------
    assert runs["capsh"]["rc"] == 0, runs["capsh"]
    caps = capsh_print(runs["capsh"]["stdout"])
    assert caps["Current"] == "=", caps  # effective, permitted, inheritable: empty
    assert caps["Ambient set"] in ("", "<unsupported>"), caps
    assert caps["uid"] == "1000(sandbox) euid=1000(sandbox)", caps
    assert caps["gid"] == "1000(sandbox)" and caps["groups"] == "", caps
    assert "(no-new-privs=1)" in caps["Securebits"], caps
    bounding = cap_names(caps["Bounding set"])
    agent_caps = {c.lower().removeprefix("cap_") for c in AGENT_CAPABILITIES}
    if backend == "gvisor":
        # kernel_init empties it before the kernel starts (a warm pool's too)
        assert bounding == set() and agent_caps, bounding
    whose = "emptied by kernel_init" if backend == "gvisor" else "PID 1's, all of them"
    found.append(
        "capsh: uid 1000, no capability (effective, permitted, inheritable, ambient), "
        f"no_new_privs=1; bounding set {len(bounding)} ({whose}): out of reach under "
        "no_new_privs"
    )

    # -- captest: read /etc/shadow ---------------------------------------------
    captest = runs["captest"]["stdout"]
    assert "Current capabilities: none" in captest, captest
    assert "Attempting direct access to shadow...FAILED" in captest, captest
    assert "Attempting to access shadow by child process...FAILED" in captest, captest
    found.append("captest: /etc/shadow unreadable, directly or by a child")

    # -- pscap: who holds capabilities -------------------------------------------
    assert runs["pscap"]["rc"] == 0, runs["pscap"]
    holders = pscap_rows(runs["pscap"]["stdout"])
    assert [(h["pid"], h["user"]) for h in holders] == [("1", "root")], holders
    agent = cap_names(holders[0]["caps"].rstrip(" +@"))
    if backend == "gvisor":
        assert agent == agent_caps, holders
        found.append(f"pscap: only PID 1 (the agent) holds capabilities: {sorted(agent)}")
    else:
        assert holders[0]["caps"].startswith("full"), holders
        found.append("pscap: only PID 1 (the agent, root of the VM's own kernel) holds any")

    # -- filecap, find: ways up and out ------------------------------------------
    filecap = runs["filecap"]
    assert {"/usr", "/opt", "/etc", "/tmp"} <= set(filecap["tops"]), filecap
    assert not filecap["failed"], filecap
    with_caps = {}  # "[set] /path  caps [rootid]" -> {path: caps}
    for line in filecap["found"]:
        words = line.split()
        path = next(w for w in words if w.startswith("/"))
        with_caps[path] = " ".join(words[words.index(path) + 1 :])
    # No file but the control has a file capability, by getxattr(2) itself. The
    # control (set by the host; the workspace is mounted nosuid, so it never counts)
    # is seen, or not, as the sandbox reports its value: filecap must list it when
    # that value is well formed (its size query says 20 bytes).
    control = str(tools_in_workspace / FILECAP_CONTROL)
    walked = runs["xattr_walk"]
    assert set(walked) <= {control}, walked
    size, error = runs["control_xattr"]
    if size == len(NET_RAW_EP):
        assert walked == {control: NET_RAW_EP.hex()}, walked
        assert with_caps == {control: "net_raw"}, filecap  # the tool looked, and saw
        how = "filecap sees the control planted by the host (nosuid workspace)"
    elif control in walked:
        # gVisor's gofer: a size query answers 0, a read fills the whole buffer
        # (the value zero-padded); libcap-ng rejects that length (EINVAL)
        assert with_caps == {}, filecap
        how = (
            f"filecap is blind to file capabilities here: getxattr(2) answers a size "
            f"query with {size} and pads the value to the buffer, which libcap-ng rejects "
            f"(the host's control on a workspace file, seen only by a getxattr walk)"
        )
    else:
        assert error in ("ENODATA", "ENOTSUP", "EOPNOTSUPP"), error
        assert with_caps == {}, filecap
        how = f"the host's file capability on a workspace file is invisible inside ({error})"
    setid = runs["setid"]["stdout"].split()
    assert setid == [str(tools_in_workspace / SETUID_CONTROL)], runs["setid"]
    assert runs["setid"]["rc"] in (0, 1), runs["setid"]  # 1: folders it may not enter
    found.append(
        "filecap and a getxattr walk: no file with capabilities; find: no setuid/setgid "
        f"file but the control planted in the (nosuid) workspace; {how}"
    )

    sockets = runs["sockets"]["stdout"].split()
    assert sockets and all(s.startswith("/run/kernel/") for s in sockets), sockets
    unix = [line.split()[-1] for line in runs["unix"]["stdout"].splitlines()[1:]]
    strays = [s for s in unix if s.startswith("/") and not s.startswith("/run/kernel/")]
    assert not strays, runs["unix"]
    found.append("sockets: only the kernel's own (/run/kernel), no docker or containerd")

    devices = dict(line.split(" ", 1)[::-1] for line in runs["devices"]["stdout"].splitlines())
    block = sorted(p for p, kind in devices.items() if kind == "b")
    opened = runs["open_devices"]["stdout"].split()
    assert not [p for p in opened if devices.get(p) == "b"], opened
    assert set(opened) - HARMLESS_DEVICES <= {"/dev/kmsg"}, opened
    assert runs["kmsg"] in ("EPERM", "EACCES", "ENOENT"), runs["kmsg"]
    if backend == "gvisor":
        assert block == [], devices
    else:
        assert block == ["/dev/vda"], devices  # the VM's own root disk, root's only
    found.append(
        f"devices: block {block or 'none'} (none open to the kernel), "
        f"kernel may open only {sorted(set(opened) & HARMLESS_DEVICES)}; /dev/kmsg {runs['kmsg']}"
    )

    writable = runs["writable"]["stdout"].split()
    assert all(p.startswith("/proc/sys/") for p in writable), writable
    assert set(runs["write_back"]) == set(writable), runs["write_back"]
    assert set(runs["write_back"].values()) <= {"EPERM", "EACCES", "EROFS"}, runs["write_back"]
    found.append(
        "/proc/sys, /sys: nothing writable"
        + "".join(f" ({p} by its mode 0666, {e} on write)" for p, e in runs["write_back"].items())
    )

    # -- lynis --------------------------------------------------------------------
    lynis = runs["lynis"]
    assert lynis["rc"] == 0, lynis
    lynis_out = (out / "lynis.log").read_text(errors="replace")
    report = lynis_report(out / "lynis-report.dat")
    assert report["finish"] == ["true"], report
    executed = set(report["tests_executed"][0].split("|")) - {""}
    assert LYNIS_ALWAYS <= executed <= {*LYNIS_TESTS, "CORE-1000"}, executed
    assert int(report["lynis_tests_done"][0]) == len(executed), report["lynis_tests_done"]
    assert "warning" not in report, report["warning"]
    kernel = report["os_kernel_version_full"][0]
    assert kernel != os.uname().release
    if backend == "gvisor":
        assert kernel == "4.4.0", kernel  # what gVisor's user-space kernel says it is
    else:
        guest_kernel = json.loads((boot_dir() / "boot.json").read_text())["kernel"]
        assert kernel == guest_kernel, kernel  # the VM's own Debian kernel
    assert report["compiler_installed"] == ["0"], report
    assert "Result: no non-native binary formats found" in lynis_out
    found.insert(
        0,
        f"lynis {report['lynis_version'][0]} ({len(executed)} tests, 0 warnings, "
        f"hardening index {report['hardening_index'][0]}, {lynis['seconds']:.0f} s): "
        f"kernel {kernel} (host: {os.uname().release}), virtualization "
        f"{'undetected' if report['vm'] == ['2'] else report.get('vmtype')}, "
        "no compiler, no binfmt_misc formats",
    )
    verdict("; ".join(found))
