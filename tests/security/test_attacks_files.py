"""Files: the host's filesystem is not the sandbox's, and the workspace mount is no door.

Each attack proves it ran (a listing that worked, a control file it did find) and
that the host's file stayed out of reach for the sandbox's reason: the path does
not exist in the guest (ENOENT), or the kernel's user may not open it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT, execute
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import KernelManager
from security.kit import HOSTILE, PRELUDE, Target
from traitlets.config import Config

from provisioner import guest
from provisioner.images.store import find_image

NOT_THERE = {"ENOENT"}
REFUSED = {"EACCES", "EPERM", "ENOENT", "EROFS"}


@pytest.mark.attack("files", "read a file planted on the host, by its path")
def test_host_file_by_path(target, verdict):
    path = target.planted["host_secret"]
    found = target.run(
        f"report(var_tmp=attempt(os.listdir, '/var/tmp')[0], secret=attempt(open, {path!r})[0])"
    )
    assert found["var_tmp"] == "ok"  # the directory is there to look in: the guest's own
    assert found["secret"] in NOT_THERE, found
    verdict(f"{found['secret']}: the guest's /var/tmp is the image's, the host's file is absent")


@pytest.mark.attack("files", "search the whole filesystem for a secret planted on the host")
def test_host_file_by_search(target, verdict):
    needle = f"host-secret-{target.planted['token']}"
    control = target.workspace / f"control-{secrets.token_hex(4)}.txt"
    control.write_text(needle + "\n")  # the same text in the workspace: the search works
    control.chmod(0o644)
    try:
        found = target.run(
            f"needle = {needle[::-1]!r}[::-1]\n"  # the cell's source must not match itself
            "hits = subprocess.run(['grep', '-rlsF', needle, '/', '--exclude-dir=proc',"
            " '--exclude-dir=sys', '--exclude-dir=dev'], capture_output=True, text=True)\n"
            "report(hits=hits.stdout.split())",
            timeout=600,
        )
    finally:
        control.unlink()
    assert found["hits"] == [str(control)], found
    verdict("only the workspace's control copy found: no host file is in the sandbox")


@pytest.mark.attack("files", "reach the host's root through /proc/1/root")
def test_proc_1_root(target, verdict):
    secret = target.planted["host_secret"]
    found = target.run(
        "report(pid1=attempt(os.listdir, '/proc/1/root')[0],"
        f" through=attempt(open, '/proc/1/root' + {secret!r})[0],"
        " own=attempt(os.listdir, '/proc/self/root')[0])"
    )
    assert found["own"] == "ok"  # /proc/<pid>/root works for the kernel's own processes
    assert found["pid1"] in REFUSED and found["through"] in REFUSED, found
    verdict(
        f"{found['pid1']} (PID 1 is the sandbox's own agent, not the host's init); "
        "the host's file is not behind it"
    )


@pytest.mark.attack("files", "read kernel memory through /proc/kcore, /dev/mem, /dev/kmem")
def test_kernel_memory(target, verdict):
    found = target.run(
        "report(**{p: attempt(open, p, 'rb')[0] for p in "
        "('/proc/kcore', '/dev/mem', '/dev/kmem', '/dev/port')},"
        " proc=attempt(os.listdir, '/proc')[0])"
    )
    assert found.pop("proc") == "ok"
    assert set(found.values()) <= REFUSED, found
    verdict(", ".join(f"{p}: {e}" for p, e in found.items()))


@pytest.mark.attack("files", "read the host's firmware tables under /sys/firmware")
def test_sys_firmware(target, verdict):
    host = Path("/sys/firmware/acpi/tables/DSDT")
    host_hash = hashlib.sha256(host.read_bytes()).hexdigest() if host.exists() else ""
    found = target.run(
        "import hashlib\n"
        "def read(p):\n"
        "    return hashlib.sha256(open(p, 'rb').read()).hexdigest()\n"
        "report(listing=attempt(os.listdir, '/sys/firmware'),"
        " dsdt=attempt(read, '/sys/firmware/acpi/tables/DSDT'),"
        " sys=attempt(os.listdir, '/sys')[0])"
    )
    assert found["sys"] == "ok"
    status, value = found["dsdt"]
    assert status != "ok" or value != host_hash, "the host's ACPI table is readable"
    verdict(f"DSDT: {status}; /sys/firmware: {found['listing'][0]} {found['listing'][1]}")


@pytest.mark.attack("files", "open the host's disks and devices, make one with mknod, a tun link")
def test_device_nodes(target, verdict):
    devices = [*sorted(p.name for p in Path("/sys/block").iterdir()), "kvm", "vhost-net"]
    found = target.run(
        "assert_sandboxed()\n"
        "import fcntl, struct\n"
        f"opened = {{d: attempt(open, '/dev/' + d, 'rb')[0] for d in {devices!r}}}\n"
        "made = attempt(os.mknod, '/tmp/disk', 0o600 | 0o060000, os.makedev(7, 0))[0]\n"
        "made_opens = attempt(open, '/tmp/disk', 'rb')[0] if made == 'ok' else made\n"
        "def tun():\n"
        "    with open('/dev/net/tun', 'r+b', buffering=0) as t:\n"
        "        fcntl.ioctl(t, 0x400454CA, struct.pack('16sH', b'jsb0', 0x0002))\n"
        "report(opened=opened, mknod=made, mknod_open=made_opens, tun=attempt(tun)[0],"
        " dev=sorted(os.listdir('/dev')))"
    )
    assert found["dev"], "nothing listed in /dev"
    opened = found["opened"]
    assert set(opened.values()) <= REFUSED, [(d, e) for d, e in opened.items() if e == "ok"]
    # A node for the host's loop0 (7:0): refused, or (gVisor, whose devices are all its
    # own) made in the sandbox's layer but leading to no device.
    assert found["mknod"] in {"EPERM", "EACCES"} or found["mknod_open"] in {"ENXIO", "ENODEV"}
    assert found["tun"] in REFUSED, found  # TUNSETIFF needs CAP_NET_ADMIN
    mknod = found["mknod"] if found["mknod"] != "ok" else f"made, opens {found['mknod_open']}"
    verdict(
        f"host disks and /dev/kvm: {', '.join(sorted(set(opened.values())))}; "
        f"mknod 7:0: {mknod}; a tun link: {found['tun']}"
    )


@pytest.mark.attack("files", "climb out of the workspace mount with ..")
def test_dotdot_out_of_the_workspace(target, verdict):
    sibling = target.planted["sibling_secret"]
    relative = "../" * 6 + sibling.lstrip("/")
    found = target.run(
        f"os.chdir({str(target.workspace)!r})\n"
        f"report(up=attempt(os.listdir, '..')[0], sibling=attempt(open, {relative!r})[0],"
        f" direct=attempt(open, {sibling!r})[0])"
    )
    assert found["up"] == "ok"
    assert found["sibling"] in NOT_THERE and found["direct"] in NOT_THERE, found
    verdict(f"{found['sibling']}: above the workspace is the guest's own /tmp")


@pytest.mark.attack("files", "follow a symlink made in the workspace to a host path")
def test_symlink_out_of_the_workspace(target, verdict):
    secret = target.planted["host_secret"]
    link, root_link = target.workspace / "escape", target.workspace / "root"
    found = target.run(
        f"os.symlink({secret!r}, {str(link)!r}); os.symlink('/', {str(root_link)!r})\n"
        f"report(link=attempt(open, {str(link)!r})[0],"
        f" via_root=attempt(open, {str(root_link)!r} + {secret!r})[0],"
        f" made=os.path.islink({str(link)!r}))"
    )
    assert found["made"] and link.is_symlink()  # the link exists, on the host too
    assert found["link"] in NOT_THERE and found["via_root"] in NOT_THERE, found
    # The host never follows it on the guest's behalf: it is only a link in a folder.
    assert link.resolve() == Path(secret)
    verdict(f"{found['link']}: links resolve inside the sandbox, where the target is absent")


@pytest.mark.attack("files", "write into the image and the system folders")
def test_writes_stay_in_the_throwaway_layer(target, verdict):
    rootfs = find_image(target.image)
    passwd = rootfs / "etc" / "passwd"
    before = hashlib.sha256(passwd.read_bytes()).hexdigest()
    found = target.run(
        "assert_sandboxed()\n"
        "wrote = {p: attempt(lambda p: open(p, 'a').write('jsb-attack\\n'), p)[0]"
        " for p in ('/etc/passwd', '/usr/lib/os-release', '/opt/venv/bin/python3')}\n"
        "made = {p: attempt(lambda p: open(p, 'w').write('x'), p)[0]"
        " for p in ('/jsb-attack', '/usr/jsb-attack', '/tmp/jsb-attack')}\n"
        "report(wrote=wrote, made=made)"
    )
    assert found["made"]["/tmp/jsb-attack"] == "ok"  # the kernel can write where it may
    assert hashlib.sha256(passwd.read_bytes()).hexdigest() == before
    assert not (rootfs / "jsb-attack").exists() and not Path("/jsb-attack").exists()
    refused = {p: e for p, e in {**found["wrote"], **found["made"]}.items() if e != "ok"}
    assert set(refused.values()) <= REFUSED, found
    verdict(
        f"refused as the kernel's user ({', '.join(sorted(set(refused.values())))}); "
        "the image on the host unchanged"
    )


SET_ID_ATTACK = """
import json, os, stat
def attempt(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return os.strerror(e.errno)
open("shell", "w").write("#!/bin/sh\\nid\\n")
print(json.dumps({
    "uid": os.getuid(),
    "chmod": attempt(os.chmod, "shell", 0o4755),
    "create": attempt(lambda: os.close(os.open("created", os.O_CREAT | os.O_WRONLY, 0o6755))),
    "mknod": attempt(os.mknod, "node", 0o104755),
    "guest_mode": oct(os.stat("shell").st_mode),
}))
"""


async def run_in(km: AsyncIOLoopKernelManager, folder: Path, code: str) -> dict:
    """Start `km`'s kernel in `folder`, run `code` there, shut it down; the JSON line the
    code printed last."""
    await km.start_kernel(cwd=str(folder))
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=READY_TIMEOUT)
    reply, text, _ = await execute(kc, code)
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    assert reply["status"] == "ok", text
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.attack("files", "leave a setuid-root program in a root-owned workspace for the host")
async def test_set_id_program_in_a_root_workspace(no_leftovers, kernel_name, verdict):
    """On a root-owned workspace (mounted idmapped) the kernel's files are root's on the
    host: a set-id bit on one would make a root shell for any host user who may run it."""
    folder = Path(tempfile.mkdtemp(prefix="jsb-rootws-", dir="/tmp"))
    folder.chmod(0o755)  # root's, and any host user may run what is in it
    km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
    try:
        found = await run_in(km, folder, SET_ID_ATTACK)
        assert found["uid"] != 0
        on_host = {p.name: p.stat() for p in folder.iterdir()}
        assert on_host["shell"].st_uid == 0, "the attack needs a root-owned file: it made one"
        set_id = [n for n, s in on_host.items() if s.st_mode & (stat.S_ISUID | stat.S_ISGID)]
        assert set_id == [], f"set-id files on the host: {set_id}"
        modes = {n: oct(s.st_mode) for n, s in on_host.items()}
        if kernel_name.endswith("gvisor"):
            assert found["chmod"] == found["create"] == found["mknod"] == os.strerror(1), found
            verdict(
                f"the kernel (uid {found['uid']}) wrote root-owned files; chmod 04755, open "
                f"with 06755 and mknod 04755: {found['chmod']} (seccomp); host modes {modes}"
            )
        else:
            verdict(
                f"the kernel (uid {found['uid']}) wrote root-owned files; chmod 04755: "
                f"{found['chmod']}, guest sees {found['guest_mode']}, kept in xattrs: "
                f"host modes {modes}"
            )
    finally:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        shutil.rmtree(folder, ignore_errors=True)


REWRITE_ATTACK = """
import errno, json, mmap, os
def rewrite(name):
    fd = os.open(name, os.O_RDWR)
    try:
        if name.startswith("write"):
            os.write(fd, b"#!/bin/sh\\necho pwned\\n")
        else:  # a shared writable mapping: its pages reach the file without a write()
            with mmap.mmap(fd, 4) as m:
                m[:4] = b"#!/x"
                m.flush()
    finally:
        os.close(fd)
def attempt(name):
    try:
        rewrite(name)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps({"uid": os.getuid(), "modes": {n: oct(os.stat(n).st_mode) for n in NAMES},
                  "results": {n: attempt(n) for n in NAMES}}))
