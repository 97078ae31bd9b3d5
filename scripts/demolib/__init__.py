"""The parts of `scripts/demo.py` (``make demo``): a loopback registry, a private containerd, a private
`damselfly serve`, the cgroup that counts their CPU time, and the undoing of everything by exact pid and
path. Nothing here touches a containerd, registry or damselfly already running on the machine.
"""
