"""jupyter-sandbox: Jupyter kernel provisioners that run every kernel in a sandbox."""

__version__ = "0.1.0"
"""The distribution's version, defined here only (pyproject.toml reads it)."""
