"""The tests of oneflow_rope, and the helpers they share with bench/.

Importable as the package ``tests`` from the repository root (pytest puts the root on the path;
scripts run as ``python -m tests.sanitize_driver`` or ``python -m bench.gpu_check`` from there):

- ``tests.reference``: the float64 numpy reference, written from docs/operator.md (numpy only);
- ``tests.cases``: the parameter table of the CPU tests and the GPU bench (numpy only);
- ``tests.raw_driver``: runs the framework-free kernels (module _rope_raw) on numpy arrays or
  PyTorch tensors (numpy only; PyTorch when given its tensors);
- ``tests.flow_helpers``: numpy arrays to OneFlow calls (needs OneFlow).

Importing this package imports nothing else: the three framework-free modules work on a machine
without OneFlow.
"""
