"""The run's report: summaries, verdicts against the targets, the markdown tables, the
environment they were measured in, and the result files.

The markdown is a fragment without a `#` heading, so that the documentation's
performance page can include `results/latest.md` as it is.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends import Backend
from kernels import Kind
from measure import MIB, percentile

from provisioner import hostcmd
from provisioner.errors import Error

REPO = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
"""Where result files go by default (relative to the repository), and are committed."""


def summarize(raw: dict) -> dict[str, dict[str, float]]:
    """label -> metric -> value: medians and percentiles of the raw samples. A variant's
    starts (a label of `raw["starts"]` that is no kernel of the other measurements) get
    {"start": median, "start_vs_local": its ratio to local's, "start_vs_backend": its
    ratio to its backend's own kernels' start}."""
    s: dict[str, dict[str, float]] = {}
    for label in raw["labels"]:
        ex = raw["executes"][label]
        neighbour = raw["neighbour"][label]
        s[label] = {
            "start": statistics.median(raw["starts"][label]),
            "execute_p50": percentile(ex["idle"], 50),
            "execute_p99": percentile(ex["idle"], 99),
            "reply_p50": percentile(ex["reply"], 50),
            "reply_p99": percentile(ex["reply"], 99),
            "inside_p50": percentile(raw["inside"][label], 50),
            "throughput": statistics.median(r["mib_per_s"] for r in raw["throughput"][label]),
            "pss": raw["memory"][label]["pss"],
            "neighbour_idle_p99": percentile(neighbour["idle"], 99),
            "neighbour_loaded_p99": percentile(neighbour["loaded"], 99),
            "neighbour_hog_cores": neighbour["hog_cores"],
        }
        s[label]["neighbour_ratio"] = (
            s[label]["neighbour_loaded_p99"] / s[label]["neighbour_idle_p99"]
        )
    for label, times in raw["starts"].items():
        if label not in s and times:
            start = statistics.median(times)
            s[label] = {
                "start": start,
                "start_vs_local": start / s["local"]["start"],
                "start_vs_backend": start / s[raw["variants"][label]]["start"],
            }
    return s


def verdicts(s: dict, backends: list[Backend]) -> dict[str, dict[str, str]]:
    """backend -> metric -> PASS / MISS, for each of its targets (informational ones too);
    and variant label -> {"start": PASS / MISS} for each measured variant with a bound
    over its backend's start or local's (`Variant.versus_backend`, `versus_local`)."""
    found = {
        b.name: {
            t.metric: "PASS" if t.met(s[b.name][t.metric], s["local"][t.metric]) else "MISS"
            for t in b.targets
        }
        for b in backends
    }
    for b in backends:
        for v in b.variants:
            t = v.versus_backend or v.versus_local
            if t is not None and v.label in s:
                versus = b.name if v.versus_backend else "local"
                met = t.met(s[v.label][t.metric], s[versus][t.metric])
                found[v.label] = {t.metric: "PASS" if met else "MISS"}
    return found


def ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


def whole_ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def mib_per_s(value: float) -> str:
    return f"{value:.1f} MiB/s"


def mib(value: float | None) -> str:
    return "?" if value is None else f"{value / MIB:.1f} MiB"


def split(memory: dict) -> str:
    """PSS anon / file / shmem, in MiB."""
    sm = memory["smaps"]
    return " / ".join(f"{sm[k] / MIB:.1f}" for k in ("Pss_Anon", "Pss_File", "Pss_Shmem"))


class Tables:
    """The main table and the noisy-neighbour table of one run."""

    def __init__(self, raw: dict, s: dict, backends: list[Backend], kinds: dict[str, Kind]):
        self.raw, self.s, self.backends, self.kinds = raw, s, backends, kinds
        self.local = s["local"]
        self.verdicts = raw["verdicts"]
        self.accelerators = raw["environment"]["accelerators"]

    def target(self, backend: Backend, metric: str, titled: bool = True) -> tuple[str, str]:
        """(targets, results) of `backend` on `metric`: `gVisor ≤ 3x`, `gVisor PASS`;
        an informational target in parentheses; ("", "") if it has none."""
        for t in backend.targets:
            if t.metric != metric:
                continue
            accel = "/".join(self.accelerators.get(backend.name, [])).upper()
            name = f"{backend.title} " if titled else ""
            text, result = f"{name}{t.text(accel)}", f"{name}{self.verdicts[backend.name][metric]}"
            if t.informational:
                return f"({text}, informational)", f"({result})"
            return text, result
        return "", ""

    def line(self, name: str, local: str, cells: dict[str, tuple[str, str]],
             metric: str = "", verdict: tuple[str, str] = ("", "")) -> str:  # fmt: skip
        """A row: cells is backend -> (value, ratio), a backend missing from it gets empty
        cells; the targets and results are those of every backend on `metric`, else
        `verdict` (target, result)."""
        values = [local]
        for b in self.backends:
            values += cells.get(b.name, ("", ""))
        pairs = [self.target(b, metric) for b in self.backends] if metric else [verdict]
        targets = "; ".join(t for t, _ in pairs if t)
        results = ", ".join(r for _, r in pairs if r)
        return f"| {name} | {' | '.join(values)} | {targets} | {results} |"

    def row(self, name: str, metric: str, fmt: Callable[[float], str]) -> str:
        """A metric of every kernel, each backend's ratio to local, and its targets."""
        cells = {}
        for b in self.backends:
            value = self.s[b.name][metric]
            cells[b.name] = (fmt(value), f"{value / self.local[metric]:.2f}x")
        return self.line(name, fmt(self.local[metric]), cells, metric)

    def counts(self, key: str, unit: str = "") -> str:
        """`5` if every kernel had the same count, else `local 5, microVM 3`."""
        values = {label: self.raw["plan"][label][key] for label in self.raw["labels"]}
        if len(set(values.values())) == 1:
            return f"{values['local']}{unit}"
        return ", ".join(f"{self.kinds[label].title} {n}{unit}" for label, n in values.items())

    def variants(self) -> list[str]:
        """A row of starts for each backend's variant that was measured; one with a bound
        over its backend's start shows that ratio, the bound and its verdict."""
        lines = []
        for b in self.backends:
            for v in b.variants:
                if v.label not in self.s:
                    continue
                m = self.s[v.label]
                n = len(self.raw["starts"][v.label])
                cells = {b.name: (whole_ms(m["start"]), f"{m['start_vs_local']:.2f}x")}
                verdict = ("", "")
                t = v.versus_backend
                if t is not None:
                    verdict = (f"{t.text()} {b.title}",
                               f"{self.verdicts[v.label][t.metric]}: "
                               f"{m['start_vs_backend']:.2f}x {b.title}")  # fmt: skip
                elif v.versus_local is not None:
                    t = v.versus_local
                    verdict = (f"{t.text()} local",
                               f"{self.verdicts[v.label][t.metric]}: "
                               f"{m['start_vs_local']:.2f}x local")  # fmt: skip
                lines.append(self.line(v.row.format(n=n), "", cells, verdict=verdict))
        return lines

    def main(self) -> str:
        mem, args = self.raw["memory"], self.raw["args"]
        header = ["metric", "local"]
        for b in self.backends:
            header += [b.title, f"{b.title} / local"]
        header += ["target", "result"]
        lines = [
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 2) + ":---:|",
            self.row(
                f"start → first kernel_info_reply (median of {self.counts('starts')})",
                "start",
                whole_ms,
            ),
            *self.variants(),
            self.row(
                "execute round trip p50 (`pass`, request → reply **and** iopub idle; "
                f"n={self.counts('executes')})",
                "execute_p50",
                ms,
            ),
            self.row("execute round trip p99 (same)", "execute_p99", ms),
            self.row(
                "execute round trip p50, client started by the kernel itself, beside it "
                "(in a sandbox: no tunnel, the sandbox's own cost)",
                "inside_p50",
                ms,
            ),
            self.row("execute request → execute_reply only, p50", "reply_p50", ms),
            self.row("execute request → execute_reply only, p99", "reply_p99", ms),
            self.row(
                f"iopub throughput ({self.counts('throughput_mb', ' MiB')} stdout → idle, "
                f"median of {args['throughput_runs']}; ratio = sandbox relative to local)",
                "throughput",
                mib_per_s,
            ),
            self.row(
                "idle memory, PSS (local: kernel process tree; sandboxes: every process in "
                "the sandbox's cgroup)",
                "pss",
                mib,
            ),
            self.line(
                "idle PSS split: anon / file / shmem",
                split(mem["local"]),
                {b.name: (split(mem[b.name]), "") for b in self.backends},
            ),
            self.line(
                "sandbox cgroup's charged memory (`memory.usage_in_bytes`; v2: `memory.current`)",
                "",
                {b.name: (mib(mem[b.name]["cgroup_usage"]), "") for b in self.backends},
            ),
        ]
        outside = {
            b.name: (f"{mib(mem[b.name]['outside_pss'])} "
                     f"({', '.join(mem[b.name]['outside_names']) or '?'})", "")
            for b in self.backends if mem[b.name]["outside_pids"]
        }  # fmt: skip
        if outside:
            lines.append(
                self.line(
                    "the sandbox's host processes outside its cgroup, PSS (not counted above)",
                    "",
                    outside,
                )
            )
        return "\n".join(lines)

    def neighbour(self) -> str:
        lines = [
            "| noisy neighbour (execute p99) | idle neighbour | neighbour hogging "
            "its CPU | loaded / idle | target | result |",
            "|---|---:|---:|---:|---:|:---:|",
        ]
        for label in self.raw["labels"]:
            m = self.s[label]
            backend = self.kinds[label].backend
            target, result = ("", "") if backend is None else self.target(
                backend, "neighbour_ratio", titled=False
            )  # fmt: skip
            lines.append(
                f"| {self.kinds[label].title} (n={self.raw['neighbour'][label]['n']}) | "
                f"{m['neighbour_idle_p99'] * 1000:.2f} ms | "
                f"{m['neighbour_loaded_p99'] * 1000:.2f} ms (hog at "
                f"{m['neighbour_hog_cores']:.2f} cores) | {m['neighbour_ratio']:.2f}x | "
                f"{target} | {result} |"
            )
        return "\n".join(lines)


