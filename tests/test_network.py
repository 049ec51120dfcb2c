"""Network modes: none, egress and open, against real runsc, real kernels and real hosts.

The `test_hosts` fixture builds the world a sandbox could try to reach, all on
this machine: an "allowed" and a "blocked" host (each a network namespace behind
a veth, with TCP listeners), a stand-in metadata service on a link-local address
(169.254.42.1, routed through the host like a real one), and a listener on the
host itself (every address, loopback included). Every refused attempt is made
with the same code that reaches an allowed target in the same kernel, and must
fail with the firewall's own answer (EHOSTUNREACH: ICMP "administratively
prohibited") unless the target is structurally absent (the guest's own
loopback: ECONNREFUSED; in `none`, gVisor's stack with loopback only has no
route: EHOSTUNREACH, there without any firewall).

Attacks on the host side are played for real and checked twice: that the attempt
reached where it would do harm (a counter in a scratch nftables table of the
test's own, a conntrack entry, a host listener that works) and that it failed
there. Nothing leaves the machine: names come from /etc/hosts lines the tests
add, and the DNS flood runs its server in a private mount namespace whose
resolver is a silent socket on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import (
    BACKENDS,
    KERNEL,
    READY_TIMEOUT,
    execute,
    leftover_network,
    require_sandbox,
    skip_or_fail,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner import cgroups, hostcmd
from provisioner.errors import SandboxError, SettingError
from provisioner.network import dns
from provisioner.network import gc as network_gc
from provisioner.network import host as network_host
from provisioner.network import sandbox as network_sandbox
from provisioner.network import tap as network_tap
from provisioner.network.spec import Destination, NetworkSpec, parse_bandwidth, parse_destination
from provisioner.state import Record, records

JUPYTER_SANDBOX = [str(Path(sys.executable).parent / "jupyter"), "sandbox"]
ALLOWED, BLOCKED, META = "10.224.1.2", "10.224.2.2", "169.254.42.1"
HOSTS_LINES = (
    f"{ALLOWED} allowed.jsb-test\n{BLOCKED} blocked.jsb-test\n{ALLOWED} later.jsb-test\n"
    f"{BLOCKED} private.jsb-test\n"
)

SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    name = sys.argv[1]
    def handle(conn):
        with conn:
            conn.settimeout(30)
            line = b""
            while not line.endswith(b"\\n") and len(line) < 100:
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            words = line.decode().split()
            if words[:1] == ["send"]:
                conn.sendall(b"x" * int(words[1]))
            elif words[:1] == ["recv"]:
                got = 0
                while got < int(words[1]):
                    data = conn.recv(65536)
                    if not data:
                        break
                    got += len(data)
                conn.sendall(f"{got}\\n".encode())
            else:
                conn.sendall(f"{name}\\n".encode())
    def serve(listener):
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    for where in sys.argv[2:]:
        host, port = where.rsplit(":", 1)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
        listener.listen(64)
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """
)

# Defined once in each kernel: probe() says who answered, or why nobody did.
PROBE = textwrap.dedent(
    """
    import errno, json, socket, threading, time
    def probe(host, port, timeout=5):
        try:
            conn = socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror:
            return "no-dns"
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e))
        with conn:
            conn.sendall(b"name\\n")
            return conn.recv(100).decode().strip() or "empty"
    def resolve(name):
        try:
            return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET)})
        except socket.gaierror:
            return "no-dns"
    def listen(port, name):
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))
        server.listen()
        def answer():
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.recv(100)
                    conn.sendall(name.encode() + b"\\n")
        threading.Thread(target=answer, daemon=True).start()
    def transfer(host, port, size, direction):
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=30) as conn:
            if direction == "down":
                conn.sendall(f"send {size}\\n".encode())
                got = 0
                while got < size:
                    data = conn.recv(65536)
                    if not data:
                        break
                    got += len(data)
            else:
                conn.sendall(f"recv {size}\\n".encode())
                conn.sendall(b"x" * size)
                got = int(conn.recv(100))
        return got, time.monotonic() - started
    """
)


# -- the world around the sandboxes ---------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def host_reaches(host: str, port: int) -> str:
    """What a host process gets from a listener: its name (proves the target is up)."""
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(b"name\n")
        return conn.recv(100).decode().strip()


def host_addresses() -> list[str]:
    """Every IPv4 address of the host itself, loopback aside."""
    links = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True).stdout)
    return [
        info["local"]
        for link in links
        for info in link.get("addr_info", [])
        if not info["local"].startswith("127.")
    ]


