"""The agent image: how the agent reaches a kernel's pod without being in the user's image.

On Kubernetes a kernel's pod runs whatever image its user picked, which may have no
Python, or one the agent cannot use. The pod gets an ``emptyDir`` volume and an init
container from this image, whose entrypoint (`manifests.INSTALL_ARGV`, guest/install_agent.py)
copies `AGENT_RUNTIME` into the volume; the kernel's container mounts the volume
read-only at `AGENT_RUNTIME` and runs the agent from `AGENT_IN_RUNTIME` on its own
Python, as on one host. The pod spec gives the init container the volume's mount
point as its one argument.

The image is `AGENT_RUNTIME` and nothing else: the default image's runtime
(images/runtime.py, relocated: it needs no other file) and, inside it, the modules of
guest/ that the agent runs (`AGENT_FILES`). One reproducible layer
(images/oci_layout.py): the same runtime and agent give the same digest. Every file of
that layer has one mtime, so the standard library's .pyc files, which record their
source's mtime, are pinned to it (`_pin_pycs`): else every agent start would compile
the standard library again (~0.2 s). Its user is `IMAGE_USER`, not root, so that a
namespace under Pod Security Admission ``restricted`` admits the init container as it is.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

from .. import __version__, guest
from ..errors import ImageError
from ..guest.layout import AGENT_IN_RUNTIME, AGENT_RUNTIME
from ..hostcmd import run
from ..images.oci import COPY_TIMEOUT, reference, skopeo_command
from ..images.oci_layout import MTIME, RunConfig, image_from_tree
from ..images.runtime import copy_runtime
from ..images.store import find_image
from .manifests import INSTALL_ARGV

AGENT_FILES = ("agent.py", "protocol.py", "streams.py", "layout.py", "warm_kernel.py",
               "kernel_init.py", "install_agent.py")  # fmt: skip
"""guest/'s modules in the image: the agent, what it imports (protocol, streams, layout,
warm_kernel), what it runs (kernel_init), and the image's entrypoint (install_agent)."""
IMAGE_USER = "65534:65534"
"""nobody: the files are root's and readable by all, the copy needs no privilege."""
TITLE = "jupyter-sandbox-agent"
"""The image's ``org.opencontainers.image.title``."""
_GUEST = Path(guest.__file__).parent
_PYC_HEADER = struct.Struct("<4sIII")
"""A .pyc's header (PEP 552): magic, flags (0: checked by its source's mtime), the
source's mtime and size."""


def _pin_pycs(top: Path, mtime: int) -> None:
    """Make the .pyc files below `top` that match their source now match it once its mtime
    is `mtime` (those that do not match stay as they are: they were stale already)."""
    for pyc in top.rglob("__pycache__/*.pyc"):
        source = pyc.parent.parent / f"{pyc.name.split('.', 1)[0]}.py"
        with pyc.open("r+b") as f:
            magic, flags, recorded, size = _PYC_HEADER.unpack(f.read(_PYC_HEADER.size))
            st = source.stat() if source.is_file() else None
            if flags == 0 and st and (recorded, size) == (int(st.st_mtime) & 0xFFFFFFFF,
                                                          st.st_size & 0xFFFFFFFF):  # fmt: skip
                f.seek(0)
                f.write(_PYC_HEADER.pack(magic, flags, mtime & 0xFFFFFFFF, size))


def build_agent_image(layout: Path, tag: str) -> str:
    """Write the agent image (see the module) into `layout`, a new or empty folder in an
    existing one (where the image's tree is staged meanwhile), as an OCI image layout
    tagged `tag`: its manifest's digest. ImageError if the default image, whose runtime
    it takes, is not built."""
    runtime_source = find_image()
    staging = Path(tempfile.mkdtemp(prefix=".agent-image-", dir=layout.parent))
    try:
        root = staging / "root"
        root.mkdir()
        copy_runtime(runtime_source, root)
        runtime = root / AGENT_RUNTIME.lstrip("/")
        agent = root / AGENT_IN_RUNTIME.lstrip("/")
        agent.mkdir()
        for name in AGENT_FILES:
            shutil.copyfile(_GUEST / name, agent / name)
        for path in (root / "opt", runtime, agent, *agent.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        _pin_pycs(runtime, MTIME)
        labels = {"org.opencontainers.image.version": __version__,
                  "org.opencontainers.image.title": TITLE}  # fmt: skip
        config = RunConfig(entrypoint=INSTALL_ARGV, user=IMAGE_USER, labels=labels)
        return image_from_tree(layout, root, tag=tag, config=config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push_agent_image(dest: str, insecure: bool = False) -> str:
    """Build the agent image, tagged with the project's version, and copy it with skopeo
    to `dest`: ``oci:DIR[:TAG]`` (or a bare folder), ``oci-archive:FILE[:TAG]``,
    ``docker-archive:FILE[:NAME:TAG]`` or ``docker://REGISTRY/REPO:TAG``. `insecure`
    lets a registry answer over plain HTTP or with a certificate that does not verify.
    Returns the digest of the manifest as skopeo wrote it there (a registry's name for
    the image, to pin in the pod spec). ImageError on any failure; nothing is left but
    what skopeo wrote at `dest`."""
    target = reference(dest)
    tmp = Path(tempfile.mkdtemp(prefix="jsb-agent-image-"))
    try:
        build_agent_image(tmp / "layout", __version__)
        skopeo, env = skopeo_command(tmp)
        run(
            [*skopeo, "copy", "--quiet", f"--dest-tls-verify={str(not insecure).lower()}",
             "--digestfile", str(tmp / "digest"), f"oci:{tmp / 'layout'}:{__version__}", target],
            f"copying the agent image to {dest} (skopeo copy)", error=ImageError,
            timeout=COPY_TIMEOUT, env=env,
            fix="check DEST, and that skopeo is installed (scripts/install-host.sh)",
        )  # fmt: skip
        return (tmp / "digest").read_text(encoding="utf-8").strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
