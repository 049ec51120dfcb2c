"""PID 1 of the kernel's own PID namespace: the agent out of the kernel's sight.

gVisor's procfs (runsc 20240729) does not make the checks Linux makes on another
process's /proc entries: any user may list a root process's /proc/<pid>/fd and open
what the links lead to (held back only by each file's own mode), and read its
environ. So the kernel must not see the agent at all. The agent unshares its
children's PID namespace and starts this script (Python reads it from stdin: in a
microVM the agent's folder is gone by then) as the first process in there. As root,
it takes the launch on its control socket (the fd its argv names), gives itself a mount
namespace with a /proc of the new PID namespace, starts the kernel as the kernel's
user in a session of its own, answers "ok" (or why not), and then holds nothing: no
descriptor, an empty environment, undumpable. It stays root, so the kernel can
neither signal nor trace it, and forwards every signal it gets (the agent's, for the
kernel) to the kernel's process group; it reaps orphans and exits with the kernel's
status (128 + N for a signal), which ends every process left in the namespace.

Stdlib only, as the agent.
"""

import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 4, 24, 38
CAP_LAST = 63
WARM_TIMEOUT = 20.0
"""Seconds the warm kernel process gets to import the kernel's modules (about two here),
if a kernel claims the sandbox before it is done: less than the agent's START_TIMEOUT, so
that a slow one falls back to a fresh process rather than failing the start."""
HAND_OVER_TIMEOUT = 5.0
"""Seconds the warm kernel process gets to take the launch (it needs milliseconds)."""
KILL_ROUNDS = 20
KILL_WAIT = 0.01
"""Seconds more each round of `kill_all_but` waits for what it killed to go (2 s in all)."""
MOUNTED = False
"""Whether `mount_folders` ran (a hand-over that failed after it leaves them mounted)."""
MAX_LAUNCH = 2 << 20
READY = b"ready\n"
"""What kernel_init says, in a warm pool's sandbox, once its namespace is its own (and its
claim folder hidden there): only then may the agent cover the claim folder in its own
namespace, which a namespace copied later would inherit, covering the folders."""
LIBC = ctypes.CDLL(None, use_errno=True)
CATCHABLE = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}
"""The signals PID 1 passes on to the kernel (ignored until there is one)."""


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def own_proc() -> None:
    """A mount namespace whose /proc shows this PID namespace only, with no other /proc
    under it: the agent's is detached first, so that a kernel which unmounts its /proc
    (as root of a user namespace of its own, which gVisor allows) finds an empty
    folder there, whether or not the sandbox locks inherited mounts (gVisor 20240729
    does: EINVAL)."""
    check(LIBC.unshare(CLONE_NEWNS), "unshare the mount namespace")
    # Nothing mounted here may reach the agent's namespace, and the reverse.
    check(LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    check(LIBC.umount2(b"/proc", MNT_DETACH), "detach the agent's /proc")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    check(LIBC.mount(b"proc", b"/proc", b"proc", flags, None), "mount /proc")


FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
"""Per-mount options of /proc/self/mountinfo, as mount(2) flags."""
MUTABLE = ("/proc", "/dev")
"""Mounts `freeze` leaves writable: the PID namespace's own /proc, and the devices
(writing /dev/null is how a process discards output; only root could make a node)."""


def freeze() -> list[tuple[bytes, int]]:
    """Remount read-only, in this (the kernel's) mount namespace, every writable mount but
    `MUTABLE`, and return what to `thaw`. The warm kernel process runs the image's code as
    root before the claim: it must leave nothing that a process of the agent's, or the
    kernel to be, would run or trust (/etc/ld.so.preload, the agent's runtime, a file in
    /tmp). Its bounding set has no CAP_SYS_ADMIN: it cannot remount them itself."""
    frozen = []
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape").encode("latin-1")  # \040
            options = fields[5].split(",")
            if "rw" not in options or point.decode().startswith(MUTABLE):
                continue
            flags = MS_REMOUNT | MS_BIND | sum(FLAGS.get(option, 0) for option in options)
            check(LIBC.mount(None, point, None, flags | MS_RDONLY, None),
                  f"remount {point.decode()} read-only")  # fmt: skip
            frozen.append((point, flags))
    return frozen


def thaw(frozen: list[tuple[bytes, int]]) -> None:
    """Make writable again what `freeze` made read-only (once no process of the image's
    code is root: `hand_over`)."""
    for point, flags in frozen:
        check(LIBC.mount(None, point, None, flags, None), f"remount {point.decode()}")


def mount_folders(claim: dict) -> None:
    """Mount the kernel's folders where they belong, in this (the kernel's) mount namespace:
    the host attached each at its place in the claim folder (agent.read_claim), already
    read-only, nosuid, nodev and idmapped as it must be; read-only here too where it is.
    Then hide the claim folder (`hide`). It is covered when this starts (by the agent, or
    by kernel_init while the warm kernel process waited): uncovered here first."""
    uncover(claim["folder"])
    for folder in claim["mounts"]:
        source, destination = folder["source"].encode(), folder["destination"].encode()
        Path(folder["destination"]).mkdir(mode=0o755, parents=True, exist_ok=True)
        check(LIBC.mount(source, destination, None, MS_BIND | MS_REC, None),
              f"mount {folder['destination']}")  # fmt: skip
        if folder["read_only"]:
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            check(LIBC.mount(None, destination, None, flags, None),
                  f"remount {folder['destination']} read-only")  # fmt: skip
    check(LIBC.umount2(claim["folder"].encode(), MNT_DETACH), "unmount the claim folder")
    hide(claim["folder"])
    global MOUNTED
    MOUNTED = True


def hide(folder: str) -> None:
    """An empty read-only tmpfs over `folder` (the claim folder), in this namespace: the
    sandbox's root reaches the same host folder at that path whether or not it is
    mounted here (runsc's file server mounts it there on the host)."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    hidden = LIBC.mount(b"none", folder.encode(), b"tmpfs", flags, b"size=4k,mode=0755")
    check(hidden, f"hide {folder}")


def uncover(folder: str) -> None:
    """Take away `hide`'s tmpfs: the claim folder is there again, in this namespace."""
    check(LIBC.umount2(folder.encode(), MNT_DETACH), f"uncover {folder}")


def empty_bounding_set() -> None:
    """Drop every capability from this process's bounding set (it needs CAP_SETPCAP, which
    the agent has), so that nothing it starts can ever gain one; OSError if any is left.
    Its effective set keeps what it has until it becomes the kernel's user."""
    for cap in range(CAP_LAST + 1):
        LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last one: checked below
    if _status(os.getpid()).get("CapBnd") != 0:
        raise OSError("could not empty the bounding set of capabilities")


def _status(pid: int | str, task: str = "") -> dict[str, int]:
    """The capability sets (as numbers), the uid and the gid (-1 where its real, effective,
    saved and filesystem ids differ) of process `pid`, or of its thread `task`."""
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    found: dict[str, int] = {}
    with open(path) as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                found[name] = int(value.strip(), 16)
            elif name in ("Uid", "Gid"):
                ids = {int(v) for v in value.split()}
                found[name] = ids.pop() if len(ids) == 1 else -1
            elif name == "Groups":
                found[name] = len(value.split())
    return found


NAMESPACES = ("mnt", "pid", "net", "ipc", "uts")
"""The namespaces a warm process must share with kernel_init (one of a user namespace of
its own would show capabilities there, which `check_user` refuses; gVisor 20240729 names
another process's user namespace differently from /proc/self's)."""


def check_user(pid: int, launch: dict) -> None:
    """OSError unless every thread of `pid` is the kernel's user (real, effective, saved
    and filesystem ids; no supplementary group) with no capability, in this process's
    namespaces: the image's code has run in it, its word is not taken."""
    want = {"Uid": int(launch["uid"]), "Gid": int(launch["gid"]), "Groups": 0,
            "CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0, "CapBnd": 0}  # fmt: skip
    ours = {ns: Path(f"/proc/self/ns/{ns}").readlink() for ns in NAMESPACES}
    for task in Path(f"/proc/{pid}/task").iterdir():
        found = _status(pid, task.name)
        spaces = {ns: (task / "ns" / ns).readlink() for ns in NAMESPACES}
        # A set gVisor does not show (CapAmb) is empty; ids it does not show are wrong.
        wrong = [name for name, value in want.items()
                 if found.get(name, -1 if name in ("Uid", "Gid") else 0) != value]  # fmt: skip
        wrong += [f"{ns} namespace" for ns in NAMESPACES if spaces[ns] != ours[ns]]
        if wrong:
            raise OSError(f"thread {task.name} of the warm process is not the kernel's user "
                          f"({', '.join(wrong)})")  # fmt: skip


def become_kernel(launch: dict) -> None:
    """In the child: what agent.py's Popen(user=, group=, extra_groups=[], umask=0o077,
    start_new_session=True, cwd=, preexec_fn=limit) did, before the exec."""
    uid, gid = int(launch["uid"]), int(launch["gid"])
    if uid <= 0 or gid <= 0:
        raise ValueError(f"the kernel may not run as uid {uid}, gid {gid}")
    empty_bounding_set()
    # Ignored signals stay ignored across exec: the kernel starts with every signal's
    # default, as a process the agent started did (SIGTERM must still end it).
    for sig in CATCHABLE:
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()
    os.umask(0o077)
    os.chdir(launch["cwd"])  # as root, as Popen did
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    for which, value in launch["rlimits"]:
        resource.setrlimit(int(which), (int(value), int(value)))
    # No way back up: setuid programs in the image run without their privilege.
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


def start(launch: dict, control_fd: int) -> int:
    """Fork and exec the kernel (without the control socket); its pid, or OSError with
    the child's reason."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(err_r)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(control_fd)
            become_kernel(launch)
            os.execvpe(launch["argv"][0], launch["argv"], launch["env"])
        except BaseException as e:  # anything: said to the parent, then exit
            os.write(err_w, str(e).encode()[:4000])
        finally:
            os._exit(127)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as reasons:
        reason = reasons.read()  # EOF at the exec: it worked
    if reason:
        os.waitpid(pid, 0)
        raise OSError(reason.decode(errors="replace"))
    return pid


def start_warm(python: str, script: str, connection_file: str, user: dict
               ) -> tuple[int, socket.socket]:  # fmt: skip
    """Start the warm kernel process (`script`, guest/warm_kernel.py, in the image's
    `python`): it imports the kernel's modules before any kernel claims the sandbox. It
    runs as the kernel's user from the start (`user`: uid, gid and rlimits, the same for
    every kernel of the pool's shape), as a fresh kernel does: no capability, no group,
    no new privileges, every signal at its default. So the image's code never runs as
    root here either. Its command line is the kernel's to be, as `ps` shows it."""
    ours, theirs = socket.socketpair()
    argv = [python, script, "-m", "ipykernel_launcher", "-f", connection_file]
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.set_inheritable(theirs.fileno(), True)
            become_kernel({**user, "cwd": "/"})
            # No HOME: nothing of any user's. "/" keeps ~ from a lookup in the image's passwd.
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/",
                   "JSB_WARM_FD": str(theirs.fileno())}  # fmt: skip
            os.execve(python, argv, env)
        finally:
            os._exit(127)
    theirs.close()
    return pid, ours


def hand_over(warm: tuple[int, socket.socket], user: dict, launch: dict,
              frozen: list[tuple[bytes, int]]) -> None:  # fmt: skip
    """Make the warm kernel process the kernel `launch` asks for; OSError if it could not.

    It is the kernel's user already (`start_warm`), if the launch's user is `user`. Every
    other process of the namespace is killed (whatever the image's code left), the process
    takes the launch and says so ("user"), is checked from /proc, and only then are the
    kernel's folders mounted here and the process goes on into them ("go", then "ok").
    """
    pid, control = warm
    if {key: launch[key] for key in user} != user:
        raise OSError("the warm kernel process is another user's")
    control.settimeout(WARM_TIMEOUT)
    if control.recv(16) != b"warm\n":
        raise OSError("the warm kernel process did not get ready")
    kill_all_but(pid)
    control.settimeout(HAND_OVER_TIMEOUT)
    control.sendall(json.dumps(launch).encode() + b"\n")
    if control.recv(16) != b"user\n":
        raise OSError("the warm kernel process could not take the launch")
    kill_all_but(pid)  # and whatever it started meanwhile
    check_user(pid, launch)
    thaw(frozen)
    frozen.clear()
    if "claim" in launch:
        mount_folders(launch["claim"])
    control.sendall(b"go\n")
    control.shutdown(socket.SHUT_WR)
    answer = control.recv(4096).decode(errors="replace")
    control.close()
    if answer != "ok":
        raise OSError(answer or "the warm kernel process ended")


def _alive(pid: int) -> bool:
    """Whether `pid` is a process that still runs (not a zombie its parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_all_but(keep: int | None) -> None:
    """SIGKILL every process of this PID namespace but this one and `keep`, and reap them
    (a killed process may take a while to go: each round waits a little longer)."""
    for round in range(KILL_ROUNDS):
        if round:
            time.sleep(KILL_WAIT * round)
        found = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
        others = [pid for pid in found if pid not in (1, keep) and _alive(pid)]
        if not others:
            return
        for pid in others:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
    raise OSError("processes of the warm kernel kept appearing")


def read_launch(control: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_LAUNCH:
        chunk = control.recv(65536)
        if not chunk:
            sys.exit(0)
        data += chunk
    return json.loads(data)


def main() -> None:
    for sig in CATCHABLE:
        signal.signal(sig, signal.SIG_IGN)  # until there is a kernel to pass them to
    # argv: -, kernel_init, the control socket's fd
    #       [, warm, python, script, connection file, claim folder, kernel's user (JSON)]
    control_fd = int(sys.argv[2])
    control = socket.socket(fileno=control_fd)
    warm, frozen, user = None, [], {}
    try:
        if sys.argv[3:4] == ["warm"]:
            own_proc()
            hide(sys.argv[7])  # the image's code runs before the claim: it sees none of it
            frozen = freeze()  # nor can it leave anything behind
            user = json.loads(sys.argv[8])
            warm = start_warm(*sys.argv[4:7], user)
            control.sendall(READY)
        launch = read_launch(control)
        if warm is None:
            own_proc()
        kernel = None
        if warm is not None and launch.get("warm"):
            try:
                hand_over(warm, user, launch, frozen)
                kernel = warm[0]
            except OSError as e:  # e.g. a folder only root may enter: as Popen would
                sys.stderr.write(f"kernel_init: the warm kernel process cannot be it ({e})\n")
        if kernel is None:
            if warm is not None:
                kill_all_but(None)
                thaw(frozen)  # if a hand-over failed before it did
            if "claim" in launch and not MOUNTED:  # a hand-over may have got that far
                mount_folders(launch["claim"])
            kernel = start(launch, control_fd)
    except (OSError, KeyError, TypeError, ValueError) as e:
        control.sendall(f"{e}".encode()[:4000])
        sys.exit(127)
    control.sendall(b"ok")
    control.close()

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):  # it ended meanwhile
            os.killpg(kernel, signum)

    for sig in CATCHABLE:
        signal.signal(sig, forward)
    # Hold nothing the kernel could reach through /proc/1: no fd, no dump, no trace.
    os.closerange(0, 3)
    check(LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "set undumpable")
    while True:
        pid, status = os.wait()  # every orphan of the namespace ends up here
        if pid == kernel:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