"""


@pytest.mark.attack("files", "rewrite a setuid-root program the host left in a root workspace")
async def test_rewrite_a_set_id_program_in_a_root_workspace(
    no_leftovers, kernel_name, verdict, request
):
    """A root-owned 04755 (or 02755) program in a root-owned workspace is the kernel's own
    on the idmapped mount: it may write it, but then the bit must go, as Linux clears it
    when an unprivileged writer changes a set-id file, or any host user who runs the
    program afterwards runs the kernel's code as root."""
    if kernel_name.endswith("gvisor"):
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "gVisor 20240729 clears set-id bits on write() but not on a shared writable "
            "mmap, whose pages reach the host file as the gofer (root, CAP_FSETID)")))  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="jsb-rootws-", dir="/tmp"))
    folder.chmod(0o755)
    original = b"#!/bin/sh\nid\n" + b"#" * 64
    names = {"write-suid": 0o4755, "write-sgid": 0o2755, "mmap-suid": 0o4755, "mmap-sgid": 0o2755}
    for name, mode in names.items():
        (folder / name).write_bytes(original)
        (folder / name).chmod(mode)
    km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
    try:
        found = await run_in(km, folder, f"NAMES = {sorted(names)!r}\n" + REWRITE_ATTACK)
        assert found["uid"] != 0
        # The attack needs a program the kernel may write: on the mount, it is its own.
        assert all(int(m, 8) & 0o6000 for m in found["modes"].values()), found
        assert found["results"]["write-suid"] == "ok", found  # it did try, and could write
        after = {}
        for name in names:
            st = (folder / name).stat()
            changed = (folder / name).read_bytes() != original
            after[name] = (found["results"][name], changed, oct(st.st_mode))
            assert st.st_uid == 0
            assert not (changed and st.st_mode & (stat.S_ISUID | stat.S_ISGID)), after
        summary = "; ".join(f"{n}: {r}, {'changed' if c else 'unchanged'}, {m}"
                            for n, (r, c, m) in after.items())  # fmt: skip
        verdict(f"the kernel (uid {found['uid']}) rewrote root's set-id programs: {summary}")
    finally:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        shutil.rmtree(folder, ignore_errors=True)


