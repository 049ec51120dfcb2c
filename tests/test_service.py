"""The sandbox service (`jupyter sandbox serve`) with real callers: local users made by the
test, whose processes connect to it (the kernel tells the service who they are), and
whose own Jupyter clients start real gVisor kernels through it."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import execute, leftover_cgroups
from images_kit import MARKER
from jupyter_client.manager import AsyncKernelManager
from provisioner.guest.protocol import FROM_GUEST, FrameReader, Kind
from service_kit import (
    USER_PYTHON,
    Service,
    as_user,
    close_all,
    containers,
    memory_limit_of,
    require_user_venv,
    service_records,
    system_users,
    wait_until,
)
from traitlets.config import Config

from provisioner.state import records

USERS = ("jsbt-ann", "jsbt-bob", "jsbt-cat", "jsbt-dan", "jsbt-eve")
POLICY = """
[default]
memory_limit = "768M"
cpu_limit = 1.0
pids_limit = 256
max_kernels = 8
kernelspecs = ["python3-gvisor"]

[users.jsbt-ann]
memory_limit = "512M"
pids_limit = 128

[users.jsbt-eve]
network = "egress"
egress_allow = ["jsb-service.test:80"]
"""
GRACE = 3.0

pytestmark = pytest.mark.usefixtures("sandbox_host")

# A user's own Jupyter client: starts kernels (in service mode: it is not root), runs
# cells in each, and prints what it saw as JSON. With "pause", it prints the sandbox ids
# after the first cell and waits for a line on stdin before the others.
KERNELS = r"""
import asyncio, json, sys
from jupyter_client.manager import AsyncKernelManager

job = json.loads(sys.argv[1])

async def run(km, kc, code):
    out = []
    def hook(msg):
        if msg["msg_type"] in ("stream", "error"):
            out.append(msg["content"].get("text") or msg["content"].get("evalue", ""))
    try:
        reply = await kc.execute_interactive(code, timeout=job.get("timeout", 60), output_hook=hook)
        status = reply["content"]["status"]
    except TimeoutError:
        status = "timeout"
    return {"status": status, "out": "".join(out)}

async def start():
    km = AsyncKernelManager(kernel_name="python3-gvisor")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=120)
    return km, kc

async def main():
    kernels = await asyncio.gather(*(start() for _ in range(job["kernels"])))
    results = [[await run(km, kc, job["cells"][0])] for km, kc in kernels]
    if job.get("pause"):
        print(json.dumps([km.provisioner.sandbox_id for km, _ in kernels]), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for (km, kc), seen in zip(kernels, results):
            seen.append({"alive": await km.is_alive()})
    for (km, kc), seen in zip(kernels, results):
        for code in job["cells"][1:]:
            seen.append(await run(km, kc, code))
    report = [
        {"cells": seen, "service": km.provisioner.through_service,
         "memory_limit": km.provisioner.memory_limit, "sandbox_id": km.provisioner.sandbox_id}
        for (km, kc), seen in zip(kernels, results)
    ]
    for km, kc in kernels:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    print(json.dumps(report), flush=True)

asyncio.run(main())
"""


def kernels_as(user, job: dict, **kwargs) -> subprocess.Popen:
    return as_user(
        user,
        [str(USER_PYTHON), "-c", KERNELS, json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"the user's client failed:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def users():
    with system_users(*USERS) as made:
        yield made


@pytest.fixture(scope="module")
def service(users):
    folder = Path(tempfile.mkdtemp(prefix="jsb-service-", dir="/tmp"))
    svc = Service(folder, POLICY, grace=GRACE).start()
    yield svc
    if svc.proc.poll() is None:
        assert svc.stop() == 0
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def nothing_left(users, service):
    """After the test: none of the test users' sandboxes, containers or cgroups remain."""
    uids = {u.pw_uid for u in users.values()}
    yield
    wait_until(lambda: not service_records(uids), GRACE + 15, "the users' sandboxes are gone")
    ours = {r.sandbox_id for r in records()}
    assert not {c for c in containers() if c.startswith("jsb-")} - ours
    assert not leftover_cgroups()


def hello_from(read_fd: int) -> Kind:
    """The first frame the agent sends on a channel the service handed over."""
    reader = FrameReader(FROM_GUEST)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 1)
        if ready:
            for frame in reader.feed(os.read(read_fd, 65536)):
                return frame.kind
    raise AssertionError("no frame from the agent")


