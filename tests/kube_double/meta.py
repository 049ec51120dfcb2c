"""What every part of the double shares: API errors as `Status` objects, and timestamps.

An `ApiError` carries what a real API server would answer (HTTP code, `reason`,
message, `details`); the HTTP layer turns it into a `kind: Status` body, and a
watch into an ERROR event. The messages follow the real server's wording so that
a client's error handling is exercised with what it will meet on a cluster.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any


def now() -> str:
    """The current time as Kubernetes writes a `metav1.Time`: RFC 3339, whole seconds, UTC."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def later(seconds: float) -> str:
    """`now()` plus `seconds` (a deletion's `deletionTimestamp`)."""
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Cause:
    """One problem of an invalid object (`details.causes[]` of a 422)."""

    field: str
    reason: str
    message: str


@dataclass
class ApiError(Exception):
    """A request refused as the real API server would refuse it."""

    code: int
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"

    def status(self) -> dict[str, Any]:
        """The `kind: Status` object of this error."""
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _group_kind(plural: str, group: str) -> str:
    return f"{plural}.{group}" if group else plural


def _details(plural: str, name: str, group: str) -> dict[str, Any]:
    return {"name": name, **({"group": group} if group else {}), "kind": plural}


def not_found(plural: str, name: str, group: str = "") -> ApiError:
    message = f'{_group_kind(plural, group)} "{name}" not found'
    return ApiError(404, "NotFound", message, _details(plural, name, group))


def already_exists(plural: str, name: str, group: str = "") -> ApiError:
    message = f'{_group_kind(plural, group)} "{name}" already exists'
    return ApiError(409, "AlreadyExists", message, _details(plural, name, group))


def conflict(plural: str, name: str, why: str, group: str = "") -> ApiError:
    message = f'Operation cannot be fulfilled on {_group_kind(plural, group)} "{name}": {why}'
    return ApiError(409, "Conflict", message, _details(plural, name, group))


def invalid(kind: str, name: str, causes: list[Cause], group: str = "") -> ApiError:
    """422: what the real validation says, one cause per field."""
    what = "; ".join(f"{c.field}: {c.message}" for c in causes)
    if len(causes) > 1:
        what = "[" + ", ".join(f"{c.field}: {c.message}" for c in causes) + "]"
    details: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "causes": [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes],
    }
    if group:
        details["group"] = group
    return ApiError(
        422, "Invalid", f'{kind}{"." + group if group else ""} "{name}" is invalid: {what}', details
    )


def forbidden(message: str, plural: str, name: str = "", group: str = "") -> ApiError:
    details = {
        "kind": plural,
        **({"name": name} if name else {}),
        **({"group": group} if group else {}),
    }
    return ApiError(403, "Forbidden", message, details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")
