"""Per-kernel networks: none, egress (an allowlist) or open, always behind a firewall.

One module per concern; import from the module (this package re-exports nothing):

- `spec`: the modes, `egress_allow` entries and bandwidths as asked for (parsing
  only, standard library only: the settings and the policy import nothing else);
- `host`: what every sandbox's network shares on the host: the names of its
  objects, the host-wide lock, IPv4 forwarding and its guard, the /30 pool;
- `sandbox`: one sandbox's namespace, link, firewall, bandwidth cap and DNS
  (`SandboxNetwork`); its docstring tells how all of it is built and why;
- `dns`: the DNS responder one sandbox's guest asks;
- `tap`: attaching to a microVM's tap device inside its namespace, for QEMU;
- `gc`: removing a sandbox's network, after a crash too, and finding what no
  sandbox owns any more.
"""
