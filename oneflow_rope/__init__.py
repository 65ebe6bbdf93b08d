"""oneflow_rope: fused rotary position embedding (RoPE) for OneFlow 0.9.0.

    >>> import oneflow_rope
    >>> out = oneflow_rope.fused_apply_rotary_emb(x, layout="BMHK", mode="plane")

``fused_apply_rotary_emb`` computes what ``oneflow._C.fused_apply_rotary_emb`` of newer OneFlow
releases computes; ``patch_oneflow()`` installs that function, with upstream's signature and
defaults, into ``oneflow._C``.
Import this package before ``oneflow`` (or after it, if OneFlow's CUDA libraries are already on
the loader path): it makes the CUDA libraries of the nvidia-* wheels loadable first.
"""

from ._loader import preload_cuda_libraries

preload_cuda_libraries()

from .layout import (  # noqa: E402
    INPUT_LAYOUTS,
    MODES,
    OUTPUT_LAYOUTS,
    VARLEN_LAYOUTS,
    LayoutInfo,
    RopeShapes,
    infer_shapes,
    parse_layout,
)
from .ops import (  # noqa: E402
    cos_sin_table,
    fused_apply_rotary_emb,
    fused_apply_rotary_emb_qk,
    position_check_enabled,
    set_position_check,
)
from .compat import patch_oneflow  # noqa: E402
from .rotary_embedding import RotaryEmbedding  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "fused_apply_rotary_emb",
    "fused_apply_rotary_emb_qk",
    "cos_sin_table",
    "set_position_check",
    "position_check_enabled",
    "patch_oneflow",
    "RotaryEmbedding",
    "infer_shapes",
    "parse_layout",
    "RopeShapes",
    "LayoutInfo",
    "INPUT_LAYOUTS",
    "OUTPUT_LAYOUTS",
    "VARLEN_LAYOUTS",
    "MODES",
]