TRUNCATIONS = {
    "os.open O_WRONLY|O_TRUNC": "os.close(os.open(PATH, os.O_WRONLY | os.O_TRUNC))",
    "os.open O_RDWR|O_TRUNC": "os.close(os.open(PATH, os.O_RDWR | os.O_TRUNC))",
    "os.open O_RDONLY|O_TRUNC": "os.close(os.open(PATH, os.O_RDONLY | os.O_TRUNC))",
    "open(path, 'w')": "open(PATH, 'w').close()",
    "os.truncate": "os.truncate(PATH, 0)",
    "O_TRUNC through a relative link": "os.close(os.open(LINK, os.O_WRONLY | os.O_TRUNC))",
    "O_TRUNC through an absolute link": "os.close(os.open(LINK, os.O_WRONLY | os.O_TRUNC))",
}
"""Each way to empty a file, as kernel code on its own file PATH (LINK: a link to it)."""
TRUNCATE_ATTACK = """
assert_sandboxed()
def truncate(code, path, link):
    exec(code, {"os": os, "PATH": path, "LINK": link})
found = {}
for n, (how, code) in enumerate(sorted(TRUNCATIONS.items())):
    path = os.path.join(WORKSPACE, f"file-{n}")
    link = os.path.join(WORKSPACE, f"link-{n}") if "link" in how else path
    seen = open(path).read()  # the file is there, and readable: the attempt is aimed right
    found[how] = [attempt(truncate, code, path, link)[0], seen, open(path).read()]
report(found=found, uid=os.getuid())
"""


