"""Where things are in a sandbox, and who the kernel is there: shared by both ends.

The host builds images and sandboxes with these (provisioner/images/build.py,
provisioner/backends/), the guest finds its agent and the kernel's home with
them. Standard library only, like everything under guest/.
"""

AGENT_DIR = "/opt/jupyter-sandbox"
"""Where the host's guest/ folder is mounted read-only in every sandbox."""
AGENT_RUNTIME = "/opt/jupyter-sandbox-runtime"
"""The agent's own Python, in every image (provisioner/images/runtime.py): the agent never
depends on the image's interpreter, which an R-only image does not have."""
AGENT_PYTHON = f"{AGENT_RUNTIME}/bin/python3"
"""What runs the agent (and the microVM's pid1, and kernel_init) in every sandbox."""
AGENT_OPENSSL_CONF = "/dev/null"
"""OPENSSL_CONF of every agent (gVisor's OCI spec, the microVM's pid1, a kernel pod's env).
The runtime's libcrypto would otherwise read the image's own /usr/lib/ssl/openssl.cnf as
soon as the agent imports ssl (asyncio does), and a directive there can load a module of
the image's into the agent, which is root in a local sandbox. An image is untrusted
(tests/security/test_hostile_images.py)."""
AGENT_IN_RUNTIME = f"{AGENT_RUNTIME}/agent"
"""Where the agent's code (agent.py and the modules it runs) sits inside the runtime's folder:
in the agent image and so on Kubernetes, where an init container copies the whole folder into
a volume that the kernel's container mounts read-only at `AGENT_RUNTIME`. The user's image
then needs neither the runtime nor the agent baked in (provisioner/kubernetes/agent_image.py)."""
CLAIM_DIR = "/opt/jupyter-sandbox-claim"
"""Where a gVisor sandbox finds its kernel's user and folders (the agent's `take_claim`).
Every gVisor sandbox is started before it knows them: it may wait in a warm pool
(provisioner/pool.py) until a kernel claims it. The claim (backends/gvisor_claim.py)
writes `kernel` (JSB_KERNEL's value) and `mounts.json` here, and attaches each of the
kernel's folders at `<n>`; the agent reads it and covers it, kernel_init mounts the folders
where they belong in the kernel's namespace and hides it there. The host writes all of it
before anyone can send LAUNCH."""
CLAIMED = "claim"
"""JSB_KERNEL's value in a sandbox whose kernel is named in `CLAIM_DIR`."""
WARM_ENV = "JSB_WARM_PYTHON"
"""Set, to the kernel's Python, in a gVisor sandbox of a warm pool: its agent starts the
kernel process ahead of the claim (guest/warm_kernel.py, under kernel_init)."""
WARM_USER_ENV = "JSB_WARM_KERNEL"
"""Beside `WARM_ENV`: the kernel's user ("uid,gid,nproc,nofile", as JSB_KERNEL), part of a
pool's shape, which the warm kernel process runs as from its start."""
KERNEL_USER = "sandbox"
KERNEL_UID = 1000
"""The kernel's uid (and gid) in the default image, and on the host when a root-owned
workspace gives it no owner to take (provisioner/workspace.py)."""
KERNEL_HOME = "/home/sandbox"
"""The kernel's home, and its cwd when no workspace is mounted."""
KERNEL_WRITABLE = ("/tmp", "/var/tmp", KERNEL_HOME)
"""Folders the kernel may write to (mode 1777), made so by the agent in each sandbox's own
writable layer: in the image store on the host nothing is world-writable, so that no
local user of the host can plant a file there that every kernel of the image would see."""
GUEST_PYTHON = "/opt/venv/bin/python3"
"""The Python kernel's interpreter in the default image (its kernelspec names it)."""
KERNEL_PATH = "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"
"""The kernel's PATH."""
