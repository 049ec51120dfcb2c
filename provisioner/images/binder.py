"""Building an image's tree from a Binder / repo2docker folder.

A course repository's ``binder/`` folder (or ``.binder/``, or the repository's top
when it has neither: repo2docker's rule) says what its notebooks need, in files
that repo2docker applies in this order, and so does this module:

- ``runtime.txt``: accepted only when it names the base image's Python
  (``python-3.11``, or its exact ``python-3.11.2``): the base's venv is the kernel;
- ``apt.txt``: Debian packages, installed by apt in a chroot of the tree. Packages
  from Debian's archive are trusted like the base itself: their maintainer scripts
  run as root in the chroot (with a ``policy-rc.d`` so that no daemon starts);
- ``requirements.txt``: PyPI packages, downloaded as wheels on the host (pip in the
  chroot cannot reach the index here) and installed into ``/opt/venv`` from them,
  with the base's own packages pinned as constraints: the kernel's stack
  (ipykernel, pyzmq, ...) stays the tested one, and a requirement that needs
  another version of one of them is refused by pip's resolver, naming both;
- ``postBuild``: untrusted code. It never runs on the host nor in a chroot: it runs
  in a gVisor sandbox (``runsc``) whose root is the tree, writable, with no network,
  no capabilities, no_new_privs, and memory, process and time limits. It runs as the
  image's root (uid 0) without capabilities rather than as the notebook user as in
  repo2docker: here the environment it extends (``/opt/venv``, ``/usr/local``) is
  root-owned, and what it installs stays read-only to the kernel's user.

Every other file repo2docker would act on (``environment.yml``, ``Pipfile``,
``install.R``, ``start``, ``Dockerfile``, ...) is refused with a message naming
it and why, before anything is copied; files repo2docker ignores are ignored.

Everything is read and checked first; the base is copied only once the folder is
known to be buildable. The host never runs the folder's code, and after
``postBuild`` the host does nothing through the tree's paths but remove one
empty directory by file descriptor: from then on the tree is untrusted (symbolic
links anywhere), like an imported OCI image's, and the caller treats it so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from .. import cgroups, rootfs
from ..errors import ImageError
from ..guest.layout import GUEST_PYTHON
from ..hostcmd import quietly, stream
from .build import (
    CLEAN_ENV,
    DEBIAN_MIRROR,
    DEBIAN_SUITE,
    download_wheels,
    link_or_copy,
    tidy,
    write_file,
)

CHROOT_DEVICES = {"null": 3, "zero": 5, "full": 7, "random": 8, "urandom": 9}
"""The memory devices (major 1) apt and dpkg use in the build's chroot, by minor."""
CONFIG_DIRS = ("binder", ".binder")
"""Sub-folders that hold a repository's configuration; either makes its top files ignored."""
HONOURED = ("runtime.txt", "apt.txt", "requirements.txt", "postBuild")
"""The files applied, in repo2docker's order."""

_NO_CONDA = (
    "conda environments are not supported: no conda channel is reachable from the build. "
    "List the packages in requirements.txt (PyPI) or apt.txt (Debian) instead"
)
_NO_CRAN = (
    "R packages from CRAN are not supported: no CRAN mirror is reachable from the build. "
    "Install R and its packages from Debian instead: r-cran-irkernel (the R kernel) and "
    "r-cran-<package> lines in apt.txt"
)
_NO_JULIA = "Julia environments are not supported: no Julia package server is reachable"
_NO_PIPENV = (
    "Pipenv is not supported: write requirements.txt instead "
    "(`pipenv requirements > requirements.txt`)"
)
_NO_PACKAGE = (
    "installing the repository itself as a Python package (pip install .) is not supported: "
    "list its dependencies in requirements.txt, or put the configuration in a binder/ folder "
    "(then repo2docker ignores this file too)"
)
REFUSED: dict[str, str] = {
    "start": "a start script is not supported: kernels are started by the sandbox's agent, "
    "not by the image; move its setup into postBuild",
    "environment.yml": _NO_CONDA,
    "environment.yaml": _NO_CONDA,
    "Pipfile": _NO_PIPENV,
    "Pipfile.lock": _NO_PIPENV,
    "Project.toml": _NO_JULIA,
    "JuliaProject.toml": _NO_JULIA,
    "REQUIRE": _NO_JULIA,
    "install.R": _NO_CRAN,
    "default.nix": "Nix is not supported: no Nix cache is reachable from the build",
    "Dockerfile": "a Dockerfile is not built here: build it with Docker, then import the "
    "result (`docker save IMAGE -o FILE`, then `jupyter sandbox image build NAME "
    "--from docker-archive:FILE`)",
}
"""Files repo2docker acts on wherever the configuration is, and why each is refused."""
REFUSED_AT_TOP: dict[str, str] = {
    "setup.py": _NO_PACKAGE,
    "pyproject.toml": _NO_PACKAGE,
    "DESCRIPTION": _NO_CRAN,
}
"""Files repo2docker acts on only at the top of a folder without binder/ or .binder/
(pyproject.toml only when it declares a buildable project)."""

