"""Images from Binder / repo2docker folders (images/binder.py), with real parts.

One folder made here is built once for the module on the real default image:
apt.txt (jq, from Debian's archive), requirements.txt (six, from PyPI) and a
postBuild that records where it ran, in a real gVisor sandbox. What the folder
asks that cannot be honoured is refused before anything is copied: those tests
need neither root nor the network. Run under the shared lock (RULES.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_sandbox

from provisioner import cgroups
from provisioner.errors import ImageError
from provisioner.images.binder import (
    BUILDS_CGROUP,
    POSTBUILD_TMP_PREFIX,
    PostBuildLimits,
    apt_packages_of,
    build_from_binder,
    check_runtime,
    config_folder,
    is_binder_folder,
    post_build_argv,
    post_build_spec,
    requirements_of,
)
from provisioner.images.store import find_image, load_manifest

pytestmark = pytest.mark.timeout(600)

LOG = logging.getLogger("test_image_binder")
POST_BUILD = """#!/bin/sh
set -e
echo "postBuild starts"
{{
  echo "uid=$(id -u)"
  echo "caps=$(grep CapEff /proc/self/status | cut -f2)"
  echo "boot=$(dmesg | head -n 1)"
  echo "net=$(python3 -c 'import socket; print(",".join(n for _, n in socket.if_nameindex()))')"
  echo "six=$(python3 -c 'import six; print(six.__version__)')"
  echo "jq=$(echo '{{"a": 41}}' | jq '.a + 1')"
  echo "cwd=$(pwd)"
  if cat {canary} >/dev/null 2>&1; then echo canary=read; else echo canary=absent; fi
  echo changed > {canary} 2>/dev/null || true
  if touch written 2>/dev/null; then echo folder=writable; else echo folder=read-only; fi
  # O_WRONLY|O_CREAT|O_TRUNC, then O_RDONLY|O_TRUNC: runsc's directfs emptied a file so
  # on a bind read-only in the OCI spec only
  if ( : > data.txt ) 2>/dev/null; then echo truncate=ok; else echo truncate=refused; fi
  if python3 -c "import os; os.open('data.txt', os.O_RDONLY | os.O_TRUNC)" 2>/dev/null
  then echo rdonly_truncate=ok; else echo rdonly_truncate=refused; fi
  echo "data=$(cat data.txt)"
}} > /opt/binder-marker
"""


def build_leftovers() -> list[str]:
    """What a build may leave on the host: its temporary folders, cgroup, runsc."""
    tmp = Path(tempfile.gettempdir())
    found = [str(p) for p in tmp.glob(f"{POSTBUILD_TMP_PREFIX}*")]
    found += [str(p) for p in tmp.glob("jsb-binder-wheels-*")]
    found += [str(p) for p in cgroups.directories(BUILDS_CGROUP)]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(b"jsb-build-") for a in argv):
            found.append(f"process {cmdline.parent.name}: {b' '.join(argv).decode()}")
    return found


def write_folder(folder: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        if name in executable:
            (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def fake_base(tmp_path: Path) -> Path:
    """Enough of a base for the checks made before copying: its venv's Python version."""
    base = tmp_path / "base"
    (base / "opt/venv").mkdir(parents=True)
    (base / "opt/venv/pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    return base


@pytest.fixture(scope="module")
def base() -> Path:
    require_sandbox()  # root, runsc and the default image: skips here, fails under CI
    return find_image()


@dataclasses.dataclass
class Built:
    folder: Path
    dest: Path
    result: dict
    canary: Path
    leftovers_before: list[str]


@pytest.fixture(scope="module")
def built(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    top = tmp_path_factory.mktemp("binder")
    canary = top / "host-canary"
    canary.write_text("host secret\n")
    folder = write_folder(
        top / "course",
        {
            "binder/runtime.txt": "python-3.11\n",
            "binder/apt.txt": "# a small Debian package\njq  # JSON on the command line\n\n",
            "binder/requirements.txt": "six  # a small pure-Python wheel\n",
            "binder/postBuild": POST_BUILD.format(canary=canary),
            # binder/ exists: repo2docker ignores the top's files, refused or not.
            "environment.yml": "dependencies: [python=3.8]\n",
            "requirements.txt": "-e .\n",
            "data.txt": "course data\n",
        },
        executable=("binder/postBuild",),
    )
    dest = top / "rootfs"
    dest.mkdir()
    before = build_leftovers()
    result = build_from_binder(folder, dest, base_rootfs=base, log=LOG)
    yield Built(folder, dest, result, canary, before)
    shutil.rmtree(dest)


def marker(built: Built) -> dict[str, str]:
    text = (built.dest / "opt/binder-marker").read_text()
    return dict(line.split("=", 1) for line in text.splitlines())


def test_apt_txt_packages_are_installed(built: Built) -> None:
    assert (built.dest / "usr/bin/jq").is_file()
    assert built.result["apt_packages"] == ["jq"]
    # What apt needed meanwhile is gone: the host's resolv.conf, the daemon guard, lists.
    assert (built.dest / "etc/resolv.conf").read_text() == ""
    assert not os.path.lexists(built.dest / "usr/sbin/policy-rc.d")
    assert not [p for p in (built.dest / "var/lib/apt/lists").iterdir() if p.is_file()
                and p.name != "lock"]  # fmt: skip
    assert not list((built.dest / "var/cache/apt/archives").glob("*.deb"))


def test_requirements_are_importable_by_the_image_python(built: Built) -> None:
    out = subprocess.run(
        ["chroot", built.dest, "/opt/venv/bin/python3", "-c", "import six; print(six.__file__)"],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    ).stdout  # fmt: skip
    assert out.startswith("/opt/venv/lib/python3.11/site-packages/six.py")
    assert built.result["requirements"] == ["six"]
    assert not (built.dest / "tmp/binder-wheels").exists()


def test_the_base_packages_stay_as_they_were(built: Built, base: Path) -> None:
    """The base's kernel stack is pinned: installing requirements changed none of it."""
    manifest = load_manifest() or {}
    listing = subprocess.run(
        ["chroot", built.dest, "/opt/venv/bin/python3", "-c",
         "import json, importlib.metadata as m; "
         "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    ).stdout  # fmt: skip
    installed = {k.replace("_", "-"): v for k, v in json.loads(listing).items()}
    for name in ("ipykernel", "pyzmq", "numpy"):
        assert installed[name] == manifest["python_packages"][name], name


def test_post_build_ran_in_a_gvisor_sandbox(built: Built) -> None:
    got = marker(built)
    assert "Starting gVisor" in got["boot"], got  # gVisor's kernel log, not the host's
    assert got["uid"] == "0" and got["caps"] == "0000000000000000", got
    assert got["net"] == "lo", got  # no network
    assert got["six"] and got["jq"] == "42", got  # after apt.txt and requirements.txt
    assert got["cwd"] == "/srv/repo", got  # the repository's root, as repo2docker runs it
    assert got["folder"] == "read-only", got
    assert got["data"] == "course data", got  # postBuild could read the file it tried
    assert got["truncate"] == got["rdonly_truncate"] == "refused", got
    assert (built.folder / "data.txt").read_text() == "course data\n"
    assert got["canary"] == "absent", got
    assert built.canary.read_text() == "host secret\n"
    assert not (built.folder / "written").exists()
    assert not os.path.lexists(built.dest / "srv/repo")


def test_the_result_says_what_was_honoured(built: Built, base: Path) -> None:
    result = built.result
    assert result["kind"] == "binder" and result["folder"] == str(built.folder)
    names = ("runtime.txt", "apt.txt", "requirements.txt", "postBuild")
    assert result["files"] == {
        name: hashlib.sha256((built.folder / "binder" / name).read_bytes()).hexdigest()
        for name in names
    }
    assert result["python_version"] == (load_manifest() or {})["python_version"]


def test_the_build_leaves_nothing_behind(built: Built) -> None:
    assert build_leftovers() == built.leftovers_before == []


def test_a_failing_post_build_says_why_and_leaves_nothing(base: Path, tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "course",
        {"postBuild": "#!/bin/sh\necho step one\necho 'no data here' >&2\nexit 3\n"},
    )  # not executable: run by its #! line
    dest = tmp_path / "rootfs"
    dest.mkdir()
    with pytest.raises(ImageError) as failed:
        build_from_binder(folder, dest, base_rootfs=base, log=LOG)
    message = str(failed.value)
    assert "postBuild" in message and "exit status 3" in message, message
    assert "step one" in message and "no data here" in message, message
    assert build_leftovers() == []
    assert not os.path.lexists(dest / "srv/repo")
    shutil.rmtree(dest)


def test_a_post_build_past_its_time_is_killed(base: Path, tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "course", {"postBuild": "echo waiting\nexec sleep 600\n"}, ("postBuild",)
    )
    dest = tmp_path / "rootfs"
    dest.mkdir()
    with pytest.raises(ImageError, match=r"postBuild did not finish within 3 s") as failed:
        build_from_binder(
            folder, dest, base_rootfs=base, log=LOG, limits=PostBuildLimits(timeout=3)
        )
    assert "waiting" in str(failed.value)
    assert build_leftovers() == []
    shutil.rmtree(dest)


def test_a_requirement_without_a_wheel_is_named(base: Path, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "course", {"requirements.txt": "jsb-no-such-package-3f9a\n"})
    dest = tmp_path / "rootfs"
    dest.mkdir()
    with pytest.raises(ImageError) as failed:
        build_from_binder(folder, dest, base_rootfs=base, log=LOG)
    message = str(failed.value)
    assert message.startswith("requirements.txt: no wheel of jsb-no-such-package-3f9a"), message
    assert build_leftovers() == []
    shutil.rmtree(dest)


# --- refused before anything is copied: no root, no network --------------------------


@pytest.mark.parametrize(
    ("files", "named", "why"),
    [
        ({"binder/environment.yml": "dependencies: [numpy]\n"}, "environment.yml", "conda"),
        ({"environment.yml": "dependencies: [numpy]\n"}, "environment.yml", "conda"),
        ({"runtime.txt": "python-3.8\n"}, "runtime.txt", "offers only Python 3.11.2"),
        ({"runtime.txt": "python-3.11.7\n"}, "runtime.txt", "write python-3.11"),
        ({"runtime.txt": "r-2023-01-01\n"}, "runtime.txt", "r-cran-irkernel"),
        ({"requirements.txt": "six\n-e .\n"}, "requirements.txt line 2", "-e"),
        ({"requirements.txt": "--index-url https://example.org/simple\nsix\n"},
         "requirements.txt line 1", "PyPI only"),
        ({"requirements.txt": "git+https://example.org/x.git\n"}, "requirements.txt", "git+"),
        ({"requirements.txt": "six @ https://example.org/six.whl\n"}, "requirements.txt", "URL"),
        ({"requirements.txt": "six==${VERSION}\n"}, "requirements.txt", "environment variables"),
        ({"apt.txt": "jq\n--allow-unauthenticated\n"}, "apt.txt line 2",
         "'--allow-unauthenticated' is not a Debian package name"),
        ({"apt.txt": "jq;rm -rf /\n"}, "apt.txt line 1", "not a Debian package name"),
        ({"start": "#!/bin/sh\nexec \"$@\"\n"}, "start", "agent"),
        ({"Pipfile": "[packages]\n"}, "Pipfile", "requirements.txt"),
        ({"install.R": "install.packages('x')\n"}, "install.R", "CRAN"),
        ({"Project.toml": "[deps]\n"}, "Project.toml", "Julia"),
        ({"default.nix": "{}\n"}, "default.nix", "Nix"),
        ({"binder/Dockerfile": "FROM debian\n"}, "Dockerfile", "docker-archive"),
        ({"setup.py": "from setuptools import setup\n"}, "setup.py", "pip install ."),
        ({"pyproject.toml": "[project]\nname='x'\n[build-system]\nrequires=[]\n"},
         "pyproject.toml", "pip install ."),
        ({"postBuild": "echo no interpreter\n"}, "postBuild", "chmod +x"),
        ({"binder/apt.txt": "jq\n", ".binder/apt.txt": "jq\n"}, "binder/ and .binder/", "one"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused_by_name(
    files: dict[str, str], named: str, why: str, fake_base: Path, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "course", files)
    dest = tmp_path / "rootfs"
    dest.mkdir()
    with pytest.raises(ImageError) as refused:
        build_from_binder(folder, dest, base_rootfs=fake_base, log=LOG)
    message = str(refused.value)
    assert named in message and why in message, message
    assert not any(dest.iterdir())  # refused before anything was copied


def test_a_file_linking_out_of_the_folder_is_not_read(fake_base: Path, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "course", {})
    (folder / "apt.txt").symlink_to("/etc/passwd")
    dest = tmp_path / "rootfs"
    dest.mkdir()
    with pytest.raises(ImageError, match=r"apt\.txt .* symbolic link leading out") as refused:
        build_from_binder(folder, dest, base_rootfs=fake_base, log=LOG)
    assert "root:" not in str(refused.value)


def test_which_folders_are_binder_folders(tmp_path: Path) -> None:
    assert not is_binder_folder(tmp_path / "missing")
    assert not is_binder_folder(write_folder(tmp_path / "notes", {"README.md": "hi\n"}))
    assert not is_binder_folder(write_folder(tmp_path / "rootfs", {"etc/os-release": ""}))
    for name in ("requirements.txt", "apt.txt", "postBuild", "environment.yml", "Dockerfile"):
        assert is_binder_folder(write_folder(tmp_path / f"with-{name}", {name: ""})), name
    for name in ("binder", ".binder"):
        assert is_binder_folder(write_folder(tmp_path / f"in-{name}", {f"{name}/x": ""})), name


def test_the_configuration_folder_is_repo2dockers(tmp_path: Path) -> None:
    top = write_folder(tmp_path / "top", {"requirements.txt": "six\n"})
    assert config_folder(top) == top
    nested = write_folder(tmp_path / "nested", {"requirements.txt": "-e .\n", ".binder/x": ""})
    assert config_folder(nested) == nested / ".binder"


def test_what_is_accepted() -> None:
    for runtime in ("python-3", "python-3.11", "python-3.11.2\n"):
        check_runtime(runtime, "3.11.2")
    apt_txt = "# tools\njq r-cran-irkernel\nlibfoo1:amd64  # lib\ng++=4:12.2.0-3\n"
    assert apt_packages_of(apt_txt) == ["jq", "r-cran-irkernel", "libfoo1:amd64", "g++=4:12.2.0-3"]
    assert requirements_of(
        "six>=1.16  # comment\nhumanize[extra] ==4.9 ; python_version >= '3.8'\nnumpy \\\n  <3\n\n"
    ) == ["six>=1.16", 'humanize[extra]==4.9; python_version >= "3.8"', "numpy<3"]
    assert post_build_argv(b"anything", 0o755) == ["/bin/sh", "-c", "./postBuild"]
    assert post_build_argv(b"x", 0o755, "binder/postBuild") == [
        "/bin/sh",
        "-c",
        "./binder/postBuild",
    ]
    assert post_build_argv(b"#!/usr/bin/env python3\n", 0o644) == [
        "/usr/bin/env", "python3", "./postBuild",
    ]  # fmt: skip


def test_the_post_build_sandbox_is_confined(tmp_path: Path) -> None:
    limits = PostBuildLimits(memory=1 << 30, pids=99)
    spec = post_build_spec(
        tmp_path / "root", tmp_path / "binder", ["./postBuild"], f"{BUILDS_CGROUP}/x", limits
    )
    process = spec["process"]
    assert process["noNewPrivileges"] is True
    assert all(caps == [] for caps in process["capabilities"].values())
    assert {"type": "network"} in spec["linux"]["namespaces"]
    assert spec["linux"]["resources"] == {
        "memory": {"limit": 1 << 30, "swap": 1 << 30}, "pids": {"limit": 99},
    }  # fmt: skip
    (repo,) = [m for m in spec["mounts"] if m["destination"] == "/srv/repo"]
    assert repo["source"] == str(tmp_path / "binder") and "ro" in repo["options"]
    assert spec["root"] == {"path": str(tmp_path / "root"), "readonly": False}
