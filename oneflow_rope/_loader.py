"""Makes ``import oneflow`` work without a hand-set LD_LIBRARY_PATH.

OneFlow 0.9.0 links against ``libcublas.so.11``, ``libcublasLt.so.11`` and ``libcudnn.so.8`` even on
a machine without a GPU. The ``nvidia-cublas-cu11`` and ``nvidia-cudnn-cu11`` wheels ship them
under ``site-packages/nvidia/*/lib``; loading them globally before ``oneflow`` lets the dynamic
loader find them by name.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

# Dependency order: cublasLt before cublas; cudnn last.
_LIBRARIES = (
    ("cublas", "libcublasLt.so.11"),
    ("cublas", "libcublas.so.11"),
    ("cudnn", "libcudnn.so.8"),
)


def preload_cuda_libraries() -> list:
    """Loads OneFlow's CUDA library dependencies from the nvidia-* wheels, once.

    Returns the paths loaded (empty when oneflow is already imported or the wheels are absent).
    """
    if "oneflow" in sys.modules:
        return []
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    loaded = []
    for folder, name in _LIBRARIES:
        for root in spec.submodule_search_locations:
            path = os.path.join(root, folder, "lib", name)
            if os.path.exists(path):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded.append(path)
                break
    return loaded
