"""Sphinx configuration of jupyter-sandbox's documentation (`make docs`).

Sphinx with MyST-Parser and the PyData theme, as jupyter_client and JupyterHub build
theirs: pages stay Markdown that GitHub renders too, readers of Jupyter's own docs
find the same layout, and a Sphinx extension can render the configuration reference
straight from the settings' declarations (`_ext/settings_reference.py`), which
MkDocs could do only through a separate generator.

`make docs` builds with `-W --keep-going -n`: any warning, a broken cross-reference
included, fails the build, and `make test` runs it.
"""

from __future__ import annotations

import sys
from importlib.metadata import version as installed_version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "jupyter-sandbox"
author = "the jupyter-sandbox developers"
copyright = "the jupyter-sandbox developers, BSD-3-Clause"
release = version = installed_version("jupyter-sandbox")

extensions = ["myst_parser", "settings_reference"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
highlight_language = "text"
"""Code blocks without a language (diagrams, command lines) are not coloured as Python."""
myst_heading_anchors = 3
"""Headings down to ### get anchors, so that pages may link `page.md#a-heading`."""

html_theme = "pydata_sphinx_theme"
html_title = "jupyter-sandbox"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_sidebars = {"**": []}
"""No left sidebar: every page is at the top level, listed in the header."""
