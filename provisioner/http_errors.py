"""The provisioner's edge with the Jupyter server: core errors as tornado HTTP errors.

jupyter_server answers a kernel start that raised a tornado `HTTPError` with
its status and message, and anything else with "Unhandled error". The core's
errors (`errors.py`) know nothing of tornado; here each is re-raised as an
instance of a class that is both the original class and an `HTTPError`, so a
caller catching `SandboxError` (nbclient, a test, jupyter_client alone) still
does, and JupyterLab shows the message.
"""

from __future__ import annotations

import functools

from tornado.web import HTTPError

from .errors import Error


@functools.cache
def _reported_class(cls: type[Error]) -> type[Error]:
    def __str__(self: Error) -> str:  # HTTPError's own would prefix the status
        return self.message  # type: ignore[attr-defined]

    return type(cls.__name__, (cls, HTTPError), {"__str__": __str__, "__module__": cls.__module__})


def reported(error: Error) -> Error:
    """`error` as an exception of the same class that is also a tornado HTTPError with the
    class's `http_status`; its message is the same (HTTPError would %-format it: escaped)."""
    cls = _reported_class(type(error))
    message = str(error)
    made = cls.__new__(cls)
    HTTPError.__init__(made, error.http_status, message.replace("%", "%%"))  # type: ignore[arg-type]
    made.message = message  # type: ignore[attr-defined]
    made.args = ()  # HTTPError formats log_message % args
    made.__cause__, made.__traceback__ = error.__cause__, error.__traceback__
    return made
