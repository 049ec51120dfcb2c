#!/usr/bin/env python
"""Benchmark the sandboxed kernels against the local one, in the same run, as ratios.

    sudo .venv/bin/python benchmarks/run.py [--backends gvisor,microvm] [--starts 5]
        [--executes 1000] [--throughput-mb 50] [--microvm-starts 3] [--microvm-executes 200]
        [--microvm-throughput-mb 10] [--no-imported] [--out benchmarks/results]

Measures, for the kernelspecs `python3` (local, unsandboxed) and those of `--backends`
(`python3-gvisor`, `python3-microvm`; the list is `backends.BACKENDS`):

- start: `AsyncKernelManager.start_kernel()` until `client.wait_for_ready()` returns
  (the first kernel_info_reply), median of `--starts` starts; with gVisor, also the
  same start through the sandbox service (`jupyter sandbox serve`, started for the run);
  with gVisor, also the same start on an imported image (unless `--no-imported`): the
  run imports the default image plus a layer through a docker-archive (imported.py)
  before any start, installs its kernel with `kernelspec install --image`, and removes
  the image at its end, whatever happens; its ratio to gVisor's start on the default
  image has a target (within 10%);
  with the microVM, also the same start booted instead of restored from its shape's
  snapshot (`snapshots = False`, `--microvm-boot-starts` of them);
- execute round trip: `execute_request` for `pass` until both its `execute_reply`
  (shell) and its `status: idle` (iopub) have arrived, p50 and p99; the reply alone
  is reported too;
- iopub throughput: a cell printing `--throughput-mb` MiB to stdout, until its
  `status: idle`, every byte of the stream counted;
- the same execute round trip from a client the kernel starts beside itself (inside
  its sandbox): the part of the ratio the sandbox costs without the tunnel;
- idle memory: PSS of the kernel's processes (see README.md for what is counted);
- noisy neighbour: a kernel's execute round trip p99 while a second kernel of the
  same kind runs `while True: pass` (at its cpu_limit, 1 core by default), against
  its own p99 with the second kernel idle.

The microVM backend is slow under TCG (a start takes 15-30 s, an execute 50-150 ms),
so it gets its own, smaller counts (`--microvm-*`); its ratios are still against the
same local kernel. Measurements are interleaved (alternating starts, alternating
blocks of executes, alternating floods) so that load from elsewhere on the machine
hits every kernel alike.
Prints a markdown table and writes it with every raw sample to `<out>/<day>-<backends>.md`
and `.json`, copied to `<out>/latest.md` and `latest.json`. Every kernel is shut down,
and the script checks that none of its sandboxes is left behind.

The modules beside this one: backends (what is known of each backend), kernels
(starting and driving them; the run's state), imported (the imported image), measure,
memory, report, leftovers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import leftovers
import report
from backends import BACKENDS, Backend, Variant, by_name
from imported import IMPORTED, imported_kernel
from kernels import Kernel, Kind, Run, kinds, sandbox_service
from measure import (
    measure_executes,
    measure_inside,
    measure_neighbour,
    measure_starts,
    measure_throughput,
)
from memory import measure_memory
from provisioner.guest.layout import KERNEL_UID

COUNTS = ("starts", "executes", "throughput_mb", "neighbour_executes")
"""What the plan counts for each kernel; each is an option (`--starts`...)."""


def plan(args: argparse.Namespace, backends: list[Backend]) -> dict[str, dict[str, int]]:
    """label -> count -> how many of each measurement each kernel gets: the common
    options' counts, or those of a backend's own options (`Backend.counts`)."""
    counts = {"local": {key: getattr(args, key) for key in COUNTS}}
    for b in backends:
        counts[b.name] = {key: getattr(args, b.counts.get(key, key)) for key in COUNTS}
    return counts


def variant_starts(
    args: argparse.Namespace, backends: list[Backend], counts: dict[str, dict[str, int]]
) -> dict[str, int]:
    """label -> starts, for each backend's variant: its option's count, else as many as
    its backend's starts (none where its option says 0, or its skip option is given)."""
    starts = {}
    for b in backends:
        for variant in b.variants:
            if variant.skip_option and getattr(args, variant.skip_option):
                continue
            option = variant.count_option
            n = getattr(args, option) if option else counts[b.name]["starts"]
            if n > 0:
                starts[variant.label] = n
    return starts


