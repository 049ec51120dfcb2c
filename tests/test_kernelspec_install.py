"""`kernelspec install --image`: what an image's kernelspec may carry to the host, checked.

An image's kernel.json and environment end up in a kernelspec on the host, where the
Jupyter server reads and serves them. A fake image store (a tree and a manifest made
here) stands for an imported image; no sandbox is started.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from provisioner.guest.layout import AGENT_PYTHON

from provisioner import kernelspecs
from provisioner.errors import ImageError, SettingError

LOG = logging.getLogger("test")
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'


def fake_image(store: Path, kernel: dict, env: list[str]) -> str:
    root = store / "evil/rootfs"
    (root / Path(AGENT_PYTHON).parent.relative_to("/")).mkdir(parents=True)
    (root / AGENT_PYTHON.lstrip("/")).write_bytes(b"")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/prog").write_bytes(b"#!/bin/sh\n")
    (root / "usr/bin/prog").chmod(0o755)
    folder = root / "usr/share/jupyter/kernels/k"
    folder.mkdir(parents=True)
    (folder / "logo-64x64.png").write_bytes(PNG)
    (folder / "logo-32x32.png").write_bytes(SVG)  # a PNG name, not a PNG
    (folder / "logo-svg.svg").write_bytes(SVG)
    entry = {"argv": ["prog", "-f", "{connection_file}"], "display_name": "K", "language": "k",
             "interrupt_mode": "signal", "env": {}, "resource_dir": "/usr/share/jupyter/kernels/k",
             "logos": ["logo-32x32.png", "logo-64x64.png", "logo-svg.svg"], **kernel}  # fmt: skip
    manifest = {"name": "evil", "kernels": {"k": entry}, "env": env}
    (store / "evil/manifest.json").write_text(json.dumps(manifest))
    return "evil"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JUPYTER_SANDBOX_IMAGES_DIR", str(tmp_path / "images"))
    return tmp_path / "images"


def installed(prefix: Path) -> Path:
    [folder] = (prefix / "share/jupyter/kernels").iterdir()
    return folder


def test_only_checked_png_logos_and_no_server_variables_reach_the_host(
    store: Path, tmp_path: Path
) -> None:
    env = ["PATH=/usr/bin:/bin", "HOME=/root", "LEAK=$AWS_SECRET_ACCESS_KEY"]
    image = fake_image(store, {"env": {"TOKEN": "${JUPYTERHUB_API_TOKEN}"}}, env)
    kernelspecs.install(image, prefix=str(tmp_path / "p"), log=LOG)
    folder = installed(tmp_path / "p")
    assert sorted(p.name for p in folder.iterdir()) == ["kernel.json", "logo-64x64.png"]
    spec = json.loads((folder / "kernel.json").read_text())
    assert spec["argv"] == ["/usr/bin/prog", "-f", "{connection_file}"]
    # `$$` is jupyter_client's escape: the kernel sees the text, not the server's secret
    assert spec["env"] == {"PATH": "/usr/bin:/bin", "LEAK": "$$AWS_SECRET_ACCESS_KEY",
                           "TOKEN": "$${JUPYTERHUB_API_TOKEN}"}  # fmt: skip


@pytest.mark.parametrize("arg", ["{env}", "--cwd={cwd}", "{prefix}/x", "{ip}"])
def test_argv_naming_what_the_server_fills_in_is_refused(
    store: Path, tmp_path: Path, arg: str
) -> None:
    image = fake_image(store, {"argv": ["prog", arg, "{connection_file}"]}, [])
    with pytest.raises(ImageError, match="only \\{connection_file\\} and \\{resource_dir\\}"):
        kernelspecs.install(image, prefix=str(tmp_path / "p"), log=LOG)
    assert not (tmp_path / "p").exists()


def test_a_program_the_image_does_not_have_is_refused(store: Path, tmp_path: Path) -> None:
    image = fake_image(store, {"argv": ["python", "-m", "ipykernel_launcher"]}, ["PATH=/usr/bin"])
    with pytest.raises(ImageError, match="runs 'python', which is not on its PATH"):
        kernelspecs.install(image, prefix=str(tmp_path / "p"), log=LOG)


@pytest.mark.parametrize("name", ["My R", "../x", "", "x" * 65])
def test_bad_kernelspec_names_are_refused(store: Path, tmp_path: Path, name: str) -> None:
    image = fake_image(store, {}, [])
    if not name:
        kernelspecs.install(image, name=name, prefix=str(tmp_path / "p"), log=LOG)
        assert installed(tmp_path / "p").name == "k-gvisor-evil"  # no name: the default one
        return
    with pytest.raises(SettingError, match="invalid kernelspec name"):
        kernelspecs.install(image, name=name, prefix=str(tmp_path / "p"), log=LOG)
    assert not (tmp_path / "x").exists() and not (tmp_path / "p").exists()
