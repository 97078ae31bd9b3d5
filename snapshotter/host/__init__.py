"""The host's plumbing: loop devices, mounts, mkfs, mountinfo and the mount system calls."""
