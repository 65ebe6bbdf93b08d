"""Benchmarks and the GPU check. Run them as modules from the repository root, e.g.
``python -m bench.host_overhead``; they import the shared test helpers as ``tests.*``."""