def truncate_a_read_only_workspace(target: Target, owner: int) -> dict[str, list]:
    """Start a kernel of `target`'s kind on a read-only workspace owned by `owner` (the
    kernel's user: bound as it is; root: bound idmapped, root's files shown as the
    kernel's), try every truncation there; {how: [errno, before, after, on the host]}.

    Every file is writable by the kernel's user as far as its mode and owner go: only the
    mount's read-only flag stands in the way."""
    workspace = Path(tempfile.mkdtemp(prefix="jsb-attack-ro-", dir="/tmp"))
    contents = {}
    try:
        for n, how in enumerate(sorted(TRUNCATIONS)):
            file = workspace / f"file-{n}"
            contents[how] = f"{how}: {secrets.token_hex(8)}\n"
            file.write_text(contents[how])
            if "relative" in how:
                (workspace / f"link-{n}").symlink_to(file.name)
            elif "absolute" in how:
                (workspace / f"link-{n}").symlink_to(file)
        for path in (workspace, *workspace.iterdir()):
            os.chown(path, owner, owner, follow_symlinks=False)
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        config = Config({"SandboxProvisioner": {"workspace": "ro"}})
        km = KernelManager(kernel_name=target.kernel_name, autorestart=False, config=config)
        km.start_kernel(cwd=str(workspace))
        try:
            assert km.provisioner.image == target.image
            attacker = Target(target.backend, km, km.client(), workspace, image=target.image)
            attacker.kc.start_channels()
            attacker.kc.wait_for_ready(timeout=READY_TIMEOUT)
            found = attacker.run(
                PRELUDE
                + f"TRUNCATIONS = {TRUNCATIONS!r}\nWORKSPACE = {str(workspace)!r}\n"
                + TRUNCATE_ATTACK
            )
            attacker.kc.stop_channels()
        finally:
            km.shutdown_kernel(now=True)
        assert found["uid"] != 0
        results = found["found"]
        for n, how in enumerate(sorted(TRUNCATIONS)):
            results[how].append((workspace / f"file-{n}").read_text())
        # The kernel read each file before it tried (the attack was aimed right) ...
        assert all(before == contents[how] for how, (_, before, *_) in results.items()), results
        # ... and it stayed whole, on the host and as the kernel sees it, and the kernel got
        # the read-only mount's answer (EACCES: a 9p server's, for some of them).
        emptied = {how: r for how, r in results.items() if r[2:] != [contents[how]] * 2}
        assert not emptied, f"files emptied (errno, before, in the guest, on the host): {emptied}"
        for how, (error, *_) in results.items():
            # Under QEMU's mapped-xattr (a microVM's idmapped workspace) a link is a file
            # with an attribute: one made on the host is no link to the guest (ELOOP).
            hosts_link = target.backend == "microvm" and owner == 0 and "link" in how
            assert error in {"EROFS", "EACCES"} | ({"ELOOP"} if hosts_link else set()), results
        return results
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def truncation_verdict(results: dict[str, list]) -> str:
    by_error: dict[str, list[str]] = {}
    for how, (error, *_) in sorted(results.items()):
        by_error.setdefault(error, []).append(how)
    said = "; ".join(f"{error}: {', '.join(hows)}" for error, hows in sorted(by_error.items()))
    return f"{said}; every file intact on the host"


