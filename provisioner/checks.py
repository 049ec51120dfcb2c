"""A check of the host, as `jupyter sandbox doctor` reports it (doctor.py runs them; each
backend contributes its own, `Backend.checks`)."""

from __future__ import annotations

from dataclasses import dataclass

INSTALL = "run `make setup` in the jupyter-sandbox checkout (or `bash scripts/install-host.sh`)"
"""How to install what a check found missing."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    """How to fix a failure, for the operator."""
