"""Images on disk: `ocilayout` (the one OCI-layout reader and writer), `documents` (bounded, verified
manifests and configs from a directory or an archive), `blockimage` (block images made from a
directory), `spec` (a converted image's layers as a device spec)."""
