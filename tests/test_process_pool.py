"""Notebooks run from a pool of forked worker processes (batch grading, papermill pipelines).

A forked worker inherits the parent's provisioner state (the I/O loop without its
thread, locks, caches, thread pools): it must start its own and leave the
parent's, and the parent's running kernel, alone.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT
from helpers import bundles_of, sandboxes_of
from jupyter_client import KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from provisioner.state import records

POOL_TIMEOUT = int(os.environ.get("JSB_POOL_TIMEOUT", 480))
"""Seconds for the whole pool: the runs before the fix hung forever."""


def run_notebook(kernel_name: str, workspace: str, n: int) -> tuple[int, str, list[str]]:
    """Run a two-cell notebook; return this process's pid, its outputs and its kernel's id."""
    nb = new_notebook(
        cells=[
            new_code_cell(f"import os\nnumber = {n}\nprint(number * 7, os.getuid())"),
            new_code_cell("open(f'out-{number}.txt', 'w').write(str(number)); number + 1"),
        ]
    )
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=120,
        startup_timeout=READY_TIMEOUT,
        resources={"metadata": {"path": workspace}},
    )
    kernel_ids: list[str] = []
    client.on_notebook_start = lambda notebook: kernel_ids.append(client.km.kernel_id)
    client.execute()
    first, second = nb.cells
    text = first.outputs[0]["text"] + second.outputs[0]["data"]["text/plain"]
    return os.getpid(), text, kernel_ids


@pytest.mark.timeout(900)
def test_notebooks_from_a_fork_process_pool(no_leftovers, workspace: Path, kernel_name: str):
    runs = 4 if kernel_name.endswith("gvisor") else 2  # a microVM boots in ~30 s under TCG
    # The parent has used its I/O loop, and keeps a kernel running while it forks.
    assert run_notebook(kernel_name, str(workspace), 0)[1] == "0 1000\n1"
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(cwd=str(workspace))
    workers: set[int] = set()
    kernel_ids: list[str] = []
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=READY_TIMEOUT)
        kc.execute_interactive("kept = 'still here'", timeout=60)

        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
        try:
            futures = [
                pool.submit(run_notebook, kernel_name, str(workspace), n)
                for n in range(1, runs + 1)
            ]
            results = [f.result(timeout=POOL_TIMEOUT) for f in futures]
        finally:
            # A hung worker would hold up shutdown (and the test) forever.
            for child in multiprocessing.active_children():
                if child.is_alive() and any(not f.done() for f in futures):
                    os.kill(child.pid, signal.SIGKILL)
            pool.shutdown(wait=True, cancel_futures=True)

        for n, (pid, text, ids) in enumerate(results, start=1):
            assert text == f"{n * 7} 1000\n{n + 1}", text  # uid 1000: the sandbox's user
            assert pid != os.getpid()
            workers.add(pid)
            kernel_ids += ids
        assert len(workers) == 2, f"the runs were not spread over both workers: {workers}"
        assert len(set(kernel_ids)) == runs
        assert sorted(p.name for p in workspace.glob("out-*.txt")) == [
            f"out-{n}.txt" for n in range(runs + 1)
        ]

        # The workers did not disturb the parent's loop nor its kernel.
        messages: list[dict] = []
        kc.execute_interactive("print(kept)", timeout=60, output_hook=messages.append)
        assert [m["content"]["text"] for m in messages if m["msg_type"] == "stream"] == [
            "still here\n"
        ]
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    last = runs + 1  # and the parent's I/O loop still carries new kernels
    assert run_notebook(kernel_name, str(workspace), last)[1] == f"{last * 7} 1000\n{last + 1}"

    # Each worker's kernels were removed by the worker itself (records owned by a
    # worker are not the no_leftovers fixture's to see).
    for kernel_id in kernel_ids:
        assert not sandboxes_of(kernel_id), kernel_id
        assert not bundles_of(kernel_id), kernel_id
    assert not [r.sandbox_id for r in records() if r.owner_pid in workers]