@pytest.fixture(scope="module")
def test_hosts(sandbox_host: None, tmp_path_factory) -> Iterator[dict]:
    """Two hosts, a link-local 'metadata service' and a host listener; all removed after."""
    script = tmp_path_factory.mktemp("net") / "server.py"
    script.write_text(SERVER)
    servers: list[subprocess.Popen] = []
    made: list[str] = []

    def start(netns: str | None, name: str, *where: str) -> None:
        prefix = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
        server = subprocess.Popen(
            [*prefix, sys.executable, str(script), name, *where], stdout=subprocess.PIPE, text=True
        )
        servers.append(server)
        assert server.stdout.readline().strip() == "ready"

    host_port = free_port()
    hosts = (
        ("nettest-allowed", "ntallow", 1, "allowed", (8080, 8081, 8082)),
        ("nettest-blocked", "ntblock", 2, "blocked", (8080,)),
        ("nettest-meta", "ntmeta", 3, "meta", ()),
    )
    clear_stale_test_hosts([netns for netns, *_ in hosts])
    try:
        for netns, veth, n, name, ports in hosts:
            sh("ip", "netns", "add", netns)
            made.append(netns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            sh("ip", "addr", "add", f"10.224.{n}.1/30", "dev", veth)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", netns, "addr", "add", f"10.224.{n}.2/30", "dev", "eth0")
            sh("ip", "-n", netns, "link", "set", "eth0", "up")
            if ports:
                start(netns, name, *(f"10.224.{n}.2:{port}" for port in ports))
        # The metadata stand-in: a link-local address, reached through the host.
        sh("ip", "-n", "nettest-meta", "addr", "add", f"{META}/32", "dev", "eth0")
        sh("ip", "route", "add", f"{META}/32", "via", "10.224.3.2")
        start("nettest-meta", "meta", f"{META}:8080")
        start(None, "host", f"0.0.0.0:{host_port}")  # the host itself, loopback included
        # Each target answers the host: whatever a sandbox does not reach, it does
        # not reach because of its sandbox.
        assert host_reaches(ALLOWED, 8082) == "allowed"
        assert host_reaches(BLOCKED, 8080) == "blocked"
        assert host_reaches(META, 8080) == "meta"
        assert host_reaches("127.0.0.1", host_port) == "host"
        yield {"host_port": host_port}
    finally:
        for server in servers:
            server.kill()
            server.wait()
        subprocess.run(["ip", "route", "del", f"{META}/32"], capture_output=True)
        for netns in made:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    assert not [p for p in Path("/run/netns").glob("nettest-*")]


def clear_stale_test_hosts(netns: list[str]) -> None:
    """Remove what a killed earlier run left of `test_hosts` (namespaces, with their veths,
    and the metadata route); fail if a live run holds them (its listeners are in them)."""
    left = [name for name in netns if network_host.netns_path(name).exists()]
    in_use = network_gc._namespaces_in_use(left)
    if in_use:
        skip_or_fail(f"another test run is using the test hosts' namespaces {in_use}")
    for name in left:
        sh("ip", "netns", "del", name)
    subprocess.run(["ip", "route", "del", f"{META}/32"], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hosts_file() -> Iterator[Path]:
    """Test names in the host's /etc/hosts; the file is restored even on failure."""
    path = Path("/etc/hosts")
    original = path.read_text().replace(HOSTS_LINES, "")  # a killed earlier run's lines
    path.write_text(original.rstrip("\n") + "\n" + HOSTS_LINES)
    try:
        yield path
    finally:
        path.write_text(original)


# -- kernels --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def kernel(workspace: Path, kernel_name: str = KERNEL, **settings) -> AsyncIterator[tuple]:
    """A started kernel (gVisor unless named) with these provisioner settings and `PROBE`
    defined in it."""
    km = AsyncIOLoopKernelManager(
        kernel_name=kernel_name, config=Config({"SandboxProvisioner": settings})
    )
    await km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        await run(kc, PROBE)
        yield km, kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def run(kc, code: str):
    """Execute `code`; the value it prints as JSON on its last line (or None)."""
    content, text, _ = await execute(kc, code, timeout=120)
    assert content["status"] == "ok", content
    lines = text.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


async def probes(kc, targets: list[tuple[str, int]]) -> list[str]:
    return await run(kc, f"print(json.dumps([probe(h, p) for h, p in {targets!r}]))")


def record_of(km) -> Record:
    return next(r for r in records() if r.sandbox_id == km.provisioner.sandbox_id)


def host_end(record: Record) -> str:
    return str(ipaddress.IPv4Network(record.subnet)[1])


def guest_address(record: Record) -> str:
    return str(ipaddress.IPv4Network(record.subnet)[2])


def exists(record: Record) -> dict[str, bool]:
    tables = network_gc.host_objects().tables
    return {
        "netns": Path("/run/netns", record.netns).exists(),
        "veth": Path("/sys/class/net", record.veth).exists(),
        "table": record.nft_table in tables,
    }


# -- settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"network": "wide"}, r"network.*'none', 'egress', 'open'"),
        ({"egress_allow": ["169.254.169.254"]}, r"egress_allow.*always blocked"),
        ({"egress_allow": ["127.0.0.1:80"]}, r"egress_allow.*always blocked"),
        ({"egress_allow": ["100.100.100.200"]}, r"egress_allow.*always blocked"),
        ({"egress_allow": ["168.63.129.16:80"]}, r"egress_allow.*always blocked"),
        ({"egress_allow": ["[2001:db8::1]:443"]}, r"egress_allow.*IPv6"),
        ({"egress_allow": ["pypi.org:99999"]}, r"egress_allow.*port.*1 to 65535"),
        ({"egress_allow": ["pypi.org:"]}, r"egress_allow.*port"),
        ({"egress_allow": ["bad host!"]}, r"egress_allow.*not a valid hostname"),
        ({"egress_allow": ["10.0.0.1/8"]}, r"egress_allow.*host bits"),
        ({"egress_allow": [""]}, r"egress_allow.*expected"),
        ({"network_bandwidth": "10MB"}, r'network_bandwidth.*"10M"'),
        ({"network_bandwidth": "fast"}, r'network_bandwidth.*"10M"'),
        ({"network_bandwidth": "100"}, r"network_bandwidth.*at least 8000"),
    ],
)
async def test_bad_network_setting_fails_the_start_naming_it(
    no_leftovers, workspace, setting, message
):
    km = AsyncIOLoopKernelManager(kernel_name=KERNEL, config=Config({"GVisorProvisioner": setting}))
    with pytest.raises(SettingError, match=message):
        await km.start_kernel(cwd=str(workspace))
    assert not km.has_kernel


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pypi.org:443", Destination(host="pypi.org", port=443)),
        ("PyPI.org.", Destination(host="pypi.org")),
        ("10.0.0.0/8", Destination(net=ipaddress.IPv4Network("10.0.0.0/8"))),
        (
            "192.0.2.7:8080",
            Destination(net=ipaddress.IPv4Network("192.0.2.7/32"), port=8080),
        ),
    ],
)
def test_destinations_as_operators_write_them(text, expected):
    assert parse_destination(text) == expected
    assert str(expected) == text.lower().rstrip(".")


@pytest.mark.parametrize(
    "text, rate",
    [("10M", 10**7), ("512k", 512_000), ("1G", 10**9), ("8Mbit", 8 * 10**6), ("", None)],
)
def test_bandwidths_as_operators_write_them(text, rate):
    assert parse_bandwidth(text) == rate


def bare_network(mode: str = "open", allow: tuple[str, ...] = ()) -> network_sandbox.SandboxNetwork:
    """A sandbox network object with addresses but nothing made on the host."""
    spec = NetworkSpec(mode=mode, allow=tuple(map(parse_destination, allow)))
    record = Record(sandbox_id=f"jsb-unit-{os.getpid()}", kernel_id="?", backend="?")
    net = network_sandbox.SandboxNetwork(spec, record, logging.getLogger("test"))
    net.host_ip, net.guest_ip = "10.223.0.1", "10.223.0.2"
    return net