def markdown(raw: dict, s: dict, backends: list[Backend], kinds: dict[str, Kind],
             raw_file: str) -> str:  # fmt: skip
    """The report: a header saying where and how it was measured, then the tables. A
    fragment for inclusion: no `#` heading."""
    env = raw["environment"]
    title = " vs ".join(kinds[label].title for label in raw["labels"])
    header = [
        f"**{title}**, measured {env['date']} at git {env['git']}",
        "",
        f"- host: Linux {env['kernel']}, {env['cpus']} CPUs ({env['cpu_model']}), "
        f"Python {env['python']}",
        f"- load average (1, 5, 15 min) at start / end: {env['loadavg_start']} / "
        f"{env['loadavg_end']}",
    ]
    for b in backends:
        accel = "/".join(env["accelerators"].get(b.name, [])).upper()
        header.append(
            f"- {b.title}: {env['versions'][b.name]}" + (f", accelerator {accel}" if accel else "")
        )
    for label, image in raw.get("images", {}).items():
        header.append(
            f"- {kinds[label].title}: image `{image['name']}` imported by the run from a "
            f"{image['source_bytes'] / 1e6:.0f} MB docker-archive in "
            f"{image['build_seconds']:.0f} s (`image build`, microVM root disk included; "
            f"{image['size_bytes'] / 1e6:.0f} MB stored), removed at the end"
        )
    header.append(f"- command: `{env['command']}`; every sample in `{raw_file}`")
    if raw["args"].get("note"):
        header.append(f"- note: {raw['args']['note']}")
    tables = Tables(raw, s, backends, kinds)
    return "\n".join([*header, "", tables.main(), "", tables.neighbour(), ""])


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def output(argv: list[str], what: str) -> str:
    """The first line a host tool prints, or `?` if it cannot say."""
    try:
        return (hostcmd.run(argv, what).splitlines() or ["?"])[0].strip()
    except Error:
        return "?"


