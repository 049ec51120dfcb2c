"""The Kubernetes backend's pieces: each kernel a pod of its own in a sandboxing RuntimeClass.

In the user's server: `client` (asks the service, reaches the pod over TLS). In the
cluster, the sandbox service: `service` (HTTP, the caller's hub token, policy and
quotas), `hub` (whose token it is), `cluster` (the one watch, pods made and deleted),
`manifests` (the kernel's Pod, Secret and NetworkPolicy), `credentials` (the kernel's
TLS identity), `agent_image` (the image whose init container brings the agent),
`doctor` (what a real cluster must give). docs/kubernetes.md says why it is built so.
"""
