"""Network, with the default `network = "none"`: the host's services are out of reach.

Every target is first shown to answer the host, so that what the sandbox does not
reach, it does not reach because of the sandbox. The firewall of the egress and
open modes is attacked in tests/test_network.py (its rows are in the same table).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

CONNECT = (
    "def connect(host, port):\n"
    "    s = socket.socket()\n"
    "    s.settimeout(5)\n"
    "    try:\n"
    "        s.connect((host, port))\n"
    "        return 'connected'\n"
    "    except OSError as e:\n"
    "        return errno.errorcode.get(e.errno, str(e))\n"
    "    finally:\n"
    "        s.close()\n"
)
UNREACHED = {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "timed out"}


@contextlib.contextmanager
def listener() -> Iterator[tuple[int, list]]:
    """A TCP listener on the host's 127.0.0.1 that counts who connects."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, peer = server.accept()
                accepted.append(peer)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with socket.create_connection(server.getsockname(), timeout=5) as own:
            mine = own.getsockname()  # the host itself reaches it...
        deadline = time.monotonic() + 5
        while mine not in accepted and time.monotonic() < deadline:
            time.sleep(0.01)  # ...once the thread has taken it: counted before the attack
        assert accepted == [mine], accepted
        yield server.getsockname()[1], accepted
    finally:
        server.close()


@pytest.mark.attack("network", "connect to a service on the host's 127.0.0.1")
def test_host_loopback_service(target, verdict):
    with listener() as (port, accepted):
        seen_by_host = len(accepted)
        found = target.run(CONNECT + f"report(lo=connect('127.0.0.1', {port}))")
        assert len(accepted) == seen_by_host, "the sandbox reached the host's listener"
    assert found["lo"] in UNREACHED, found
    verdict(f"{found['lo']}: the sandbox's 127.0.0.1 is its own")


@pytest.mark.attack("network", "connect to the Jupyter ports of its own and of another kernel")
def test_kernel_ports(target, verdict):
    ports = [target.km.shell_port, target.km.control_port, *target.planted["other_ports"]]
    for port in ports:  # all listening on the host
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    found = target.run(CONNECT + f"report(answers=[connect('127.0.0.1', p) for p in {ports!r}])")
    assert set(found["answers"]) <= UNREACHED, found
    verdict(f"{', '.join(sorted(set(found['answers'])))} on all {len(ports)} ports")


@pytest.mark.attack("network", "find a network interface or route out (link-local metadata too)")
def test_interfaces_and_routes(target, verdict):
    found = target.run(
        CONNECT + "assert_sandboxed()\n"
        "report(links=[name for _, name in socket.if_nameindex()],"
        " meta=connect('169.254.42.1', 80))"
    )
    assert found["links"] == ["lo"], found
    assert found["meta"] in UNREACHED, found
    verdict(f"only lo; link-local stand-in address: {found['meta']}")


@pytest.mark.attack("network", "open raw and packet sockets")
def test_raw_sockets(target, verdict):
    found = target.run(
        "report(raw=attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW,"
        " socket.IPPROTO_ICMP)[0],"
        " packet=attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW)[0],"
        " tcp=attempt(lambda: socket.socket().close())[0])"
    )
    assert found.pop("tcp") == "ok"
    assert set(found.values()) <= {"EPERM", "EACCES", "EAFNOSUPPORT", "ESOCKTNOSUPPORT"}, found
    verdict(f"raw: {found['raw']}, packet: {found['packet']} (no CAP_NET_RAW)")


@pytest.mark.attack("network", "bind a privileged port")
def test_privileged_port(target, verdict):
    found = target.run(
        "def bind(port):\n"
        "    with socket.socket() as s:\n"
        "        s.bind(('0.0.0.0', port))\n"
        "report(low=attempt(bind, 80)[0], high=attempt(bind, 8080)[0],"
        " links=[name for _, name in socket.if_nameindex()])"
    )
    assert found["high"] == "ok"
    if target.backend == "microvm":
        assert found["low"] in {"EACCES", "EPERM"}, found
        verdict(f"{found['low']} for port 80 (8080 binds: the attempt is real)")
    else:
        # gVisor's network stack keeps no ports for root; what binds is reachable only
        # from inside this sandbox (network none: lo alone; other modes: the host and
        # other sandboxes may not connect in, see tests/test_network.py)
        assert found["low"] in {"EACCES", "EPERM"} or found["links"] == ["lo"], found
        verdict(f"{found['low']} for port 80: gVisor reserves no ports, and only lo is there")
