"""Test set-up: make the tests' helper modules importable and load oneflow_rope (which makes
OneFlow's CUDA libraries loadable) before anything imports oneflow."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import oneflow_rope  # noqa: E402,F401  (must precede `import oneflow`)
