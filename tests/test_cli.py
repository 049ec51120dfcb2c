"""`jupyter sandbox` refuses what it does not understand, before doing anything.

Each test runs the real console command (`jupyter sandbox ...`, this tree's `provisioner`
first on PYTHONPATH) as a subprocess. None starts a sandbox: the refused commands must
stop at parsing, and the valid forms checked here only print (help, version, config,
the list of sandboxes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioner import __version__

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = str(Path(sys.executable).parent / "jupyter")
REFUSAL_SECONDS = 15
"""A refusal is parsing only (under a second here); the bound allows for a loaded host.
A refused `image build` that went on would run debootstrap for minutes, or log that the
image is up to date."""


def sandbox(*args: str, timeout: float = REFUSAL_SECONDS) -> subprocess.CompletedProcess[str]:
    """Run `jupyter sandbox *args` with this tree's code."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [JUPYTER, "sandbox", *args],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


REFUSED = [
    # (argv, the command named, what is refused, one option or subcommand it lists)
    (["image", "build", "--form", "X"], "image build", "unknown option --form", "--from"),
    (["image", "build", "--frm=X"], "image build", "unknown option --frm", "--force"),
    (["image", "build", "--fast"], "image build", "unknown option --fast", "--force"),
    (["image", "build", "a", "b"], "image build", "unexpected argument 'b'", "--name"),
    (["image", "build", "--", "x", "y"], "image build", "unexpected argument 'y'", "--name"),
    (["image", "rm", "a", "b"], "image rm", "unexpected argument 'b'", "--log-level"),
    (["image", "ls", "a"], "image ls", "unexpected argument 'a'", "--log-level"),
    (["image", "bild"], "image", "unknown subcommand bild", "build"),
    (["image", "--name", "x"], "image", "unknown option --name", "--log-level"),
    (["doctor", "--platfrom", "kvm"], "doctor", "unknown option --platfrom", "--platform"),
    (["doctor", "--verbose"], "doctor", "unknown option --verbose", "--runsc"),
    (["doctor", "python3"], "doctor", "unexpected argument 'python3'", "--image"),
    (["ps", "--all"], "ps", "unknown option --all", "--log-level"),
    (["ps", "-a"], "ps", "unknown option -a", "--debug"),
    (["ps", "mine"], "ps", "unexpected argument 'mine'", "--config"),
    (["ps", "--Nope.interval=1"], "ps", "unknown option --Nope.interval", "--<Class>.<trait>"),
    (["ps", "--PsApp.nope=1"], "ps", "unknown option --PsApp.nope", "--<Class>.<trait>"),
    (["ps", "--generate-config"], "ps", "unknown option --generate-config", "--show-config"),
    (["gc", "--everything"], "gc", "unknown option --everything", "--all"),
    (["gc", "--al=1"], "gc", "unknown option --al", "--all"),
    (["gc", "now"], "gc", "unexpected argument 'now'", "--all"),
    (["serve", "--polcy=/etc/p.toml"], "serve", "unknown option --polcy", "--policy"),
    (["serve", "--daemon"], "serve", "unknown option --daemon", "--socket"),
    (["serve", "--policy=/p", "start"], "serve", "unexpected argument 'start'", "--grace-period"),
    (["--image", "X"], "", "unknown option --image", "--log-level"),
    (["build"], "", "unknown subcommand build", "image"),
    (
        ["kernelspec", "install", "--imag", "X"],
        "kernelspec install",
        "unknown option --imag",
        "--image",
    ),
    (
        ["kernelspec", "install", "--memory=1G"],
        "kernelspec install",
        "unknown option --memory",
        "--memory-limit",
    ),
    (["kernelspec", "instal"], "kernelspec", "unknown subcommand instal", "install"),
    (["kernelspecs", "install"], "", "unknown subcommand kernelspecs", "kernelspec"),
    (
        ["kubernetes", "agent-image", "--dest=x"],
        "kubernetes agent-image",
        "unknown option --dest",
        "--to",
    ),
    (
        ["kubernetes", "agent-image", "--to", "x", "y"],
        "kubernetes agent-image",
        "unexpected argument 'y'",
        "--insecure",
    ),
    (
        ["kubernetes", "agent-images"],
        "kubernetes",
        "unknown subcommand agent-images",
        "agent-image",
    ),
]