def test_the_caller_is_who_the_kernel_says_it_is(users, service, nothing_left):
    ann, bob = users["jsbt-ann"], users["jsbt-bob"]
    a, b = service.caller(ann), service.caller(bob)
    # a claim in the request is not even accepted
    claim, _ = a.call("create", kernel_id="k1", kernel_name="python3-gvisor", settings={},
                      cwd=ann.pw_dir, user="jsbt-bob")  # fmt: skip
    assert not claim["ok"] and claim["kind"] == "request"
    assert "unknown field user" in claim["error"]

    made, fds = a.create(ann.pw_dir)
    other, other_fds = b.create(bob.pw_dir)
    try:
        assert made["ok"] and other["ok"], (made, other)
        assert made["user"] == "jsbt-ann" and other["user"] == "jsbt-bob"
        assert made["settings"]["memory_limit"] == "512M"  # [users.jsbt-ann]
        assert other["settings"]["memory_limit"] == "768M"  # [default]
        assert len(fds) == 3  # the channel (both ways) and the console, for the caller only
        assert hello_from(fds[0]) is Kind.HELLO
        record = next(r for r in records() if r.sandbox_id == made["sandbox_id"])
        assert (record.uid, record.user, record.owner_pid) == (ann.pw_uid, "jsbt-ann", service.pid)
        assert memory_limit_of(record) == 512 << 20
        assert "/users/u-jsbt-ann/" in record.cgroup
        record_b = next(r for r in records() if r.sandbox_id == other["sandbox_id"])
        assert memory_limit_of(record_b) == 768 << 20
        # each sees only its own
        listed, _ = a.call("list")
        assert [s["sandbox_id"] for s in listed["sandboxes"]] == [made["sandbox_id"]]
        for caller, reply in ((a, made), (b, other)):
            done, _ = caller.call("destroy", sandbox_id=reply["sandbox_id"])
            assert done["ok"], done
        assert made["sandbox_id"] not in containers()
    finally:
        close_all(fds + other_fds)
        a.close()
        b.close()


