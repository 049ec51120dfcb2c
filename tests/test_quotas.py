"""Per-user quotas across kernels: counted under the user's lock, held by the user's cgroup."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from conftest import KERNEL
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner import cgroups, policy, quotas
from provisioner.state import Record, records

log = logging.getLogger("test-quotas")


def test_admission_counts_live_sandboxes_and_names_the_quota():
    user = f"quota-test-{os.getpid()}"
    held = [Record(sandbox_id=f"q-{user}-{i}", kernel_id="k", backend="test", user=user,
                   memory=512 << 20) for i in range(2)]  # fmt: skip
    dead_owner = Record(sandbox_id=f"q-{user}-dead", kernel_id="k", backend="test", user=user,
                        memory=512 << 20, owner_pid=1, owner_start=-1)  # fmt: skip
    try:
        for record in (*held, dead_owner):
            record.save()
        new = Record(sandbox_id=f"q-{user}-new", kernel_id="k", backend="test", user=user,
                     memory=256 << 20)  # fmt: skip
        count = rf"kernel quota: {user} already runs 2 of at most 2 sandboxed kernels \(max_kern"
        with pytest.raises(quotas.QuotaError, match=count):
            quotas.admit(new, quotas.Quota(max_kernels=2), log)
        memory = r"memory quota: .* 2 running kernels hold 1G of at most 1\.125G .*_limit is 256M"
        with pytest.raises(quotas.QuotaError, match=memory):
            quotas.admit(new, quotas.Quota(max_memory=1152 << 20), log)
        assert new.sandbox_id not in {r.sandbox_id for r in records()}  # refused: nothing kept
        quotas.admit(new, quotas.Quota(max_kernels=3, max_memory=1280 << 20), log)  # exactly fits
        assert new.sandbox_id in {r.sandbox_id for r in records()}
        limit = cgroups.ROOT / "memory" / cgroups.user_cgroup(user).strip("/")
        assert int((limit / "memory.limit_in_bytes").read_text()) == 1280 << 20
        assert int((limit / "memory.memsw.limit_in_bytes").read_text()) == 1280 << 20
        held.append(new)
    finally:
        for record in (*held, dead_owner):
            record.remove()
        quotas.release(user)
    assert cgroups.directories(cgroups.user_cgroup(user)) == []


def test_user_names_map_to_safe_cgroup_names():
    assert cgroups.user_cgroup("alice") == "/jupyter-sandbox/users/u-alice"
    assert cgroups.user_cgroup("../x") == "/jupyter-sandbox/users/u-..%2fx"
    assert cgroups.user_cgroup("a@b.org") == "/jupyter-sandbox/users/u-a%40b.org"


def _kernel(memory: str = "512M") -> AsyncIOLoopKernelManager:
    return AsyncIOLoopKernelManager(
        kernel_name=KERNEL, config=Config({"GVisorProvisioner": {"memory_limit": memory}})
    )


async def test_quotas_refuse_a_start_beyond_them_and_the_users_cgroup_holds_them(
    no_leftovers, workspace: Path, tmp_path: Path, monkeypatch
):
    path = tmp_path / "policy.toml"
    path.write_text("[default]\nmax_kernels = 1\n[users.quinn]\nmax_kernels = 2\n")
    monkeypatch.setenv(policy.POLICY_ENV, str(path))
    monkeypatch.setenv("JUPYTERHUB_USER", "quinn")
    running: list[AsyncIOLoopKernelManager] = []
    try:
        for _ in range(2):
            km = _kernel()
            await km.start_kernel(cwd=str(workspace))
            running.append(km)
        user = cgroups.ROOT / "memory" / cgroups.user_cgroup("quinn").strip("/")
        for km in running:  # each kernel's cgroup sits inside the user's
            assert (user / km.provisioner.sandbox_id).is_dir()
        with pytest.raises(policy.PolicyError, match=r"kernel quota: quinn already runs 2 of "
                           rf"at most 2 .*max_kernels in the sandbox policy {path}"):  # fmt: skip
            await _kernel().start_kernel(cwd=str(workspace))

        # the operator raises the count and caps memory; the policy is read again
        path.write_text('[users.quinn]\nmax_kernels = 5\nmax_memory = "1G"\n')
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        with pytest.raises(policy.PolicyError, match=r"memory quota: quinn's 2 running kernels "
                           r"hold 1G of at most 1G"):  # fmt: skip
            await _kernel("256M").start_kernel(cwd=str(workspace))
        assert int((user / "memory.limit_in_bytes").read_text()) == 1 << 30

        await running.pop().shutdown_kernel(now=True)  # a slot frees up
        km = _kernel("256M")
        await km.start_kernel(cwd=str(workspace))
        running.append(km)
    finally:
        for km in running:
            await km.shutdown_kernel(now=True)
    assert cgroups.directories(cgroups.user_cgroup("quinn")) == []