def imports(args: argparse.Namespace, backends: list[Backend]) -> list[Variant]:
    """The variants measured in this run that start kernels on an image the run imports."""
    measured = variant_starts(args, backends, plan(args, backends))
    return [v for b in backends for v in b.variants if v.image and v.label in measured]


async def benchmark(args: argparse.Namespace, run: Run, backends: list[Backend]) -> dict:
    """Every measurement, in order; the raw samples."""
    labels = ["local", *(b.name for b in backends)]
    known: dict[str, Kind] = kinds(backends)
    counts = plan(args, backends)

    def each(key: str) -> dict[str, int]:
        return {label: counts[label][key] for label in labels}

    def said(key: str) -> str:
        return ", ".join(f"{label} {n}" for label, n in each(key).items())

    raw: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "labels": labels,
        "backends": [b.name for b in backends],
        "plan": counts,
        "variants": {v.label: b.name for b in backends for v in b.variants},
    }
    print(f"starts ({said('starts')}), alternating", file=sys.stderr)
    starts = {**each("starts"), **variant_starts(args, backends, counts)}
    if any(known[label].via_service for label in starts):
        with sandbox_service(run):
            raw["starts"] = await measure_starts(run, known, starts, not args.no_warmup)
    else:
        raw["starts"] = await measure_starts(run, known, starts, not args.no_warmup)

    kernels: dict[str, Kernel] = {}
    try:
        for label in labels:
            kernel = Kernel(run, known[label])
            kernels[label] = kernel
            await kernel.start()
        await asyncio.sleep(args.settle)
        print("memory", file=sys.stderr)
        raw["memory"] = {label: measure_memory(k) for label, k in kernels.items()}
        print(f"executes ({said('executes')})", file=sys.stderr)
        raw["executes"] = await measure_executes(
            kernels, each("executes"), args.warmup_executes, args.block
        )
        print(f"executes from inside each kernel ({said('executes')})", file=sys.stderr)
        raw["inside"] = {
            label: await measure_inside(kernel, counts[label]["executes"], args.warmup_executes)
            for label, kernel in kernels.items()
        }
        print(
            f"throughput (MiB: {said('throughput_mb')}) x {args.throughput_runs}", file=sys.stderr
        )
        raw["throughput"] = await measure_throughput(
            kernels, each("throughput_mb"), args.throughput_runs
        )
    finally:
        for kernel in kernels.values():
            await kernel.stop()
    print(f"noisy neighbour (executes per phase: {said('neighbour_executes')})", file=sys.stderr)
    raw["neighbour"] = {
        label: await measure_neighbour(run, known[label], n, args.warmup_executes)
        for label, n in each("neighbour_executes").items()
    }
    return raw


async def amain(args: argparse.Namespace, run: Run, backends: list[Backend]) -> dict:
    """`benchmark`, cancelled (its kernels shut down on the way out) by SIGTERM."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await benchmark(args, run, backends)


def backend_list(text: str) -> list[str]:
    names = [b.name for b in BACKENDS]
    chosen = list(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    unknown = [b for b in chosen if b not in names]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(names)}, got {text!r}"
        )
    return chosen


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM outside the event loop (while an image is imported or removed): unwind as
    Ctrl-C does, so that whatever the run made is removed."""
    raise KeyboardInterrupt


