"""LLaMA-style causal self-attention with the fused rotary embedding of ``oneflow_rope``.

What it shows:

* a causal self-attention block as in LLaMA: q/k/v projections, rotary position embedding
  (RoPE, "plane" / rotate-half mode) on q and k, scaled dot-product attention written with plain
  OneFlow ops, output projection;
* the RoPE done two ways: ``oneflow_rope.fused_apply_rotary_emb`` (one kernel, reading the
  projections in (B, M, H, K) layout and writing (B, H, M, K) for the attention matmuls), and the
  same rotate-half written with plain OneFlow ops (``x * cos + rotate_half(x) * sin``);
* the fused block run in eager mode and inside a ``flow.nn.Graph``; both agree with the plain-op
  block, and the gradients of the fused and plain-op blocks agree too.

It exits non-zero if any float32 difference exceeds 1e-4.

Run it with ``make example`` (which sets up .venv and builds the package first), or directly::

    .venv/bin/python examples/llama_attention.py [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import oneflow_rope  # before oneflow: makes the CUDA libraries OneFlow needs loadable

import numpy as np
import oneflow as flow
import oneflow.nn as nn

# A RoPE function takes q or k of shape (B, M, H, K) and returns it rotated, shape (B, H, M, K).
RopeFn = Callable[[flow.Tensor], flow.Tensor]

ROPE_BASE = 10000.0
TOLERANCE = 1e-4


def fused_rope_bmhk_to_bhmk(x: flow.Tensor) -> flow.Tensor:
    """RoPE with the fused op: reads x as (B, M, H, K), token m at position m, and writes the
    result straight into the (B, H, M, K) layout the attention matmuls want."""
    return oneflow_rope.fused_apply_rotary_emb(
        x, layout="BMHK", output_layout="BHMK", mode="plane", base=ROPE_BASE
    )


def rotate_half(x: flow.Tensor) -> flow.Tensor:
    """(x1, x2) -> (-x2, x1) along the last dim, the two halves being its first and second half."""
    half = x.shape[-1] // 2
    first_half = x[..., :half]
    second_half = x[..., half:]
    return flow.cat([-second_half, first_half], dim=-1)


def plain_rope_bmhk_to_bhmk(x: flow.Tensor) -> flow.Tensor:
    """The same RoPE with plain OneFlow ops, cos/sin computed from the formula in float32:
    angle[m, j] = m * base ** (-2 i / K) with i = j mod K/2."""
    seq_len, head_size = x.shape[1], x.shape[3]
    pair_index = flow.arange(head_size // 2, dtype=flow.float32, device=x.device)
    inverse_frequency = flow.pow(ROPE_BASE, -2.0 * pair_index / head_size)  # (K/2,)
    positions = flow.arange(seq_len, dtype=flow.float32, device=x.device)
    angle_half = positions.unsqueeze(1) * inverse_frequency.unsqueeze(0)  # (M, K/2)
    angle = flow.cat([angle_half, angle_half], dim=-1).reshape(1, seq_len, 1, head_size)
    rotated = x * flow.cos(angle).to(x.dtype) + rotate_half(x) * flow.sin(angle).to(x.dtype)
    return rotated.permute(0, 2, 1, 3)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary position embedding on q and k."""

    def __init__(self, hidden_size: int, num_heads: int, max_seq_len: int, rope: RopeFn) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.rope = rope
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        # True above the diagonal: key position > query position, masked out.
        future_positions = flow.triu(flow.ones(max_seq_len, max_seq_len), diagonal=1).to(flow.bool)
        self.register_buffer("future_mask", future_positions, persistent=False)

    def forward(self, hidden: flow.Tensor) -> flow.Tensor:
        """hidden: (B, M, hidden_size) -> (B, M, hidden_size)."""
        batch, seq_len, hidden_size = hidden.shape
        heads_shape = (batch, seq_len, self.num_heads, self.head_size)
        query = self.rope(self.q_proj(hidden).reshape(*heads_shape))  # (B, H, M, K)
        key = self.rope(self.k_proj(hidden).reshape(*heads_shape))  # (B, H, M, K)
        value = self.v_proj(hidden).reshape(*heads_shape).permute(0, 2, 1, 3)  # (B, H, M, K)

        scores = flow.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_size)  # (B, H, M, M)
        mask = self.future_mask[:seq_len, :seq_len]
        scores = scores.masked_fill(mask, float("-inf"))
        weights = flow.softmax(scores, dim=-1)
        context = flow.matmul(weights, value)  # (B, H, M, K)
        context = context.permute(0, 2, 1, 3).reshape(batch, seq_len, hidden_size)
        return self.o_proj(context)


