"""The sandbox service: a root daemon that makes sandboxes for unprivileged Jupyter servers.

`wire` is the socket's message format, `server` the daemon (`jupyter sandbox
serve`), `client` what a provisioner uses when its server is not root.
"""