_MAX_FILE = 1 << 20
"""The largest configuration file read (runtime.txt, apt.txt, requirements.txt, postBuild)."""
_DEB_PACKAGE = re.compile(
    r"[a-z0-9][a-z0-9+.-]+"  # Debian policy 5.6.1: a package name
    r"(?::[a-z0-9][a-z0-9-]*)?"  # an architecture qualifier (libfoo:amd64)
    r"(?:=[0-9][A-Za-z0-9.+~:-]*)?"  # a version (jq=1.6-2.1), starting with a digit
)
_REQUIREMENT_OPTIONS = {
    ("-e", "--editable"): "editable installs need the package's source: list it by name",
    ("-i", "--index-url", "--extra-index-url", "--no-index", "-f", "--find-links",
     "--trusted-host"): "packages come from PyPI only (as wheels downloaded on the host)",
    ("-r", "--requirement", "-c", "--constraint"): "other requirement files are not read: "
    "merge them into requirements.txt",
}  # fmt: skip
POSTBUILD_MOUNT = "/srv/repo"
"""Where the repository (the folder built from) is, read-only, in postBuild's sandbox:
its working directory, as repo2docker runs postBuild from the repository's root."""


@dataclasses.dataclass(frozen=True)
class PostBuildLimits:
    """What a postBuild may use in its sandbox. The host's cgroup holds gVisor's own
    threads too, so `pids` is a backstop for a fork bomb rather than an exact count."""

    timeout: float = 30 * 60
    """Seconds before it is killed and the build fails."""
    memory: int = 4 << 30
    """Bytes of memory (plus swap), its tmpfs /tmp included."""
    pids: int = 2048
    """Host tasks of its sandbox."""


DEFAULT_LIMITS = PostBuildLimits()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a folder asks for, read and checked before anything is copied."""

    config: Path
    python_version: str
    files: dict[str, str]
    apt_packages: list[str]
    requirements: list[str]
    post_build: list[str] | None
    """postBuild's argv in its sandbox, if there is one."""


def is_binder_folder(path: Path) -> bool:
    """Whether `path` is a folder repo2docker would build: it has a binder/ or .binder/
    folder, or any file at its top that repo2docker acts on."""
    if not path.is_dir():
        return False
    if any((path / name).is_dir() for name in CONFIG_DIRS):
        return True
    known = (*HONOURED, *REFUSED, *REFUSED_AT_TOP)
    return any(os.path.lexists(path / name) for name in known)


