"""Damselfly's on-disk formats: pure data structures, no I/O framework.

- `chunkfile`: the seekable, compressed, digest-verified chunk container, and `ChunkReader`; its byte
  layout is `chunklayout`, its writer `chunkwriter`, its parsed and verified trailer and index (one per
  blob, shared by every reader of it) `chunkindex`.
- `layer`: a sparse block-level diff over a virtual device, stored in one chunk container.
- `extents`: the sorted, non-overlapping extent map both use.
- `stack`: up to 255 layers merged into one map; reads; `flatten`.
- `upper`: the crash-safe writable upper and its `commit` into a layer blob.
- `annotations`: the image annotations of a converted layer.
- `digest`: content digests (``sha256:<hex>``): the one place they are validated.

Imports point only one way: `p2p` and `snapshotter` use this package, never the reverse.
The byte layouts are specified in docs/format.md.
"""
