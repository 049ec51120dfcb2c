"""The attack table (docs/attacks.md), written by the security suite from its own results.

Each attack test carries `@pytest.mark.attack(category, what)` and says, through the
`verdict` fixture, why the attack failed (or, for a microVM, where it harmlessly
landed). Only when asked (`--attack-table=PATH`, which `make security-report` passes)
is an `AttackTable` registered: it collects one row per attack, one column per
target (`COLUMNS`: each backend, and gVisor on an imported image), and writes the
page at the end of the run. A plain test run writes nothing:
the page is tracked, and a test run must leave the tree as it found it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from provisioner import hostcmd
from provisioner.errors import Error

COLUMNS = {"gvisor": "gVisor", "microvm": "microVM", "gvisor-imported": "gVisor, imported image"}
"""The table's columns: the security suite's targets (security.kit.TARGETS) by test id."""
BACKENDS = ("gvisor", "microvm")
CATEGORIES = ("files", "secrets", "network", "processes", "resources", "tunnel", "audit")
REPO = Path(__file__).resolve().parent.parent

PAGE = """\
# Attacks on the sandboxes

<!-- Written by `make security-report` (tests/attack_report.py): do not edit by hand. -->

The security suite (`tests/security/`, and the firewall's attacks in
`tests/test_network.py`) attacks a real sandboxed kernel of each backend through the
ordinary execute path; the threat model is in SECURITY.md. Each cell is the reason
the attack failed, as the test observed it. {written}

The third column attacks a gVisor kernel on an *imported* image, brought the way an
operator brings their own: the default image's root filesystem as one layer plus a
layer of the test's own, saved as a docker-archive (what `docker save` writes), built
with `jupyter sandbox image build NAME --from docker-archive:FILE`, and its Python
kernel installed with `jupyter sandbox kernelspec install --image NAME`. "not run"
there marks the attacks that start their own kernels of each backend on the default
image (resource exhaustion beside a neighbour, set-id programs in a root workspace,
the auditing tools, the firewall).

{table}
"""


def column_of(item: pytest.Item) -> str:
    """The column of a test's result: its target's id if it ran from one, else the backend
    its parameters name (a kernelspec such as "python3-microvm"), else gVisor."""
    params = [str(v) for v in getattr(getattr(item, "callspec", None), "params", {}).values()]
    for text in params:
        if text in COLUMNS:
            return text
    for text in params:
        for backend in BACKENDS:
            if backend in text:
                return backend
    return "gvisor"


def table(rows: dict[str, dict]) -> str:
    """The markdown table of `rows` (attack id -> {"category", "what", "results":
    {column: text}}), ordered by category, then attack."""
    lines = [
        "| # | category | attack | " + " | ".join(COLUMNS.values()) + " |",
        "|---:|---|---|" + "---|" * len(COLUMNS),
    ]
    ordered = sorted(rows.values(), key=lambda r: (CATEGORIES.index(r["category"]), r["what"]))
    for n, row in enumerate(ordered, 1):
        cells = [row["results"].get(c, "not run") for c in COLUMNS]
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
        lines.append(f"| {n} | {row['category']} | {row['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def written() -> str:
    """`Written on 2026-12-07 at git abc1234.`"""
    try:
        commit = hostcmd.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], "git").strip()
    except Error:
        commit = "?"
    return f"Written on {datetime.date.today().isoformat()} at git {commit}."


class AttackTable:
    """A pytest plugin: the results of the attacks run, written to `path` at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        """attack id -> {"category", "what", "results": {column: text}}"""

    def record(self, item: pytest.Item, outcome: str, longrepr: str = "") -> None:
        """Note an attack test's result: its verdict if it passed, else why not."""
        marker = item.get_closest_marker("attack")
        if marker is None:
            return
        category, what = marker.args
        assert category in CATEGORIES, f"unknown attack category {category!r}"
        row = self.rows.setdefault(
            getattr(item, "originalname", item.name),
            {"category": category, "what": what, "results": {}},
        )
        if outcome == "passed":
            text = getattr(item, "attack_verdict", "") or "failed as expected"
        elif outcome == "skipped":
            text = "not run: " + longrepr.splitlines()[-1][:120] if longrepr else "not run"
        else:
            text = "**ATTACK NOT STOPPED / TEST FAILED**"
        row["results"][column_of(item)] = text

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.record(item, report.outcome, str(report.longrepr or ""))
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.rows:
            self.path.write_text(PAGE.format(written=written(), table=table(self.rows)))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.rows:
            terminalreporter.write_line(f"attack table ({len(self.rows)} attacks): {self.path}")
