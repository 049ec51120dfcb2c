"""Notebooks and blocking clients on sandboxed kernels: nbclient, papermill, BlockingKernelClient.

These callers are synchronous: their event loop runs only inside each call, so
the kernel stays reachable only because the tunnel runs on its own loop.
"""

from __future__ import annotations

import base64
import secrets
import struct
import time
from pathlib import Path

import nbformat
import papermill
from conftest import KERNEL, READY_TIMEOUT
from helpers import bundles_of, sandboxes_of
from jupyter_client import BlockingKernelClient, KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook


def text_of(cell) -> str:
    """The stdout of a code cell plus the text/plain of its results."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_nbclient_runs_a_notebook_in_the_sandbox(no_leftovers, workspace: Path, kernel_name: str):
    nb = new_notebook(
        cells=[
            new_code_cell("6 * 7"),
            new_code_cell("import numpy as np\na = np.arange(10)\nprint(a.sum(), a.mean(), a @ a)"),
            new_code_cell(
                "import pandas as pd\n"
                "df = pd.DataFrame({'x': [1, 2, 3], 'y': [4, 5, 6]})\n"
                "df['z'] = df.x * df.y\n"
                "df"
            ),
            new_code_cell(
                "import matplotlib.pyplot as plt\n"
                "fig, ax = plt.subplots(figsize=(4, 3), dpi=50)\n"
                "ax.plot(df.x, df.z)\n"
                "plt.show()"
            ),
            new_code_cell(
                "import os, socket\n"
                "with open('result.csv', 'w') as f:\n"
                "    df.to_csv(f, index=False)\n"
                "print(os.getcwd(), socket.gethostname(), os.getuid())"
            ),
        ],
        metadata={
            "kernelspec": {"name": kernel_name, "display_name": "ignored", "language": "python"}
        },
    )
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=120,
        startup_timeout=READY_TIMEOUT,
        resources={"metadata": {"path": str(workspace)}},
    )
    kernel_ids: list[str] = []
    client.on_notebook_start = lambda notebook: kernel_ids.append(client.km.kernel_id)
    client.execute()

    arithmetic, numeric, frame, figure, files = nb.cells
    assert arithmetic.outputs[0].output_type == "execute_result"
    assert text_of(arithmetic) == "42"
    assert text_of(numeric) == "45 4.5 285\n"
    (result,) = frame.outputs
    assert "<table" in result.data["text/html"]
    assert " ".join(result.data["text/plain"].split()) == "x y z 0 1 4 4 1 2 5 10 2 3 6 18"
    images = [o for o in figure.outputs if o.output_type == "display_data"]
    assert len(images) == 1
    width, height = png_size(base64.b64decode(images[0].data["image/png"]))
    assert 100 < width <= 200  # 4 x 3 inches at 50 dpi, trimmed to the drawing
    assert 75 < height <= 150
    cwd, hostname, uid = text_of(files).split()
    assert (cwd, hostname, uid) == (str(workspace), "sandbox", "1000")
    assert (workspace / "result.csv").read_text().split() == ["x,y,z", "1,4,4", "2,5,10", "3,6,18"]
    assert nb.metadata.language_info.name == "python"
    # nbclient shut its kernel down, sandbox and all
    assert len(kernel_ids) == 1
    assert sandboxes_of(kernel_ids[0]) == []
    assert bundles_of(kernel_ids[0]) == []


def test_papermill_injects_parameters(no_leftovers, workspace: Path, tmp_path: Path):
    source = tmp_path / "report.ipynb"
    output = tmp_path / "report-out.ipynb"
    parameters = new_code_cell("who = 'nobody'\ntimes = 1")
    parameters.metadata["tags"] = ["parameters"]
    nbformat.write(
        new_notebook(
            cells=[
                parameters,
                new_code_cell(
                    "import socket\nprint(f'hello {who} ' * times + socket.gethostname())"
                ),
            ],
            # the notebook names the local kernel; kernel_name= must win over it
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
        ),
        source,
    )
    who = f"tester-{secrets.token_hex(4)}"

    result = papermill.execute_notebook(
        str(source),
        str(output),
        parameters={"who": who, "times": 2},
        kernel_name=KERNEL,
        cwd=str(workspace),
        progress_bar=False,
    )

    written = nbformat.read(output, as_version=4)
    for nb in (result, written):
        assert nb.metadata.papermill.parameters == {"who": who, "times": 2}
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1
        assert f'who = "{who}"' in injected[0].source
        assert text_of(nb.cells[-1]) == f"hello {who} hello {who} sandbox\n"


def test_blocking_kernel_manager_and_client(no_leftovers, workspace: Path):
    km = KernelManager(kernel_name=KERNEL)
    km.start_kernel(cwd=str(workspace))
    try:
        kc = km.client()
        assert isinstance(kc, BlockingKernelClient)
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            outputs: list[dict] = []
            reply = kc.execute_interactive(
                "import os, platform\nprint(platform.node(), os.getuid())",
                timeout=60,
                output_hook=outputs.append,
            )
            assert reply["content"]["status"] == "ok"
            streams = [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"]
            assert streams == ["sandbox 1000\n"]

            # Nobody runs a loop while this thread sleeps; the kernel must still be
            # reachable afterwards, and must not have been declared dead meanwhile.
            msg_id = kc.execute("import time\ntime.sleep(1.5)\nprint('slept')")
            time.sleep(3)
            assert km.is_alive()
            reply = kc.get_shell_msg(timeout=30)
            assert reply["parent_header"]["msg_id"] == msg_id
            assert reply["content"]["status"] == "ok"
            assert kc.is_alive()  # the heartbeat, through the tunnel

            # a blocking interrupt goes through the provisioner's signal path
            msg_id = kc.execute("import time\ntime.sleep(100)")
            time.sleep(1)
            started = time.monotonic()
            km.interrupt_kernel()
            reply = kc.get_shell_msg(timeout=30)
            assert reply["parent_header"]["msg_id"] == msg_id
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert time.monotonic() - started < 10
        finally:
            kc.stop_channels()
        assert len(sandboxes_of(km.kernel_id)) == 1
        km.shutdown_kernel()  # the polite way: a shutdown_request, then wait
        assert not km.is_alive()
        assert sandboxes_of(km.kernel_id) == []
        assert bundles_of(km.kernel_id) == []
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
