#!/usr/bin/env python
"""A kernel through the Kubernetes backend against the local kernel, in the same run.

    sudo .venv/bin/python benchmarks/kubernetes.py [--starts 5] [--executes 300]

Sets up what tests/test_kubernetes.py runs on (tests/kube_kit.py): the cluster double
(the API server and a kubelet running each pod under runsc), a real JupyterHub whose
user `amy` has a running server, and the sandbox service as a process; this process
acts as amy's server (her token). Then, alternating, as `make bench` does for the
local backends (benchmarks/measure.py):

- start: from `start_kernel()` to the first `kernel_info_reply` (the service's policy
  and quota, the Pod, Secret and NetworkPolicy, the init container copying the agent,
  the kernel container, TLS to the pod, the kernel's start), `--starts` of each;
- execute: `pass` round trips to the reply and to idle, `--executes` of each, p50, p90
  and p99;

and the API requests the double served per start and shutdown (its request log).
What a real cluster adds (the scheduler, image pulls, a CNI, a remote API server) is
not here: docs/kubernetes.md. Writes `<out>/kubernetes-<day>.md` and `.json`, copied to
`kubernetes-latest.*`. Not part of `make test`: `make bench-kubernetes`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import report  # noqa: E402 (after the tests' folder is on the path)
from kernels import LOCAL, Kernel, Kind, Run  # noqa: E402
from kube_kit import KERNELSPEC, kube_cluster  # noqa: E402
from measure import measure_executes, measure_starts, percentile  # noqa: E402

POLICY = '[default]\nmemory_limit = "1G"\ncpu_limit = 1.0\nmax_kernels = 4\n'
KUBERNETES = Kind("kubernetes", "Kubernetes (the double, gVisor pods)", KERNELSPEC)


def summary(starts: dict[str, list[float]], executes: dict[str, dict[str, list[float]]]
            ) -> dict[str, dict[str, float]]:  # fmt: skip
    found: dict[str, dict[str, float]] = {}
    for label in starts:
        found[label] = {
            "start_p50": percentile(starts[label], 50),
            **{f"execute_p{p}": percentile(executes[label]["idle"], p) for p in (50, 90, 99)},
            "reply_p50": percentile(executes[label]["reply"], 50),
        }
    return found


def markdown(s: dict[str, dict[str, float]], raw: dict[str, Any]) -> str:
    local = s["local"]
    rows = [
        "| | local | Kubernetes (double) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for key, title in (("start_p50", "start to first kernel_info_reply, p50"),
                       ("execute_p50", "execute `pass` to idle, p50"),
                       ("execute_p90", "execute `pass` to idle, p90"),
                       ("execute_p99", "execute `pass` to idle, p99"),
                       ("reply_p50", "execute `pass` to the reply, p50")):  # fmt: skip
        k = s["kubernetes"][key]
        rows.append(f"| {title} | {report.ms(local[key])} | {report.ms(k)} | "
                    f"{k / local[key]:.2f}x |")  # fmt: skip
    per_start = raw["measured"]["per_start"]
    idle = raw["measured"]["idle_per_hour"]
    return "\n".join(
        [
            f"# Kubernetes backend through the cluster double ({raw['date']})",
            "",
            f"`{raw['command']}` on this host (load {raw['host']}): {raw['starts']} starts and "
            f"{raw['executes']} executes of each kernel, alternating.",
            "",
            *rows,
            "",
            "API requests the double served per kernel start and shutdown (the service's, as "
            "counted by the double): "
            + (", ".join(f"{key}: {n:g}" for key, n in per_start.items()) or "none")
            + ".",
            "",
            f"API requests per hour while kernels idle (counted over {raw['idle_seconds']:g} s, "
            "the service's one watch included, whatever the number of kernels): "
            + (", ".join(f"{key}: {n:.3g}" for key, n in idle.items()) or "none")
            + ".",
            "",
            "Not measured here: what a real cluster adds (scheduling, image pulls, a CNI, a "
            "remote API server and kubelet); see docs/kubernetes.md.",
            "",
        ]
    )


def delta(before: dict[str, int], after: dict[str, int], per: float) -> dict[str, float]:
    """Requests served between two counts of the double's, divided by `per`."""
    return {key: (after.get(key, 0) - before.get(key, 0)) / per
            for key in sorted(after) if after.get(key, 0) != before.get(key, 0)}  # fmt: skip


async def measure(args: argparse.Namespace, folder: Path, double: Any) -> dict[str, Any]:
    run = Run(cwd=str(folder))
    kinds = {"local": LOCAL, "kubernetes": KUBERNETES}
    counts = {"local": args.starts, "kubernetes": args.starts}
    before = await double.requests()
    starts = await measure_starts(run, kinds, counts, warmup=True)
    per_start = delta(before, await double.requests(), args.starts + 1)  # with the warm-up
    kernels = {label: Kernel(run, kind) for label, kind in kinds.items()}
    try:
        for kernel in kernels.values():
            await kernel.start()
        before = await double.requests()
        await asyncio.sleep(args.idle)
        idle = delta(before, await double.requests(), args.idle / 3600)
        executes = await measure_executes(
            kernels, {label: args.executes for label in kinds}, warmup=20, block=50
        )
    finally:
        for kernel in kernels.values():
            await kernel.stop()
    return {"starts": starts, "executes": executes, "per_start": per_start,
            "idle_per_hour": idle}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--executes", type=int, default=300)
    parser.add_argument(
        "--idle",
        type=float,
        default=120.0,
        help="Seconds the API requests of two idle kernels are counted.",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jsb-bench-k8s-") as scratch:
        folder = Path(scratch)
        folder.chmod(0o755)
        with kube_cluster(folder / "cluster", POLICY, servers=("amy",)) as cluster:
            os.environ["JUPYTER_PATH"] = str(cluster.kernelspecs)
            os.environ["JUPYTERHUB_API_TOKEN"] = cluster.hub.token("amy")
            measured = asyncio.run(measure(args, folder, cluster.double))
    raw = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["benchmarks/kubernetes.py", *sys.argv[1:]]),
        "host": report.loadavg(),
        "starts": args.starts,
        "executes": args.executes,
        "idle_seconds": args.idle,
        "measured": measured,
    }
    s = summary(measured["starts"], measured["executes"])
    text = markdown(s, raw)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"kubernetes-{raw['date']}"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps({**raw, "summary": s}, indent=1))
    for suffix in (".md", ".json"):
        shutil.copyfile(args.out / f"{name}{suffix}", args.out / f"kubernetes-latest{suffix}")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
