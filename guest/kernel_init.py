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

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
MAX_LAUNCH = 2 << 20
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


def become_kernel(launch: dict) -> None:
    """In the child: what agent.py's Popen(user=, group=, extra_groups=[], umask=0o077,
    start_new_session=True, cwd=, preexec_fn=limit) did, before the exec."""
    uid, gid = int(launch["uid"]), int(launch["gid"])
    if uid <= 0 or gid <= 0:
        raise ValueError(f"the kernel may not run as uid {uid}, gid {gid}")
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


def main() -> None:
    for sig in CATCHABLE:
        signal.signal(sig, signal.SIG_IGN)  # until there is a kernel to pass them to
    control_fd = int(sys.argv[2])  # argv: -, kernel_init, the control socket's fd
    control = socket.socket(fileno=control_fd)
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_LAUNCH:
        chunk = control.recv(65536)
        if not chunk:
            sys.exit(0)
        data += chunk
    try:
        launch = json.loads(data)
        own_proc()
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
