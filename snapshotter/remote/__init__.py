"""Converted images through containerd: `snapshots` (the Prepare hook that records remote layers),
`layers` (what their labels say; chains), `blobcheck` (is the blob there?), `chains` (shared chain
mounts), `rpull` (`damselfly rpull`), `containerd` (a client of containerd's API)."""
