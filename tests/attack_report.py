"""The attack table in SECURITY.md, written by the security suite from its own results.

Each attack test carries `@pytest.mark.attack(category, what)` and says, through the
`verdict` fixture, why the attack failed (or, for a microVM, where it harmlessly
landed). After a run that covered the whole suite the table between the markers in
SECURITY.md is rewritten: one row per attack, one column per backend.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SECURITY_MD = Path(__file__).resolve().parent.parent / "SECURITY.md"
BEGIN, END = "<!-- attack-table:begin -->", "<!-- attack-table:end -->"
SUITE = Path(__file__).resolve().parent / "security"
BACKEND_NAMES = {"gvisor": "gVisor", "microvm": "microVM"}
CATEGORIES = ("files", "secrets", "network", "processes", "resources", "tunnel", "audit")

_rows: dict[str, dict] = {}
"""attack id -> {"category", "what", "results": {backend: text}}"""


def backend_of(item: pytest.Item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    for value in params.values():
        text = str(value)
        for backend in BACKEND_NAMES:
            if backend in text:
                return backend
    return "gvisor"


def record(item: pytest.Item, outcome: str, longrepr: str = "") -> None:
    """Note an attack test's result: its verdict if it passed, else why not."""
    marker = item.get_closest_marker("attack")
    if marker is None:
        return
    category, what = marker.args
    assert category in CATEGORIES, f"unknown attack category {category!r}"
    row = _rows.setdefault(
        item.originalname if hasattr(item, "originalname") else item.name,
        {"category": category, "what": what, "results": {}},
    )
    if outcome == "passed":
        text = getattr(item, "attack_verdict", "") or "failed as expected"
    elif outcome == "skipped":
        text = "not run: " + longrepr.splitlines()[-1][:120] if longrepr else "not run"
    else:
        text = "**ATTACK NOT STOPPED / TEST FAILED**"
    row["results"][backend_of(item)] = text


def covers_whole_suite(config: pytest.Config) -> bool:
    """Only a run of every attack may rewrite the table."""
    if config.option.keyword or config.option.markexpr or getattr(config.option, "lf", False):
        return False
    args = [Path(a.split("::")[0]).resolve() for a in config.args] or [SUITE.parent]
    return any(a.is_dir() and (a == SUITE or a in SUITE.parents) for a in args)


def table() -> str:
    backends = list(BACKEND_NAMES)
    lines = [
        "| # | category | attack | " + " | ".join(BACKEND_NAMES[b] for b in backends) + " |",
        "|---:|---|---|" + "---|" * len(backends),
    ]
    ordered = sorted(_rows.values(), key=lambda r: (CATEGORIES.index(r["category"]), r["what"]))
    for n, row in enumerate(ordered, 1):
        cells = [row["results"].get(b, "not run") for b in backends]
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
        lines.append(f"| {n} | {row['category']} | {row['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(config: pytest.Config) -> None:
    if not _rows or not covers_whole_suite(config) or not SECURITY_MD.exists():
        return
    text = SECURITY_MD.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return
    block = f"{BEGIN}\n{table()}\n{END}"
    SECURITY_MD.write_text(pattern.sub(lambda _: block, text))
