"""Drives the framework-free kernels (module _rope_raw) with PyTorch tensors or numpy arrays.

Used where OneFlow cannot run: the GPU test bench and benchmarks on the lent H100/H200 (PyTorch
CUDA tensors), and the sanitizer build on the CPU (numpy arrays). The call's defaults and shapes
come from the op's own C++ rules (``_rope_raw.infer_shapes``, the same code as the op's inference
and the same rules as ``oneflow_rope.infer_shapes``), the layouts from the operator's table
(``_rope_raw.layout``); the tensors' real strides are mapped onto the kernel's (b, m, h, k)
strides, so views run without a copy.

    raw = load_raw("build-gpu")                 # the compiled _rope_raw of a build folder
    out = rope(raw, x, cos, sin, position_ids, layout="BMHK", mode="plane")
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Optional, Tuple

import numpy as np


def load_raw(build_dir: str):
    """The module _rope_raw built in `build_dir` (CMake option ONEFLOW_ROPE_BUILD_RAW=ON)."""
    found = sorted(glob.glob(os.path.join(build_dir, "_rope_raw*.so")))
    if not found:
        raise FileNotFoundError(f"build_dir: no _rope_raw*.so in {build_dir!r}; build with -DONEFLOW_ROPE_BUILD_RAW=ON")
    spec = importlib.util.spec_from_file_location("_rope_raw", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_torch(t: Any) -> bool:
    return type(t).__module__.startswith("torch")


def dtype_name(t: Any) -> str:
    if _is_torch(t):
        return str(t.dtype).replace("torch.", "")
    if getattr(t, "dtype", None) == np.uint16:  # bfloat16 bits held in a numpy array
        return "bfloat16"
    return str(t.dtype)


def _ptr(t: Any) -> int:
    if t is None:
        return 0
    return t.data_ptr() if _is_torch(t) else t.ctypes.data


def _elem_size(t: Any) -> int:
    return t.element_size() if _is_torch(t) else t.itemsize


def _strides(t: Any) -> Tuple[int, ...]:
    return tuple(t.stride()) if _is_torch(t) else tuple(s // t.itemsize for s in t.strides)


def _logical_strides(raw, t: Any, layout: str, K: int, slot: int) -> Tuple[int, Tuple[int, int, int, int]]:
    """(element offset, (b, m, h, k) strides) of a tensor in `layout`."""
    info = raw.layout(layout)
    st = _strides(t)
    b, m = st[info["batch_axis"]], st[info["seq_axis"]]
    if not info["fused"]:
        return 0, (b, m, st[info["head_axis"]], st[3])
    k = st[2]
    return slot * K * k, (b, m, info["slots"] * K * k, k)


def _infer(raw, x_shape, cos, position_ids, *, layout, output_layout, mode, tensor_index, k_size, rotary_size):
    """The op's C++ rules on the call (raises ValueError naming the argument)."""
    return raw.infer_shapes(
        list(x_shape), layout, output_layout=output_layout, mode=mode, tensor_index=tensor_index,
        k_size=k_size, rotary_size=rotary_size, table_shape=None if cos is None else list(cos.shape),
        position_ids_shape=None if position_ids is None else list(position_ids.shape))


def rope(raw, x, cos=None, sin=None, position_ids=None, *, layout: str = "BMHK",
         output_layout: Optional[str] = None, mode: str = "plane", tensor_index: Optional[int] = None,
         k_size: Optional[int] = None, base: float = 10000.0, rotary_size: Optional[int] = None,
         out=None, stream: Optional[int] = None, plan_only: bool = False):
    """Forward rotation of x through the raw kernels. Returns the output tensor / array
    (or the params dict when plan_only). CUDA when x is a CUDA tensor, else the CPU kernel."""
    s = _infer(raw, x.shape, cos, position_ids, layout=layout, output_layout=output_layout, mode=mode,
               tensor_index=tensor_index, k_size=k_size, rotary_size=rotary_size)
    if out is None:
        out = _empty_like(x, tuple(s["out_shape"]))
    params = _params(raw, src=x, dst=out, src_layout=s["layout"], dst_layout=s["output_layout"], src_slot=s["slot"],
                     dst_slot=0, shapes=s, mode=mode, base=base, cos=cos, sin=sin, position_ids=position_ids,
                     inverse=False)
    if plan_only:
        return params
    _launch(raw, x, params, stream)
    return out


def rope_backward(raw, dy, x_shape, cos=None, sin=None, position_ids=None, *, layout: str = "BMHK",
                  output_layout: Optional[str] = None, mode: str = "plane",
                  tensor_index: Optional[int] = None, k_size: Optional[int] = None,
                  base: float = 10000.0, rotary_size: Optional[int] = None, stream: Optional[int] = None):
    """dx (x's layout and shape, zeros in unselected packed slots) from dy (the output layout)."""
    s = _infer(raw, x_shape, cos, position_ids, layout=layout, output_layout=output_layout, mode=mode,
               tensor_index=tensor_index, k_size=k_size, rotary_size=rotary_size)
    dx = _poisoned(dy, tuple(x_shape))  # every element must be written (packed: zeros by the kernel)
    slot, K = s["slot"], s["head_size"]
    params = _params(raw, src=dy, dst=dx, src_layout=s["output_layout"], dst_layout=s["layout"], src_slot=0,
                     dst_slot=slot, shapes=s, mode=mode, base=base, cos=cos, sin=sin, position_ids=position_ids,
                     inverse=True)
    slots = raw.layout(s["layout"])["slots"]
    if slots > 1:
        k_stride = _strides(dx)[-1]
        params["zero_slots"] = [(other - slot) * K * k_stride for other in range(slots) if other != slot]
    _launch(raw, dy, params, stream)
    return dx


