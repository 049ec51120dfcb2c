"""Secrets: what the server and the other tenants hold stays on the host."""

from __future__ import annotations

import secrets

import pytest
from jupyter_core.paths import jupyter_runtime_dir

NOT_THERE = {"ENOENT"}


@pytest.mark.attack("secrets", "read the server's environment (JUPYTERHUB_API_TOKEN, cloud keys)")
def test_server_environment(target, verdict):
    token = target.planted["env_token"]
    found = target.run(
        "environs = {}\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    environs[pid] = attempt(lambda p: open(f'/proc/{p}/environ', 'rb').read().decode(),"
        " pid)\n"
        "report(own=dict(os.environ), environs=environs)"
    )
    assert "PATH" in found["own"]  # the kernel's own environment was read
    assert token not in str(found["own"]) and token not in str(found["environs"])
    assert "JUPYTERHUB_API_TOKEN" not in found["own"]
    others = {e[0] for pid, e in found["environs"].items() if e[0] != "ok"}
    verdict(
        "absent from the kernel's environment and from every /proc/*/environ it can read"
        + (f" (others: {', '.join(sorted(others))})" if others else "")
    )


@pytest.mark.attack("secrets", "steal another kernel's connection file and HMAC key")
def test_other_kernels_key(target, verdict):
    path, key = target.planted["other_connection_file"], target.planted["other_key"]
    control = target.workspace / f"control-{secrets.token_hex(4)}.json"
    control.write_text(key)  # the same key in the workspace: the search works
    control.chmod(0o644)
    try:
        found = target.run(
            f"key = {key[::-1]!r}[::-1]\n"
            "hits = subprocess.run(['grep', '-rlsF', key, '/', '--exclude-dir=proc',"
            " '--exclude-dir=sys', '--exclude-dir=dev'], capture_output=True, text=True)\n"
            f"report(file=attempt(open, {path!r})[0], hits=hits.stdout.split())",
            timeout=600,
        )
    finally:
        control.unlink()
    assert found["hits"] == [str(control)], found
    assert found["file"] in NOT_THERE, found
    verdict(f"{found['file']}; the key found nowhere in the sandbox but the control copy")


@pytest.mark.attack("secrets", "list the server's runtime directory (every kernel's connection)")
def test_server_runtime_dir(target, verdict):
    planted, real = target.planted["runtime_dir"], jupyter_runtime_dir()
    found = target.run(
        f"report(planted=attempt(os.listdir, {planted!r})[0],"
        f" real=attempt(os.listdir, {real!r})[0],"
        " state=attempt(os.listdir, '/run/jupyter-sandbox')[0],"
        " images=attempt(os.listdir, '/var/lib/jupyter-sandbox')[0],"
        " run=attempt(os.listdir, '/run')[0])"
    )
    assert found.pop("run") == "ok"
    # The server's own runtime dir is under the guest's /root (the image's, closed to
    # the kernel's user); the planted one is world-readable on the host.
    assert found.pop("real") in {"ENOENT", "EACCES"}
    assert set(found.values()) <= NOT_THERE, found
    verdict("a runtime dir any host user could list, /run/jupyter-sandbox, "
            "/var/lib/jupyter-sandbox: ENOENT")  # fmt: skip


@pytest.mark.attack("secrets", "read another user's home directory")
def test_other_users_home(target, verdict):
    home = target.planted["victim_home"]
    found = target.run(
        f"report(home=attempt(os.listdir, '/home')[0], listed=attempt(os.listdir, '/home')[1],"
        f" notes=attempt(open, {home!r} + '/notes.txt')[0])"
    )
    assert found["home"] == "ok"
    assert home.rsplit("/", 1)[1] not in found["listed"]
    assert found["notes"] in NOT_THERE, found
    verdict(f"{found['notes']}: the guest's /home is the image's, empty of host users")
