"""The Kubernetes agent image (issue 17, item 2): the agent reaches a kernel's pod from an
init container of the project's own image, never baked into the user's.

Real parts: the image is built from the real default image's runtime, read by the real
skopeo, pushed to Debian's docker-registry on loopback and pulled back, unpacked by the
project's importer, and installed as the init container would: install_agent.py on the
image's own Python in a chroot of the image, as the image's user, into an empty folder
standing for the emptyDir volume (root's, mode 0777, as Kubernetes makes it). The copy
then runs alone, as the kernel's container sees it: a chroot holding nothing but the
copy, mounted read-only at AGENT_RUNTIME, as the kernel's uid.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import skip_or_fail
from oci_kit import require_tools, skopeo_copy
from provisioner.guest.layout import AGENT_IN_RUNTIME, AGENT_PYTHON, AGENT_RUNTIME, KERNEL_UID

from provisioner import __version__
from provisioner.errors import ImageError
from provisioner.images.oci import unpack_image
from provisioner.images.oci_layout import MTIME
from provisioner.images.runtime import AGENT_NEEDS
from provisioner.images.store import find_image
from provisioner.kubernetes import credentials
from provisioner.kubernetes.agent_image import (
    AGENT_FILES,
    IMAGE_USER,
    TITLE,
    build_agent_image,
    push_agent_image,
)
from provisioner.kubernetes.manifests import INSTALL_ARGV

log = logging.getLogger("test")
TAG = "test"
BUILD_SECONDS = 30
"""A build takes about 2.5 s here (copying ~42 MB, gzipping it to ~15 MB); the bound
allows for a loaded host."""
MAX_COMPRESSED = 25 << 20
"""What an init container pulls: ~15 MB today."""
RUNTIME = AGENT_RUNTIME.lstrip("/")
ALONE = f"""
import {", ".join(AGENT_NEEDS)}
import threading
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain("/tls/cert.pem", "/tls/key.pem")
client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client.load_verify_locations("/tls/cert.pem")
ours, theirs = socket.socketpair()
def serve():
    with server.wrap_socket(theirs, server_side=True) as s:
        s.sendall(s.recv(5).upper())
thread = threading.Thread(target=serve)
thread.start()
with client.wrap_socket(ours, server_hostname="jsb-test.kernel.jupyter-sandbox") as c:
    c.sendall(b"hello")
    print(c.recv(5).decode(), c.version())
thread.join()
print(hmac.new(b"key", b"message", "sha256").hexdigest(), len(secrets.token_bytes(32)))
"""
"""What the kernel's container needs of the runtime: the agent's modules, a TLS handshake
(between two threads over a socketpair: libssl and libcrypto really work), hmac."""


@dataclass(frozen=True)
class Built:
    layout: Path
    digest: str
    seconds: float


@pytest.fixture(scope="module")
def agent_image(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if os.geteuid() != 0:
        skip_or_fail("the chroots of these tests need root")
    try:
        find_image()
    except ImageError as e:
        skip_or_fail(f"{e} (run `make setup`)")
    layout = tmp_path_factory.mktemp("agent-image") / "layout"
    started = time.monotonic()
    digest = build_agent_image(layout, TAG)
    return Built(layout, digest, time.monotonic() - started)


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs/sha256" / digest.split(":", 1)[1]


def run_in(root: Path, *argv: str, user: str = IMAGE_USER) -> subprocess.CompletedProcess[str]:
    """`argv` in a chroot of `root` as `user` (uid:gid), with nothing of the host's env."""
    return subprocess.run(["chroot", f"--userspec={user}", str(root), *argv],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, check=False)  # fmt: skip


def unpacked(source: str, dest: Path) -> Path:
    """The image `source` unpacked by the project's importer into the new folder `dest`."""
    dest.mkdir()
    unpack_image(source, dest, max_bytes=1 << 30, log=log)
    return dest