def test_hostile_requests_get_an_error_and_change_nothing(users, service, nothing_left, tmp_path):
    ann, bob = users["jsbt-ann"], users["jsbt-bob"]
    b = service.caller(bob)
    victim, victim_fds = b.create(bob.pw_dir)
    assert victim["ok"], victim
    secret = Path(bob.pw_dir) / "notes"
    secret.mkdir()
    os.chown(secret, bob.pw_uid, bob.pw_gid)
    link = Path(ann.pw_dir) / "bobs-notes"
    link.symlink_to(secret)
    before = {r.sandbox_id for r in records()}
    service_fds = len(list(Path(f"/proc/{service.pid}/fd").iterdir()))
    a = service.caller(ann)

    def create(**overrides):
        request = {"kernel_id": "k-hostile", "kernel_name": "python3-gvisor",
                   "settings": {}, "cwd": ann.pw_dir, **overrides}  # fmt: skip
        return a.call("create", **request)[0]

    refused = {
        "not JSON": (b"not json", "not JSON"),
        "not an object": (b"[1, 2]", "not a JSON object"),
        "too long": (b'{"id": 1, "op": "list", "x": "' + b"x" * 70000 + b'"}', "longer"),
        "too deep": (b"[" * 30000 + b"]" * 30000, "not JSON"),
    }
    for what, (raw, error) in refused.items():
        a.send(raw)
        reply, _ = a.reply(None)
        assert not reply["ok"] and error in reply["error"], what
    cases = [
        (a.call("format_disk")[0], "request", "op: expected"),
        (a.call("destroy")[0], "request", "sandbox_id"),
        (create(kernel_id="../../etc"), "request", "kernel_id"),
        (create(backend="microvm"), "request", "unknown field backend"),
        (create(kernel_name="python3"), "request", "not a sandboxed one"),
        (create(kernel_name="python3-microvm"), "policy", "does not let jsbt-ann start kernel"),
        (create(kernel_name="no-such-kernel"), "request", "no kernelspec"),
        (create(settings={"open_files_limit": 10**6}), "policy", "at most 4096"),  # unnamed
        (a.call("attach", sandbox_ids=["jsb-x"] * 300)[0], "request", "at most 256"),
        (create(cwd="relative/path"), "request", "absolute"),
        (create(settings={"kernel_uid": 0}), "request", "settings"),
        (create(settings={"runsc_path": "/tmp/evil"}), "request", "settings"),
        (create(settings={"image": "/tmp/my-rootfs"}), "setting", "image"),
        (create(settings={"memory_limit": "lots"}), "setting", "memory_limit"),
        (create(settings={"memory_limit": "4G"}), "policy", "at most '512M'"),
        (create(settings={"pids_limit": 100000}), "policy", "at most 128"),
        (create(cwd="/etc"), "sandbox", "system folder"),
        (create(cwd=bob.pw_dir), "sandbox", "not a folder you own"),
        (create(cwd=str(secret)), "sandbox", "not a folder you own"),
        (create(cwd=str(link)), "sandbox", "not a folder you own"),  # a link: never followed
        (create(cwd=str(link) + "/."), "sandbox", "not a folder you own"),
        (create(cwd=f"{ann.pw_dir}/../jsbt-bob"), "sandbox", "not a folder you own"),
        (create(cwd="/home/nobody-here"), "sandbox", "not a folder you own"),
        (a.call("kill", sandbox_id=victim["sandbox_id"])[0], "request", "no sandbox"),
        (a.call("destroy", sandbox_id=victim["sandbox_id"])[0], "request", "no sandbox"),
        (a.call("destroy", sandbox_id="jsb-none")[0], "request", "no sandbox"),
    ]
    for reply, kind, error in cases:
        assert not reply["ok"] and reply["kind"] == kind and error in reply["error"], reply
    # a foreign id and a missing one are told apart by nothing
    assert cases[-2][0]["error"].replace(victim["sandbox_id"], "X") == cases[-1][0][
        "error"
    ].replace("jsb-none", "X")
    taken, _ = a.call("attach", sandbox_ids=[victim["sandbox_id"]])
    assert taken["ok"] and taken["attached"] == {} and taken["unknown"] == [victim["sandbox_id"]]
    # descriptors sent to the service are refused (the kernel closes them: no room for them)
    r, w = os.pipe()
    a.send({"id": 99, "op": "list"}, fds=[r, w])
    close_all([r])
    refused_fds, _ = a.reply(None)
    assert not refused_fds["ok"] and "descriptors are not accepted" in refused_fds["error"]
    with pytest.raises(BrokenPipeError):  # no copy of the read end is left anywhere
        os.write(w, b"x")
    close_all([w])
    listed, _ = a.call("list")  # and the connection still serves
    assert listed["ok"] and listed["sandboxes"] == []

    assert {r.sandbox_id for r in records()} == before  # nothing made, nothing removed
    victim_record = next(r for r in records() if r.sandbox_id == victim["sandbox_id"])
    assert victim_record.process_alive() and victim_record.uid == bob.pw_uid
    assert service.proc.poll() is None
    a.close()
    time.sleep(0.5)
    assert len(list(Path(f"/proc/{service.pid}/fd").iterdir())) <= service_fds
    done, _ = b.call("destroy", sandbox_id=victim["sandbox_id"])
    assert done["ok"]
    close_all(victim_fds)
    b.close()


