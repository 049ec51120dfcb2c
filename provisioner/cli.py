"""`jupyter sandbox`: doctor, image build, ps, gc, serve."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any, NoReturn

from jupyter_core.application import JupyterApp, base_flags
from traitlets import Bool, Float, Unicode
from traitlets.config.loader import KVArgParseConfigLoader

from . import __version__, cgroups, cleanup, doctor
from .errors import ImageError, SandboxError, SettingError
from .images.boot import build_boot_files
from .images.build import build_image
from .limits import format_size
from .provisioner import GVisorProvisioner, MicroVMProvisioner
from .service.server import SandboxService
from .state import records

HANDLED_FIRST = ("--help", "--help-all", "-h", "--version", "-V")
"""Options traitlets' `Application.parse_command_line` acts on before any loader runs."""


class _StrictLoader(KVArgParseConfigLoader):
    """The command-line loader of every `jupyter sandbox` command: it refuses what the
    command does not understand, before the command does anything.

    traitlets' loader only warns "Unrecognized alias" for an unknown `--opt value` (and
    drops it), takes an unknown `--Class.trait=x` silently, fails an unknown `--flag` with
    a misleading "expected one argument", and keeps any positional argument in
    `extra_args`, which no command here reads: `image build --from X` rebuilt the default
    image and exited 0. Here an option must be an alias or flag of the command or
    `--Class.trait` of one of its configurable classes, and no positional argument is
    accepted (on a command with subcommands it is an unknown subcommand). A refusal names
    what was refused and lists what is accepted, on stderr, with argparse's usage-error
    status 2.
    """

    def __init__(self, *args: Any, command: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command = command

    def _parse_args(self, args: list[str]) -> None:
        options = self._options()
        listed = [*options, "--<Class>.<trait> (see --help-all)"]
        for arg in args[: args.index("--")] if "--" in args else args:
            name = arg.split("=", 1)[0]
            if _is_option(arg) and name not in options and not self._is_trait(name):
                self._refuse(f"unknown option {name}", listed)
        super()._parse_args(args)
        stray = [*getattr(self.parsed_data, "extra_args", []), *self.extra_args]
        if stray and self.subcommands:
            self._refuse(f"unknown subcommand {stray[0]}", list(self.subcommands))
        if stray:
            self._refuse(f"unexpected argument {stray[0]!r}", listed)

    def _options(self) -> list[str]:
        """The command's options as typed: its own aliases and flags, those every command
        has, then those traitlets handles before any loader runs."""
        names = [*self.aliases, *(k for k in self.flags if k not in self.aliases)]
        ours = [f"-{n}" if len(n) == 1 else f"--{n}" for n in names]
        inherited = {f"--{n}" for n in (*_Sub.aliases, *_Sub.flags)}
        return sorted(ours, key=lambda o: o in inherited) + list(HANDLED_FIRST)

    def _is_trait(self, name: str) -> bool:
        """Whether `name` is `--Class.trait` for a configurable trait of the command's
        classes (the set traitlets' loader built for this parse)."""
        return name.startswith("--") and name[2:] in self.argparse_traits

    def _refuse(self, what: str, accepted: list[str]) -> NoReturn:
        self.parser.exit(2, f"{self.command}: {what}; accepted: {', '.join(accepted)}\n")


def _is_option(arg: str) -> bool:
    """Whether argparse takes `arg` for an option rather than a value: a leading dash,
    not a negative number, no space (argparse's own rule)."""
    return (
        len(arg) > 1
        and arg.startswith("-")
        and not arg[1].isdigit()
        and not arg.startswith("-.")
        and " " not in arg
    )


class _Sub(JupyterApp):
    """The base of every `jupyter sandbox` command: strict command-line parsing."""

    version = __version__
    flags = {k: v for k, v in base_flags.items() if k not in ("generate-config", "y")}
    """jupyter_core's flags but `--generate-config` and `-y`: JupyterApp.start acts on
    them, and these commands' start does not call it."""

    def _create_loader(
        self, argv: list[str] | None, aliases: Any, flags: Any, classes: Any
    ) -> KVArgParseConfigLoader:
        return _StrictLoader(
            argv,
            aliases,
            flags,
            classes=classes,
            log=self.log,
            subcommands=self.subcommands,
            command=self.name.replace("-", " "),
        )

    def _find_subcommand(self, name: str) -> str:
        """No external subcommands: JupyterApp would leave the command line unparsed
        when a `jupyter-sandbox-<name>` is on PATH, and these commands never run it."""
        return ""

    def out(self, text: str = "") -> None:
        """Command output (the one place this package writes to stdout)."""
        sys.stdout.write(text + "\n")


class DoctorApp(_Sub):
    name = "jupyter-sandbox-doctor"
    description = "Check that this host can run sandboxed kernels; exit 1 if it cannot."
    runsc_path = Unicode("runsc", config=True, help="runsc binary to check.")
    platform = Unicode("systrap", config=True, help="gVisor platform to check.")
    image = Unicode("python3", config=True, help="Guest image to check.")
    aliases = {
        "platform": "DoctorApp.platform",
        "runsc": "DoctorApp.runsc_path",
        "image": "DoctorApp.image",
        **_Sub.aliases,
    }

    def start(self) -> None:
        overrides = {"runsc_path": self.runsc_path, "platform": self.platform}
        checks = doctor.run_checks(self.image, overrides)
        for check in checks:
            self.out(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
            if not check.ok and check.fix:
                self.out(f"       fix: {check.fix}")
        failed = [c for c in checks if not c.ok]
        self.out(
            "this host can run sandboxed kernels"
            if not failed
            else f"{len(failed)} problem(s): sandboxed kernels cannot start here"
        )
        self.exit(1 if failed else 0)


class ImageBuildApp(_Sub):
    name = "jupyter-sandbox-image-build"
    description = "Build the guest image (a Debian root filesystem with Python and ipykernel)."
    image = Unicode("python3", config=True, help="Name of the image.")
    force = Bool(False, config=True, help="Rebuild even if the recipe did not change.")
    flags = {
        "force": ({"ImageBuildApp": {"force": True}}, "Rebuild even if up to date."),
        **_Sub.flags,
    }
    aliases = {"name": "ImageBuildApp.image", **_Sub.aliases}

    def start(self) -> None:
        self.log.setLevel(min(self.log.level, logging.INFO))  # its steps are its output
        started = time.monotonic()
        try:
            rootfs = build_image(self.image, force=self.force, log=self.log)
            boot = build_boot_files(self.image, rootfs, self.log)
        except ImageError as e:
            self.log.error("%s", e)
            self.exit(1)
        self.out(
            f"image {self.image} ready at {rootfs}, microVM boot files in "
            f"{boot.kernel.parent} ({time.monotonic() - started:.1f} s)"
        )


class ImageApp(_Sub):
    name = "jupyter-sandbox-image"
    description = "Manage guest images."
    subcommands = {"build": (ImageBuildApp, ImageBuildApp.description)}

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        super().start()


class PsApp(_Sub):
    name = "jupyter-sandbox-ps"
    description = "List live sandboxes: kernel id, backend, age, CPU, memory, owning server."
    interval = Float(0.5, config=True, help="Seconds over which the CPU use is measured.")

    def start(self) -> None:
        found = records()
        before = {r.sandbox_id: cgroups.cpu_seconds(r.cgroup) for r in found}
        time.sleep(self.interval)
        now = time.time()
        rows = [("SANDBOX", "KERNEL", "USER", "BACKEND", "AGE", "CPU", "MEMORY", "OWNER")]
        for record in found:
            memory = cgroups.memory_usage(record.cgroup)
            used, was = cgroups.cpu_seconds(record.cgroup), before[record.sandbox_id]
            cpu = "-" if used is None or was is None else f"{(used - was) / self.interval:.0%}"
            owner = str(record.owner_pid) if record.owner_alive() else f"{record.owner_pid} (gone)"
            rows.append(
                (
                    record.sandbox_id,
                    record.kernel_id,
                    record.user or "-",
                    record.backend,
                    f"{now - record.created:.0f}s",
                    cpu,
                    format_size(memory) if memory else "-",
                    owner,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


class GcApp(_Sub):
    name = "jupyter-sandbox-gc"
    description = "Remove sandboxes, bundles and cgroups left behind by servers that died."
    all = Bool(False, config=True, help="Also remove sandboxes of live servers.")
    flags = {
        "all": ({"GcApp": {"all": True}}, "Also remove sandboxes of live servers."),
        **_Sub.flags,
    }

    def start(self) -> None:
        self.log.setLevel(min(self.log.level, logging.INFO))  # what it removed is its output
        reaped = cleanup.collect(self.log, include_live=self.all)
        self.out(f"removed {len(reaped)} sandbox(es)")


class ServeApp(_Sub):
    name = "jupyter-sandbox-serve"
    description = (
        "Run the sandbox service (as root): it makes sandboxes for Jupyter servers that are "
        "not root, under the operator's policy, for the user the kernel says called."
    )
    classes = [SandboxService, GVisorProvisioner, MicroVMProvisioner]
    aliases = {
        "socket": "SandboxService.socket_path",
        "policy": "SandboxService.policy_file",
        "grace-period": "SandboxService.grace_period",
        **_Sub.aliases,
    }

    def start(self) -> None:
        if os.geteuid() != 0:
            self.log.critical("the sandbox service makes sandboxes, and must run as root")
            self.exit(1)
        # INFO at least: it is a daemon's journal
        self.log.setLevel(min(self.log.level, logging.INFO))
        try:
            asyncio.run(SandboxService(parent=self, log=self.log).run())
        except (SettingError, SandboxError) as e:
            self.log.critical("%s", e)
            self.exit(1)


class SandboxApp(_Sub):
    name = "jupyter-sandbox"
    description = "Sandboxed Jupyter kernels (gVisor, microVM): check, build, list, clean up."
    subcommands = {
        "doctor": (DoctorApp, DoctorApp.description),
        "image": (ImageApp, ImageApp.description),
        "ps": (PsApp, PsApp.description),
        "gc": (GcApp, GcApp.description),
        "serve": (ServeApp, ServeApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        super().start()


main = SandboxApp.launch_instance
