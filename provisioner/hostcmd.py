"""Running the host's own tools (ip, nft, runsc, mount, debootstrap...): one way, bounded.

Every host command this project runs goes through here, so that each has a
timeout, never reads the terminal, keeps at most `TAIL_CHARS` of what it said
for an error message, and fails with the project's own error class naming the
step (`what`) rather than a bare `CalledProcessError`.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from .errors import Error, SandboxError

TAIL_CHARS = 4000
"""What of a failed command's output an error message carries (its end)."""
TAIL_LINES = 40
MAX_LINE = 65536
"""The most of a build command's output read as one line (the rest is the next line's)."""
"""Lines of a streamed command's output kept for its error message."""

Argv = Sequence[str | os.PathLike[str]]


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]


def _advised(message: str, fix: str) -> str:
    return f"{message}\n{fix}" if fix else message


def run(argv: Argv, what: str, *, error: type[Error] = SandboxError, input: str | None = None,
        timeout: float = 30, env: dict[str, str] | None = None, fix: str = "") -> str:  # fmt: skip
    """Run `argv` to its end and return its standard output (whole: the caller parses it;
    these are the host's own tools answering about the host). `error` naming `what`, with
    the end of its standard error, if it cannot start, times out or exits non-zero; `fix`,
    if given, ends that message on a line of its own (what the reader should do next)."""
    args = [os.fspath(a) for a in argv]
    try:
        feed = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        result = subprocess.run(args, capture_output=True, text=True, errors="replace",
                                timeout=timeout, env=env, check=False, **feed)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        raise error(_advised(f"{what}: {' '.join(args[:4])}: {e}", fix)) from None
    if result.returncode:
        raise error(_advised(f"{what}: {' '.join(args)} failed (exit status {result.returncode}): "
                             f"{_tail(result.stderr or result.stdout)}", fix))  # fmt: skip
    return result.stdout


def quietly(argv: Argv, log: logging.Logger, gone: tuple[str, ...] = (), timeout: float = 30,
            level: int = logging.WARNING) -> bool:  # fmt: skip
    """Run a removal: True if it worked. "Already gone" (any of `gone` in its error output)
    is fine and not logged; any other failure is logged at `level`. Never raises."""
    args = [os.fspath(a) for a in argv]
    try:
        result = subprocess.run(args, capture_output=True, text=True, errors="replace",
                                stdin=subprocess.DEVNULL, timeout=timeout, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        log.log(level, "%s: %s", " ".join(args), e)
        return False
    if result.returncode and not any(g in result.stderr for g in gone):
        log.log(level, "%s: %s", " ".join(args), _tail(result.stderr or result.stdout))
    return result.returncode == 0


def probe(argv: Argv, timeout: float = 30) -> str | None:
    """Run a question whose failure is itself an answer (does this table exist? what
    addresses has this link?): its standard output if it exited 0; None if it could not
    start, timed out or exited non-zero. Never raises, logs nothing."""
    args = [os.fspath(a) for a in argv]
    try:
        result = subprocess.run(args, capture_output=True, text=True, errors="replace",
                                stdin=subprocess.DEVNULL, timeout=timeout, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def stream(argv: Argv, log: logging.Logger, what: str, *, error: type[Error] = SandboxError,
           env: dict[str, str] | None = None, cwd: Path | None = None,
           fix: str = "") -> None:  # fmt: skip
    """Run a long command (a build step) with umask 022, each line of its output going to
    `log` at debug level and the last `TAIL_LINES` into `error` if it fails (`fix`, if
    given, ending that message on a line of its own, as for `run`).

    The umask matters: files a build makes must stay readable by the unprivileged
    kernel user whatever umask the caller has. Interrupted (Ctrl-C, a cancelled
    thread), the command gets SIGTERM, then SIGKILL after 10 s, before this returns:
    its caller may remove the tree it was writing.
    """
    args = ["/bin/sh", "-c", 'umask 022 && exec "$@"', "sh", *map(os.fspath, argv)]
    log.debug("running: %s", " ".join(args[4:]))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True,
                                errors="replace")  # fmt: skip
    except OSError as e:
        raise error(_advised(f"{what}: cannot run {args[4]}: {e}; run `jupyter sandbox doctor`",
                             fix)) from e  # fmt: skip
    assert proc.stdout is not None
    with proc:
        try:
            # Bounded reads: a command that prints without a newline (a hostile postBuild)
            # must not make this process hold its whole output as one line.
            while line := proc.stdout.readline(MAX_LINE):
                tail.append(line.rstrip()[:TAIL_CHARS])
                log.debug("  %s", tail[-1])
        except BaseException:
            proc.terminate()  # SIGTERM first: debootstrap unmounts /proc on it
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        output = "\n".join(tail)
        raise error(_advised(f"{what} failed (exit status {proc.returncode}). "
                             f"Last output:\n{output}", fix))  # fmt: skip