@pytest.mark.parametrize(("argv", "command", "refused", "listed"), REFUSED)
def test_refuses_unknown_options_and_arguments(
    argv: list[str], command: str, refused: str, listed: str
) -> None:
    """Exit 2 at parsing, one line on stderr: the command, what it refused, what it takes;
    nothing on stdout and no log line, so the command itself never started."""
    done = sandbox(*argv)
    assert done.returncode == 2, done
    assert done.stdout == ""
    name = " ".join(["jupyter sandbox", command]).strip()
    assert done.stderr.startswith(f"{name}: {refused}; accepted: "), done.stderr
    assert listed in done.stderr.split("; accepted: ", 1)[1]
    assert done.stderr.count("\n") == 1, done.stderr


def test_image_build_from_what_it_cannot_use_does_not_build() -> None:
    """`image build --from X` once rebuilt the default image and exited 0. Now a SOURCE
    that is none of the kinds stops it before any build step: within seconds, nothing on
    stdout, and on stderr the refusal alone, saying what SOURCE may be."""
    started = time.monotonic()
    done = sandbox("image", "build", "mine", "--from", "X", "--force")
    assert time.monotonic() - started < REFUSAL_SECONDS
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "cannot build an image from 'X': expected an OCI image" in line


def test_unknown_subcommand_lists_the_subcommands() -> None:
    done = sandbox("nope")
    assert done.returncode == 2
    assert done.stderr == (
        "jupyter sandbox: unknown subcommand nope; accepted: doctor, image, kernelspec, "
        "kubernetes, ps, gc, serve\n"
    )


def test_no_subcommand_prints_the_subcommands() -> None:
    """`jupyter sandbox` alone still prints the subcommands and exits 1."""
    done = sandbox()
    assert done.returncode == 1
    for sub in ("doctor", "image", "kernelspec", "kubernetes", "ps", "gc", "serve"):
        assert f"\n{sub}\n" in done.stdout
    assert sandbox("image").returncode == 1
    assert sandbox("kubernetes").returncode == 1


def test_version() -> None:
    done = sandbox("--version")
    assert done.returncode == 0, done
    assert done.stdout == f"{__version__}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["doctor", "--help"],
        ["gc", "--help"],
        ["image", "build", "--help"],
        ["kubernetes", "agent-image", "--help"],
        ["kubernetes", "serve", "--help"],
        ["kubernetes", "render", "--help"],
        ["kubernetes", "gc", "--help"],
        ["serve", "--help-all"],
        ["help"],
        ["image", "build", "--from", "X", "--help"],  # help wins, as in argparse
    ],
)
def test_help(argv: list[str]) -> None:
    done = sandbox(*argv)
    assert done.returncode == 0, done
    assert "Options\n=======" in done.stdout or "Subcommands\n===========" in done.stdout


def test_agent_image_without_a_destination_does_not_build() -> None:
    started = time.monotonic()
    done = sandbox("kubernetes", "agent-image", "--insecure")
    assert time.monotonic() - started < REFUSAL_SECONDS
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "where to? `jupyter sandbox kubernetes agent-image --to DEST`" in line


def test_ps() -> None:
    """`ps` runs (the table's header at least), plain and with the standard options and a
    `--Class.trait` of its own."""
    for argv in (["ps"], ["ps", "--PsApp.interval=0.1", "--log-level=WARN", "--debug"]):
        done = sandbox(*argv)
        assert done.returncode == 0, done
        assert done.stdout.split()[:2] == ["SANDBOX", "KERNEL"], done.stdout


def test_accepted_options_reach_the_config() -> None:
    """Aliases, inherited `--Class.trait` and config classes of the command are taken:
    `--show-config` prints what they set instead of starting the service."""
    done = sandbox(
        "serve",
        "--policy=/etc/p.toml",
        "--grace-period=5",
        "--SandboxService.socket_group=jupyterhub-users",
        "--GVisorProvisioner.platform=ptrace",
        "--Application.log_level=WARN",
        "--show-config",
    )
    assert done.returncode == 0, done
    for line in (
        ".policy_file = '/etc/p.toml'",
        ".socket_group = 'jupyterhub-users'",
        ".platform = 'ptrace'",
        ".log_level = 'WARN'",
    ):
        assert line in done.stdout, done.stdout
