"""The host's plumbing: `tools` (running util-linux and e2fsprogs), `loop` (loop devices), `mkfs`
(ext4), `mountinfo` (the kernel's mount table), `mounts` (mount, umount, loop mounts), `syscalls`
(mount(2) and umount2(2)), `sockets` (root-only unix sockets), `umask` (the mode of shared files)."""
