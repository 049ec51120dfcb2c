"""The operator's policy: tiers, precedence, refusals that name the rule, reloads."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest
from conftest import KERNEL, execute
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioner import cgroups, policy
from provisioner.errors import PolicyError
from provisioner.policy import Identity, Policy

TEACHING = """
[default]                       # students
memory_limit = "512M"
cpu_limit = 0.5
kernelspecs = ["python3-gvisor"]

[groups.tas]
memory_limit = "1G"

[groups.instructors]
memory_limit = "4G"
cpu_limit = 2.0

[users.alice]                   # replaces what her groups give, setting by setting
cpu_limit = 1.0
"""

student = Identity("bob", frozenset({"students"}))
ta_and_instructor = Identity("carol", frozenset({"tas", "instructors"}))
alice = Identity("alice", frozenset({"instructors"}))


def test_tiers_groups_raise_users_replace():
    p = Policy.parse(TEACHING)
    assert p.ceilings(student) == {
        "memory_limit": "512M",
        "cpu_limit": 0.5,
        "kernelspecs": ["python3-gvisor"],
    }
    assert p.ceilings(ta_and_instructor)["memory_limit"] == "4G"  # the most generous group
    assert p.ceilings(ta_and_instructor)["cpu_limit"] == 2.0
    assert p.ceilings(alice) == {
        "memory_limit": "4G",
        "cpu_limit": 1.0,
        "kernelspecs": ["python3-gvisor"],
    }


def test_asking_for_less_is_granted_more_is_refused_naming_the_ceiling():
    ceilings = Policy.parse(TEACHING).ceilings(student)
    granted = policy.apply(ceilings, {"memory_limit": "256M"}, "python3-gvisor", student)
    assert granted == {"cpu_limit": 0.5}  # memory stays as asked; cpu takes the ceiling
    with pytest.raises(PolicyError, match=r"memory_limit = '2G'.*bob: at most '512M'"):
        policy.apply(ceilings, {"memory_limit": "2G"}, "python3-gvisor", student)
    with pytest.raises(PolicyError, match=r"bob start kernel 'python3'; allowed: python3-gvisor"):
        policy.apply(ceilings, {}, "python3", student)


NETWORKED = """
[default]
network = "none"

[groups.researchers]
network = "egress"
egress_allow = ["pypi.org:443", "10.9.0.0/16"]
network_bandwidth = "10M"

