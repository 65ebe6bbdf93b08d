"""Test set-up: load oneflow_rope (which makes OneFlow's CUDA libraries loadable) before anything
imports oneflow. The helpers are imported as the package ``tests`` (pytest puts the repository
root on the path)."""

import oneflow_rope  # noqa: F401  (must precede `import oneflow`)
