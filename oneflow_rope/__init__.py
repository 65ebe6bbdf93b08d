"""oneflow_rope: fused rotary position embedding (RoPE) for OneFlow 0.9.0.

    >>> import oneflow_rope
    >>> out = oneflow_rope.fused_apply_rotary_emb(x, layout="BMHK", mode="plane")

``fused_apply_rotary_emb`` matches ``oneflow._C.fused_apply_rotary_emb`` of newer OneFlow releases.
Import this package before ``oneflow`` (or after it, if OneFlow's CUDA libraries are already on
the loader path): it makes the CUDA libraries of the nvidia-* wheels loadable first.
"""

from ._loader import preload_cuda_libraries

preload_cuda_libraries()

from .layout import INPUT_LAYOUTS, MODES, OUTPUT_LAYOUTS, LayoutInfo, RopeShapes, infer_shapes, parse_layout  # noqa: E402
from .ops import (  # noqa: E402
    cos_sin_table,
    fused_apply_rotary_emb,
    fused_apply_rotary_emb_qk,
    position_check_enabled,
    set_position_check,
)

__version__ = "0.1.0"

__all__ = [
    "fused_apply_rotary_emb",
    "fused_apply_rotary_emb_qk",
    "cos_sin_table",
    "set_position_check",
    "position_check_enabled",
    "infer_shapes",
    "parse_layout",
    "RopeShapes",
    "LayoutInfo",
    "INPUT_LAYOUTS",
    "OUTPUT_LAYOUTS",
    "MODES",
]
