"""Label and field selectors: the query strings of list and watch, and `LabelSelector` objects.

Label selectors take the real grammar: `a=b`, `a==b`, `a!=b`, `a`, `!a`,
`a in (x,y)`, `a notin (x,y)`, joined by commas; every requirement must hold.
Field selectors take `f=v`, `f==v`, `f!=v` on the fields the real server
supports for that resource (`FIELDS`); any other field is refused as there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .meta import bad_request

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(
    rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$"
)
LABEL_VALUE = re.compile(rf"^({_NAME})?$")
MAX_SELECTOR = 4096


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str
    """One of "=", "!=", "in", "notin", "exists", "!"."""
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        if self.op in ("!=", "notin"):
            return not present or labels[self.key] not in self.values
        return present if self.op == "exists" else not present


@dataclass(frozen=True)
class LabelSelector:
    """All of `requirements` (none: everything); `nothing` matches no object at all."""

    requirements: tuple[Requirement, ...] = ()
    nothing: bool = False

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.nothing:
            return False
        return all(r.matches(labels or {}) for r in self.requirements)


EVERYTHING = LabelSelector()


def _check_key(key: str) -> str:
    if not LABEL_KEY.match(key) or len(key) > 317:
        raise bad_request(f"unable to parse requirement: invalid label key {key!r}")
    return key


def _check_value(value: str) -> str:
    if not LABEL_VALUE.match(value):
        raise bad_request(f"unable to parse requirement: invalid label value: {value!r}")
    return value


def _split_top(text: str) -> list[str]:
    """Split at the commas that are not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


_SET = re.compile(r"^\s*(\S+)\s+(in|notin)\s*\((.*)\)\s*$")
_EQUALITY = re.compile(r"^\s*([^\s!=]+)\s*(==|=|!=)\s*(\S*)\s*$")


def parse_labels(text: str | None) -> LabelSelector:
    """A `labelSelector` query string; 400 BadRequest if it does not parse."""
    if not text or not text.strip():
        return EVERYTHING
    if len(text) > MAX_SELECTOR:
        raise bad_request("labelSelector: too long")
    requirements = []
    for part in _split_top(text):
        if match := _SET.match(part):
            key, op, inner = match.groups()
            values = frozenset(_check_value(v.strip()) for v in inner.split(","))
            requirements.append(Requirement(_check_key(key), op, values))
        elif match := _EQUALITY.match(part):
            key, op, value = match.groups()
            op = "=" if op == "==" else op
            requirements.append(Requirement(_check_key(key), op, frozenset({_check_value(value)})))
        elif (stripped := part.strip()).startswith("!"):
            requirements.append(Requirement(_check_key(stripped[1:].strip()), "!"))
        elif stripped:
            requirements.append(Requirement(_check_key(stripped), "exists"))
        else:
            raise bad_request(f"unable to parse requirement: empty requirement in {text!r}")
    return LabelSelector(tuple(requirements))


def from_object(selector: Mapping[str, Any] | None) -> LabelSelector:
    """A `metav1.LabelSelector` (matchLabels, matchExpressions). None selects nothing, `{}`
    everything, as in NetworkPolicy peers. The object was validated at admission."""
    if selector is None:
        return LabelSelector(nothing=True)
    requirements = [
        Requirement(k, "=", frozenset({v})) for k, v in (selector.get("matchLabels") or {}).items()
    ]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expression in selector.get("matchExpressions") or []:
        requirements.append(
            Requirement(
                expression["key"],
                ops[expression["operator"]],
                frozenset(expression.get("values") or ()),
            )
        )
    return LabelSelector(tuple(requirements))


# -- field selectors -----------------------------------------------------------------


def _path(*keys: str) -> Callable[[Mapping[str, Any]], str]:
    def get(obj: Mapping[str, Any]) -> str:
        value: Any = obj
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, bool):
            return "true" if value else "false"
        return "" if value is None else str(value)

    return get


_COMMON = {
    "metadata.name": _path("metadata", "name"),
    "metadata.namespace": _path("metadata", "namespace"),
}
FIELDS: dict[str, dict[str, Callable[[Mapping[str, Any]], str]]] = {
    "pods": {
        **_COMMON,
        "spec.nodeName": _path("spec", "nodeName"),
        "spec.restartPolicy": _path("spec", "restartPolicy"),
        "spec.schedulerName": _path("spec", "schedulerName"),
        "spec.serviceAccountName": _path("spec", "serviceAccountName"),
        "spec.hostNetwork": _path("spec", "hostNetwork"),
        "status.phase": _path("status", "phase"),
        "status.podIP": _path("status", "podIP"),
        "status.nominatedNodeName": _path("status", "nominatedNodeName"),
    },
    "secrets": {**_COMMON, "type": _path("type")},
    "namespaces": {**_COMMON, "status.phase": _path("status", "phase")},
}
"""Per resource, the fields a selector may name (others have `metadata.*` only)."""


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[tuple[Callable[[Mapping[str, Any]], str], bool, str], ...] = ()
    """(getter, equal?, value) for each term."""

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all((get(obj) == value) == equal for get, equal, value in self.terms)


def parse_fields(text: str | None, resource: str) -> FieldSelector:
    """A `fieldSelector` query string for `resource`; 400 BadRequest as the real server."""
    if not text or not text.strip():
        return FieldSelector()
    if len(text) > MAX_SELECTOR:
        raise bad_request("fieldSelector: too long")
    known = FIELDS.get(resource, _COMMON)
    terms = []
    for part in text.split(","):
        match = re.match(r"^\s*([^=!\s]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if match is None:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        name, op, value = match.groups()
        if name not in known:
            raise bad_request(
                f'"{name}" is not a known field selector: only '
                + ", ".join(f'"{k}"' for k in known)
            )
        terms.append((known[name], op != "!=", value))
    return FieldSelector(tuple(terms))
