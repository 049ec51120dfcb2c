"""A tiny DNS responder for one sandbox: A records for the names it may use, nothing else.

The guest is hostile, so this is deliberately small: it answers only standard
queries with exactly one question, from the sandbox's own address and arriving
on the sandbox's own link, in one UDP datagram of at most 512 bytes; anything
else is dropped without a reply. Names are never forwarded as queries: the
caller's `lookup` decides (for egress, from the allowlist) and resolves with
the host's resolver, which also lets it open the firewall for the addresses it
hands out before the guest can use them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

MAX_QUERY = 1232
"""Largest datagram read as a query (EDNS's common UDP size); anything longer is dropped."""
MAX_RESPONSE = 512
MAX_PENDING = 16
"""Queries of one sandbox being answered at once; more are dropped (the guest retries)."""
TTL = 60

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A = 1
CLASS_IN = 1
_LABEL = re.compile(rb"^[A-Za-z0-9_-]{1,63}$")

Lookup = Callable[[str], Awaitable["list[str] | None"]]
"""name -> its IPv4 addresses, or None for a name the sandbox may not use (NXDOMAIN)."""


@dataclass(frozen=True)
class Query:
    id: int
    recursion_desired: bool
    name: str
    """Lower case, no trailing dot; "" for a name that no rule can allow (odd bytes, root)."""
    qtype: int
    qclass: int
    question: bytes
    """The question section as received, echoed in the reply."""


def parse_query(data: bytes) -> Query | None:
    """The query in `data`, or None for anything that is not one plain question."""
    if not 12 <= len(data) <= MAX_QUERY:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", data)
    opcode = (flags >> 11) & 0xF
    if flags & 0x8000 or opcode != 0 or qdcount != 1 or ancount or nscount or arcount > 1:
        return None  # a response, not a QUERY, or not one question (EDNS's OPT may follow)
    labels: list[bytes] = []
    pos, length = 12, 0
    while True:
        if pos >= len(data):
            return None
        size = data[pos]
        if size == 0:
            pos += 1
            break
        if size > 63:  # also compression pointers, which a question never needs
            return None
        length += size + 1
        if length > 254 or pos + 1 + size > len(data):
            return None
        labels.append(data[pos + 1 : pos + 1 + size])
        pos += 1 + size
    if pos + 4 > len(data):
        return None
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    valid = bool(labels) and all(_LABEL.match(label) for label in labels)
    name = b".".join(labels).decode("ascii").lower() if valid else ""
    return Query(ident, bool(flags & 0x0100), name, qtype, qclass, data[12 : pos + 4])


def response(query: Query, rcode: int, addresses: Sequence[str] = (), ttl: int = TTL) -> bytes:
    """The reply to `query`: `rcode`, and A records for `addresses` (as many as fit)."""
    room = (MAX_RESPONSE - 12 - len(query.question)) // 16
    answers = [a for a in addresses if query.qtype == TYPE_A][: max(room, 0)]
    flags = 0x8000 | 0x0080 | (0x0100 if query.recursion_desired else 0) | rcode
    packet = bytearray(struct.pack("!6H", query.id, flags, 1, len(answers), 0, 0))
    packet += query.question
    for address in answers:
        # name: a pointer to the question's name at offset 12
        packet += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4)
        packet += socket.inet_aton(address)
    return bytes(packet)


class Responder(asyncio.DatagramProtocol):
    """Answers one sandbox's queries on the host end of its link. I/O loop only."""

    def __init__(self, lookup: Lookup, client: str, log: logging.Logger, label: str) -> None:
        self.lookup = lookup
        self.client = client
        self.log = log
        self.label = label
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task] = set()
        self.dropped = 0
        """Datagrams ignored: malformed, from elsewhere, or over MAX_PENDING."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        query = parse_query(data) if addr[0] == self.client else None
        if query is None or len(self.pending) >= MAX_PENDING or self.transport is None:
            self.dropped += 1
            return
        task = asyncio.ensure_future(self._answer(query, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    def error_received(self, exc: Exception) -> None:
        self.log.debug("sandbox %s: DNS responder: %s", self.label, exc)

    async def _answer(self, query: Query, addr: tuple) -> None:
        addresses: Sequence[str] = ()
        if query.qclass != CLASS_IN:
            rcode = REFUSED
        elif not query.name:
            rcode = NXDOMAIN
        else:
            try:
                found = await self.lookup(query.name)
            except Exception as e:  # the host's resolver failed, timed out, or is busy
                self.log.debug("sandbox %s: DNS %s: %s", self.label, query.name, e)
                rcode = SERVFAIL
            else:
                if found is None:
                    self.log.debug("sandbox %s: DNS refused %s", self.label, query.name)
                    rcode = NXDOMAIN
                else:
                    rcode, addresses = NOERROR, found
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(response(query, rcode, addresses), addr)

    def close(self) -> None:
        for task in list(self.pending):
            task.cancel()
        if self.transport is not None:
            self.transport.close()
            self.transport = None


async def serve(
    address: str,
    port: int,
    client: str,
    lookup: Lookup,
    log: logging.Logger,
    label: str,
    device: str = "",
) -> Responder:
    """Start a responder on `address`:`port` (UDP) answering only `client`; with `device`,
    only datagrams that arrive on that link (a query spoofed from elsewhere never reaches it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((address, port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: Responder(lookup, client, log, label), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    return protocol
