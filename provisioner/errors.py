"""Errors a kernel start can end with, worded for the person who started it.

They are tornado HTTPErrors too: the Jupyter server then sends their message to
JupyterLab instead of "Unhandled error". Outside a server they are ordinary
RuntimeError / ValueError.
"""

from __future__ import annotations

from tornado.web import HTTPError


class _Reported(HTTPError):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(self.status, message.replace("%", "%%"))
        self.message = message
        self.args = ()  # HTTPError formats log_message % args

    def __str__(self) -> str:
        return self.message


class SandboxError(_Reported, RuntimeError):
    """A sandbox could not be created or run; the message says how to fix it."""


class SettingError(_Reported, ValueError):
    """A provisioner setting is invalid; the message names it and the accepted form."""

    status = 400
