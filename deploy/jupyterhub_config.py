# /etc/jupyterhub/jupyterhub_config.py: a single-host hub for local users, whose kernels
# run in sandboxes made by the sandbox service (jupyter-sandbox.service) under
# /etc/jupyter-sandbox/policy.toml. See docs/hubs.md.
c = get_config()  # noqa: F821

PREFIX = "/opt/jupyter-sandbox"

c.JupyterHub.bind_url = "http://:8000"
c.JupyterHub.db_url = "sqlite:////var/lib/jupyterhub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "/var/lib/jupyterhub/jupyterhub_cookie_secret"
c.ConfigurableHTTPProxy.command = [f"{PREFIX}/proxy/node_modules/.bin/configurable-http-proxy"]

# Local users log in with their system password; members of jupyterhub-users may.
c.JupyterHub.authenticator_class = "pam"
c.PAMAuthenticator.allowed_groups = {"jupyterhub-users"}
c.PAMAuthenticator.admin_users = set()

# Each single-user server runs as its user (not root): its kernels are sandboxed by the
# service, which it finds at the socket below, under the limits the policy gives the user.
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [f"{PREFIX}/venv/bin/jupyterhub-singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {"JUPYTER_SANDBOX_SOCKET": "/run/jupyter-sandbox/service.sock"}
c.Spawner.args = [
    # only sandboxed kernels are offered, and a new notebook gets a gVisor one
    "--KernelSpecManager.allowed_kernelspecs=python3-gvisor",
    "--KernelSpecManager.allowed_kernelspecs=python3-microvm",
    "--MappingKernelManager.default_kernel_name=python3-gvisor",
]
