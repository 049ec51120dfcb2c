"""Host kernelspecs for the kernels an image carries: `jupyter sandbox kernelspec install`.

An image's manifest lists its kernelspecs (images/kernels.py). For each one asked
for, this writes a kernelspec on the host, through jupyter_client's
`KernelSpecManager` as `jupyter kernelspec install` does, that starts the same
argv inside a sandbox of the chosen backend on that image: "R (gVisor sandbox,
course-101)". Its provisioner config names the image and whatever limits the
operator gave; the policy still bounds them when a kernel starts.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from . import backends, settings
from .errors import ImageError, SettingError
from .guest.layout import KERNEL_PATH
from .images.kernels import MAX_LOGO, read_inside, which_inside
from .images.store import find_image, load_manifest

KEPT_OUT_ENV = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "HOSTNAME", "PWD", "JPY_PARENT_PID"})
"""Variables of an image's environment a kernelspec does not carry: they describe the
image's own user and shell, not the kernel's (the provisioner sets HOME and SHELL for
the kernel's user; its home is the sandbox's, whoever the image's user was)."""
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
PLACEHOLDER = re.compile(r"\{[A-Za-z0-9_]+\}")
"""What jupyter_client fills in in a kernelspec's argv (from the server's side)."""
SPEC_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A kernelspec name jupyter_client accepts (and one that is only a folder's name)."""
PNG = b"\x89PNG\r\n\x1a\n"


def kernelspec_settings() -> dict[str, settings.Setting]:
    """What a kernelspec's provisioner config may set, by name (the common settings
    a kernelspec may set, the backend's own aside)."""
    return {s.name: s for s in settings.COMMON if settings.KERNELSPEC in s.who}


def image_env(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The image's own environment (its OCI config's Env, or the default PATH), minus what
    the sandbox sets for the kernel's user."""
    env: dict[str, str] = {}
    for entry in manifest.get("env") or ():
        if not isinstance(entry, str) or "=" not in entry:
            continue
        name, value = entry.split("=", 1)
        if _ENV_NAME_RE.fullmatch(name) and name not in KEPT_OUT_ENV and "\0" not in value:
            env[name] = value
    return env


def kernel_json(
    image: str,
    kernel: Mapping[str, Any],
    backend: backends.Backend,
    config: Mapping[str, Any],
    manifest: Mapping[str, Any],
    rootfs: Path,
) -> dict[str, Any]:
    """The host kernel.json that runs image `image`'s kernel `kernel` (its manifest entry)
    under `backend` with provisioner `config` (already checked).

    The program is written as its path in the image, found on the kernel's PATH there:
    jupyter_client replaces a bare `python` with the *server's* interpreter, which does
    not exist in the sandbox. ImageError if the image does not have it."""
    # `$` doubled: jupyter_client expands ${VAR} in a kernelspec's env from the *server's*
    # environment (its secrets), and the image must not name any of them.
    env = {
        k: v.replace("$", "$$") for k, v in {**image_env(manifest), **kernel.get("env", {})}.items()
    }
    # jupyter_client puts the *host* kernelspec's folder for {resource_dir}; the kernel
    # needs its own folder in the image.
    argv = [arg.replace("{resource_dir}", kernel["resource_dir"]) for arg in kernel["argv"]]
    for arg in argv:
        # jupyter_client fills in {env}, {cwd}, {prefix}... from the server's side: the
        # server's whole environment would reach the sandbox. Only the connection file.
        unknown = set(PLACEHOLDER.findall(arg)) - {"{connection_file}"}
        if unknown:
            raise ImageError(
                f"kernel {kernel['display_name']!r} of image {image!r} names "
                f"{', '.join(sorted(unknown))} in its argv: only {{connection_file}} and "
                "{resource_dir} are filled in for a sandboxed kernel"
            )
    if "/" not in argv[0]:
        found = which_inside(rootfs, argv[0], env.get("PATH", KERNEL_PATH))
        if found is None:
            raise ImageError(
                f"kernel {kernel['display_name']!r} of image {image!r} runs {argv[0]!r}, "
                f"which is not on its PATH ({env.get('PATH', KERNEL_PATH)}) in the image"
            )
        argv[0] = found
    return {
        "argv": argv,
        "display_name": f"{kernel['display_name']} ({backend.title} sandbox, {image})",
        "language": kernel["language"],
        "interrupt_mode": kernel.get("interrupt_mode", "signal"),
        "env": env,
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {
                "provisioner_name": backend.provisioner_name,
                "config": {"image": image, **config},
            },
        },
    }


def install(
    image: str,
    *,
    kernel: str = "",
    backend: str = "gvisor",
    config: Mapping[str, Any] | None = None,
    name: str = "",
    user: bool = False,
    prefix: str | None = None,
    log: logging.Logger,
) -> list[tuple[str, str]]:
    """Install host kernelspecs for image `image`'s kernels (all, or `kernel`), and
    return (kernelspec name, folder) for each.

    ImageError if the image is not built or has no such kernel; SettingError for an
    unknown backend or a setting a kernelspec may not set or with a bad value.
    """
    chosen = backends.get(backend)
    find_image(image)
    manifest = load_manifest(image) or {}
    found: dict[str, Any] = manifest.get("kernels") or {}
    if kernel and kernel not in found:
        raise ImageError(
            f"image {image!r} has no kernel {kernel!r}; it has: {', '.join(found) or 'none'}"
        )
    if not found:
        raise ImageError(
            f"image {image!r} carries no kernelspec (looked in the usual "
            "share/jupyter/kernels folders); write a kernelspec for it by hand "
            "(docs: Environments)"
        )
    checked = _checked(config or {})
    chosen_kernels = [kernel] if kernel else sorted(found)
    if name and not SPEC_NAME.fullmatch(name):
        raise SettingError(
            f"invalid kernelspec name {name!r}: lowercase letters, digits, '.', '_' or '-'"
        )
    if name and len(chosen_kernels) > 1:
        raise SettingError(f"--name names one kernelspec; image {image!r} has several: "
                           f"{', '.join(chosen_kernels)}; pick one with --kernel")  # fmt: skip
    rootfs = find_image(image)
    manager = KernelSpecManager()
    done = []
    for which in chosen_kernels:
        entry = found[which]
        spec_name = name or _spec_name(which, chosen.name, image)
        with tempfile.TemporaryDirectory(prefix="jsb-kernelspec-") as tmp:
            folder = Path(tmp) / spec_name
            folder.mkdir()
            (folder / "kernel.json").write_text(
                json.dumps(kernel_json(image, entry, chosen, checked, manifest, rootfs), indent=2)
                + "\n"
            )
            # PNG logos only, checked: the Jupyter server serves a kernelspec's files from
            # its own origin, and an SVG of the image's could carry a script.
            for logo in entry.get("logos", ()):
                if not logo.endswith(".png"):
                    continue
                try:
                    data = read_inside(rootfs, f"{entry['resource_dir']}/{logo}", MAX_LOGO)
                except (OSError, ImageError) as e:
                    log.warning("logo %s of kernel %s left out: %s", logo, which, e)
                    continue
                if data.startswith(PNG):
                    (folder / logo).write_bytes(data)
            where = manager.install_kernel_spec(str(folder), spec_name, user=user, prefix=prefix)
        log.info("installed kernelspec %s (%s) in %s", spec_name, which, where)
        done.append((spec_name, where))
    return done


def _spec_name(kernel: str, backend: str, image: str) -> str:
    """`ir-gvisor-course-101`: what the kernel is, where it runs, on what."""
    return re.sub(r"[^a-z0-9._-]+", "-", f"{kernel}-{backend}-{image}".lower())


def _checked(config: Mapping[str, Any]) -> dict[str, Any]:
    allowed = kernelspec_settings()
    out = {}
    for key, value in config.items():
        if key == "image":
            raise SettingError("the image is the one the kernelspec is installed for")
        if key not in allowed:
            raise SettingError(
                f"a kernelspec cannot set {key!r}; it may set: {', '.join(sorted(allowed))}"
            )
        try:
            out[key] = settings.check(allowed[key], value)
        except ValueError as e:
            raise SettingError(str(e)) from None
    return out
