"""Field checks shared by every kind: names, labels, quantities, with the real messages.

A `Problems` collects causes as the API server's validation does (it reports
every problem at once) and raises one 422 Invalid at the end.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema
import referencing
from kubernetes_validate import utils as schemas

from .meta import Cause, bad_request, invalid
from .selectors import LABEL_KEY, LABEL_VALUE

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
MAX_ANNOTATIONS = 256 * 1024

_SUFFIXES = {
    "": 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(
    r"^([+-]?[0-9.]+)(e[+-]?[0-9]+|E[+-]?[0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
)


SCHEMA_VERSION = "1.31.0"
"""The Kubernetes version whose OpenAPI schemas the bodies are decoded against (the
version the double's /version claims)."""


@functools.cache
def _validator(kind: str, api_version: str) -> Any:
    """A JSON schema validator of `kind` (kubernetes-validate's copy of the official
    schemas, non-strict: unknown fields are let through, as the server drops them)."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{SCHEMA_VERSION}-local"
    schema = schemas.schema_contents(
        f"{folder}/{kind.lower()}-{group_version}.json", SCHEMA_VERSION
    )
    definitions = schemas.schema_contents(f"{folder}/_definitions.json", SCHEMA_VERSION)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def decode(obj: dict[str, Any]) -> None:
    """Refuse, as the server's JSON decoding does (400), a body whose fields have the wrong
    types; a missing required field is validation's business (422), not decoding's."""
    kind, api_version = obj["kind"], obj["apiVersion"]
    for error in _validator(kind, api_version).iter_errors(obj):
        if error.validator == "type":
            where = ".".join(str(p) for p in error.absolute_path)
            raise bad_request(
                f'{kind} in version "{api_version.split("/")[-1]}" cannot be '
                f"handled as a {kind}: {where}: {error.message}"
            )


def quantity(value: Any) -> Decimal:
    """A resource quantity ("64Mi", "500m", "1.5", 2) as a number; ValueError if it is none."""
    if isinstance(value, bool):
        raise ValueError("quantities must match the regular expression")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(
            "quantities must match the regular expression "
            "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
        )
    number, suffix = match.groups()
    try:
        base = Decimal(number)
    except InvalidOperation:
        raise ValueError("unable to parse quantity's suffix") from None
    if suffix and suffix[0] in "eE" and len(suffix) > 1:
        return base * Decimal(10) ** int(suffix[1:])
    return base * Decimal(_SUFFIXES[suffix or ""])


class Problems:
    """Causes of an invalid object, raised together by `check`."""

    def __init__(self) -> None:
        self.causes: list[Cause] = []

    def required(self, field: str, detail: str = "") -> None:
        self.causes.append(
            Cause(field, "FieldValueRequired", "Required value" + (f": {detail}" if detail else ""))
        )

    def bad(self, field: str, value: Any, detail: str) -> None:
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        self.causes.append(Cause(field, "FieldValueInvalid", f"Invalid value: {shown}: {detail}"))

    def unsupported(self, field: str, value: Any, supported: list[str], why: str = "") -> None:
        options = ", ".join(f'"{s}"' for s in supported)
        message = f'Unsupported value: "{value}": supported values: {options}'
        self.causes.append(Cause(field, "FieldValueNotSupported", message + why))

    def forbidden(self, field: str, detail: str) -> None:
        self.causes.append(Cause(field, "FieldValueForbidden", f"Forbidden: {detail}"))

    def duplicate(self, field: str, value: Any) -> None:
        self.causes.append(Cause(field, "FieldValueDuplicate", f'Duplicate value: "{value}"'))

    def check(self, kind: str, name: str, group: str = "") -> None:
        if self.causes:
            raise invalid(kind, name, self.causes, group)

    # -- common fields -------------------------------------------------------------------

    def dns_label(self, field: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            self.required(field)
        elif len(value) > 63 or not DNS1123_LABEL.match(value):
            self.bad(
                field,
                value,
                "a lowercase RFC 1123 label must consist of lower case "
                "alphanumeric characters or '-', and must start and end with an "
                "alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
            )

    def dns_subdomain(self, field: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            self.required(field, "name or generateName is required")
        elif len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
            self.bad(
                field,
                value,
                "a lowercase RFC 1123 subdomain must consist of lower case "
                "alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character (e.g. 'example.com', regex used for validation "
                "is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
            )

    def metadata(self, meta: Any) -> None:
        """labels and annotations of any object (its name is the caller's)."""
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict):
            self.bad("metadata.labels", labels, "must be a map of strings")
            labels = {}
        for key, value in labels.items():
            if not LABEL_KEY.match(key):
                self.bad(
                    "metadata.labels",
                    key,
                    "name part must consist of alphanumeric characters, '-', '_' or '.'",
                )
            if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
                self.bad(
                    "metadata.labels",
                    value,
                    "a valid label must be an empty string or "
                    "consist of alphanumeric characters, '-', '_' or '.', and must start "
                    "and end with an alphanumeric character",
                )
        annotations = meta.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            self.bad("metadata.annotations", "", "must be a map of strings")
        elif sum(len(k) + len(v) for k, v in annotations.items()) > MAX_ANNOTATIONS:
            self.causes.append(
                Cause(
                    "metadata.annotations",
                    "FieldValueTooLong",
                    "Too long: must have at most 262144 bytes",
                )
            )

    def quantity(self, field: str, value: Any) -> Decimal | None:
        try:
            return quantity(value)
        except ValueError as e:
            self.bad(field, value, str(e))
            return None

    def label_selector(self, field: str, selector: Any) -> None:
        """A `metav1.LabelSelector` object."""
        if selector is None:
            return
        if not isinstance(selector, dict):
            self.bad(field, selector, "must be a label selector")
            return
        for key, value in (selector.get("matchLabels") or {}).items():
            if (
                not LABEL_KEY.match(key)
                or not isinstance(value, str)
                or not LABEL_VALUE.match(value)
            ):
                self.bad(f"{field}.matchLabels", f"{key}={value}", "invalid label")
        for i, expression in enumerate(selector.get("matchExpressions") or []):
            where = f"{field}.matchExpressions[{i}]"
            operator = expression.get("operator") if isinstance(expression, dict) else None
            if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
                self.unsupported(
                    f"{where}.operator", operator, ["In", "NotIn", "Exists", "DoesNotExist"]
                )
                continue
            if not LABEL_KEY.match(str(expression.get("key", ""))):
                self.bad(f"{where}.key", expression.get("key"), "invalid label key")
            values = expression.get("values") or []
            if operator in ("In", "NotIn") and not values:
                self.required(
                    f"{where}.values", "must be specified when `operator` is 'In' or 'NotIn'"
                )
            if operator in ("Exists", "DoesNotExist") and values:
                self.forbidden(
                    f"{where}.values",
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                )