@pytest.mark.attack("files", "empty a file of a read-only workspace (O_TRUNC, truncate, links)")
def test_truncate_a_read_only_workspace(target, no_leftovers, verdict):
    """gVisor's directfs (runsc's default) opens the host file itself: runsc 20240729
    answered EROFS to an O_TRUNC open on a read-only bind, yet had emptied the host's file
    by then. The host's own mount of the workspace must be read-only (backends/gvisor.py)."""
    verdict(truncation_verdict(truncate_a_read_only_workspace(target, 1000)))


@pytest.mark.attack("files", "empty root's files in a read-only workspace (mounted idmapped)")
def test_truncate_a_read_only_root_workspace(target, no_leftovers, verdict):
    """A root server's own clone (its code, its venv) may be mounted read-only only: on the
    idmapped mount root's files are the kernel's, so the read-only flag is all that stops
    it from emptying the server's modules."""
    verdict(truncation_verdict(truncate_a_read_only_workspace(target, 0)))


AGENT_ATTACK = """\
\"\"\"The project's agent (real_agent.py), after an attack on its own folder as root.\"\"\"

import errno, json, os

_CANARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "canary")


def _attempt(empty, *args):
    try:
        empty(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _open(flags):
    os.close(os.open(_CANARY, flags))


_seen = open(_CANARY).read()
_found = {"uid": os.getuid(), "seen": _seen, "tries": {
    "os.open O_WRONLY|O_TRUNC": _attempt(_open, os.O_WRONLY | os.O_TRUNC),
    "os.open O_RDONLY|O_TRUNC": _attempt(_open, os.O_RDONLY | os.O_TRUNC),
    "os.truncate": _attempt(os.truncate, _CANARY, 0),
}}
_found["after"] = open(_CANARY).read()
with open("/tmp/jsb-agent-attack.json", "w") as _out:
    json.dump(_found, _out)
os.chmod("/tmp/jsb-agent-attack.json", 0o644)

from real_agent import main

if __name__ == "__main__":
    main()
"""
"""An agent.py that, as the sandbox's root, tries to empty a file of its own folder (the
host's guest/, this server's code), leaves what it saw in /tmp for the kernel to report,
then runs the project's agent. At import: a microVM's pid1 imports the agent."""


