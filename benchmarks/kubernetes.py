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
    requests = raw["api_requests"]
    return "\n".join(
        [
            f"# Kubernetes backend through the cluster double ({raw['date']})",
            "",
            f"`{raw['command']}` on {raw['host']}: {raw['starts']} starts and "
            f"{raw['executes']} executes of each kernel, alternating.",
            "",
            *rows,
            "",
            "API requests the double served, per kernel (start and shutdown, from its log): "
            + ", ".join(f"{verb} {kind}: {n:g}" for (verb, kind), n in sorted(requests.items()))
            + ".",
            "",
            "Not measured here: what a real cluster adds (scheduling, image pulls, a CNI, a "
            "remote API server and kubelet); see docs/kubernetes.md.",
            "",
        ]
    )


def api_requests(log: str, kernels: int) -> dict[tuple[str, str], float]:
    """Requests per kernel by (verb, resource), from the double's log lines
    `request <VERB> <path> <status>`; watches and lists of the service's start apart."""
    counts: dict[tuple[str, str], int] = {}
    for line in log.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "request" or "watch=" in parts[2]:
            continue
        verb, path = parts[1], parts[2].split("?")[0]
        segments = [p for p in path.split("/") if p]
        kind = next((p for p in ("pods", "secrets", "networkpolicies") if p in segments), "")
        if kind and verb in ("POST", "DELETE"):
            counts[verb, kind] = counts.get((verb, kind), 0) + 1
    return {key: n / max(1, kernels) for key, n in counts.items()}


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    run = Run(cwd=str(folder))
    kinds = {"local": LOCAL, "kubernetes": KUBERNETES}
    counts = {"local": args.starts, "kubernetes": args.starts}
    starts = await measure_starts(run, kinds, counts, warmup=True)
    kernels = {label: Kernel(run, kind) for label, kind in kinds.items()}
    try:
        for kernel in kernels.values():
            await kernel.start()
        executes = await measure_executes(
            kernels, {label: args.executes for label in kinds}, warmup=20, block=50
        )
    finally:
        for kernel in kernels.values():
            await kernel.stop()
    return {"starts": starts, "executes": executes, "kernels": args.starts + 2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--executes", type=int, default=300)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jsb-bench-k8s-") as scratch:
        folder = Path(scratch)
        folder.chmod(0o755)
        with kube_cluster(folder / "cluster", POLICY, servers=("amy",)) as cluster:
            os.environ["JUPYTER_PATH"] = str(cluster.kernelspecs)
            os.environ["JUPYTERHUB_API_TOKEN"] = cluster.hub.token("amy")
            measured = asyncio.run(measure(args, folder))
            log = cluster.double.log(size=1 << 26)
    raw = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["benchmarks/kubernetes.py", *sys.argv[1:]]),
        "host": report.loadavg(),
        "starts": args.starts,
        "executes": args.executes,
        "measured": measured,
        "api_requests": api_requests(log, measured["kernels"]),
    }
    s = summary(measured["starts"], measured["executes"])
    text = markdown(s, raw)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"kubernetes-{raw['date']}"
    (args.out / f"{name}.md").write_text(text)
    serializable = {**raw, "api_requests": {f"{v} {k}": n for (v, k), n in
                                            raw["api_requests"].items()}, "summary": s}  # fmt: skip
    (args.out / f"{name}.json").write_text(json.dumps(serializable, indent=1))
    for suffix in (".md", ".json"):
        shutil.copyfile(args.out / f"{name}{suffix}", args.out / f"kubernetes-latest{suffix}")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