def test_a_callers_sandboxes_wait_for_it_then_go(users, service, nothing_left):
    ann, bob = users["jsbt-ann"], users["jsbt-bob"]
    a = service.caller(ann)
    kept, kept_fds = a.create(ann.pw_dir)
    dropped, dropped_fds = a.create(ann.pw_dir)
    ended, ended_fds = a.create(ann.pw_dir)
    assert kept["ok"] and dropped["ok"] and ended["ok"]
    try:
        # A sandbox whose channel its caller closes ends, and the caller is told.
        close_all(ended_fds)
        told, _ = a.recv()
        assert told == {
            "event": "exited",
            "sandbox_id": ended["sandbox_id"],
            "status": told["status"],
        }
        a.call("destroy", sandbox_id=ended["sandbox_id"])
        # The caller goes (the server's connection drops); its sandboxes wait for it.
        a.close()
        time.sleep(GRACE / 3)
        ids = {r.sandbox_id for r in records()}
        assert {kept["sandbox_id"], dropped["sandbox_id"]} <= ids
        b = service.caller(bob)
        stolen, _ = b.call("attach", sandbox_ids=[kept["sandbox_id"]])
        assert stolen["attached"] == {} and stolen["unknown"] == [kept["sandbox_id"]]
        again = service.caller(ann)
        back, _ = again.call("attach", sandbox_ids=[kept["sandbox_id"]])
        assert back["attached"] == {kept["sandbox_id"]: None}
        # past the grace period: the one not attached again is gone, wholly
        wait_until(
            lambda: dropped["sandbox_id"] not in {r.sandbox_id for r in records()},
            GRACE + 10,
            "the dropped sandbox is destroyed",
        )
        assert dropped["sandbox_id"] not in containers()
        assert "not attached again in time" in service.log_text()
        kept_record = next(r for r in records() if r.sandbox_id == kept["sandbox_id"])
        assert kept_record.process_alive()
        again.close()  # and now it goes too, after its grace period
        wait_until(
            lambda: kept["sandbox_id"] not in {r.sandbox_id for r in records()},
            GRACE + 10,
            "the kept sandbox is destroyed once its caller is gone",
        )
        b.close()
    finally:
        close_all(kept_fds + dropped_fds)


def test_twenty_kernels_start_at_once_for_four_users(users, service, nothing_left):
    require_user_venv()
    code = "import os, resource; print(os.getuid(), resource.getrlimit(resource.RLIMIT_NPROC)[0])"
    env = {"JUPYTER_SANDBOX_SOCKET": str(service.socket)}
    started = time.monotonic()
    procs = {name: kernels_as(user, {"kernels": 5, "cells": [code]}, env=env)
             for name, user in users.items() if name != "jsbt-eve"}  # fmt: skip
    reports = {name: finish(proc) for name, proc in procs.items()}
    elapsed = time.monotonic() - started
    for name, report in reports.items():
        assert len(report) == 5
        pids = 128 if name == "jsbt-ann" else 256
        for kernel in report:
            assert kernel["service"] is True  # not root, socket present: auto chose it
            assert kernel["cells"][0] == {"status": "ok", "out": f"{users[name].pw_uid} {pids}\n"}
            assert kernel["memory_limit"] == ("512M" if name == "jsbt-ann" else "768M")
    assert len({k["sandbox_id"] for r in reports.values() for k in r}) == 20
    print(f"20 kernels of 4 users started, ran a cell and shut down in {elapsed:.1f} s")


