"""The parts of `scripts/demo.py` (``make demo``): a loopback registry, a private containerd, a private
`damselfly serve`, the cgroup that counts their CPU time, and the undoing of everything by exact pid and
path. Nothing here touches a containerd, registry or damselfly already running on the machine.

The same harness serves the tests (``from scripts.demolib.registry import Registry``: their registries,
containerd instances, `damselfly serve` processes and leak checks) and the benchmarks (`report`); it
imports nothing from the tests.
"""