@pytest.mark.attack("files", "as the sandbox's root, empty a file of the agent's folder")
def test_root_empties_the_agents_folder(target, no_leftovers, verdict):
    """The agent's folder is the host's guest/, this server's own code, mounted read-only
    in every sandbox; its root (the agent, or whoever took its place) may open any file
    there, and gVisor's directfs would empty one opened with O_TRUNC unless the host's
    own mount of the folder is read-only (backends/gvisor.py)."""
    folder = Path(tempfile.mkdtemp(prefix="jsb-agent-dir-", dir="/tmp"))
    folder.chmod(0o755)  # a microVM's QEMU reads it as the kernel's user
    canary = f"the server's own code {secrets.token_hex(8)}\n"
    try:
        source = Path(guest.__file__).resolve().parent
        for module in source.glob("*.py"):
            name = "real_agent.py" if module.name == "agent.py" else module.name
            shutil.copy(module, folder / name)
        (folder / "agent.py").write_text(AGENT_ATTACK)
        (folder / "canary").write_text(canary)
        for path in folder.iterdir():
            path.chmod(0o644)
        km = KernelManager(kernel_name=target.kernel_name, autorestart=False)
        km.kernel_id = str(uuid.uuid4())
        # A microVM's snapshot would run the attack in the VM that made it: boot instead.
        settings = {"snapshots": False} if target.backend == "microvm" else {}
        km.provisioner = HOSTILE[target.backend](
            kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, parent=km,
            image=target.image, workspace="none", **settings,
        )  # fmt: skip
        km.provisioner.agent_dir = folder
        km.start_kernel()
        try:
            attacker = Target(target.backend, km, km.client(), folder, image=target.image)
            attacker.kc.start_channels()
            attacker.kc.wait_for_ready(timeout=READY_TIMEOUT)
            found = attacker.run(
                "import json\nprint(json.dumps(json.load(open('/tmp/jsb-agent-attack.json'))))"
            )
            attacker.kc.stop_channels()
        finally:
            km.shutdown_kernel(now=True)
        assert found["uid"] == 0 and found["seen"] == canary, found  # root, aimed right
        assert (folder / "canary").read_text() == canary, f"the host's file was emptied: {found}"
        assert found["after"] == canary, found
        assert set(found["tries"].values()) == {"EROFS"}, found
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    verdict(
        f"EROFS for {', '.join(sorted(found['tries']))} as root in the sandbox; "
        "the host's file intact"
    )
