"""The errors a kernel start can end with, worded for the person who started it.

One hierarchy, free of any web framework: each class says how it crosses the
two edges it may meet. `http_status` is what the Jupyter server answers
(`http_errors.reported` makes the tornado error at the provisioner's edge) and
`kind` names it on the sandbox service's wire (`KINDS`, the one table both ends
use), so that a refusal reads and counts the same in-process and through the
service.
"""

from __future__ import annotations


class Error(Exception):
    """Anything this project reports to a person: the message says what to do."""

    kind = "sandbox"
    """Its name on the sandbox service's wire (see `KINDS`)."""
    http_status = 500
    """What the Jupyter server answers when a kernel start ends with it."""


class SandboxError(Error, RuntimeError):
    """A sandbox could not be created or run; the message says how to fix it."""


class ImageError(SandboxError):
    """A guest image is missing, stale, damaged, or could not be built."""

    kind = "image"


class ServiceError(SandboxError):
    """The sandbox service cannot be reached, or answered out of turn."""


class SettingError(Error, ValueError):
    """A setting is invalid; the message names it and the accepted form."""

    kind = "setting"
    http_status = 400


class RequestError(SettingError):
    """A request to the sandbox service that it does not understand; nothing was done."""

    kind = "request"


class PolicyError(SettingError):
    """The operator's policy is invalid, or refuses what was asked."""

    kind = "policy"
    http_status = 403


class QuotaError(PolicyError):
    """A start would take a user past a per-user quota."""

    kind = "quota"


KINDS: dict[str, type[Error]] = {
    cls.kind: cls
    for cls in (SandboxError, ImageError, SettingError, RequestError, PolicyError, QuotaError)
}
"""Wire kind -> class: the service sends `error.kind`, its client raises `KINDS[kind]`."""


def kind_of(error: BaseException) -> str:
    """The wire kind of `error`: its own, or "sandbox" for anything unforeseen."""
    return error.kind if isinstance(error, Error) else SandboxError.kind
