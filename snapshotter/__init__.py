"""Everything containerd and the kernel see: the Snapshots service, devices, mounts and the CLI."""
