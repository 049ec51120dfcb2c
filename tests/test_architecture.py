"""The layering of the code, checked by import-linter (contracts in pyproject.toml).

The guest never imports host code; the core never imports the sandbox service, the
CLI or the web layer; modules import only downwards (cli, then the provisioner,
service and doctor, then the request, backends, the host's parts, errors) and no
package has an import cycle. These start no sandbox.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
    )  # fmt: skip


def test_the_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "4 kept" in result.stdout, result.stdout


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(REPO / "pyproject.toml", tree)
    ignore = shutil.ignore_patterns("__pycache__", "image", "microvm")
    shutil.copytree(REPO / "provisioner", tree / "provisioner", ignore=ignore, symlinks=True)
    shutil.copytree(REPO / "guest", tree / "guest", ignore=ignore)
    return tree


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The contracts are not vacuous: a backend importing the CLI is caught."""
    tree = copy_tree(tmp_path)
    base = tree / "provisioner" / "backends" / "base.py"
    base.write_text(base.read_text() + "\nfrom .. import cli  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "provisioner.backends.base -> provisioner.cli" in result.stdout, result.stdout


def test_the_guest_importing_host_code_is_caught(tmp_path):
    tree = copy_tree(tmp_path)
    agent = tree / "guest" / "protocol.py"
    agent.write_text(agent.read_text() + "\nimport provisioner.tunnel  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "guest.protocol -> provisioner.tunnel" in result.stdout, result.stdout
