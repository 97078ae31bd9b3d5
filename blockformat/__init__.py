"""Damselfly's on-disk formats: pure data structures, no I/O framework.

- `chunkfile`: the seekable, compressed, digest-verified chunk container.
- `layer`: a sparse block-level diff over a virtual device, stored in one chunk container.
- `extents`: the sorted, non-overlapping extent map both use.
- `stack`: up to 255 layers merged into one map; reads; `flatten`.
- `upper`: the crash-safe writable upper and its `commit` into a layer blob.

Imports point only one way: `p2p` and `snapshotter` use this package, never the reverse.
The byte layouts are specified in docs/format.md.
"""
