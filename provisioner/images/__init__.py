"""Guest images: the read-only root filesystems that sandboxed kernels run on.

- `store`: where images live and finding one at kernel start (no root, no network);
- `build`: making an image from the recipe in ``guest/image/`` (root, network);
- `binder`: an image's tree from a Binder/repo2docker folder (root, network, runsc);
- `boot`: what a microVM boots, made from an image, and finding it at kernel start.

Import from the module that says what you need; nothing is re-exported here.
"""
