"""The Kubernetes backend: each kernel a pod of its own, under a sandboxing RuntimeClass.

Its sandboxes are made in the cluster by the sandbox service (`jupyter sandbox
kubernetes serve`, provisioner/kubernetes/service.py), which holds the only
Kubernetes credential; a user's server asks it with its JupyterHub token
(provisioner/kubernetes/client.py, this backend's `maker`) and reaches the kernel
pod over TLS. So nothing of this backend runs on the server's host: no runtime to
reap, no orphans to find there (the service's gc finds the cluster's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import SandboxError
from ..settings import KERNELSPEC, OPERATOR, Setting, text_value
from ..state import Record
from .base import Backend, Sandbox, SandboxSpec

SERVICE_URL_ENV = "JUPYTER_SANDBOX_SERVICE_URL"
DEFAULT_SERVICE_URL = "http://jupyter-sandbox.jhub.svc:8181"
"""The service as deploy/kubernetes/ installs it (namespace jhub, port 8181)."""


class KubernetesBackend(Backend):
    """Kernel pods in a Kubernetes cluster, made by the cluster's sandbox service."""

    name = "kubernetes"
    title = "Kubernetes"
    provisioner_class = "KubernetesProvisioner"
    maker = "provisioner.kubernetes.client.KubernetesClient"
    settings = (
        Setting(
            name="service_url", kind="text",
            default=os.environ.get(SERVICE_URL_ENV, DEFAULT_SERVICE_URL),
            help=f"The Kubernetes sandbox service's URL (default: ${SERVICE_URL_ENV}, else "
            f"{DEFAULT_SERVICE_URL}).",
            parse=text_value, who=frozenset({OPERATOR, KERNELSPEC}),
            enforced="kubernetes/client.py",
        ),
    )  # fmt: skip
    changed_defaults = MappingProxyType({
        # The user's volume is not the server's folder: none unless the operator says.
        "workspace": "none",
        # An image pull on a fresh node takes a while.
        "startup_timeout": 300.0,
    })  # fmt: skip

    async def create(self, spec: SandboxSpec, settings: Mapping[str, Any],
                     log: logging.Logger) -> Sandbox:  # fmt: skip
        raise SandboxError(
            "kernels of the kubernetes backend are made by its sandbox service in the "
            "cluster (`jupyter sandbox kubernetes serve`), never on this host"
        )

    def remove_runtime(self, record: Record, log: logging.Logger) -> None:
        """Nothing of a kernel pod is on this host."""


KUBERNETES = KubernetesBackend()