def volume_of(root: Path) -> Path:
    """An empty folder in `root` as Kubernetes makes an emptyDir: root's, mode 0777."""
    volume = root / "volume"
    volume.mkdir()
    volume.chmod(0o777)
    return volume


def test_the_build_is_fast_and_small(agent_image: Built) -> None:
    print(f"agent image built in {agent_image.seconds:.1f} s")
    assert agent_image.seconds < BUILD_SECONDS
    manifest = json.loads(blob(agent_image.layout, agent_image.digest).read_bytes())
    [layer] = manifest["layers"]
    print(f"its one layer: {layer['size'] / 1e6:.1f} MB")
    assert layer["size"] < MAX_COMPRESSED


def test_skopeo_reads_it(agent_image: Built) -> None:
    require_tools("skopeo")
    ref = f"oci:{agent_image.layout}:{TAG}"

    def inspect(*extra: str) -> dict:
        out = subprocess.run(["skopeo", "inspect", *extra, ref], capture_output=True, text=True,
                             timeout=60, check=True).stdout  # fmt: skip
        return json.loads(out)

    info = inspect()
    assert info["Digest"] == agent_image.digest
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    assert info["Labels"] == {
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.title": TITLE,
    }
    config = inspect("--config")["config"]
    assert config["Entrypoint"] == list(INSTALL_ARGV)
    assert config["User"] == IMAGE_USER
    assert "Env" not in config and "Cmd" not in config


def test_its_content(agent_image: Built) -> None:
    """AGENT_RUNTIME and nothing else, the agent's files in it; root's, one mtime, no user
    names, nothing writable but by its owner, no set-id bit."""
    manifest = json.loads(blob(agent_image.layout, agent_image.digest).read_bytes())
    with tarfile.open(blob(agent_image.layout, manifest["layers"][0]["digest"])) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:2] == ["opt", RUNTIME]
    assert all(n.startswith(RUNTIME + "/") for n in names[2:])
    agent = AGENT_IN_RUNTIME.lstrip("/")
    assert sorted(n for n in names if n.startswith(agent + "/")) == sorted(
        f"{agent}/{f}" for f in AGENT_FILES
    )
    assert f"{RUNTIME}/bin/python3" in names and f"{RUNTIME}/lib/libssl.so.3" in names
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", MTIME), m.name
        assert m.isdir() or m.isreg() or m.issym(), m.name
        if not m.issym():
            assert m.mode & 0o7022 == 0, f"{m.name}: {oct(m.mode)}"


def test_pushed_to_a_registry_pulled_back_installed_and_run_alone(
    registry: int, agent_image: Built, tmp_path: Path
) -> None:
    image = f"docker://127.0.0.1:{registry}/jupyter-sandbox-agent:{__version__}"
    digest = push_agent_image(image, insecure=True)
    # Built again for the push: the same bytes, so the same digest, kept by the registry.
    assert digest == agent_image.digest
    skopeo_copy(image, f"oci:{tmp_path / 'pulled'}:1", "--src-tls-verify=false")
    root = unpacked(f"oci:{tmp_path / 'pulled'}:1", tmp_path / "root")
    assert sorted(p.name for p in root.iterdir()) == ["opt"]

    # The init container: the image's entrypoint, as its user, the volume its argument.
    volume = volume_of(root)
    done = run_in(root, *INSTALL_ARGV, "/volume")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in volume.iterdir()) == ["agent", "bin", "lib"]
    assert stat.S_IMODE(volume.stat().st_mode) == 0o777  # not ours to change (see install_agent)
    nobody = tuple(int(x) for x in IMAGE_USER.split(":"))
    source = root / RUNTIME
    for path in volume.rglob("*"):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == nobody, path
        if stat.S_ISLNK(st.st_mode):
            assert path.readlink() == (source / path.relative_to(volume)).readlink()
            continue
        assert st.st_mode & 0o7022 == 0, f"{path}: {oct(st.st_mode)}"
        twin = (source / path.relative_to(volume)).lstat()
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(twin.st_mode), path
        if stat.S_ISREG(st.st_mode):
            assert st.st_mtime == twin.st_mtime == MTIME, path
    assert (volume / "agent/agent.py").read_bytes() == (root / AGENT_IN_RUNTIME.lstrip("/")
                                                        / "agent.py").read_bytes()  # fmt: skip

    # The kernel's container: only the copy, read-only at AGENT_RUNTIME, as the kernel's uid.
    alone = tmp_path / "alone"
    (alone / RUNTIME).mkdir(parents=True)
    (alone / "tls").mkdir()
    write_certificate(alone / "tls")
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         'mount --bind -o ro "$1" "$2" && '
         'exec chroot --userspec="$3" "$4" "$5" -S -s -E -B -v -c "$6"',
         "sh", str(volume), str(alone / RUNTIME), f"{KERNEL_UID}:{KERNEL_UID}", str(alone),
         AGENT_PYTHON, ALONE],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/bin"},
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    expected = hmac.new(b"key", b"message", hashlib.sha256).hexdigest()
    assert done.stdout.splitlines() == ["HELLO TLSv1.3", f"{expected} 32"]
    # The standard library's .pyc files are used (the image pinned them to the layer's
    # mtime): none is stale, so no agent start compiles the standard library again.
    assert re.search(r"__pycache__/ssl\.cpython-\d+\.pyc matches .*/ssl\.py", done.stderr)
    assert "bytecode is stale" not in done.stderr
    assert not list(alone.joinpath(RUNTIME).iterdir())  # the mount went with its namespace


