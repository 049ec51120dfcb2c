"""`jupyter sandbox`: doctor, image build/ls/rm, kernelspec install, kubernetes agent-image,
ps, gc, serve."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from jupyter_core.application import JupyterApp, base_flags
from traitlets import Bool, Float, Unicode
from traitlets.config.loader import KVArgParseConfigLoader

from . import __version__, cgroups, cleanup, doctor, kernelspecs, settings
from .checks import Check
from .errors import ImageError, SandboxError, SettingError
from .images.boot import build_boot_files
from .images.build import build_image
from .images.imports import import_image, source_kind
from .images.install import remove_image, users_of
from .images.store import DEFAULT_IMAGE, find_image, list_images, load_manifest
from .images.unpack import DEFAULT_MAX_SIZE
from .kernelspecs import kernelspec_settings
from .kubernetes.agent_image import push_agent_image
from .limits import format_size, parse_size
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
    `--Class.trait` of one of its configurable classes, and a positional argument only
    where the command names one (`positional`; on a command with subcommands it is an
    unknown subcommand). A refusal names
    what was refused and lists what is accepted, on stderr, with argparse's usage-error
    status 2.
    """

    def __init__(self, *args: Any, command: str, positional: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command = command
        self.positional = positional

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
        if len(stray) > self.positional:
            self._refuse(f"unexpected argument {stray[self.positional]!r}", listed)

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
    positional: tuple[str, ...] = ()
    """Traits the command's positional arguments set, in order (none: it takes none)."""

    @property
    def command(self) -> str:
        """The command as typed, for its messages: its name with spaces (a subcommand whose
        own name has a dash says so as a class attribute)."""
        return self.name.replace("-", " ")

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        for trait, value in zip(self.positional, self.extra_args, strict=False):
            setattr(self, trait, value)

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
            command=self.command,
            positional=len(self.positional),
        )

    def _find_subcommand(self, name: str) -> str:
        """No external subcommands: JupyterApp would leave the command line unparsed
        when a `jupyter-sandbox-<name>` is on PATH, and these commands never run it."""
        return ""

    def out(self, text: str = "") -> None:
        """Command output (the one place this package writes to stdout)."""
        sys.stdout.write(text + "\n")


class _Group(_Sub):
    """A command that only holds subcommands (`subcommands`); alone, it lists them and
    exits 1."""

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        super().start()


class ImageBuildApp(_Sub):
    name = "jupyter-sandbox-image-build"
    description = (
        "Build an image: without --from, the default one (Debian with Python and ipykernel); "
        "with --from, NAME from a Binder folder, an OCI image or a root filesystem folder."
    )
    image = Unicode(DEFAULT_IMAGE, config=True, help="Name of the image.")
    source = Unicode(
        "",
        config=True,
        help="What to build it from: a Binder folder, an OCI layout folder, oci:DIR[:TAG], "
        "oci-archive:FILE, docker-archive:FILE, docker://REGISTRY/REPO:TAG, or a root "
        "filesystem folder. Empty: the default image's recipe.",
    )
    max_size = Unicode(
        format_size(DEFAULT_MAX_SIZE),
        config=True,
        help="The most an imported image may unpack to (e.g. 20G): a bound on "
        "decompression bombs and gigantic layers.",
    )
    force = Bool(False, config=True, help="Rebuild even if the recipe did not change.")
    insecure = Bool(
        False,
        config=True,
        help="Pull from a registry over plain HTTP or with an unverified certificate "
        "(one on loopback).",
    )
    positional = ("image",)
    flags = {
        "force": ({"ImageBuildApp": {"force": True}}, "Rebuild even if up to date."),
        "insecure": (
            {"ImageBuildApp": {"insecure": True}},
            "Pull from a registry without TLS verification.",
        ),
        **_Sub.flags,
    }
    aliases = {
        "name": "ImageBuildApp.image",
        "from": "ImageBuildApp.source",
        "max-size": "ImageBuildApp.max_size",
        **_Sub.aliases,
    }

    def start(self) -> None:
        self.log.setLevel(min(self.log.level, logging.INFO))  # its steps are its output
        started = time.monotonic()
        try:
            max_bytes = parse_size(self.max_size)
            # What the command line asks is checked before anything is built.
            if self.source:
                source_kind(self.source)
            elif self.image != DEFAULT_IMAGE:
                raise ImageError(
                    f"image {self.image!r} needs --from SOURCE (only {DEFAULT_IMAGE} is "
                    "built from the project's recipe)"
                )
            # The default image first, in any case: it gives every image the agent's
            # runtime, and a Binder folder its base.
            default = build_image(DEFAULT_IMAGE, force=self.force and not self.source,
                                  log=self.log)  # fmt: skip
            if not self.source:
                rootfs = default
            else:
                import_image(self.image, self.source, max_bytes=max_bytes,
                             tls_verify=not self.insecure, log=self.log)  # fmt: skip
                rootfs = find_image(self.image)
            boot = build_boot_files(self.image, rootfs, self.log)
        except (ImageError, ValueError) as e:
            self.log.error("%s", e)
            self.exit(1)
        kernels = (load_manifest(self.image) or {}).get("kernels", {})
        self.out(
            f"image {self.image} ready at {rootfs}, microVM boot files in "
            f"{boot.kernel.parent} ({time.monotonic() - started:.1f} s); kernels: "
            f"{', '.join(kernels) or 'none found'}"
        )


