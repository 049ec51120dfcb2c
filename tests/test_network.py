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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import KERNEL, execute, leftover_network
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner import dns, network
from provisioner.errors import SandboxError, SettingError
from provisioner.state import Record, records

JUPYTER_SANDBOX = [str(Path(sys.executable).parent / "jupyter"), "sandbox"]
ALLOWED, BLOCKED, META = "10.224.1.2", "10.224.2.2", "169.254.42.1"
HOSTS_LINES = f"{ALLOWED} allowed.jsb-test\n{BLOCKED} blocked.jsb-test\n{ALLOWED} later.jsb-test\n"

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
    try:
        for netns, veth, n, name, ports in (
            ("nettest-allowed", "ntallow", 1, "allowed", (8080, 8081, 8082)),
            ("nettest-blocked", "ntblock", 2, "blocked", (8080,)),
            ("nettest-meta", "ntmeta", 3, "meta", ()),
        ):
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hosts_file() -> Iterator[Path]:
    """Test names in the host's /etc/hosts; the file is restored even on failure."""
    path = Path("/etc/hosts")
    original = path.read_text()
    path.write_text(original.rstrip("\n") + "\n" + HOSTS_LINES)
    try:
        yield path
    finally:
        path.write_text(original)


# -- kernels --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def kernel(workspace: Path, **settings) -> AsyncIterator[tuple]:
    """A started kernel with these provisioner settings and `PROBE` defined in it."""
    km = AsyncIOLoopKernelManager(
        kernel_name=KERNEL, config=Config({"GVisorProvisioner": settings})
    )
    await km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
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
    tables = network.host_objects().tables
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
        ("pypi.org:443", network.Destination(host="pypi.org", port=443)),
        ("PyPI.org.", network.Destination(host="pypi.org")),
        ("10.0.0.0/8", network.Destination(net=ipaddress.IPv4Network("10.0.0.0/8"))),
        (
            "192.0.2.7:8080",
            network.Destination(net=ipaddress.IPv4Network("192.0.2.7/32"), port=8080),
        ),
    ],
)
def test_destinations_as_operators_write_them(text, expected):
    assert network.parse_destination(text) == expected
    assert str(expected) == text.lower().rstrip(".")


@pytest.mark.parametrize(
    "text, rate",
    [("10M", 10**7), ("512k", 512_000), ("1G", 10**9), ("8Mbit", 8 * 10**6), ("", None)],
)
def test_bandwidths_as_operators_write_them(text, rate):
    assert network.parse_bandwidth(text) == rate


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


# -- sandboxes --------------------------------------------------------------------------


async def test_none_reaches_nothing_and_has_only_lo(no_leftovers, workspace, test_hosts):
    async with kernel(workspace) as (km, kc):
        assert record_of(km).netns == ""  # no namespace, veth or table was made
        result = await run(
            kc,
            "listen(9000, 'self')\n"
            "print(json.dumps([probe('127.0.0.1', 9000), probe('10.224.1.2', 8080),\n"
            f"    probe('{META}', 8080), resolve('allowed.jsb-test'),\n"
            "    sorted(name for _, name in socket.if_nameindex())]))",
        )
    # gVisor's own network stack, with loopback only, has no route anywhere else
    assert result == ["self", "EHOSTUNREACH", "EHOSTUNREACH", "no-dns", ["lo"]]


async def test_egress_reaches_only_what_is_allowed(no_leftovers, workspace, test_hosts, hosts_file):
    host_port = test_hosts["host_port"]
    allow = [f"{ALLOWED}:8080", "allowed.jsb-test:8081", "later.jsb-test:8080"]
    async with kernel(workspace, network="egress", egress_allow=allow) as (km, kc):
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
        await asyncio.sleep(network.CACHE_SECONDS + 0.2)
        later = await run(
            kc, "print(json.dumps([resolve('later.jsb-test'), probe('later.jsb-test', 8080)]))"
        )
        assert later == [[BLOCKED], "blocked"]
    assert exists(record) == {"netns": False, "veth": False, "table": False}
    assert not leftover_network()


async def test_open_reaches_the_network_but_not_the_host_metadata_or_other_sandboxes(
    no_leftovers, workspace, test_hosts, hosts_file
):
    host_port = test_hosts["host_port"]
    async with (
        kernel(workspace, network="open") as (km_a, kc_a),
        kernel(workspace, network="open", network_bandwidth="8M") as (km_b, kc_b),
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


async def test_failed_network_setup_leaves_nothing(no_leftovers, workspace, monkeypatch):
    seen: dict[str, bool] = {}

    def fail(self, rate: int) -> None:
        seen.update(exists(self.record))  # made so far: namespace, veth, table
        raise SandboxError("tc failed (injected by the test)")

    monkeypatch.setattr(network.SandboxNetwork, "_limit_bandwidth", fail)
    km = AsyncIOLoopKernelManager(
        kernel_name=KERNEL,
        config=Config({"GVisorProvisioner": {"network": "open", "network_bandwidth": "1M"}}),
    )
    with pytest.raises(SandboxError, match="injected by the test"):
        await km.start_kernel(cwd=str(workspace))
    assert seen == {"netns": True, "veth": True, "table": True}
    assert not leftover_network()


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


def test_gc_removes_network_objects_of_no_sandbox(sandbox_host):
    """What a crash between `ip netns add` and the record's save would leave."""
    orphan = network.names(f"jsb-orphan-{os.getpid()}")
    sh("ip", "netns", "add", orphan.netns)
    peer = ["peer", "name", "eth0", "netns", orphan.netns]
    sh("ip", "link", "add", orphan.veth, "type", "veth", *peer)
    sh("nft", "add", "table", "inet", orphan.table)
    assert leftover_network()
    subprocess.run([*JUPYTER_SANDBOX, "gc"], capture_output=True, text=True, check=True)
    assert not leftover_network()
