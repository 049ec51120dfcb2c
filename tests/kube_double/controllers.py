"""The control plane's controllers besides the API server: the scheduler's binding, and
what the node lifecycle controller, the taint manager and pod garbage collection do
to the pods of a node that is lost.

Each step is its own write (its own MODIFIED event), as each controller writes on
its own; a step is skipped once the object is gone or is another pod of that name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .kinds import POD
from .meta import later, now
from .store import Store

Obj = dict[str, Any]

LOST_STEP = 0.05
"""Seconds between the controllers' steps after a node is lost (the real ones take
minutes: tolerationSeconds is 300 by default)."""


def _condition(kind: str, status: str, reason: str = "", message: str = "") -> Obj:
    entry: Obj = {
        "type": kind,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": now(),
    }
    if reason:
        entry["reason"] = reason
    if message:
        entry["message"] = message
    return entry


def bind(store: Store, pod: Obj, node: str) -> Obj:
    """The scheduler: bind the pod to `node` (PodScheduled). Returns the pod as stored."""

    def change(obj: Obj) -> None:
        obj["spec"]["nodeName"] = node
        obj.setdefault("status", {})["conditions"] = [_condition("PodScheduled", "True")]

    meta = pod["metadata"]
    return store.update(POD, meta["namespace"], meta["name"], change)


def _set_condition(entry: Obj) -> Callable[[Obj], None]:
    def change(obj: Obj) -> None:
        conditions = [c for c in obj["status"].get("conditions", []) if c["type"] != entry["type"]]
        obj["status"]["conditions"] = [*conditions, entry]

    return change


async def node_lost(store: Store, namespace: str, name: str, uid: str, grace: int) -> None:
    """A pod of a lost node: Ready becomes False (node lifecycle controller), a
    DisruptionTarget condition and a graceful delete (taint manager), then removal (pod
    GC, once the node object is gone: no kubelet will ever confirm the deletion)."""

    def mark(obj: Obj) -> None:
        obj["metadata"].setdefault("deletionTimestamp", later(grace))
        obj["metadata"].setdefault("deletionGracePeriodSeconds", grace)

    steps = [
        _set_condition(_condition("Ready", "False")),
        _set_condition(
            _condition(
                "DisruptionTarget",
                "True",
                "DeletionByTaintManager",
                "Taint manager: deleting due to NoExecute taint",
            )
        ),
        mark,
    ]
    for step in [*steps, None]:
        await asyncio.sleep(LOST_STEP)
        obj = store.find(POD, namespace, name)
        if obj is None or obj["metadata"]["uid"] != uid:
            return
        if step is None:
            store.remove(POD, namespace, name)
        else:
            store.update(POD, namespace, name, step)
