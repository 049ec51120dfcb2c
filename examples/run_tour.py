"""Run examples/tour.ipynb in a sandboxed kernel and print what it shows.

    python examples/run_tour.py [--kernel python3-gvisor] [--save executed.ipynb]

The host's side comes first (hostname, kernel, CPUs, memory, some of its files),
then every cell of the tour with its outputs. The tour's parameters are set to
facts about this host, as papermill would: files that exist here, and a port
that listens on this host's 127.0.0.1 while the tour runs. The kernel works in
a fresh temporary folder, removed afterwards.

Exit status: 0 if every cell ran, 1 if any cell failed, 2 if the kernel did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

HERE = Path(__file__).resolve().parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
KERNEL_UID = 1000
"""Owner of the tour's folder when this runs as root: the kernel runs as the owner."""


def host_files() -> list[str]:
    """Files and folders that exist on this host and must not be visible in the sandbox."""
    candidates = [
        Path(__file__).resolve(),
        Path(sys.prefix) / "pyvenv.cfg",
        Path.home() / ".bashrc",
        Path.home() / ".ssh",
        Path("/run/jupyter-sandbox"),
        Path("/var/lib/jupyter-sandbox"),
    ]
    return [str(p) for p in candidates if p.exists()]


def mem_total_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")


def print_host(files: list[str], port: int) -> None:
    print("=" * 78)
    print("The host, for comparison")
    print("=" * 78)
    u = platform.uname()
    print(f"uname: {u.system} {u.node} {u.release} {u.version} {u.machine}")
    print(f"hostname: {u.node}, uid {os.getuid()}")
    print(f"CPUs: {os.cpu_count()}, MemTotal: {mem_total_kb()} kB")
    print(f"listening on 127.0.0.1:{port} while the tour runs")
    for path in files:
        print(f"{path:55} exists here")
    print()


def inject_parameters(nb, values: dict) -> None:
    """Add a cell setting `values` after the cell tagged "parameters", as papermill does."""
    source = "# Set by run_tour.py for this host\n" + "".join(
        f"{name} = {json.dumps(value)}\n" for name, value in values.items()
    )
    cell = new_code_cell(source.rstrip("\n"))
    cell.metadata["tags"] = ["injected-parameters"]
    index = next(
        (i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), -1
    )
    nb.cells.insert(index + 1, cell)


def show_output(output) -> list[str]:
    kind = output.output_type
    if kind == "stream":
        return output.text.rstrip("\n").splitlines()
    if kind in ("execute_result", "display_data"):
        data = output.get("data", {})
        if "text/plain" in data:
            return data["text/plain"].splitlines()
        return [f"[{', '.join(data)}]"]
    if kind == "error":
        lines = ANSI.sub("", "\n".join(output.traceback)).splitlines()
        return ["ERROR:", *lines[-12:]]
    return []


def print_notebook(nb) -> int:
    """Print every cell and its text outputs; return how many cells failed."""
    failed = 0
    print("=" * 78)
    print("The sandbox: examples/tour.ipynb")
    print("=" * 78)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            print()
            for line in cell.source.splitlines():
                print(f"  {line}" if line else "")
            continue
        if cell.cell_type != "code":
            continue
        count = cell.get("execution_count") or " "
        print(f"\n--- In [{count}] " + "-" * 60)
        print(textwrap.indent(cell.source, "  "))
        lines = [line for output in cell.outputs for line in show_output(output)]
        if lines:
            print(f"--- Out [{count}]")
            print("\n".join(f"  | {line}" for line in lines))
        if any(output.output_type == "error" for output in cell.outputs):
            failed += 1
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", default="python3-gvisor", help="kernelspec to run the tour in")
    parser.add_argument("--notebook", type=Path, default=HERE / "tour.ipynb")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per cell")
    parser.add_argument("--save", type=Path, help="also write the executed notebook here")
    args = parser.parse_args(argv)

    nb = nbformat.read(args.notebook, as_version=4)
    workdir = Path(tempfile.mkdtemp(prefix="jupyter-sandbox-tour-"))
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        if os.geteuid() == 0:
            os.chown(workdir, KERNEL_UID, KERNEL_UID)
        workdir.chmod(0o755)
        port = listener.getsockname()[1]
        files = host_files()
        print_host(files, port)
        inject_parameters(
            nb,
            {
                "HOST_NAME": socket.gethostname(),
                "HOST_FILES": files,
                "HOST_PORT": port,
                "HOST_MEMORY_KB": mem_total_kb(),
            },
        )
        client = NotebookClient(
            nb,
            kernel_name=args.kernel,
            timeout=args.timeout,
            startup_timeout=120,
            allow_errors=True,  # run every cell, report every failure
            resources={"metadata": {"path": str(workdir)}},
        )
        try:
            client.execute()
        except Exception as e:
            print(f"the kernel {args.kernel!r} did not run the tour: {e}", file=sys.stderr)
            return 2
        failed = print_notebook(nb)

        print("\n" + "=" * 78)
        print(f"Back on the host, the tour's folder {workdir} holds:")
        for path in sorted(workdir.iterdir()):
            st = path.stat()
            print(f"  {path.name} (owner uid {st.st_uid}): {path.read_text().strip()!r}")
        if args.save:
            nbformat.write(nb, args.save)
            print(f"executed notebook written to {args.save}")
        if failed:
            print(f"{failed} cell(s) failed", file=sys.stderr)
            return 1
        print("every cell ran")
        return 0
    finally:
        listener.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