def tensor_entry(raw, src, dst, src_layout: str, dst_layout: str, *, K: int, H: int, src_slot: int = 0,
                 dst_slot: int = 0) -> dict:
    """The params entry of one rotated tensor: src read in src_layout, written to dst in dst_layout
    (slots: 0-based positions of the tensor in a packed layout's heads)."""
    src_off, src_st = _logical_strides(raw, src, src_layout, K, src_slot)
    dst_off, dst_st = _logical_strides(raw, dst, dst_layout, K, dst_slot)
    es = _elem_size(src)
    return {"x": _ptr(src) + src_off * es, "out": _ptr(dst) + dst_off * es, "H": H,
            "x_strides": src_st, "out_strides": dst_st}


def extended_params(raw, tensors, *, dtype: str, B: int, M: int, K: int, mode: str = "plane",
                    rotary_size: Optional[int] = None, cos=None, sin=None, position_ids=None,
                    base: float = 10000.0, inv_freq=None, attention_scaling: float = 1.0,
                    seqlen_offset: int = 0, seqlen_offsets=None, cu_seqlens=None,
                    cu_seqlens_total: Optional[int] = None, inverse: bool = False) -> dict:
    """A params dict using every input of the kernels' parameter struct (q and k in one launch,
    offsets, inv_freq, float32 tables, cu_seqlens); `tensors` are tensor_entry() dicts."""
    R = 1 if position_ids is None else position_ids.shape[1]
    params = {
        "dtype": dtype, "mode": mode, "tensors": tensors, "B": B, "M": M, "K": K,
        "rotary_size": rotary_size or K, "rotary_dim": R, "base": float(base), "inverse": inverse,
        "attention_scaling": float(attention_scaling), "seqlen_offset": int(seqlen_offset),
    }
    if cos is not None:
        params.update(cos=_ptr(cos), sin=_ptr(sin), table_rows=cos.shape[0], table_strides=_strides(cos),
                      table_dtype=dtype_name(cos))
    if inv_freq is not None:
        params.update(inv_freq=_ptr(inv_freq), inv_freq_dtype=dtype_name(inv_freq))
    if position_ids is not None:
        params.update(position_ids=_ptr(position_ids), pos_dtype=dtype_name(position_ids),
                      pos_strides=_strides(position_ids))
    if seqlen_offsets is not None:
        params.update(seqlen_offsets=_ptr(seqlen_offsets), offsets_dtype=dtype_name(seqlen_offsets),
                      offsets_stride=_strides(seqlen_offsets)[0])
    if cu_seqlens is not None:
        params.update(cu_seqlens=_ptr(cu_seqlens), cu_seqlens_dtype=dtype_name(cu_seqlens),
                      num_seqs=cu_seqlens.shape[0] - 1,
                      cu_seqlens_total=M if cu_seqlens_total is None else cu_seqlens_total)
    return params


def launch(raw, x, params, stream=None):
    """Runs a params dict on x's device (CUDA for a CUDA tensor, else the CPU kernel)."""
    _launch(raw, x, params, stream)


def _params(raw, *, src, dst, src_layout, dst_layout, src_slot, dst_slot, shapes, mode, base, cos, sin, position_ids,
            inverse):
    """The params dict of a one-tensor call; `shapes`: what raw.infer_shapes resolved."""
    K = shapes["head_size"]
    src_off, src_st = _logical_strides(raw, src, src_layout, K, src_slot)
    dst_off, dst_st = _logical_strides(raw, dst, dst_layout, K, dst_slot)
    es = _elem_size(src)
    params = {
        "dtype": dtype_name(src), "mode": mode,
        "x": _ptr(src) + src_off * es, "out": _ptr(dst) + dst_off * es,
        "B": shapes["batch"], "M": shapes["seq_len"], "H": shapes["num_heads"], "K": K,
        "x_strides": src_st, "out_strides": dst_st, "rotary_size": shapes["rotary_size"],
        "rotary_dim": shapes["rotary_dim"], "base": float(base), "inverse": inverse,
        "cos": _ptr(cos), "sin": _ptr(sin), "table_rows": 0 if cos is None else cos.shape[0],
        "table_strides": (0, 1) if cos is None else _strides(cos),
        "position_ids": _ptr(position_ids), "pos_dtype": "" if position_ids is None else dtype_name(position_ids),
        "pos_strides": (0, 0, 0) if position_ids is None else _strides(position_ids),
    }
    if cos is not None and _strides(sin) != _strides(cos):
        raise ValueError("sin: must have cos's strides")
    return params


def _launch(raw, x, params, stream):
    if _is_torch(x) and x.is_cuda:
        import torch

        raw.forward_cuda(params, stream if stream is not None else torch.cuda.current_stream().cuda_stream)
    else:
        raw.forward_cpu(params)


def _empty_like(x, shape):
    if _is_torch(x):
        import torch

        return torch.empty(shape, dtype=x.dtype, device=x.device)
    return np.empty(shape, dtype=x.dtype)


def _poisoned(x, shape):
    """An uninitialised-looking output: NaN (all ones bits for integer storage such as bfloat16
    held in uint16), so an element the kernel does not write shows."""
    if _is_torch(x):
        import torch

        return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    out = np.empty(shape, dtype=x.dtype)
    if np.issubdtype(out.dtype, np.integer):
        out.fill(np.iinfo(out.dtype).max)
    else:
        out.fill(np.nan)
    return out