def build_from_binder(
    folder: Path,
    dest: Path,
    *,
    base_rootfs: Path,
    log: logging.Logger,
    limits: PostBuildLimits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Fill the empty directory `dest` with a copy of `base_rootfs` changed as the Binder
    folder `folder` asks (see the module's docstring), and say what was done.

    Needs root (chroot, runsc), the network (Debian's archive, PyPI) and, for a
    postBuild, runsc. ImageError naming the file for anything the folder asks that
    cannot be honoured, before `dest` is touched; ImageError naming the step when a
    step fails, with `dest` left for the caller to remove (nothing is mounted in it,
    no sandbox or temporary folder of this build is left).
    """
    plan = _plan(folder, base_rootfs)
    if not dest.is_dir() or any(dest.iterdir()):
        raise ImageError(f"building from {folder}: {dest} is not an empty directory")
    if os.geteuid() != 0:
        raise ImageError(
            "building an image from a Binder folder needs root (chroot, runsc): "
            "run `sudo jupyter sandbox image build`"
        )
    runsc = _find_runsc() if plan.post_build else ""

    log.info("binder: copying the base image %s", base_rootfs)
    # A copy, never hard links: apt and pip change files of the base in place.
    stream(["cp", "-a", "--reflink=auto", "--", f"{base_rootfs}/.", dest], log,
           "copying the base image", error=ImageError)  # fmt: skip
    # Nothing is world-writable in the store (install.check_tree clears it again when the
    # image is stored), but apt's download user and the build's tools need /tmp.
    for scratch in ("tmp", "var/tmp"):
        (dest / scratch).chmod(0o1777)  # the base's copy: nothing untrusted ran in it yet
    # Nor does the store keep device nodes (check_tree removes them again); apt and
    # dpkg in the chroot need the harmless ones.
    (dest / "dev").mkdir(mode=0o755, exist_ok=True)
    for node, minor in CHROOT_DEVICES.items():
        os.mknod(dest / "dev" / node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        (dest / "dev" / node).chmod(0o666)  # past the umask
    if plan.apt_packages:
        log.info("binder: apt.txt: installing %s", " ".join(plan.apt_packages))
        _apt_install(dest, plan.apt_packages, log)
    if plan.requirements:
        log.info("binder: requirements.txt: installing %s", ", ".join(plan.requirements))
        _pip_install(dest, plan.requirements, plan.python_version, log)
    # Before postBuild: afterwards the tree's paths may lead out of it (see above).
    tidy(dest)
    if plan.post_build:
        log.info("binder: running postBuild in a gVisor sandbox")
        _run_post_build(dest, folder, plan.post_build, runsc, limits, log)
    return {
        "kind": "binder",
        "folder": str(folder),
        "files": plan.files,
        "python_version": plan.python_version,
        "apt_packages": plan.apt_packages,
        "requirements": plan.requirements,
    }


# --- reading and checking the folder ---------------------------------------------------


def config_folder(folder: Path) -> Path:
    """The folder whose files count: binder/ or .binder/ if there is one (repo2docker's
    rule: then the top's files are ignored), else `folder` itself."""
    if not folder.is_dir():
        raise ImageError(f"{folder} is not a folder")
    found = [folder / name for name in CONFIG_DIRS if (folder / name).is_dir()]
    if len(found) > 1:
        raise ImageError(
            f"{folder} has both binder/ and .binder/: repo2docker reads only one; remove one"
        )
    if found:
        _check_inside(folder, found[0], found[0].name)
        return found[0]
    return folder


def _check_inside(folder: Path, path: Path, name: str) -> None:
    """ImageError unless `path` (a symbolic link, maybe) stays inside `folder`: a link to
    a host file would have the build read it, and its errors print it."""
    top = os.path.realpath(folder)
    if not os.path.realpath(path).startswith(top + os.sep):
        raise ImageError(f"{name} in {folder} is a symbolic link leading out of the folder")


def _read(folder: Path, config: Path, name: str) -> tuple[bytes, int] | None:
    """The content and mode of file `name` of the configuration, None if there is none."""
    path = config / name
    if not os.path.lexists(path):
        return None
    _check_inside(folder, path, name)
    try:
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"{name}: cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{name}: {path} is not a regular file")
        data = f.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise ImageError(f"{name}: {path} is larger than {_MAX_FILE >> 20} MiB")
    return data, st.st_mode


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ImageError(f"{name} is not UTF-8 text ({e})") from None


def _plan(folder: Path, base_rootfs: Path) -> _Plan:
    config = config_folder(folder)
    for name, why in REFUSED.items():
        if os.path.lexists(config / name):
            raise ImageError(f"{name} in {config} cannot be honoured: {why}")
    if config == folder:
        for name, why in REFUSED_AT_TOP.items():
            if os.path.lexists(folder / name) and (
                name != "pyproject.toml" or _buildable_pyproject(folder)
            ):
                raise ImageError(f"{name} in {folder} cannot be honoured: {why}")

    python_version = base_python_version(base_rootfs)
    read = {name: _read(folder, config, name) for name in HONOURED}
    files = {name: hashlib.sha256(got[0]).hexdigest() for name, got in read.items() if got}
    if (got := read["runtime.txt"]) is not None:
        check_runtime(_text("runtime.txt", got[0]), python_version)
    apt_packages = apt_packages_of(_text("apt.txt", got[0])) if (got := read["apt.txt"]) else []
    requirements = (
        requirements_of(_text("requirements.txt", got[0]))
        if (got := read["requirements.txt"])
        else []
    )
    where = (config / "postBuild").relative_to(folder).as_posix()
    post_build = post_build_argv(*got, where) if (got := read["postBuild"]) else None
    return _Plan(config, python_version, files, apt_packages, requirements, post_build)


def _buildable_pyproject(folder: Path) -> bool:
    """Whether repo2docker would `pip install .` this pyproject.toml: it declares a
    project and a build system."""
    got = _read(folder, folder, "pyproject.toml")
    text = _text("pyproject.toml", got[0]) if got else ""
    tables = set(re.findall(r"^\s*\[\s*([A-Za-z-]+)\s*\]", text, flags=re.MULTILINE))
    return {"project", "build-system"} <= tables


def base_python_version(base_rootfs: Path) -> str:
    """The Python of the base's kernel venv ("3.11.2"), from its pyvenv.cfg (read, not run)."""
    cfg = base_rootfs / Path(GUEST_PYTHON).parent.parent.relative_to("/") / "pyvenv.cfg"
    try:
        text = cfg.read_text(encoding="utf-8")
    except OSError as e:
        raise ImageError(f"the base image has no kernel venv ({cfg}: {e.strerror})") from None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() in {"version", "version_info"} and re.fullmatch(
            r"\d+\.\d+\.\d+", value.strip()
        ):
            return value.strip()
    raise ImageError(f"the base image's {cfg} names no Python version")


def check_runtime(text: str, python_version: str) -> None:
    """ImageError unless runtime.txt names the base's Python: python-3, python-3.11 or
    python-3.11.2 for a base with 3.11.2 (repo2docker would install what it names)."""
    runtime = text.strip()
    offered = f"python-{'.'.join(python_version.split('.')[:2])}"
    match = re.fullmatch(r"python-(\d+(?:\.\d+){0,2})", runtime)
    if match is None and runtime.startswith("r-"):
        raise ImageError(
            f"runtime.txt asks for R ({runtime}): R from a dated CRAN snapshot is not "
            f"supported ({_NO_CRAN}); remove runtime.txt (the base offers {offered})"
        )
    wanted = match.group(1).split(".") if match else None
    if wanted is None or python_version.split(".")[: len(wanted)] != wanted:
        raise ImageError(
            f"runtime.txt asks for {runtime!r}, but the base image offers only Python "
            f"{python_version}: write {offered} in runtime.txt, or remove it"
        )


def apt_packages_of(text: str) -> list[str]:
    """The Debian packages apt.txt lists ('#' comments, blank lines and several names on
    a line allowed); ImageError naming any word that is not a package name (an option
    such as --allow-unauthenticated, a path, a URL)."""
    packages = []
    for number, line in enumerate(text.splitlines(), 1):
        for word in line.partition("#")[0].split():
            if not _DEB_PACKAGE.fullmatch(word):
                raise ImageError(
                    f"apt.txt line {number}: {word!r} is not a Debian package name "
                    "(lowercase letters, digits, '+', '-', '.', optionally =VERSION); "
                    "apt.txt lists packages only, no options"
                )
            packages.append(word)
    return packages


def requirements_of(text: str) -> list[str]:
    """The requirements of requirements.txt, each a PyPI name with optional extras,
    versions and markers; ImageError naming the line of anything else (-e, other
    indexes, URLs, git+, paths, per-requirement options, $VARIABLES)."""
    found = []
    lines = re.sub(r"\\\r?\n", "", text).splitlines()
    for number, raw in enumerate(lines, 1):
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if not line:
            continue
        where = f"requirements.txt line {number} ({line!r})"
        if line.startswith("-"):
            option = re.split(r"[\s=]", line, maxsplit=1)[0]
            why = next((w for opts, w in _REQUIREMENT_OPTIONS.items() if option in opts), "")
            raise ImageError(f"{where}: option {option} is not supported: "
                             f"{why or 'requirements.txt lists packages only'}")  # fmt: skip
        if "$" in line or " -" in line:
            raise ImageError(
                f"{where}: environment variables and per-requirement options (--hash) "
                "are not supported"
            )
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            requirement = None
        if requirement is None or requirement.url:
            raise ImageError(
                f"{where}: not a package name from PyPI; URLs, git+ links and paths "
                "(., ./folder, a .whl) are not supported: packages are installed as "
                "wheels from PyPI"
            )
        found.append(str(requirement))
    return found


def post_build_argv(data: bytes, mode: int, path: str = "postBuild") -> list[str]:
    """How postBuild (at `path` in the repository) is run from the repository's root: by
    /bin/sh if executable (as repo2docker's `./binder/postBuild`: a script without `#!`
    is run by the shell), else by the interpreter its `#!` line names. ImageError if it
    is neither."""
    if mode & 0o111:
        return ["/bin/sh", "-c", f"./{path}"]
    if data.startswith(b"#!"):
        line = data[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        interpreter = line.split(None, 1)  # as Linux: the rest is one argument
        if interpreter and interpreter[0].startswith("/"):
            return [*interpreter, f"./{path}"]
    raise ImageError(
        "postBuild is not executable and does not start with a #! line naming its "
        "interpreter: make it executable (chmod +x) or begin it with e.g. #!/bin/bash"
    )


# --- the steps -------------------------------------------------------------------------


def _chroot_env() -> dict[str, str]:
    """CLEAN_ENV, and the host's proxy settings: apt in the chroot fetches from Debian."""
    proxies = {k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")}
    return {**CLEAN_ENV, **proxies}


@contextlib.contextmanager
def _replaced(path: Path, text: str, mode: int = 0o644) -> Iterator[None]:
    """`path` holds `text` meanwhile, then what it held before (or nothing)."""
    before = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    write_file(path, text, mode)
    try:
        yield
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            write_file(path, before.decode("utf-8", "surrogateescape"))


def _apt_install(root: Path, packages: list[str], log: logging.Logger) -> None:
    """apt-get install `packages` in a chroot of `root` (a copy of a trusted base: no
    path in it leads out yet). Mounts nothing: apt and dpkg need no /proc for this."""
    sources = root / "etc/apt/sources.list"
    listed = sources.is_file() and sources.read_text(errors="replace").strip()
    parts = root / "etc/apt/sources.list.d"
    if not listed and not any(parts.glob("*.list")) and not any(parts.glob("*.sources")):
        codename = _os_release(root).get("VERSION_CODENAME") or DEBIAN_SUITE
        write_file(sources, f"deb {DEBIAN_MIRROR} {codename} main\n")

    def chroot(*argv: str) -> None:
        stream(["chroot", root, *argv], log, f"apt.txt: {' '.join(argv[:2])} in the image",
               error=ImageError, env=_chroot_env())  # fmt: skip

    host_resolv = Path("/etc/resolv.conf").read_text(errors="replace")
    with (
        _replaced(root / "etc/resolv.conf", host_resolv),
        # No package's daemon may start: it would run on the host, in the chroot.
        _replaced(root / "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755),
    ):
        chroot("apt-get", "update")
        chroot("apt-get", "install", "--no-install-recommends", "-y", "--", *packages)
        chroot("apt-get", "clean")


def _os_release(root: Path) -> dict[str, str]:
    try:
        text = (root / "etc/os-release").read_text(errors="replace")
    except OSError:
        text = ""
    pairs = (line.partition("=") for line in text.splitlines())
    return {k.strip(): v.strip().strip('"') for k, _, v in pairs}


def _site_packages(root: Path, python_version: str) -> Path:
    minor = ".".join(python_version.split(".")[:2])
    return (
        root
        / Path(GUEST_PYTHON).parent.parent.relative_to("/")
        / f"lib/python{minor}/site-packages"
    )


def _constraints(site_packages: Path) -> str:
    """The venv's distributions pinned (`name==version`), read from their metadata."""
    pins = {
        (dist.metadata["Name"], dist.version)
        for dist in importlib.metadata.distributions(path=[str(site_packages)])
        if dist.metadata["Name"]
    }
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins))


def _pip_install(root: Path, requirements: list[str], python_version: str,
                 log: logging.Logger) -> None:  # fmt: skip
    """Install `requirements` into the image's /opt/venv from wheels downloaded on the
    host, the base's packages pinned. Only unpacks wheels in the chroot (pip runs no
    code of theirs), and nothing of them runs afterwards on the host or in a chroot."""
    site_packages = _site_packages(root, python_version)
    minor = ".".join(python_version.split(".")[:2])
    staging = Path(tempfile.mkdtemp(prefix="jsb-binder-wheels-"))
    try:
        (staging / "constraints.txt").write_text(_constraints(site_packages))
        (staging / "requirements.txt").write_text(
            "-c constraints.txt\n" + "".join(f"{r}\n" for r in requirements)
        )
        try:
            download_wheels(staging / "requirements.txt", staging, minor, log)
        except ImageError as e:
            raise ImageError(_pip_error(str(e), minor)) from None
        guest_wheels = root / "tmp" / "binder-wheels"
        shutil.copytree(staging, guest_wheels, copy_function=link_or_copy)
        venv_pip = str(Path(GUEST_PYTHON).with_name("pip"))
        stream(
            ["chroot", root, venv_pip, "install", "--no-index", "--find-links",
             "/tmp/binder-wheels", "--no-cache-dir", "--requirement",
             "/tmp/binder-wheels/requirements.txt"],
            log, "requirements.txt: pip install in the image", error=ImageError, env=CLEAN_ENV,
        )  # fmt: skip
        shutil.rmtree(guest_wheels)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pip_error(message: str, minor: str) -> str:
    """pip download's failure, said in terms of requirements.txt."""
    missing = re.search(r"No matching distribution found for (\S+)", message)
    if missing:
        return (
            f"requirements.txt: no wheel of {missing.group(1)} for Python {minor} on Linux "
            "x86_64 is on PyPI (packages are installed from wheels only: nothing is "
            f"compiled here), or its version conflicts with the base image's.\n{message}"
        )
    if "ResolutionImpossible" in message or "conflict" in message:
        return (
            "requirements.txt: a requirement conflicts with the base image's packages, "
            f"which stay at their versions (the kernel's own stack).\n{message}"
        )
    return f"requirements.txt: {message}"


def _find_runsc() -> str:
    runsc = shutil.which("runsc")
    if runsc is None:
        raise ImageError(
            "postBuild runs in a gVisor sandbox, and runsc is not installed: run "
            "scripts/install-host.sh as root, then `jupyter sandbox doctor`"
        )
    return runsc


def post_build_spec(root: Path, repo: Path, argv: list[str], cgroup: str,
                    limits: PostBuildLimits) -> dict[str, Any]:  # fmt: skip
    """The OCI runtime config of postBuild's sandbox: the tree writable as its root
    (its writes are the build's result), the repository read-only, scratch space (/tmp,
    /var/tmp, /run) in memory, no network namespace shared, no capabilities."""
    tmpfs = {"type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
    no_caps = {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
    return {
        "ociVersion": "1.0.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": argv,
            "env": [
                f"PATH={Path(GUEST_PYTHON).parent}:{CLEAN_ENV['PATH']}",
                "LANG=C.UTF-8",
                "HOME=/root",
                "PIP_NO_CACHE_DIR=1",
                "PIP_DISABLE_PIP_VERSION_CHECK=1",
            ],
            "cwd": POSTBUILD_MOUNT,
            "capabilities": no_caps,
            "noNewPrivileges": True,
        },
        "root": {"path": str(root), "readonly": False},
        "hostname": "binder-build",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            *({"destination": d, **tmpfs} for d in ("/tmp", "/var/tmp", "/run")),
            {
                "destination": POSTBUILD_MOUNT,
                "type": "bind",
                "source": str(repo),
                "options": ["rbind", "ro", "nosuid", "nodev"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "cgroupsPath": cgroup,
            "resources": {
                "memory": {"limit": limits.memory, "swap": limits.memory},
                "pids": {"limit": limits.pids},
            },
        },
    }


BUILDS_CGROUP = f"{cgroups.SANDBOXES}/builds"
"""Where postBuild sandboxes' cgroups are made (removed with each)."""
POSTBUILD_TMP_PREFIX = "jsb-postbuild-"
"""The host's temporary folder of a postBuild (its bundle and runsc state), removed after."""


def _run_post_build(root: Path, repo: Path, argv: list[str], runsc: str,
                    limits: PostBuildLimits, log: logging.Logger) -> None:  # fmt: skip
    """Run postBuild in a gVisor sandbox over `root` (see `post_build_spec`), its output
    going to `log`; ImageError with its last lines and exit status if it fails or
    outlives `limits.timeout`. Leaves no sandbox, runsc state, bundle or cgroup."""
    container = f"jsb-build-{secrets.token_hex(6)}"
    cgroup = f"{BUILDS_CGROUP}/{container}"
    tmp = Path(tempfile.mkdtemp(prefix=POSTBUILD_TMP_PREFIX))
    state, bundle = tmp / "state", tmp / "bundle"
    state.mkdir(mode=0o700)
    bundle.mkdir(mode=0o700)
    mount_point = root / POSTBUILD_MOUNT.lstrip("/")
    made = not os.path.lexists(mount_point)
    if made:  # by us, while the tree is still the trusted copy
        mount_point.mkdir(mode=0o755, parents=True)
    runsc_state = [runsc, f"--root={state}"]
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        quietly([*runsc_state, "kill", "--all", container, "KILL"], log, level=logging.DEBUG)

    timer = threading.Timer(limits.timeout, expire)
    timer.daemon = True
    try:
        # Read-only on the host too: runsc's directfs would empty a file of the folder
        # opened with O_TRUNC through a bind read-only in the OCI spec only (rootfs.bind).
        repo_ro = rootfs.bind(repo, tmp, True)
        spec = post_build_spec(root, repo_ro, argv, cgroup, limits)
        (bundle / "config.json").write_text(json.dumps(spec))
        timer.start()
        stream(
            [*runsc_state, "--platform=systrap", "--network=none",
             # Writes go to the tree itself, not to gVisor's overlay in memory.
             "--overlay2=none", "run", f"--bundle={bundle}", container],
            log, "postBuild (in its gVisor sandbox)", error=ImageError,
        )  # fmt: skip
    except ImageError as e:
        if timed_out.is_set():
            last = str(e).partition("Last output:")[2]
            raise ImageError(
                f"postBuild did not finish within {limits.timeout:g} s and was killed. "
                f"Last output:{last}"
            ) from None
        raise
    finally:
        timer.cancel()
        quietly([*runsc_state, "delete", "--force", container], log,
                gone=("does not exist", "not found"), level=logging.DEBUG)  # fmt: skip
        cgroups.remove(cgroup)
        cgroups.remove_if_empty(BUILDS_CGROUP)
        rootfs.remove_bundle(tmp)  # unmounts the repository's bind before it deletes
        if made:
            _rmdir_beneath(root, POSTBUILD_MOUNT.lstrip("/"), log)


def _rmdir_beneath(root: Path, rel: str, log: logging.Logger) -> None:
    """Remove the empty directory root/rel without following any symbolic link on the
    way: postBuild may have replaced any part of the path by one leading to the host."""
    parts = Path(rel).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)  # fmt: skip
            os.close(fd)
            fd = sub
        os.rmdir(parts[-1], dir_fd=fd)
    except OSError as e:
        log.debug("leaving %s in the image: %s", rel, e)
    finally:
        os.close(fd)
