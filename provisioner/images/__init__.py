"""Guest images: the read-only root filesystems that sandboxed kernels run on.

- `store`: where images live and finding one at kernel start (no root, no network);
- `build`: making an image from the recipe in ``guest/image/`` (root, network);
- `boot`: what a microVM boots, made from an image, and finding it at kernel start;
- `unpack`: untrusted layers and rootfs folders into a plain tree, hostile input neutralised;
- `oci`: OCI layouts, archives and registries (through skopeo) into such a tree.

Import from the module that says what you need; nothing is re-exported here.
"""