class ImageLsApp(_Sub):
    name = "jupyter-sandbox-image-ls"
    description = "List images: name, size, kernels, source, build time, kernels using it."

    def start(self) -> None:
        rows = [("NAME", "SIZE", "KERNELS", "SOURCE", "BUILT", "IN USE")]
        for name, manifest in list_images():
            source = manifest.get("source") or {}
            rows.append(
                (
                    name,
                    format_size(int(manifest.get("size_bytes") or 0)),
                    ",".join(manifest.get("kernels") or {}) or "-",
                    str(source.get("reference") or source.get("folder") or source.get("kind", "-")),
                    str(manifest.get("built_at", "-")),
                    str(len(users_of(name))),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


class ImageRmApp(_Sub):
    name = "jupyter-sandbox-image-rm"
    description = "Remove an image (refused while a kernel uses it)."
    image = Unicode("", config=True, help="Name of the image to remove.")
    positional = ("image",)

    def start(self) -> None:
        try:
            if not self.image:
                raise ImageError("which image? `jupyter sandbox image rm NAME`")
            remove_image(self.image, self.log)
        except ImageError as e:
            self.log.error("%s", e)
            self.exit(1)
        self.out(f"image {self.image} removed")


class ImageApp(_Group):
    name = "jupyter-sandbox-image"
    description = "Manage guest images."
    subcommands = {
        "build": (ImageBuildApp, ImageBuildApp.description),
        "ls": (ImageLsApp, ImageLsApp.description),
        "rm": (ImageRmApp, ImageRmApp.description),
    }


def _setting_value(text: str) -> Any:
    """A setting given on the command line: JSON where it parses as JSON (2, 0.5, true,
    ["pypi.org:443"]), else the text itself (1G, egress)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class KernelspecInstallApp(_Sub):
    name = "jupyter-sandbox-kernelspec-install"
    description = (
        "Install host kernelspecs that run an image's kernels in a sandbox: one per "
        "kernel the image carries (or --kernel), for --backend, with the limits given."
    )
    image = Unicode("", config=True, help="The image whose kernels to install (required).")
    kernel = Unicode("", config=True, help="Only this kernel of the image (default: all).")
    backend = Unicode("gvisor", config=True, help="The backend: gvisor or microvm.")
    spec_name = Unicode("", config=True, help="The kernelspec's name (one kernel only).")
    user = Bool(False, config=True, help="Install for the current user, not system-wide.")
    sys_prefix = Bool(False, config=True, help="Install into sys.prefix (this environment).")
    prefix = Unicode("", config=True, help="Install under this prefix.")
    vars().update(
        {
            s.name: Unicode(None, allow_none=True, config=True, help=s.help)
            for s in kernelspec_settings().values()
            if s.name != "image"
        }
    )
    aliases = {
        "image": "KernelspecInstallApp.image",
        "kernel": "KernelspecInstallApp.kernel",
        "backend": "KernelspecInstallApp.backend",
        "name": "KernelspecInstallApp.spec_name",
        "prefix": "KernelspecInstallApp.prefix",
        **{
            s.name.replace("_", "-"): f"KernelspecInstallApp.{s.name}"
            for s in kernelspec_settings().values()
            if s.name != "image"
        },
        **_Sub.aliases,
    }
    flags = {
        "user": ({"KernelspecInstallApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": (
            {"KernelspecInstallApp": {"sys_prefix": True}},
            "Install into sys.prefix.",
        ),
        **_Sub.flags,
    }

    def start(self) -> None:
        config = {
            name: _setting_value(getattr(self, name))
            for name in kernelspec_settings()
            if name != "image" and getattr(self, name) is not None
        }
        try:
            if not self.image:
                raise SettingError("which image? --image NAME (`jupyter sandbox image ls`)")
            installed = kernelspecs.install(
                self.image, kernel=self.kernel, backend=self.backend, config=config,
                name=self.spec_name, user=self.user,
                prefix=sys.prefix if self.sys_prefix else (self.prefix or None), log=self.log,
            )  # fmt: skip
        except (ImageError, SettingError, OSError) as e:
            self.log.error("%s", e)
            self.exit(1)
        for name, where in installed:
            self.out(f"installed kernelspec {name} in {where}")


class KernelspecApp(_Group):
    name = "jupyter-sandbox-kernelspec"
    description = "Kernelspecs for images' kernels."
    subcommands = {"install": (KernelspecInstallApp, KernelspecInstallApp.description)}


class KubernetesAgentImageApp(_Sub):
    name = "jupyter-sandbox-kubernetes-agent-image"
    command = "jupyter sandbox kubernetes agent-image"
    description = (
        "Build the agent image (the agent and its Python, which an init container puts into "
        "every kernel pod) and copy it to DEST with skopeo."
    )
    dest = Unicode(
        "",
        config=True,
        help="Where to: docker://REGISTRY/REPO:TAG, oci:DIR[:TAG], oci-archive:FILE[:TAG] or "
        "docker-archive:FILE[:NAME:TAG].",
    )
    insecure = Bool(
        False,
        config=True,
        help="Push to a registry over plain HTTP or with an unverified certificate (one on "
        "loopback).",
    )
    aliases = {"to": "KubernetesAgentImageApp.dest", **_Sub.aliases}
    flags = {
        "insecure": (
            {"KubernetesAgentImageApp": {"insecure": True}},
            "Push to a registry without TLS verification.",
        ),
        **_Sub.flags,
    }

    def start(self) -> None:
        self.log.setLevel(min(self.log.level, logging.INFO))  # its steps are its output
        started = time.monotonic()
        try:
            if not self.dest:
                raise ImageError(f"where to? `{self.command} --to DEST`")
            # The agent's runtime comes from the default image: built, and up to date.
            build_image(DEFAULT_IMAGE, force=False, log=self.log)
            digest = push_agent_image(self.dest, self.insecure)
        except ImageError as e:
            self.log.error("%s", e)
            self.exit(1)
        self.out(
            f"agent image {__version__} ({digest}) copied to {self.dest} "
            f"({time.monotonic() - started:.1f} s)"
        )


class _KubernetesServiceApp(_Sub):
    """A command that acts as the Kubernetes sandbox service does: with its configuration
    (`--config FILE`, a traitlets file setting `c.KubernetesService...`, as the service's
    ConfigMap holds it). The service's module is imported only by these commands: the
    Kubernetes client library is an extra (`jupyter-sandbox[kubernetes]`)."""

    config_path = Unicode("", config=True, help="The service's configuration file (Python).")
    aliases = {"config": "_KubernetesServiceApp.config_path", **_Sub.aliases}

    def kubernetes_service(self) -> Any:
        """The service's configuration as this command was given it."""
        from .kubernetes.service import KubernetesService

        if self.config_path:
            path = Path(self.config_path).resolve()
            if not path.is_file():
                raise SettingError(f"no configuration file {self.config_path}")
            self.load_config_file(path.name, path=str(path.parent))
        return KubernetesService(parent=self)


def report(app: _Sub, checks: list[Check], where: str) -> NoReturn:
    """Print `checks` as doctor does, and exit 1 if one failed."""
    for check in checks:
        app.out(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        if not check.ok and check.fix:
            app.out(f"       fix: {check.fix}")
    failed = [c for c in checks if not c.ok]
    app.out(
        f"{where} can run sandboxed kernels"
        if not failed
        else f"{len(failed)} problem(s): sandboxed kernels cannot start on {where}"
    )
    app.exit(1 if failed else 0)


class DoctorApp(_KubernetesServiceApp):
    name = "jupyter-sandbox-doctor"
    description = (
        "Check that this host (or with --kubernetes, a cluster) can run sandboxed kernels; "
        "exit 1 if it cannot."
    )
    runsc_path = Unicode("runsc", config=True, help="runsc binary to check.")
    platform = Unicode("systrap", config=True, help="gVisor platform to check.")
    image = Unicode("python3", config=True, help="Guest image to check.")
    kubernetes = Bool(
        False, config=True,
        help="Check the cluster the Kubernetes service's configuration (--config) reaches: "
        "API, RBAC, RuntimeClass, a probe pod's kernel, NetworkPolicy enforcement.",
    )  # fmt: skip
    network = Bool(True, config=True, help="With --kubernetes: probe NetworkPolicy too.")
    aliases = {
        "platform": "DoctorApp.platform",
        "runsc": "DoctorApp.runsc_path",
        "image": "DoctorApp.image",
        **_KubernetesServiceApp.aliases,
    }
    flags = {
        "kubernetes": ({"DoctorApp": {"kubernetes": True}}, "Check a Kubernetes cluster."),
        "no-network": ({"DoctorApp": {"network": False}}, "Skip the NetworkPolicy probe."),
        **_Sub.flags,
    }

    def start(self) -> None:
        if self.kubernetes:
            from .kubernetes.doctor import run_checks

            checks = asyncio.run(run_checks(self.kubernetes_service(), network=self.network))
            report(self, checks, "this cluster")
        overrides = {"runsc_path": self.runsc_path, "platform": self.platform}
        report(self, doctor.run_checks(self.image, overrides), "this host")


class KubernetesServeApp(_KubernetesServiceApp):
    name = "jupyter-sandbox-kubernetes-serve"
    command = "jupyter sandbox kubernetes serve"
    description = (
        "Run the Kubernetes sandbox service (a JupyterHub service in the cluster, holding the "
        "only Kubernetes credential for kernels; docs: 'Kubernetes')."
    )

    def start(self) -> None:
        from .kubernetes.service import serve

        self.log.setLevel(min(self.log.level, logging.INFO))
        try:
            service = self.kubernetes_service()
            asyncio.run(serve(service))
        except SettingError as e:
            self.log.error("%s", e)
            self.exit(2)


class KubernetesRenderApp(_KubernetesServiceApp):
    name = "jupyter-sandbox-kubernetes-render"
    command = "jupyter sandbox kubernetes render"
    description = (
        "Print, as YAML, the Pod and NetworkPolicy that a kernel start would create for USER "
        "with KERNELSPEC under the service's configuration and policy, without a cluster."
    )
    user = Unicode("user", config=True, help="Whose kernel (their policy and labels).")
    groups = Unicode("", config=True, help="The user's hub groups, comma-separated.")
    server = Unicode("", config=True, help="The user's server name ('' for the default).")
    kernelspec = Unicode(
        "python3-kubernetes", config=True,
        help="A kernelspec on this machine: its provisioner config is what the kernel asks.",
    )  # fmt: skip
    aliases = {
        "user": "KubernetesRenderApp.user",
        "groups": "KubernetesRenderApp.groups",
        "server": "KubernetesRenderApp.server",
        "kernelspec": "KubernetesRenderApp.kernelspec",
        **_KubernetesServiceApp.aliases,
    }

    def start(self) -> None:
        import yaml

        from .kubernetes.service import render

        try:
            service = self.kubernetes_service()
            asked = _asked_by(self.kernelspec)
            groups = frozenset(g for g in self.groups.split(",") if g)
            objects = asyncio.run(render(service, self.user, groups, self.server,
                                         self.kernelspec, asked))  # fmt: skip
        except (SettingError, SandboxError) as e:
            self.log.error("%s", e)
            self.exit(1)
        self.out(yaml.safe_dump_all(objects, sort_keys=False).rstrip())


def _asked_by(kernelspec: str) -> dict[str, Any]:
    """What a kernelspec's provisioner config asks of the service (its user settings);
    SettingError if there is no such kernelspec here."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernelspec)
    except NoSuchKernel:
        raise SettingError(
            f"no kernelspec {kernelspec!r} here (`jupyter kernelspec list`)"
        ) from None
    config = spec.metadata.get("kernel_provisioner", {}).get("config", {})
    return {name: value for name, value in config.items() if name in settings.USER_SETTINGS}


class KubernetesGcApp(_KubernetesServiceApp):
    name = "jupyter-sandbox-kubernetes-gc"
    command = "jupyter sandbox kubernetes gc"
    description = (
        "Delete kernel pods nobody will delete (ended ones, and those whose server is gone), "
        "once, as the running service does every gc_interval."
    )

    def start(self) -> None:
        from .kubernetes.service import collect_once

        self.log.setLevel(min(self.log.level, logging.INFO))
        try:
            deleted = asyncio.run(collect_once(self.kubernetes_service()))
        except (SettingError, SandboxError) as e:
            self.log.error("%s", e)
            self.exit(1)
        self.out(f"deleted {len(deleted)} kernel pod(s)" + "".join(f"\n  {n}" for n in deleted))


class KubernetesApp(_Group):
    name = "jupyter-sandbox-kubernetes"
    description = "Kernels as Kubernetes pods: the service, the agent image, what a start makes."
    subcommands = {
        "serve": (KubernetesServeApp, KubernetesServeApp.description),
        "render": (KubernetesRenderApp, KubernetesRenderApp.description),
        "gc": (KubernetesGcApp, KubernetesGcApp.description),
        "agent-image": (KubernetesAgentImageApp, KubernetesAgentImageApp.description),
    }


class PsApp(_Sub):
    name = "jupyter-sandbox-ps"
    description = (
        "List live sandboxes: kernel id, backend, age, CPU, memory, owning server. A warm "
        "pool's sandboxes, waiting for a kernel, show (warm pool) as their kernel."
    )
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
                    record.kernel_id or "(warm pool)",
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


class SandboxApp(_Group):
    name = "jupyter-sandbox"
    description = "Sandboxed Jupyter kernels (gVisor, microVM): check, build, list, clean up."
    subcommands = {
        "doctor": (DoctorApp, DoctorApp.description),
        "image": (ImageApp, ImageApp.description),
        "kernelspec": (KernelspecApp, KernelspecApp.description),
        "kubernetes": (KubernetesApp, KubernetesApp.description),
        "ps": (PsApp, PsApp.description),
        "gc": (GcApp, GcApp.description),
        "serve": (ServeApp, ServeApp.description),
    }


main = SandboxApp.launch_instance
