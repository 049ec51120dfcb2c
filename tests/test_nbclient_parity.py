"""A sandboxed kernel behaves as a local one where nbclient's own test suite looks
(`make nbclient` runs that suite itself against python3-gvisor)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import KERNEL, READY_TIMEOUT
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_traceback(kernel_name: str, workspace: Path) -> str:
    nb = new_notebook(
        cells=[new_code_cell('import sys\nprint("hello")\n# üñîçø∂é\nraise Exception("message")')]
    )
    NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=60,
        startup_timeout=READY_TIMEOUT,
        allow_errors=True,
        resources={"metadata": {"path": str(workspace)}},
    ).execute()
    (error,) = [out for out in nb.cells[0].outputs if out.output_type == "error"]
    return ANSI.sub("", "\n".join(error.traceback))


def test_the_cell_name_setting_reaches_the_kernel(
    no_leftovers, workspace: Path, monkeypatch: pytest.MonkeyPatch
):
    """nbclient's suite sets IPYKERNEL_CELL_NAME for tracebacks it can compare: a
    sandboxed kernel must name its cells (and so show its traceback) as a local one."""
    monkeypatch.setenv("IPYKERNEL_CELL_NAME", "<IPY-INPUT>")
    local = error_traceback("python3", workspace)
    assert error_traceback(KERNEL, workspace) == local