def parser() -> argparse.ArgumentParser:
    names = ",".join(b.name for b in BACKENDS)
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--backends",
        type=backend_list,
        default=[b.name for b in BACKENDS],
        help=f"sandboxed kernels to measure besides local, comma-separated (default: {names})",
    )
    p.add_argument("--starts", type=int, default=5, help="starts of each kernel (median)")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="count the first start too (by default one uncounted start each)",
    )
    p.add_argument("--executes", type=int, default=1000, help="timed executes per kernel")
    p.add_argument(
        "--warmup-executes",
        type=int,
        default=50,
        help="untimed executes per kernel first (and before each noisy-neighbour run)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=100,
        help="executes per kernel before switching to the next kernel (scaled down for "
        "kernels with fewer executes)",
    )
    p.add_argument("--throughput-mb", type=int, default=50, help="MiB printed per run")
    p.add_argument(
        "--neighbour-executes", type=int, default=500, help="executes per phase of the neighbour"
    )
    p.add_argument("--throughput-runs", type=int, default=3, help="runs per kernel (median)")
    p.add_argument(
        "--microvm-starts", type=int, default=3, help="starts of the microVM kernel (median)"
    )
    p.add_argument(
        "--microvm-boot-starts",
        type=int,
        default=1,
        help="starts of the microVM kernel booted, not restored from a snapshot (0: none)",
    )
    p.add_argument(
        "--no-imported",
        action="store_true",
        help=f"no gVisor starts on an imported image (by default the run imports {IMPORTED}, "
        "the default image plus a layer through a docker-archive, and removes it at its end)",
    )
    p.add_argument(
        "--microvm-executes",
        type=int,
        default=200,
        help="timed executes of the microVM kernel, and per phase of its neighbour",
    )
    p.add_argument(
        "--microvm-throughput-mb",
        type=int,
        default=10,
        help="MiB the microVM kernel prints per run",
    )
    p.add_argument(
        "--settle", type=float, default=2.0, help="seconds between ready and the memory reading"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=report.REPO / report.RESULTS,
        help="folder for the result files: <day>-<backends>.md and .json, and their copies "
        f"latest.md and latest.json (default: {report.RESULTS})",
    )
    p.add_argument("--note", default="", help="free text for the report's header")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parser()
    args = options.parse_args(argv)
    counts = [args.starts, args.executes, args.throughput_mb, args.throughput_runs]
    counts += [args.neighbour_executes, args.block, args.microvm_starts]
    counts += [args.microvm_executes, args.microvm_throughput_mb]
    if min(counts) < 1:
        options.error("every count must be at least 1")
    backends = by_name(args.backends)

    env = report.environment(["benchmarks/run.py", *argv], backends)
    run = Run(cwd=tempfile.mkdtemp(prefix="jsb-bench-"))
    # as a notebook folder: the sandboxed kernel runs as its owner
    os.chown(run.cwd, KERNEL_UID, KERNEL_UID)
    raw: dict | None = None
    left: list[str] = []
    images: dict[str, dict] = {}
    signal.signal(signal.SIGTERM, interrupted)
    try:
        with contextlib.ExitStack() as stack:  # the imported images, removed at the end
            for variant in imports(args, backends):
                images[variant.label] = stack.enter_context(
                    imported_kernel(variant.image, variant.kernelspec)
                )
            try:
                raw = asyncio.run(amain(args, run, backends))
            finally:
                signal.signal(signal.SIGTERM, interrupted)  # asyncio.run put back the default
                left = leftovers.check(run.sandboxes)
                if left:
                    print(f"ERROR: sandboxes left behind (now force-removed): {left}",
                          file=sys.stderr)  # fmt: skip
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        raw = None
    finally:
        shutil.rmtree(run.cwd, ignore_errors=True)
    if raw is None or left:
        return 1

    env["loadavg_end"] = report.loadavg()
    env["accelerators"] = {name: sorted(found) for name, found in run.accelerators.items()}
    env["sandboxes"] = sorted(run.sandboxes)
    raw["environment"] = env
    raw["images"] = images
    s = report.summarize(raw)
    raw["summary"] = s
    raw["verdicts"] = report.verdicts(s, backends)
    name = report.result_name(raw)
    text = report.markdown(raw, s, backends, kinds(backends), f"{name}.json")
    print(text)
    files = report.write(args.out, name, raw, text)
    print(f"written: {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
