"""Image conversion (`damselfly convert`): OCI layers in, damselfly block layers out (DESIGN §4).

- `converter`: the pipeline, source to destination; `plan`: what of the source converts and what the
  result's config and manifest say; `layercache`: converted layers reused by source chain and options;
  `fanout`: platforms converted side by side (``--jobs``) with the outcome of one after another.
- `sources` / `archive`: where the image comes from (registry, OCI layout, OCI archive, docker save);
  `sinks`: where it goes (registry, OCI layout).
- `ext4layer`: one layer built as ext4 on a block device over the layers below it.
- `check` (`damselfly check`): a converted image's tree against its source unpacked, through
  `treewalk` (a mounted tree as a value: types, modes, owners, content digests, xattrs, hard links).
- Applying a layer tar: `layerstream` (gzip/zstd decoded as read), `tarentries` (the tar stream and what
  its entries say), `applytar` (OCI whiteout semantics, entry by entry), `roottree` (safe paths under
  the root, removals, directory times), `entryfiles` (file data, sparse holes, xattrs).
"""
