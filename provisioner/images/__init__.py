"""Guest images: the read-only root filesystems that sandboxed kernels run on.

- `store`: where images live and finding one at kernel start (no root, no network);
- `build`: making the default image from the recipe in ``guest/image/`` (root, network);
- `imports`: `image build NAME --from SOURCE`, whatever SOURCE is:
  - `oci`: OCI layouts, archives and registries (through skopeo) into a tree,
  - `unpack`: untrusted layers and rootfs folders into a plain tree, hostile input neutralised,
  - `binder`: a tree from a Binder/repo2docker folder (root, network, runsc);
- `runtime`: the agent's own Python, put into every image;
- `oci_layout`: writing an OCI image layout (the project's own images, made from a folder);
- `kernels`: the kernelspecs an image carries, read as untrusted input;
- `install`: storing a finished tree as an image (manifest, swap-in) and removing one;
- `boot`: what a microVM boots, made from an image, and finding it at kernel start.

Import from the module that says what you need; nothing is re-exported here.
"""