def environment(argv: list[str], backends: list[Backend]) -> dict[str, Any]:
    """Where the run happens: the host, the load, the commit, each backend's runtime."""
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = ["git", "-C", str(REPO)]
    # The result files of earlier runs, not yet committed, are not changes to what is measured.
    changes = output([*git, "status", "--porcelain", "--", ".", f":!{RESULTS}"], "git status")
    dirty = " (uncommitted changes)" if changes not in ("", "?") else ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": output([*git, "rev-parse", "--short", "HEAD"], "git rev-parse") + dirty,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg_start": loadavg(),
        "command": shlex.join(["python", *argv]),
        "versions": {b.name: output(b.version, f"{b.title}'s version") for b in backends},
    }


def result_name(raw: dict) -> str:
    """`2026-12-07-gvisor`: the run's (UTC) day and its backends. A later run of the same
    backends on the same day replaces the earlier one's files."""
    return f"{raw['environment']['date'][:10]}-{'-'.join(raw['backends'])}"


def write(out: Path, name: str, raw: dict, text: str) -> list[Path]:
    """`<out>/<name>.md` and `.json` (every raw sample), and the same as `latest.md` and
    `latest.json` beside them (what the documentation includes). Returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(raw, indent=1, default=str) + "\n"
    files = []
    for stem in (name, "latest"):
        for suffix, content in ((".md", text), (".json", data)):
            path = out / f"{stem}{suffix}"
            path.write_text(content)
            files.append(path)
    return files