def write_certificate(folder: Path) -> None:
    """A kernel's own TLS identity, as the service makes it (credentials.make), as
    cert.pem and key.pem: the agent's copy must serve it as in a pod."""
    creds = credentials.make("jsb-test")
    assert creds.server_name == "jsb-test.kernel.jupyter-sandbox"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_text(creds.certificate)
    (folder / "key.pem").write_text(creds.key)
    for path in folder.iterdir():
        path.chmod(0o644)  # the kernel's uid reads them; a test's throwaway key


def test_install_agent_refuses_what_is_not_an_empty_folder(
    agent_image: Built, tmp_path: Path
) -> None:
    root = unpacked(f"oci:{agent_image.layout}:{TAG}", tmp_path / "root")
    full = volume_of(root)
    (full / "left").write_text("from before\n")
    (root / "file").write_text("a file\n")
    (root / RUNTIME / "empty").mkdir()
    refusals = [
        ("/volume", "is not empty"),
        ("/file", "is not a folder"),
        ("/missing", "is not a folder"),
        (f"{AGENT_RUNTIME}/empty", f"is inside {AGENT_RUNTIME}, the folder copied"),
    ]
    for dest, why in refusals:
        done = run_in(root, *INSTALL_ARGV, dest)
        assert done.returncode == 1
        assert done.stderr == (
            f"install_agent: cannot install the agent's runtime in {dest}: {dest} {why}\n"
        )
    assert [p.name for p in full.iterdir()] == ["left"]
    done = run_in(root, *INSTALL_ARGV)
    assert done.returncode == 2 and done.stderr.startswith("usage: ")


def test_the_cli_copies_it_to_an_archive(agent_image: Built, tmp_path: Path) -> None:
    """`jupyter sandbox kubernetes agent-image --to docker-archive:...`, as an operator
    without a registry at hand would: the archive holds the image."""
    require_tools("skopeo")
    archive = tmp_path / "agent.tar"
    jupyter = Path(sys.executable).parent / "jupyter"
    done = subprocess.run(
        [str(jupyter), "sandbox", "kubernetes", "agent-image", "--to",
         f"docker-archive:{archive}:jupyter-sandbox-agent:{__version__}"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"agent image {__version__} (sha256:")
    out = subprocess.run(["skopeo", "inspect", "--config", f"docker-archive:{archive}"],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert json.loads(out)["config"]["Entrypoint"] == list(INSTALL_ARGV)
