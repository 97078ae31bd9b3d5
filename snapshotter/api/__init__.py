"""containerd's gRPC API as Python modules, generated from `proto/` by `make proto` (do not edit).

`containerd.services.snapshots.v1` is what `damselfly serve` implements; `content.v1`, `images.v1` and
`leases.v1` are what a client of containerd (``rpull``) needs. Import e.g.
``from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc``.
"""
