"""PATCH bodies: JSON Patch (RFC 6902), JSON Merge Patch (RFC 7386), strategic merge patch.

A strategic merge patch is applied as a merge patch, except that lists of named
items (containers, volumes, env, conditions, ...) are merged by their `name` or
`type` as the real server does for those fields; `$patch` directives are not
supported (400). That covers what clients send for metadata, labels,
annotations and those lists.
"""

from __future__ import annotations

import copy
from typing import Any

from .meta import ApiError, bad_request

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
MERGE_KEYS = ("name", "type", "containerPort", "mountPath", "ip")


def apply_patch(obj: dict[str, Any], body: Any, content_type: str) -> dict[str, Any]:
    """`obj` with `body` applied (a copy); 415 for another content type, 400/422 for a
    patch that does not apply."""
    if content_type == JSON_PATCH:
        return _json_patch(copy.deepcopy(obj), body)
    if content_type in (MERGE_PATCH, STRATEGIC):
        if not isinstance(body, dict):
            raise bad_request("a merge patch must be a JSON object")
        return _merge(copy.deepcopy(obj), body, content_type == STRATEGIC)
    raise ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types "
        f"include: {JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC}",
    )


def _merge(target: Any, patch: Any, strategic: bool) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            raise bad_request(f"the kube double does not support the {key} directive")
        if value is None:
            target.pop(key, None)
        elif strategic and isinstance(value, list) and isinstance(target.get(key), list):
            target[key] = _merge_list(target[key], value)
        else:
            target[key] = _merge(target.get(key), value, strategic)
    return target


def _merge_list(old: list[Any], new: list[Any]) -> list[Any]:
    """A strategic merge of a list: items with a merge key replace or extend by that key;
    lists of anything else are replaced."""
    key = next(
        (
            k
            for k in MERGE_KEYS
            if all(isinstance(i, dict) and k in i for i in [*old, *new]) and (old or new)
        ),
        None,
    )
    if key is None:
        return copy.deepcopy(new)
    merged = [copy.deepcopy(i) for i in old]
    for item in new:
        at = next((n for n, o in enumerate(merged) if o[key] == item[key]), None)
        if at is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[at] = _merge(merged[at], item, True)
    return merged


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> Any:
    return _get(doc, parts[:-1])


def _json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise bad_request("a JSON patch must be a list of operations")
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid JSON patch operation {op!r}")
        try:
            doc = _one(doc, op)
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(
                422,
                "Invalid",
                f"the server rejected our request due to an error in "
                f"our request: JSON patch operation {op['op']} on {op['path']} does "
                f"not apply",
            ) from None
    return doc


def _one(doc: Any, op: dict[str, Any]) -> Any:
    parts = _pointer(op["path"])
    kind = op["op"]
    if kind in ("move", "copy"):
        source = _pointer(op["from"])
        value = copy.deepcopy(_get(doc, source))
        if kind == "move":
            doc = _one(doc, {"op": "remove", "path": op["from"]})
        return _one(doc, {"op": "add", "path": op["path"], "value": value})
    if kind == "test":
        if _get(doc, parts) != op.get("value"):
            raise ValueError("test failed")
        return doc
    if not parts:
        return copy.deepcopy(op.get("value")) if kind in ("add", "replace") else None
    parent, last = _parent(doc, parts), parts[-1]
    if kind == "add":
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif kind == "replace":
        index = int(last) if isinstance(parent, list) else last
        if isinstance(parent, dict) and index not in parent:
            raise KeyError(index)
        parent[index] = copy.deepcopy(op["value"])
    else:
        raise ValueError(kind)
    return doc


def _get(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc
