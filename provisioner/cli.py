"""`jupyter sandbox`: doctor, image build, ps, gc, serve."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from jupyter_core.application import JupyterApp
from traitlets import Bool, Float, Unicode

from . import cgroups, cleanup, doctor
from .errors import ImageError, SandboxError, SettingError
from .images.boot import build_boot_files
from .images.build import build_image
from .limits import format_size
from .provisioner import GVisorProvisioner, MicroVMProvisioner
from .service.server import SandboxService
from .state import records

__version__ = "0.1.0"


class _Sub(JupyterApp):
    version = __version__

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
    }

    def start(self) -> None:
        checks = doctor.run_checks(self.runsc_path, self.platform, self.image)
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
    flags = {"force": ({"ImageBuildApp": {"force": True}}, "Rebuild even if up to date.")}
    aliases = {"name": "ImageBuildApp.image"}

    def start(self) -> None:
        self.log.setLevel("INFO")
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
    flags = {"all": ({"GcApp": {"all": True}}, "Also remove sandboxes of live servers.")}

    def start(self) -> None:
        self.log.setLevel("INFO")
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
        "log-level": "Application.log_level",
    }

    def start(self) -> None:
        if os.geteuid() != 0:
            self.log.critical("the sandbox service makes sandboxes, and must run as root")
            self.exit(1)
        self.log.setLevel(min(self.log.level, 20))  # INFO at least: it is a daemon's journal
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
