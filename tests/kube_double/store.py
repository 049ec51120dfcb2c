"""The objects, their resourceVersions, and the watches: the double's etcd and watch cache.

One counter gives every change a resourceVersion (a decimal string, increasing
across all kinds, as etcd's revision). Every change is an `Event` kept in a
bounded history, so a watch can resume from a resourceVersion it saw; one older
than the history is answered 410 Expired, as by the real watch cache. Each
watcher has a bounded queue: one that falls behind is ended (the client resumes
from its last resourceVersion), as the real server ends slow watchers.

A watch with a label or field selector sees an object that starts to match as
ADDED and one that stops matching as DELETED, as on the real server.

Internal listeners (the scheduler and the kubelet) are called synchronously with
each event; they must not change the store from inside the call (they schedule
work on the loop instead).

Everything runs on the one event loop: no locks. Objects handed out are copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .kinds import KINDS, Kind
from .meta import ApiError, already_exists, gone, not_found, now
from .selectors import EVERYTHING, FieldSelector, LabelSelector

log = logging.getLogger(__name__)

HISTORY = 5000
"""Events kept for watches that resume from a resourceVersion."""
WATCH_QUEUE = 2000
"""Events a watcher may have waiting before it is ended as too slow."""

Obj = dict[str, Any]


@dataclass(frozen=True)
class Event:
    rv: int
    type: str
    """ADDED, MODIFIED or DELETED."""
    kind: Kind
    obj: Obj
    """The object as of this event: never changed after."""
    prev: Obj | None
    """The object before (MODIFIED, DELETED), for selector transitions."""
    data: bytes = b""
    """`obj` as JSON, made once for every watcher."""


def _rv(obj: Obj) -> int:
    return int(obj["metadata"]["resourceVersion"])


@dataclass(eq=False)
class Watcher:
    """One watch stream's filter and queue. `queue` yields (type, object JSON) pairs; None
    means the watch is over (`overflowed` says whether it was ended for falling behind)."""

    kind: Kind
    namespace: str | None
    labels: LabelSelector = EVERYTHING
    fields: FieldSelector = field(default_factory=FieldSelector)
    queue: asyncio.Queue[tuple[str, bytes] | None] = field(
        default_factory=lambda: asyncio.Queue(WATCH_QUEUE)
    )
    overflowed: bool = False

    def selects(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels.matches(obj["metadata"].get("labels")) and self.fields.matches(obj)

    def offer(self, event: Event) -> None:
        """Queue `event` as this watcher sees it, if it sees it at all."""
        if event.kind != self.kind or self.overflowed:
            return
        now_in, was_in = self.selects(event.obj), self.selects(event.prev)
        if event.type == "DELETED":
            kind = "DELETED" if was_in or now_in else ""
        elif now_in:
            kind = "MODIFIED" if was_in else "ADDED"
        else:
            kind = "DELETED" if was_in else ""
        if kind:
            self.put(kind, event.data)

    def put(self, kind: str, data: bytes) -> None:
        """Queue one event (its type and object JSON); a full queue ends the watch."""
        try:
            self.queue.put_nowait((kind, data))
        except asyncio.QueueFull:
            self.overflowed = True
            self.end()

    def end(self) -> None:
        """Tell the stream to finish (it drains what is queued first)."""
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()  # ends anyway: make room for the end mark


class Store:
    """All objects by kind, namespace and name; the change history; the live watchers."""

    def __init__(self, history: int = HISTORY) -> None:
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._history: deque[Event] = deque(maxlen=history)
        self._compacted = 0
        """The newest resourceVersion no longer in the history (0: none dropped yet)."""
        self._rv = 0
        self._watchers: set[Watcher] = set()
        self.listeners: list[Callable[[Event], None]] = []

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    @property
    def compacted(self) -> int:
        """The newest resourceVersion whose event the history no longer has (0: none)."""
        return self._compacted

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, type_: str, kind: Kind, obj: Obj, prev: Obj | None) -> None:
        event = Event(_rv(obj), type_, kind, obj, prev, json.dumps(obj).encode())
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        self._history.append(event)
        for watcher in list(self._watchers):
            watcher.offer(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a controller's bug must not fail the client's request
                log.exception("listener failed on %s %s", type_, kind.key)

    # -- reads --------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        """A copy of the object; 404 NotFound if there is none."""
        obj = self._objects.get((kind.key, namespace, name))
        if obj is None:
            raise not_found(kind.plural, name, kind.group)
        return copy.deepcopy(obj)

    def find(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        """The object itself (not a copy: do not change it), or None."""
        return self._objects.get((kind.key, namespace, name))

    def items(self, kind: Kind, namespace: str | None = None) -> Iterator[Obj]:
        """The objects themselves (not copies), in a stable order, of one namespace or all."""
        for (key, ns, _name), obj in sorted(self._objects.items(), key=lambda kv: kv[0]):
            if key == kind.key and (namespace is None or ns == namespace):
                yield obj

    def list(
        self,
        kind: Kind,
        namespace: str | None,
        labels: LabelSelector = EVERYTHING,
        fields: FieldSelector | None = None,
    ) -> list[Obj]:
        """Copies of the matching objects, sorted by namespace and name."""
        fields = fields or FieldSelector()
        return [
            copy.deepcopy(obj)
            for obj in self.items(kind, namespace)
            if labels.matches(obj["metadata"].get("labels")) and fields.matches(obj)
        ]

    # -- writes -------------------------------------------------------------------------

    def create(self, kind: Kind, obj: Obj) -> Obj:
        """Store a new object: uid, creationTimestamp, resourceVersion and generation are
        set here. 409 AlreadyExists if the name is taken. Returns a copy."""
        meta = obj["metadata"]
        key = (kind.key, meta.get("namespace", ""), meta["name"])
        if key in self._objects:
            raise already_exists(kind.plural, meta["name"], kind.group)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta["generation"] = 1
        meta["resourceVersion"] = str(self._next_rv())
        stored = copy.deepcopy(obj)
        self._objects[key] = stored
        self._emit("ADDED", kind, copy.deepcopy(stored), None)
        return copy.deepcopy(stored)

    def update(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        change: Callable[[Obj], None],
        generation: bool = False,
    ) -> Obj:
        """Apply `change` to a copy of the object and store it under a new resourceVersion
        (one MODIFIED event), unless `change` left it as it was (no event, as the real
        server skips no-op writes). `generation`: the spec changed, count it. `change` may
        raise an ApiError, and nothing is stored then. 404 if there is no such object."""
        key = (kind.key, namespace, name)
        old = self._objects.get(key)
        if old is None:
            raise not_found(kind.plural, name, kind.group)
        new = copy.deepcopy(old)
        change(new)
        if new == old:
            return copy.deepcopy(old)
        if generation:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = str(self._next_rv())
        self._objects[key] = new
        self._emit("MODIFIED", kind, copy.deepcopy(new), old)
        return copy.deepcopy(new)

    def remove(self, kind: Kind, namespace: str, name: str) -> Obj:
        """Delete the object now (a DELETED event with a new resourceVersion); 404 if gone.
        Then its dependents go too, as the garbage collector deletes them (`_collect`)."""
        key = (kind.key, namespace, name)
        old = self._objects.pop(key, None)
        if old is None:
            raise not_found(kind.plural, name, kind.group)
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit("DELETED", kind, final, old)
        self._collect(namespace, old["metadata"].get("uid"))
        return copy.deepcopy(final)

    def _collect(self, namespace: str, owner_uid: str | None) -> None:
        """What the garbage collector does once an owner is gone (background propagation,
        the default): every object of its namespace naming it in `ownerReferences` is
        deleted, each its own DELETED event after the owner's. (The real collector does it
        a moment later, in the control plane; no client asks for it.)"""
        if not owner_uid:
            return
        for (kind_key, ns, name), obj in list(self._objects.items()):
            references = obj["metadata"].get("ownerReferences") or ()
            if ns == namespace and any(r.get("uid") == owner_uid for r in references):
                kind = next(k for k in KINDS if k.key == kind_key)
                with contextlib.suppress(ApiError):  # gone meanwhile (a dependent's dependent)
                    self.remove(kind, ns, name)

    # -- watches ------------------------------------------------------------------------

    def watch(self, watcher: Watcher, since: str | None) -> None:
        """Start `watcher`: from now with every current object as ADDED first (`since` None,
        "" or "0"), or with every change after resourceVersion `since`. 410 Expired if that
        is older than the history. Call `unwatch` when the stream ends."""
        if since in (None, "", "0"):
            for obj in self.items(watcher.kind, watcher.namespace):
                if watcher.selects(obj):
                    watcher.put("ADDED", json.dumps(obj).encode())
        else:
            try:
                start = int(since)  # type: ignore[arg-type]
            except ValueError:
                raise ApiError(400, "BadRequest", f'invalid resource version "{since}"') from None
            if start < self._compacted:
                raise gone(f"too old resource version: {start} ({self._compacted + 1})")
            for event in self._history:
                if event.rv > start:
                    watcher.offer(event)
        self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def end_watches(self) -> None:
        """At shutdown: end every watch stream."""
        for watcher in list(self._watchers):
            watcher.end()
