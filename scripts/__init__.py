"""Tools around damselfly: the demo (``make demo``), the benchmarks and the image builder.

They run as scripts (``python scripts/demo.py``); this file makes `scripts.demolib` importable from the
tests too, which start their registries, containerd instances and `damselfly serve` with the same harness
as the demo. Nothing here imports from the tests.
"""