def test_kernels_outlive_a_restart_of_the_service(users, service, nothing_left):
    require_user_venv()
    ann, bob = users["jsbt-ann"], users["jsbt-bob"]
    env = {"JUPYTER_SANDBOX_SOCKET": str(service.socket)}
    job = {"kernels": 1, "cells": ["x = 41", "print(x + 1)"], "pause": True}
    hosts = Path("/etc/hosts")
    original = hosts.read_text()
    hosts.write_text(original + "192.0.2.44 jsb-service.test\n")
    resolve = "import socket; print(socket.gethostbyname('jsb-service.test'))"
    staying = kernels_as(ann, job, env=env, stdin=subprocess.PIPE)
    leaving = kernels_as(bob, job, env=env, stdin=subprocess.PIPE)
    named = kernels_as(users["jsbt-eve"], {**job, "cells": [resolve, resolve]}, env=env,
                       stdin=subprocess.PIPE)  # fmt: skip
    try:
        (kept,) = json.loads(staying.stdout.readline())
        (orphan,) = json.loads(leaving.stdout.readline())
        json.loads(named.stdout.readline())
        assert service.stop() == 0
        # the service is gone; the kernels are not
        assert {kept, orphan} <= containers()
        leaving.kill()  # bob's server dies while there is no service
        leaving.wait()
        service.start()
        log = service.log_text()
        assert f"adopted sandbox {kept}" in log and f"adopted sandbox {orphan}" in log
        # ann's server attaches again by itself; bob's never will, and his sandbox goes
        wait_until(
            lambda: orphan not in {r.sandbox_id for r in records()},
            GRACE + 15,
            "the orphan is destroyed",
        )
        assert kept in {r.sandbox_id for r in records()}
        probe = service.caller(ann)
        wait_until(
            lambda: probe.call("list")[0]["sandboxes"][0]["attached"], 15, "ann's server attaches"
        )
        probe.close()
        for proc in (staying, named):
            proc.stdin.write("go on\n")
            proc.stdin.flush()
        (report,) = finish(staying)
        assert report["cells"][1] == {"alive": True}
        assert report["cells"][2] == {"status": "ok", "out": "42\n"}  # the same kernel
        # an egress kernel's names are answered again, by the new service
        (resolved,) = finish(named)
        assert resolved["cells"][0] == {"status": "ok", "out": "192.0.2.44\n"}
        assert resolved["cells"][2] == resolved["cells"][0]
    finally:
        hosts.write_text(original)
        for proc in (staying, leaving, named):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        if service.proc.poll() is not None:
            service.start()


def test_serve_needs_root_and_a_policy(users, tmp_path):
    require_user_venv()
    plain = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-sandbox"), "serve",
         f"--socket={tmp_path / 's.sock'}"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "JUPYTER_SANDBOX_POLICY": ""},
    )  # fmt: skip
    assert plain.returncode == 1 and "needs the operator's policy" in plain.stderr
    assert not (tmp_path / "s.sock").exists()
    user = as_user(users["jsbt-cat"], [str(USER_PYTHON.parent / "jupyter-sandbox"), "serve"],
                   stderr=subprocess.PIPE, text=True)  # fmt: skip
    _, err = user.communicate(timeout=60)
    assert user.returncode == 1 and "must run as root" in err


@pytest.mark.timeout(180)
async def test_a_root_server_in_service_mode_starts_kernels_one_after_another(
    users, service, nothing_left, workspace
):
    """In-process, a root server set to mode = 'service' hands the workspace to the service
    by path: the descriptor it opened for the folder is closed once, before the call, not
    again after (a second close would take whatever socket got that number meanwhile: the
    service connection of the next kernel)."""
    config = Config({"SandboxProvisioner": {"mode": "service",
                                            "service_socket": str(service.socket)}})  # fmt: skip
    for _ in range(3):
        km = AsyncKernelManager(kernel_name="python3-gvisor", config=config)
        await km.start_kernel(cwd=str(workspace))
        try:
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=120)
            reply, text, _ = await execute(kc, "import os; print(os.getcwd())")
            kc.stop_channels()
        finally:
            await km.shutdown_kernel(now=True)
        assert reply["status"] == "ok" and text.strip() == str(workspace)


async def test_a_kernel_on_an_imported_image_through_the_service(
    users, service, nothing_left, workspace, imported_image
):
    """An image is a name the service resolves on its side: a server asks for it like any
    setting, and the kernel runs on it (its own layer's file is there)."""
    config = Config({"SandboxProvisioner": {"mode": "service", "image": imported_image,
                                            "service_socket": str(service.socket)}})  # fmt: skip
    km = AsyncKernelManager(kernel_name="python3-gvisor", config=config)
    await km.start_kernel(cwd=str(workspace))
    try:
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=120)
        reply, text, _ = await execute(kc, f"print(open({MARKER!r}).read())")
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)
    assert reply["status"] == "ok" and text.strip() == "from the test's own layer"