[groups.staff]
network = "open"
"""


def test_network_modes_and_allowlists_are_ceilings_too():
    p = Policy.parse(NETWORKED)
    researcher = Identity("rita", frozenset({"researchers"}))
    assert policy.apply(p.ceilings(student), {}, "k", student) == {"network": "none"}
    with pytest.raises(PolicyError, match=r"network = 'egress' .* bob: at most 'none'"):
        policy.apply(p.ceilings(student), {"network": "egress"}, "k", student)
    granted = policy.apply(p.ceilings(researcher), {}, "k", researcher)
    assert granted == {
        "network": "egress",
        "egress_allow": ["10.9.0.0/16", "pypi.org:443"],
        "network_bandwidth": "10M",
    }
    narrower = {"egress_allow": ["pypi.org:443"], "network_bandwidth": "1M"}
    assert policy.apply(p.ceilings(researcher), narrower, "k", researcher) == {"network": "egress"}
    with pytest.raises(PolicyError, match=r"egress_allow example.org .* at most 10.9.0.0/16, pypi"):
        policy.apply(p.ceilings(researcher), {"egress_allow": ["example.org"]}, "k", researcher)
    with pytest.raises(PolicyError, match=r"network_bandwidth = '' .* at most '10M'"):
        policy.apply(p.ceilings(researcher), {"network_bandwidth": ""}, "k", researcher)
    staff = Identity("sam", frozenset({"researchers", "staff"}))
    assert p.ceilings(staff)["network"] == "open"  # the most open group wins


@pytest.mark.parametrize(
    "text, message",
    [
        ("[default]\nmemory_limt = '1G'", "unknown setting memory_limt"),
        ("[default]\nnetwork = 'wide'", r"network = 'wide': expected one of none, egress, open"),
        ("[default]\negress_allow = ['169.254.169.254']", r"egress_allow"),
        ("[default]\nnetwork_bandwidth = '10MB'", r"network_bandwidth = '10MB'"),
        ("[default]\nmax_kernels = 0", "positive"),
        ("[default]\nmemory_limit = '1 GB'", r"memory_limit = '1 GB'"),
        ("[default]\ncpu_limit = -1", "positive"),
        ("[defaults]\n", "unknown section defaults"),
        ("[default\n", "policy"),
    ],
)
def test_invalid_policies_are_refused_clearly(text, message):
    with pytest.raises(PolicyError, match=message):
        Policy.parse(text)


def test_policy_is_reloaded_when_it_changes_and_a_bad_edit_keeps_the_last(tmp_path, caplog):
    path = tmp_path / "policy.toml"
    path.write_text('[default]\nmemory_limit = "1G"\n')
    watched = policy.PolicyFile(path, logging.getLogger("test-policy"))
    assert watched.current().default["memory_limit"] == "1G"
    path.write_text('[default]\nmemory_limit = "2G"\n')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert watched.current().default["memory_limit"] == "2G"
    path.write_text("[default\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with caplog.at_level(logging.ERROR):
        assert watched.current().default["memory_limit"] == "2G"
    assert "not reloaded" in caplog.text


def memory_ceiling_of(km) -> int:
    cgroup = km.provisioner.sandbox.record.cgroup
    return int((cgroups.ROOT / "memory" / cgroup.strip("/") / "memory.limit_in_bytes").read_text())


async def test_a_kernel_gets_its_users_policy(no_leftovers, workspace, tmp_path, monkeypatch):
    path = tmp_path / "policy.toml"
    path.write_text(
        '[default]\nmemory_limit = "512M"\n[users.alice]\nmemory_limit = "768M"\ncpu_limit = 0.5\n'
        'network = "egress"\negress_allow = ["10.9.0.1:80"]\n'
    )
    monkeypatch.setenv(policy.POLICY_ENV, str(path))
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    for asked, expected in ((None, 768), ("256M", 256)):
        settings = {} if asked is None else {"memory_limit": asked}
        km = AsyncIOLoopKernelManager(
            kernel_name=KERNEL, config=Config({"GVisorProvisioner": settings})
        )
        await km.start_kernel(cwd=str(workspace))
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            assert memory_ceiling_of(km) == expected * 2**20  # what the host enforces
            assert km.provisioner.cpu_limit == 0.5
            _, text, _ = await execute(kc, "print(open('/proc/meminfo').readline().split()[1])")
            assert int(text) == expected * 1024  # and what the kernel is told
            assert km.provisioner.network == "egress"  # the policy's network, with a device
            _, text, _ = await execute(kc, "import socket; print(socket.if_nameindex())")
            assert "eth0" in text
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    greedy = AsyncIOLoopKernelManager(
        kernel_name=KERNEL, config=Config({"GVisorProvisioner": {"memory_limit": "4G"}})
    )
    with pytest.raises(PolicyError, match=r"alice: at most '768M'"):
        await greedy.start_kernel(cwd=str(workspace))
    # nothing of the refused start is left: no port, and no connection file with its key
    assert greedy.connection_file and not Path(greedy.connection_file).exists()


def test_images_each_user_or_group_may_use():
    p = Policy.parse(
        '[default]\nimages = ["python3"]\n[groups.r-course]\nimages = ["course-101"]\n'
        "[users.dave]\nimages = []\n"
    )
    student_r = Identity("erin", frozenset({"r-course"}))
    assert p.ceilings(student_r)["images"] == ["course-101", "python3"]  # groups add
    policy.check_image(p.ceilings(student_r), "course-101", student_r)
    with pytest.raises(PolicyError, match=r"does not let bob use image 'course-101'; "
                       r"allowed: python3"):  # fmt: skip
        policy.check_image(p.ceilings(student), "course-101", student)
    with pytest.raises(PolicyError, match="allowed: none"):
        policy.check_image(p.ceilings(Identity("dave", frozenset())), "python3", student)
    # a rootfs path is an image no list names: only an unset `images` allows it
    with pytest.raises(PolicyError, match="image '/srv/rootfs'"):
        policy.check_image(p.ceilings(student_r), "/srv/rootfs", student_r)
    policy.check_image(Policy.parse("").ceilings(student), "/srv/rootfs", student)
    # a group never restricts what [default] leaves open: it only raises ceilings
    open_default = Policy.parse('[groups.r-course]\nimages = ["course-101"]\n')
    policy.check_image(open_default.ceilings(student_r), "python3", student_r)


async def test_a_kernel_on_an_image_the_policy_refuses_does_not_start(
    no_leftovers, workspace, tmp_path, monkeypatch
):
    path = tmp_path / "policy.toml"
    path.write_text('[default]\nimages = ["course-101"]\n')
    monkeypatch.setenv(policy.POLICY_ENV, str(path))
    monkeypatch.setenv("JUPYTERHUB_USER", "bob")
    km = AsyncIOLoopKernelManager(kernel_name=KERNEL)  # the kernelspec's image: python3
    with pytest.raises(PolicyError, match="does not let bob use image 'python3'"):
        await km.start_kernel(cwd=str(workspace))
    assert km.connection_file and not Path(km.connection_file).exists()


def test_the_documented_examples_are_valid_policies():
    page = (Path(__file__).resolve().parent.parent / "docs" / "policy.md").read_text()
    examples = re.findall(r"```toml\n(.*?)```", page, re.S)
    assert len(examples) >= 2
    for example in examples:
        assert Policy.parse(example).default["kernelspecs"] == ["python3-gvisor"]