class AttentionGraph(nn.Graph):
    """The attention block compiled as a static OneFlow graph (inference only)."""

    def __init__(self, block: CausalSelfAttention) -> None:
        super().__init__()
        self.block = block

    def build(self, hidden: flow.Tensor) -> flow.Tensor:
        return self.block(hidden)


def max_abs_difference(a: flow.Tensor, b: flow.Tensor) -> float:
    return float(np.abs(a.numpy().astype(np.float64) - b.numpy().astype(np.float64)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    batch, seq_len, num_heads, head_size = 2, 16, 4, 32
    hidden_size = num_heads * head_size  # 128
    device = flow.device(args.device)
    flow.manual_seed(args.seed)
    np.random.seed(args.seed)

    fused_block = CausalSelfAttention(hidden_size, num_heads, seq_len, fused_rope_bmhk_to_bhmk).to(device)
    plain_block = CausalSelfAttention(hidden_size, num_heads, seq_len, plain_rope_bmhk_to_bhmk).to(device)
    plain_block.load_state_dict(fused_block.state_dict())  # identical weights
    hidden = flow.tensor(np.random.randn(batch, seq_len, hidden_size).astype(np.float32), device=device)

    print(f"device: {device}, dtype: float32")
    print(f"input hidden: {tuple(hidden.shape)}  (B, M, hidden) with B={batch}, M={seq_len}, "
          f"H={num_heads}, K={head_size}")
    q_bmhk = fused_block.q_proj(hidden).reshape(batch, seq_len, num_heads, head_size)
    print(f"q projection (BMHK): {tuple(q_bmhk.shape)} -> fused RoPE (BHMK): "
          f"{tuple(fused_rope_bmhk_to_bhmk(q_bmhk).shape)}")

    started = time.perf_counter()
    with flow.no_grad():
        eager_fused = fused_block(hidden)
        eager_plain = plain_block(hidden)
    print(f"output: {tuple(eager_fused.shape)}")

    attention_graph = AttentionGraph(fused_block)
    graph_fused = attention_graph(hidden)  # the first call compiles the graph

    # Gradients through the fused op (its backward is the op's grad kernel) vs the plain ops.
    grad_output = flow.tensor(np.random.randn(*eager_fused.shape).astype(np.float32), device=device)
    for block in (fused_block, plain_block):
        block.zero_grad()
        (block(hidden) * grad_output).sum().backward()
    grad_differences = {
        name: max_abs_difference(getattr(fused_block, name).weight.grad, getattr(plain_block, name).weight.grad)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    elapsed = time.perf_counter() - started

    checks = {
        "eager: max |fused - plain|": max_abs_difference(eager_fused, eager_plain),
        "graph: max |fused - plain|": max_abs_difference(graph_fused, eager_plain),
        "max |eager fused - graph fused|": max_abs_difference(eager_fused, graph_fused),
        "backward: max |weight grad fused - plain|": max(grad_differences.values()),
    }
    for label, difference in checks.items():
        print(f"{label} = {difference:.3e}")
    print(f"(output values are of order {float(eager_plain.abs().max().numpy()):.3f}; "
          f"tolerance {TOLERANCE:g}; took {elapsed:.2f} s)")

    failed = {label: d for label, d in checks.items() if not d <= TOLERANCE}
    assert not failed, f"differences above {TOLERANCE:g}: {failed}"
    print("OK: fused RoPE matches the plain-op RoPE in eager mode and in nn.Graph")


if __name__ == "__main__":
    main()
