"""The Kubernetes backend's pieces: `agent_image`, the project's own small image whose init
container puts the agent and its Python into each kernel pod, so that the user's image,
any image the cluster can pull, needs neither baked in.
"""
