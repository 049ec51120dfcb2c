"""Copy the agent's runtime into a volume: what the agent image's init container runs.

On Kubernetes the user's image carries neither the agent nor its Python. The project's
agent image (provisioner/kubernetes/agent_image.py) holds only `AGENT_RUNTIME`, the
agent's code inside it at `AGENT_IN_RUNTIME`; its init container runs this file, on
that runtime's own Python, with the volume's mount point as its one argument. The
kernel's container then mounts the volume read-only at `AGENT_RUNTIME` and runs the
agent from there.

The copy keeps symlinks as links and each file's mode and times (the standard
library's .pyc files are used only while their sources keep the mtimes they record),
but never a set-id or sticky bit nor group or world write. The destination must be
an empty folder: one holding anything already is not the fresh volume this expects.
It is the volume's root, which this copy may not own (Kubernetes makes an emptyDir
root's and 0777): its mode is set only when it is ours, and the kernel's container
mounts it read-only in any case. Exit status 0, 1 with the reason on stderr, 2 for
a wrong command line. Standard library only, like the rest of guest/.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

from layout import AGENT_IN_RUNTIME, AGENT_RUNTIME

MODE_MASK = 0o755
"""The bits of a mode the copy keeps: no set-id or sticky bit, no group or world write."""


def install(source: Path, dest: Path) -> None:
    """Copy the contents of the runtime folder `source` into the empty folder `dest`, as
    the module says. ValueError for a destination refused, OSError for a copy failed."""
    if dest.is_symlink() or not dest.is_dir():
        raise ValueError(f"{dest} is not a folder")
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    if dest.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"{dest} is inside {source}, the folder copied")
    for child in sorted(source.iterdir()):
        target = dest / child.name
        if child.is_symlink():
            target.symlink_to(child.readlink())
        elif child.is_dir():
            shutil.copytree(child, target, symlinks=True)
        else:
            shutil.copy2(child, target)
    if dest.stat().st_uid == os.geteuid():
        dest.chmod(MODE_MASK)
    for path in dest.rglob("*"):
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & ~MODE_MASK:
            path.chmod(mode & MODE_MASK)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DEST, an empty folder: the volume that the kernel's "
              f"container mounts at {AGENT_RUNTIME}", file=sys.stderr)  # fmt: skip
        return 2
    try:
        if not Path(AGENT_IN_RUNTIME, "agent.py").is_file():
            raise ValueError(f"no {AGENT_IN_RUNTIME}/agent.py: this runs in the agent image")
        install(Path(AGENT_RUNTIME), Path(argv[1]))
    except (OSError, ValueError) as e:
        print(f"install_agent: cannot install the agent's runtime in {argv[1]}: {e}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