def test_cloud_metadata_addresses_are_always_blocked(sandbox_host):
    for text in ("100.100.100.200", "100.100.100.200/32", "168.63.129.16:80"):
        with pytest.raises(ValueError, match="always blocked"):
            parse_destination(text)
    rules = bare_network().ruleset()
    blocked = next(line for line in rules.splitlines() if "ip daddr {" in line)
    assert (
        "100.100.100.200" in blocked and "168.63.129.16" in blocked and "169.254.0.0/16" in blocked
    )
    check = subprocess.run(["nft", "-c", "-f", "-"], input=rules, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # the kernel accepts it as written


def test_pool_lock_is_host_wide_whatever_the_runtime_dir(sandbox_host, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_SANDBOX_RUNTIME_DIR", str(tmp_path))
    with network_host.pool_lock():
        assert (network_host.HOST_STATE / "pool.lock").exists()
    assert not list(tmp_path.iterdir())


def test_a_freed_subnet_waits_before_it_is_handed_out_again(sandbox_host, tmp_path, monkeypatch):
    monkeypatch.setattr(network_host, "_RECENTLY_FREED", tmp_path / "recently-freed.json")
    fixed = types.SimpleNamespace(randrange=lambda n: n // 2)  # "random": the middle of the pool
    monkeypatch.setattr(network_host, "random", fixed)
    first = network_host.free_subnet()
    network_host.note_freed(str(first))
    assert network_host.free_subnet() != first
    monkeypatch.setattr(network_host, "REUSE_DELAY", 0.0)  # long ago: free again
    assert network_host.free_subnet() == first


# -- the DNS responder, alone -----------------------------------------------------------


def query(name: str, qtype: int = dns.TYPE_A, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!6H", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


def test_dns_answers_allowed_names_and_nothing_else():
    q = dns.parse_query(query("Allowed.Example"))
    assert q is not None and q.name == "allowed.example" and q.recursion_desired
    reply = dns.response(q, dns.NOERROR, ["192.0.2.7", "192.0.2.8"])
    ident, flags, qd, an, ns, ar = struct.unpack_from("!6H", reply)
    assert (ident, flags & 0x800F, qd, an, ns, ar) == (0x1234, 0x8000, 1, 2, 0, 0)
    assert reply.endswith(socket.inet_aton("192.0.2.8"))
    nx = dns.response(q, dns.NXDOMAIN)
    assert struct.unpack_from("!6H", nx)[1] & 0xF == dns.NXDOMAIN
    aaaa = dns.response(
        dns.parse_query(query("allowed.example", qtype=28)), dns.NOERROR, ["1.2.3.4"]
    )
    assert struct.unpack_from("!6H", aaaa)[3] == 0  # no A records in an AAAA answer
    # Not queries: responses, compression pointers, two questions, truncated names
    assert dns.parse_query(struct.pack("!6H", 1, 0x8100, 1, 0, 0, 0) + query("a")[12:]) is None
    assert dns.parse_query(struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\0\1\0\1") is None
    assert dns.parse_query(struct.pack("!6H", 1, 0x0100, 2, 0, 0, 0) + query("a")[12:]) is None
    assert dns.parse_query(query("a")[:-3]) is None
    assert dns.parse_query(query("bad\x00name")).name == ""  # answered NXDOMAIN, never looked up


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_dns_parser_takes_any_bytes(data):
    for packet in (data, query("x.example")[:12] + data):
        q = dns.parse_query(packet)
        if q is not None:
            reply = dns.response(q, dns.NOERROR, ["192.0.2.1"] * 40)
            assert len(reply) <= dns.MAX_RESPONSE


async def test_dns_responder_serves_only_its_sandbox():
    asked = []

    async def lookup(name: str) -> list[str] | None:
        asked.append(name)
        return ["192.0.2.7"] if name == "allowed.example" else None

    port = free_port()
    responder = await dns.serve("127.0.0.1", port, "127.0.0.1", lookup, logging.getLogger(), "t")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            for packet in (b"", b"\xff" * 700, query("a")[:-2], b"\0" * 12):
                s.send(packet)  # garbage: no reply, no crash
            s.send(query("allowed.example"))
            reply = await asyncio.get_running_loop().run_in_executor(None, s.recv, 600)
            assert struct.unpack_from("!6H", reply)[3] == 1
            assert reply.endswith(socket.inet_aton("192.0.2.7"))
            s.send(query("other.example"))
            reply = await asyncio.get_running_loop().run_in_executor(None, s.recv, 600)
            assert struct.unpack_from("!6H", reply)[1] & 0xF == dns.NXDOMAIN
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as elsewhere:
            elsewhere.bind(("127.0.0.2", 0))  # another sender: not this responder's sandbox
            elsewhere.settimeout(0.5)
            elsewhere.sendto(query("allowed.example"), ("127.0.0.1", port))
            with pytest.raises(TimeoutError):
                await asyncio.get_running_loop().run_in_executor(None, elsewhere.recv, 600)
        assert asked == ["allowed.example", "other.example"]
        assert responder.dropped == 5
    finally:
        responder.close()


async def ask(sock: socket.socket, names: list[str], timeout: float = 5) -> dict:
    """Send one query per name at once: name -> (rcode, seconds until its answer)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for ident, name in enumerate(names):
        sock.send(query(name, ident=ident))
    got: dict[str, tuple[int, float]] = {}
    while len(got) < len(names):
        reply = await asyncio.wait_for(loop.sock_recv(sock, 600), timeout)
        ident, flags = struct.unpack_from("!2H", reply)
        got[names[ident]] = (flags & 0xF, round(loop.time() - started, 2))
    return got


async def test_dns_lookups_are_capped_per_sandbox_and_failures_remembered(monkeypatch):
    """The host's resolver, made to hang for names starting with "slow" (a real one would hold
    its thread just as long); everything else is the sandbox's real lookup path."""
    release, calls, threads = threading.Event(), [], set()

    def host_addresses(name: str) -> list[str]:
        calls.append(name)
        threads.add(threading.current_thread().name.split("_")[0])
        if name.startswith("slow"):
            release.wait(30)
            raise network_sandbox.LookupFailed(f"{name}: the resolver gave up (test)")
        return [] if name.startswith("none") else ["192.0.2.7"]

    monkeypatch.setattr(network_sandbox, "_host_addresses", host_addresses)
    monkeypatch.setattr(network_sandbox, "LOOKUP_TIMEOUT", 0.5)
    net, port = bare_network("open"), free_port()
    log = logging.getLogger("test")
    responder = await dns.serve("127.0.0.1", port, "127.0.0.1", net._lookup, log, "t")
    cap = network_sandbox.LOOKUPS_PER_SANDBOX
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(("127.0.0.1", port))
            # A burst: `cap` lookups start and time out; the rest are refused at once.
            burst = [f"slow-{i}.example" for i in range(cap + 3)]
            answers = await ask(s, burst)
            assert {rcode for rcode, _ in answers.values()} == {dns.SERVFAIL}
            assert sorted(calls) == burst[:cap]
            assert all(answers[n][1] < 0.3 for n in burst[cap:]), answers
            assert all(answers[n][1] >= 0.5 for n in burst[:cap]), answers
            # Timed out, but the lookups still hold their threads: so they hold their slots.
            rcode, took = (await ask(s, ["ok.example"]))["ok.example"]
            assert rcode == dns.SERVFAIL and took < 0.3
            assert len(calls) == cap
            release.set()
            await asyncio.sleep(0.3)
            # Slots free again; a failed name is not looked up again for a while, nor is
            # a name with no address, and both answers come at once.
            first = await ask(s, ["ok.example", "none.example", burst[0]])
            again = await ask(s, ["none.example", burst[0]])
        assert first["ok.example"][0] == dns.NOERROR
        assert first["none.example"][0] == again["none.example"][0] == dns.NXDOMAIN
        assert first[burst[0]][0] == again[burst[0]][0] == dns.SERVFAIL
        assert len(calls) == cap + 2 and sorted(calls[cap:]) == ["none.example", "ok.example"]
        assert threads == {"sandbox-dns"}
    finally:
        release.set()
        responder.close()


async def test_dns_responder_bound_to_its_link_ignores_other_links():
    """Bound to a device, the responder gets only what arrives there: a query through
    loopback reaches it bound to `lo`, not bound to another link."""
    other = next((name for _, name in socket.if_nameindex() if name != "lo"), None)
    if other is None:
        skip_or_fail("this host has no link but loopback")

    async def lookup(name: str) -> list[str]:
        return ["192.0.2.7"]

    loop = asyncio.get_running_loop()
    got = {}
    for device in ("lo", other):
        port = free_port()
        responder = await dns.serve(
            "127.0.0.1", port, "127.0.0.1", lookup, logging.getLogger("test"), "t", device=device
        )
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.connect(("127.0.0.1", port))
                s.send(query("a.example"))
                try:
                    reply = await asyncio.wait_for(loop.sock_recv(s, 600), 1)
                    got[device] = struct.unpack_from("!6H", reply)[3]
                except (asyncio.TimeoutError, ConnectionRefusedError) as e:
                    got[device] = type(e).__name__
        finally:
            responder.close()
    assert got["lo"] == 1
    assert got[other] in ("TimeoutError", "ConnectionRefusedError")


def test_names_open_public_addresses_and_private_ones_only_in_listed_networks():
    net = bare_network("egress", ("internal.example:443", "10.1.0.0/16:22"))
    assert net._may_open("8.8.8.8")  # decided locally: no traffic anywhere
    assert net._may_open("10.1.2.3")
    for address in ("10.2.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254", "100.100.100.200",
                    "168.63.129.16", "127.0.0.1", "10.223.0.5"):  # fmt: skip
        assert not net._may_open(address), address


async def test_a_name_keeps_its_latest_addresses_open_and_for_a_while(sandbox_host, monkeypatch):
    """A sandbox's ruleset, loaded in a namespace of the test's own: the elements a name's
    lookups leave in its sets, through the real nft."""
    net = bare_network("egress", ("cdn.example:443", "10.1.0.0/16:22"))
    netns, calls = f"nettest-nft-{os.getpid()}", []
    real_run = hostcmd.run

    def run_inside(argv: list[str], what: str, *, input: str | None = None) -> str:
        calls.append(input)
        return real_run(["ip", "netns", "exec", netns, *argv], what, input=input)

    def open_now() -> list[str]:
        listing = run_inside(["nft", "list", "set", "inet", net.names.table, "allow_port"], "?")
        assert all("timeout 5m expires" in line for line in listing.split(",")[1:])
        return sorted(re.findall(r"(10\.1\.0\.\d+) \. 443", listing), key=ipaddress.ip_address)

    sh("ip", "netns", "add", netns)
    try:
        monkeypatch.setattr(hostcmd, "run", run_inside)
        run_inside(["nft", "-f", "-"], "?", input=net.ruleset())
        addresses = [f"10.1.0.{i}" for i in range(1, 21)]  # inside the listed network
        await net._open_firewall("cdn.example", addresses[:10])
        assert open_now() == addresses[:10]
        # The name moved on to 15 addresses, 10 of them new: 16 stay open, the latest.
        await net._open_firewall("cdn.example", addresses[5:])
        latest = open_now()
        assert len(latest) == network_sandbox.MAX_ADDRESSES and set(addresses[5:]) <= set(latest)
        before = len(calls)
        await net._open_firewall("cdn.example", addresses[5:])  # still fresh: nothing to do
        assert len(calls) == before
    finally:
        sh("ip", "netns", "del", netns)


# -- sandboxes --------------------------------------------------------------------------


async def test_none_reaches_nothing_and_has_only_lo(
    no_leftovers, workspace, test_hosts, kernel_name
):
    async with kernel(workspace, kernel_name) as (km, kc):
        assert record_of(km).netns == ""  # no namespace, veth or table was made
        result = await run(
            kc,
            "listen(9000, 'self')\n"
            "print(json.dumps([probe('127.0.0.1', 9000), probe('10.224.1.2', 8080),\n"
            f"    probe('{META}', 8080), resolve('allowed.jsb-test'),\n"
            "    sorted(name for _, name in socket.if_nameindex())]))",
        )
    # With loopback only there is no route anywhere else: gVisor's own stack says so with
    # EHOSTUNREACH, the microVM's Linux with ENETUNREACH (it has no network device at all).
    unreachable = "EHOSTUNREACH" if kernel_name == KERNEL else "ENETUNREACH"
    assert result == ["self", unreachable, unreachable, "no-dns", ["lo"]]


@pytest.mark.attack("network", "egress mode: reach hosts, ports and names off its allowlist")
async def test_egress_reaches_only_what_is_allowed(
    no_leftovers, workspace, test_hosts, hosts_file, kernel_name, verdict
):
    host_port = test_hosts["host_port"]
    # Names open private addresses only inside a listed network: the IP entries cover the
    # hosts (port 9 of the other one: nothing listens there).
    allow = [f"{ALLOWED}:8080", "allowed.jsb-test:8081", "later.jsb-test:8080", f"{BLOCKED}:9"]
    settings = {"network": "egress", "egress_allow": allow}
    async with kernel(workspace, kernel_name, **settings) as (km, kc):
        record = record_of(km)
        assert exists(record) == {"netns": True, "veth": True, "table": True}
        assert len(record.veth) <= 15
        # By IP first, before the guest asks any name: allowed names were resolved at start.
        by_ip = await probes(
            kc, [(ALLOWED, 8080), (ALLOWED, 8081), (ALLOWED, 8082), (BLOCKED, 8080), (META, 8080)]
        )
        assert by_ip == ["allowed", "allowed", "EHOSTUNREACH", "EHOSTUNREACH", "EHOSTUNREACH"]
        # The host itself: its own loopback is not the guest's; its addresses are refused,
        # and so is the kernel's own port on the host.
        shell_port = km.get_connection_info()["shell_port"]
        host_targets = [("127.0.0.1", host_port), ("127.0.0.1", shell_port)]
        host_targets += [(a, host_port) for a in host_addresses()]
        host_targets.append((host_end(record), shell_port))
        answers = await probes(kc, host_targets)
        assert answers[:2] == ["ECONNREFUSED", "ECONNREFUSED"], host_targets
        assert set(answers[2:]) == {"EHOSTUNREACH"}, list(zip(host_targets, answers, strict=True))
        assert host_end(record) in host_addresses()  # the sandbox's gateway was among them
        # Names: only the allowed ones resolve; one the host knows but the list lacks does not.
        names = await run(
            kc,
            "print(json.dumps([resolve('allowed.jsb-test'), probe('allowed.jsb-test', 8081),\n"
            "    resolve('blocked.jsb-test'), probe('blocked.jsb-test', 8080),\n"
            "    open('/etc/resolv.conf').read()]))",
        )
        assert names[:4] == [[ALLOWED], "allowed", "no-dns", "no-dns"]
        assert names[4].startswith(f"nameserver {host_end(record)}\n")
        # DNS changes later: an allowed name now points at the other host, and works.
        hosts_file.write_text(
            hosts_file.read_text().replace(f"{ALLOWED} later", f"{BLOCKED} later")
        )
        await asyncio.sleep(network_sandbox.CACHE_SECONDS + 0.2)
        later = await run(
            kc, "print(json.dumps([resolve('later.jsb-test'), probe('later.jsb-test', 8080)]))"
        )
        assert later == [[BLOCKED], "blocked"]
        verdict(
            "EHOSTUNREACH (firewall) for other hosts, ports, the metadata stand-in and the "
            "host's addresses; names off the list get no DNS answer"
        )
    assert exists(record) == {"netns": False, "veth": False, "table": False}
    assert not leftover_network()


@pytest.mark.attack(
    "network", "open mode: reach the host, a link-local metadata stand-in, other sandboxes"
)
async def test_open_reaches_the_network_but_not_the_host_metadata_or_other_sandboxes(
    no_leftovers, workspace, test_hosts, hosts_file, kernel_name, verdict
):
    host_port = test_hosts["host_port"]
    async with (
        kernel(workspace, kernel_name, network="open") as (km_a, kc_a),
        kernel(workspace, kernel_name, network="open", network_bandwidth="8M") as (km_b, kc_b),
    ):
        a, b = guest_address(record_of(km_a)), guest_address(record_of(km_b))
        targets = [(ALLOWED, 8080), (ALLOWED, 8082), (BLOCKED, 8080), ("blocked.jsb-test", 8080),
                   (META, 8080), ("127.0.0.1", host_port), (host_end(record_of(km_a)), host_port),
                   *((address, host_port) for address in host_addresses())]  # fmt: skip
        answers = await probes(kc_a, targets)
        assert answers[:4] == ["allowed", "allowed", "blocked", "blocked"]
        assert answers[4:6] == ["EHOSTUNREACH", "ECONNREFUSED"]
        assert set(answers[6:]) == {"EHOSTUNREACH"}, list(zip(targets, answers, strict=True))
        # Two sandboxes: each listens; each reaches itself, neither reaches the other.
        await run(kc_a, "listen(9000, 'sandbox-a')")
        await run(kc_b, "listen(9000, 'sandbox-b')")
        assert await probes(kc_a, [(a, 9000), (b, 9000)]) == ["sandbox-a", "EHOSTUNREACH"]
        assert await probes(kc_b, [(b, 9000), (a, 9000)]) == ["sandbox-b", "EHOSTUNREACH"]
        # Bandwidth: 1 MiB each way at 8 Mbit/s takes about 1.05 s; uncapped, far less.
        size = 1 << 20
        code = (
            f"print(json.dumps([transfer('{ALLOWED}', 8080, {size}, 'down'),"
            f" transfer('{ALLOWED}', 8080, {size}, 'up')]))"
        )
        (down_b, t_down_b), (up_b, t_up_b) = await run(kc_b, code)
        (down_a, t_down_a), (up_a, t_up_a) = await run(kc_a, code)
        assert down_a == down_b == up_a == up_b == size
        assert 0.8 <= t_down_b < 5 and 0.8 <= t_up_b < 5, (t_down_b, t_up_b)
        assert t_down_a < 0.5 and t_up_a < 0.5, (t_down_a, t_up_a)
    verdict(
        "EHOSTUNREACH (firewall) for the host's addresses, 169.254.42.1 and the other "
        "sandbox; ECONNREFUSED on 127.0.0.1, the guest's own"
    )


@contextlib.contextmanager
def nft_scratch(ruleset: str) -> Iterator[None]:
    """A table of the test's own (not ours: no `jsb_` name), deleted after."""
    family, name = ruleset.split()[1:3]
    subprocess.run(["nft", "-f", "-"], input=ruleset, check=True, text=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", family, name], check=True)


@pytest.mark.attack("network", "open mode: reach a host port published by DNAT (Docker's -p)")
async def test_open_refuses_what_the_host_publishes_by_dnat(
    no_leftovers, workspace, test_hosts, verdict
):
    """Docker's -p and NodePorts: a host port forwarded to a host behind it. The host uses it;
    a sandbox, which may reach that host directly, may not reach it as the host's port."""
    port = free_port()
    dnat = f"fib daddr type local tcp dport {port} dnat to {ALLOWED}:8082"
    with nft_scratch(
        f"""table ip nettest_dnat {{
            chain prerouting {{
                type nat hook prerouting priority -100; policy accept;
                {dnat}
            }}
            chain output {{
                type nat hook output priority -100; policy accept;
                {dnat}
            }}
        }}"""
    ):
        # The DNAT works (through the host address the "allowed" host can answer: it has
        # no default route).
        assert host_reaches("10.224.1.1", port) == "allowed"
        published = host_addresses()
        async with kernel(workspace, network="open") as (km, kc):
            record = record_of(km)
            targets = [(ALLOWED, 8082), (host_end(record), port)]
            targets += [(address, port) for address in published]
            answers = await probes(kc, targets)
    assert answers[0] == "allowed"
    assert set(answers[1:]) == {"EHOSTUNREACH"}, list(zip(targets, answers, strict=True))
    verdict("EHOSTUNREACH: refused before the host's NAT, while the host itself uses it")


async def test_the_host_cannot_send_into_a_sandbox_but_its_dns_answers(
    no_leftovers, workspace, test_hosts, hosts_file
):
    async with kernel(workspace, network="open") as (km, kc):
        guest = guest_address(record_of(km))
        await run(
            kc,
            "listen(9000, 'guest')\n"
            "udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "udp.bind(('0.0.0.0', 9001))\nudp.settimeout(2)",
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(3):
                with contextlib.suppress(OSError):  # the refusal may come back as an error
                    s.sendto(b"from the host", (guest, 9001))
        try:
            socket.create_connection((guest, 9000), timeout=5).close()
            tcp = "connected"
        except OSError as e:
            tcp = errno.errorcode.get(e.errno, str(e))
        inside = await run(
            kc,
            "try:\n    got = udp.recv(100).decode()\nexcept socket.timeout:\n    got = 'nothing'\n"
            "print(json.dumps([got, probe(socket.gethostbyname('allowed.jsb-test'), 8080),\n"
            f"    probe('{guest}', 9000)]))",
        )
    # Nothing arrived, though the guest listens there (it reaches itself) and DNS works.
    assert inside == ["nothing", "allowed", "guest"]
    assert tcp == "EHOSTUNREACH"  # refused on the way out, not after the guest's answer


@pytest.mark.attack("network", "spoof DNS queries in a sandbox's name from another link")
async def test_dns_ignores_queries_spoofed_from_another_link(
    no_leftovers, workspace, test_hosts, hosts_file, verdict
):
    """The "blocked" host sends the sandbox's DNS server a query in the sandbox's name: the
    answer would land in the sandbox (and the lookup cost the host). It must not be served."""
    async with kernel(workspace, network="open") as (km, kc):
        record = record_of(km)
        host, guest = host_end(record), guest_address(record)
        await run(
            kc,
            "replies = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "replies.bind(('0.0.0.0', 5300))\nreplies.settimeout(2)",
        )
        count = f'iifname "ntblock" ip saddr {guest} udp dport 53 counter'
        spoofer = textwrap.dedent(
            f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("{guest}", 5300))
            for _ in range(3):
                s.sendto(bytes.fromhex("{query("allowed.jsb-test").hex()}"), ("{host}", 53))
            """
        )
        ns = ["ip", "-n", "nettest-blocked"]
        sh(*ns, "addr", "add", f"{guest}/32", "dev", "eth0")
        try:
            sh(*ns, "route", "add", f"{host}/32", "via", "10.224.2.1", "src", guest)
            with nft_scratch(
                f"""table ip nettest_spoof {{
                    chain prerouting {{
                        type filter hook prerouting priority raw; policy accept;
                        {count}
                    }}
                }}"""
            ):
                sh("nsenter", "--net=/run/netns/nettest-blocked", "--", sys.executable, "-c",
                   spoofer)  # fmt: skip
                inside = await run(
                    kc,
                    "try:\n    got = replies.recv(600).hex()\nexcept socket.timeout:\n"
                    "    got = 'nothing'\nprint(json.dumps([got, resolve('allowed.jsb-test')]))",
                )
                listing = ["nft", "list", "table", "ip", "nettest_spoof"]
                counted = subprocess.run(listing, capture_output=True, text=True).stdout
        finally:
            sh(*ns, "addr", "del", f"{guest}/32", "dev", "eth0")  # its route goes with it
    assert "counter packets 3 " in counted  # the spoofed queries did reach the host
    assert inside == ["nothing", [ALLOWED]]  # no answer reached the sandbox; its own DNS works
    verdict("the 3 spoofed queries reached the host and got no answer")


async def test_egress_names_open_private_addresses_only_inside_listed_networks(
    no_leftovers, workspace, test_hosts, hosts_file
):
    """private.jsb-test points at the "blocked" host: a name must not open a private address
    (the host's LAN, say) unless the operator listed a network holding it."""
    allow = ["private.jsb-test:8080", "allowed.jsb-test:8080", "10.224.1.0/24:9"]
    async with kernel(workspace, network="egress", egress_allow=allow) as (km, kc):
        answers = await run(
            kc,
            "print(json.dumps([resolve('private.jsb-test'), probe('private.jsb-test', 8080),\n"
            f"    probe('allowed.jsb-test', 8080), probe('{ALLOWED}', 8081)]))",
        )
        listed = subprocess.run(
            ["nft", "list", "set", "inet", record_of(km).nft_table, "allow_port"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    # Answered (the guest knows the address), not opened; the covered one opened, with a
    # timeout, on its own port only.
    assert answers == [[BLOCKED], "EHOSTUNREACH", "allowed", "EHOSTUNREACH"]
    assert f"{ALLOWED} . 8080 timeout 5m expires" in listed and BLOCKED not in listed, listed


def forwarding() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


def set_forwarding(value: str) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text(value)


def between_test_hosts() -> str:
    """What the "allowed" host gets from the "blocked" one, routed through this host."""
    code = textwrap.dedent(
        f"""
        import socket
        try:
            socket.create_connection(("{BLOCKED}", 8080), timeout=1).close()
            print("connected")
        except OSError as e:
            print(type(e).__name__)
        """
    )
    out = subprocess.run(
        ["nsenter", "--net=/run/netns/nettest-allowed", "--", sys.executable, "-c", code],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.strip()


async def test_forwarding_is_for_sandboxes_only_and_undone_after_the_last(
    no_leftovers, workspace, test_hosts
):
    if network_gc.host_objects().links:
        skip_or_fail("another server's sandboxes are using forwarding now")
    original = forwarding()
    routes = [("nettest-allowed", "10.224.2.0/30", "10.224.1.1"),
              ("nettest-blocked", "10.224.1.0/30", "10.224.2.1")]  # fmt: skip
    try:
        for netns, where, via in routes:
            sh("ip", "-n", netns, "route", "add", where, "via", via)
        set_forwarding("1")  # what the old code left: the host routes between the test hosts
        assert between_test_hosts() == "connected"
        set_forwarding("0")
        allow = [f"{ALLOWED}:8080"]
        async with kernel(workspace, network="egress", egress_allow=allow) as (_, kc):
            during = (forwarding(), network_host.guard_exists(), between_test_hosts())
            reached = await probes(kc, [(ALLOWED, 8080)])
        after = (forwarding(), network_host.guard_exists(), network_host.FORWARDING_BEFORE.exists())
    finally:
        for netns, where, via in routes:
            subprocess.run(["ip", "-n", netns, "route", "del", where, "via", via])
        set_forwarding(original)
    assert during == ("1", True, "TimeoutError")  # the guard drops what is not a sandbox's
    assert reached == ["allowed"]
    assert after == ("0", False, False)


UDP_TARGET = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 7777))
    print("ready", flush=True)
    data, peer = s.recvfrom(100)
    s.sendto(b"reply", peer)
    sys.stdin.readline()  # later, on the test's word: to the same peer, through the old flow
    s.sendto(b"late", peer)
    print("sent", flush=True)
    """
)


def flows_of(address: str) -> list[str]:
    found = []
    for direction in ("--orig-src", "--orig-dst"):
        listing = subprocess.run(["conntrack", "-L", direction, address], capture_output=True,
                                 text=True)  # fmt: skip
        found += listing.stdout.splitlines()
    return found


async def test_a_sandbox_flows_do_not_reach_the_next_one_on_its_subnet(
    no_leftovers, workspace, test_hosts, monkeypatch
):
    """Sandbox A talks UDP with the "allowed" host and goes; B gets A's /30 (forced here: the
    random pick avoids it). The host sends again to A's old flow: B must get nothing."""
    target = subprocess.Popen(
        ["nsenter", "--net=/run/netns/nettest-allowed", "--", sys.executable, "-c", UDP_TARGET,
         ALLOWED],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    b_record = b_net = listener = None
    try:
        assert target.stdout.readline().strip() == "ready"
        async with kernel(workspace, network="open") as (km, kc):
            a_record = record_of(km)
            got = await run(
                kc,
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "s.bind(('0.0.0.0', 5000))\ns.settimeout(5)\n"
                f"s.sendto(b'hi', ('{ALLOWED}', 7777))\n"
                "print(json.dumps(s.recv(100).decode()))",
            )
            assert got == "reply"
            guest = guest_address(a_record)
            assert flows_of(guest)  # the flow a later packet could ride
        assert not flows_of(guest)
        monkeypatch.setattr(
            network_sandbox, "free_subnet", lambda: ipaddress.IPv4Network(a_record.subnet)
        )
        b_record = Record(sandbox_id=f"jsb-nettest-{os.getpid()}", kernel_id="?", backend="gvisor")
        b_net = network_sandbox.SandboxNetwork(NetworkSpec(mode="egress"), b_record,
                                               logging.getLogger("test"))  # fmt: skip
        await b_net.open()
        assert b_net.guest_ip == guest
        listener = subprocess.Popen(
            ["nsenter", f"--net={b_net.netns_path}", "--", sys.executable, "-c",
             "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "s.bind(('0.0.0.0', 5000))\ns.settimeout(3)\nprint('ready', flush=True)\n"
             "try:\n    print(s.recv(100).decode())\nexcept socket.timeout:\n    print('nothing')"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert listener.stdout.readline().strip() == "ready"
        target.stdin.write("go\n")
        target.stdin.flush()
        assert target.stdout.readline().strip() == "sent"
        assert listener.communicate(timeout=10)[0].strip() == "nothing"
    finally:
        for process in (target, listener):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if b_net is not None:
            b_net.close()
        if b_record is not None:
            network_gc.remove(b_record, logging.getLogger("test"))
            b_record.remove()


async def test_gc_of_another_runtime_dir_spares_live_sandboxes(
    no_leftovers, workspace, test_hosts, tmp_path
):
    """Two servers on one host with their own runtime dirs: each one's gc sees only its own
    records, and must leave the other's running sandboxes' networks alone."""
    async with kernel(workspace, network="open") as (km, kc):
        record = record_of(km)
        env = {**os.environ, "JUPYTER_SANDBOX_RUNTIME_DIR": str(tmp_path / "other")}
        gc = subprocess.run([*JUPYTER_SANDBOX, "gc"], env=env, capture_output=True, text=True)
        assert gc.returncode == 0, gc.stderr
        assert exists(record) == {"netns": True, "veth": True, "table": True}
        assert await probes(kc, [(ALLOWED, 8080)]) == ["allowed"]


# The guest's side of the flood: 16 queries for names nobody knows every 0.5 s, the rate that
# used to starve the server's thread pool; it counts the answers by kind.
GUEST_FLOOD = textwrap.dedent(
    """
    import collections, json, random, socket, struct, time
    def query(name, ident):
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
        return struct.pack("!6H", ident, 0x0100, 1, 0, 0, 0) + labels + b"\\0\\1\\0\\1"
    server = open("/etc/resolv.conf").read().split()[1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    answers, fast, sent, end = collections.Counter(), 0, {}, time.monotonic() + SECONDS
    while time.monotonic() < end:
        for _ in range(16):
            ident = len(sent) & 0xFFFF
            sent[ident] = time.monotonic()
            s.sendto(query(f"x{len(sent)}-{random.randrange(10**9)}.jsb-slow", ident), (server, 53))
        time.sleep(0.5)
        while True:
            try:
                reply = s.recv(600)
            except BlockingIOError:
                break
            ident, flags = struct.unpack_from("!2H", reply)
            answers[flags & 0xF] += 1
            fast += time.monotonic() - sent[ident] < 1
    print(json.dumps({"sent": len(sent), "answers": answers, "fast": fast}))
    """
)

# The server, in a mount namespace of its own whose resolv.conf names a resolver that never
# answers (a socket of this process on loopback): every lookup of an unknown name hangs, as
# with a slow upstream, and none leaves the machine.
FLOOD_SERVER = textwrap.dedent(
    """
    import asyncio, json, socket, sys, time
    from jupyter_client.ioloop import AsyncIOLoopKernelManager
    from traitlets.config import Config
    from provisioner.ioloop import run_on_io

    kernel_name, workspace, flood = sys.argv[1:4]
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.77", 53))  # never read: queries wait, no error comes back
    EGRESS = {"network": "egress", "egress_allow": ["allowed.jsb-test:8080"]}

    async def start(**settings):
        km = AsyncIOLoopKernelManager(
            kernel_name=kernel_name, config=Config({"GVisorProvisioner": settings})
        )
        started = time.monotonic()
        await km.start_kernel(cwd=workspace)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        return km, kc, time.monotonic() - started

    async def stop(km, kc):
        kc.stop_channels()
        await km.shutdown_kernel(now=True)

    async def thread_pool_delay():
        started = time.monotonic()
        await run_on_io(asyncio.to_thread(lambda: None))
        return time.monotonic() - started

    async def start_and_stop(**settings):
        km, kc, took = await start(**settings)
        await stop(km, kc)
        return took

    async def main():
        await start_and_stop(**EGRESS)  # warms the caches the later ones find warm
        alone = await start_and_stop(**EGRESS)
        flooder, fc, _ = await start(network="open")
        try:
            out = []
            flooding = asyncio.ensure_future(fc.execute_interactive(
                flood, timeout=120, output_hook=out.append))
            await asyncio.sleep(3)
            delay = await thread_pool_delay()
            during = await start_and_stop(**EGRESS)
            await flooding
        finally:
            await stop(flooder, fc)
        text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        print(json.dumps({"alone": alone, "during": during, "delay": delay,
                          "guest": json.loads(text.strip().splitlines()[-1])}))

    asyncio.run(main())
    """
)


def test_a_dns_flood_does_not_hold_up_other_kernels(no_leftovers, workspace, hosts_file, tmp_path):
    """One open kernel floods its DNS with unknown names while the resolver hangs; another
    user's kernel, started meanwhile, starts about as fast as alone."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.77\noptions timeout:5 attempts:2\n")
    seconds = 10
    flood = GUEST_FLOOD.replace("SECONDS", str(seconds))
    server = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
         str(resolv), sys.executable, "-c", FLOOD_SERVER, KERNEL, str(workspace), flood],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert server.returncode == 0, server.stderr[-3000:]
    result = json.loads(server.stdout.strip().splitlines()[-1])
    guest = result["guest"]
    # The flood happened and met a hanging resolver: SERVFAIL only (never NXDOMAIN), nearly
    # all at once (the sandbox's lookup slots were full), a few after the lookup timeout.
    assert guest["sent"] >= 16 * seconds
    assert set(guest["answers"]) == {str(dns.SERVFAIL)}, guest
    assert guest["fast"] >= guest["sent"] - 2 * network_sandbox.LOOKUPS_PER_SANDBOX * seconds, guest
    # Meanwhile the server's own threads stayed free, and another kernel started in time.
    assert result["delay"] < 0.5, result
    assert result["during"] < result["alone"] + 3, result
    assert not leftover_network()


async def test_failed_network_setup_leaves_nothing(
    no_leftovers, workspace, monkeypatch, kernel_name
):
    seen: dict[str, bool] = {}

    def fail(self, rate: int) -> None:
        seen.update(exists(self.record))  # made so far: namespace, veth, table
        if kernel_name != KERNEL:  # and the microVM's tap and bridge
            seen["tap"] = bool(in_netns(self.record, "ip", "link", "show", network_tap.TAP_IF))
        raise SandboxError("tc failed (injected by the test)")

    monkeypatch.setattr(network_sandbox.SandboxNetwork, "_limit_bandwidth", fail)
    km = AsyncIOLoopKernelManager(
        kernel_name=kernel_name,
        config=Config({"SandboxProvisioner": {"network": "open", "network_bandwidth": "1M"}}),
    )
    with pytest.raises(SandboxError, match="injected by the test"):
        await km.start_kernel(cwd=str(workspace))
    made = {"netns": True, "veth": True, "table": True}
    assert seen == (made if kernel_name == KERNEL else {**made, "tap": True})
    assert not leftover_network()


def in_netns(record: Record, *argv: str) -> str:
    """What a command run in a sandbox's namespace prints ("" if it fails)."""
    result = subprocess.run(
        ["nsenter", f"--net=/run/netns/{record.netns}", "--", *argv],
        capture_output=True,
        text=True,
    )
    return result.stdout if result.returncode == 0 else ""


async def test_microvm_start_failing_after_its_network_leaves_nothing(
    no_leftovers, workspace, monkeypatch
):
    """The network is made, then the VM cannot start (its cgroup fails): all of it goes."""
    require_sandbox("microvm")
    seen: dict[str, object] = {}

    def fail(*args, **kwargs):
        record = next(r for r in records() if r.backend == "microvm" and r.netns)
        seen.update(exists(record))
        seen["ports"] = sorted(
            re.findall(rf"\d+: (\w+)(?:@\w+)?: .*master {network_sandbox.BRIDGE_IF}",
                       in_netns(record, "ip", "-o", "link", "show"))
        )  # fmt: skip
        raise SandboxError("cgroup failed (injected by the test)")

    monkeypatch.setattr(cgroups, "create", fail)
    km = AsyncIOLoopKernelManager(
        kernel_name=BACKENDS["microvm"], config=Config({"SandboxProvisioner": {"network": "open"}})
    )
    with pytest.raises(SandboxError, match="injected by the test"):
        await km.start_kernel(cwd=str(workspace))
    ports = sorted([network_sandbox.GUEST_IF, network_tap.TAP_IF])
    assert seen == {"netns": True, "veth": True, "table": True, "ports": ports}
    assert not leftover_network()


def tun_descriptors(pid: int | str = "self") -> dict[int, str]:
    """A process's open /dev/net/tun descriptors -> the tap each is attached to ("" if none)."""
    found = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if str(fd.readlink()) == "/dev/net/tun":
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                found[int(fd.name)] = "".join(re.findall(r"^iff:\s*(\S+)$", info, re.MULTILINE))
    return found


async def test_microvm_qemu_gets_an_attached_tap_and_never_opens_dev_net_tun(
    no_leftovers, workspace, test_hosts
):
    """Issue 14: where /dev/net/tun is root's alone (0600, a fresh Debian machine), QEMU, which
    runs as the workspace's owner, could not open it. The backend attaches to the tap and
    QEMU gets the descriptor: its command line names an fd, never an ifname, the guest's
    network works through it, and nothing changed the device's mode."""
    require_sandbox("microvm")
    tun_mode = network_tap.TUN_DEVICE.stat().st_mode
    async with kernel(workspace, BACKENDS["microvm"], network="open") as (km, kc):
        pid = record_of(km).pid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        netdev = argv[argv.index("-netdev") + 1]
        fd = re.fullmatch(r"tap,id=net0,fd=(\d+)", netdev)
        assert fd is not None, netdev
        assert not any("ifname" in arg or "script" in arg for arg in argv), argv
        assert tun_descriptors(pid) == {int(fd.group(1)): network_tap.TAP_IF}
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
        assert uids == ["1000"] * 4  # QEMU is the workspace's owner, not root
        assert await probes(kc, [(ALLOWED, 8080)]) == ["allowed"]
        assert tun_descriptors() == {}  # the backend's own copy is closed
    assert network_tap.TUN_DEVICE.stat().st_mode == tun_mode  # nothing chmods it


def test_open_tap_attaches_only_to_an_existing_tap_in_its_namespace(sandbox_host):
    """`open_tap` attaches in the named namespace, with the flags QEMU is told of; where the
    tap is missing it fails (TUNSETIFF would make a new, unbridged one) and keeps nothing."""
    import fcntl

    netns = f"jsbt-tap-{os.getpid()}"  # not ours (jsb-): no gc may take it meanwhile
    sh("ip", "netns", "add", netns)
    try:
        with pytest.raises(OSError, match=f"cannot attach to tap {network_tap.TAP_IF}") as missing:
            network_tap.open_tap(Path("/run/netns", netns))
        assert missing.value.errno == errno.ENODEV
        assert tun_descriptors() == {}
        links = in_netns(Record("?", "?", "?", netns=netns), "ip", "-o", "link")
        assert "lo:" in links and network_tap.TAP_IF not in links  # none made meanwhile
        sh("ip", "-n", netns, "tuntap", "add", "dev", network_tap.TAP_IF, "mode", "tap")
        fd = network_tap.open_tap(Path("/run/netns", netns))
        try:
            assert tun_descriptors() == {fd: network_tap.TAP_IF}
            flags = struct.unpack("16sH", fcntl.ioctl(fd, 0x800454D2, bytes(40))[:18])[1]
            assert flags & network_tap.TAP_FLAGS == network_tap.TAP_FLAGS  # TUNGETIFF
            assert flags & 0x0800  # IFF_PERSIST: the tap `ip` made, not a new one
            assert not Path("/sys/class/net", network_tap.TAP_IF).exists()  # not the host's
        finally:
            os.close(fd)
    finally:
        sh("ip", "netns", "del", netns)
    assert tun_descriptors() == {}


def test_gc_removes_the_network_of_a_server_that_died(sandbox_host, workspace):
    script = textwrap.dedent(
        f"""
        import asyncio
        from jupyter_client.manager import AsyncKernelManager
        from traitlets.config import Config
        async def main():
            config = Config({{"GVisorProvisioner": {{"network": "egress",
                                                     "egress_allow": ["{ALLOWED}:8080"],
                                                     "network_bandwidth": "10M"}}}})
            km = AsyncKernelManager(kernel_name={KERNEL!r}, config=config)
            await km.start_kernel(cwd={str(workspace)!r})
            print(km.provisioner.sandbox_id, flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id = server.stdout.readline().strip()
        assert sandbox_id.startswith("jsb-")
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    record = next(r for r in records() if r.sandbox_id == sandbox_id)
    assert exists(record) == {"netns": True, "veth": True, "table": True}
    gc = subprocess.run([*JUPYTER_SANDBOX, "gc"], capture_output=True, text=True, check=True)
    assert "removed" in gc.stdout
    assert exists(record) == {"netns": False, "veth": False, "table": False}
    assert sandbox_id not in {r.sandbox_id for r in records()}
    assert not leftover_network()


async def test_microvm_reap_removes_its_network(sandbox_host):
    """What `gc` does for a microVM sandbox whose server died: its reap removes the network
    too (namespace with tap and bridge, link, table), the record naming them."""
    from provisioner.backends import microvm

    record = Record(sandbox_id=f"jsb-reap-{os.getpid()}", kernel_id="?", backend="microvm")
    spec = NetworkSpec(mode="open")
    net = network_sandbox.SandboxNetwork(spec, record, logging.getLogger("test"), tap=True)
    await net.open()
    net.close()
    try:
        assert exists(record) == {"netns": True, "veth": True, "table": True}
        tap = in_netns(record, "ip", "-d", "link", "show", network_tap.TAP_IF)
        assert "tun type tap" in tap and f"master {network_sandbox.BRIDGE_IF}" in tap
        owner = subprocess.run(
            ["ip", "netns", "exec", record.netns, "cat",
             f"/sys/class/net/{network_tap.TAP_IF}/owner"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert owner.stdout.strip() == "-1"  # no owner: only root (the backend) may attach
    finally:
        microvm.MICROVM.reap(record, logging.getLogger("test"))
    assert exists(record) == {"netns": False, "veth": False, "table": False}
    assert not leftover_network()


def test_gc_removes_network_objects_of_no_sandbox(sandbox_host):
    """What a crash between `ip netns add` and the record's save would leave."""
    orphan = network_host.names(f"jsb-orphan-{os.getpid()}")
    sh("ip", "netns", "add", orphan.netns)
    peer = ["peer", "name", "eth0", "netns", orphan.netns]
    sh("ip", "link", "add", orphan.veth, "type", "veth", *peer)
    sh("nft", "add", "table", "inet", orphan.table)
    assert leftover_network()
    subprocess.run([*JUPYTER_SANDBOX, "gc"], capture_output=True, text=True, check=True)
    assert not leftover_network()
