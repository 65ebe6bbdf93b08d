"""Greedy generation with a tiny LLaMA-style decoder and a KV cache, eager and in nn.Graph.

What it shows:

* ``oneflow_rope.RotaryEmbedding`` with Llama 3.1 ``rope_scaling`` (as in a transformers config)
  in a decoder with grouped-query attention (4 query heads share 2 key/value heads): q and k of
  every step are rotated in the op, read as (B, M, H, K) and written as (B, H, M, K), at the
  positions given by ``seqlen_offsets`` (the number of tokens already in the cache);
* a preallocated KV cache (fixed shapes: the new keys and values are written into their slots and
  attention masks the empty ones), so one decode step compiles into one ``flow.nn.Graph``;
* the same model with the RoPE written in plain OneFlow ops (Llama 3.1 inverse frequencies from
  the formula, a cos/sin table, ``index_select`` of the rows, ``x * cos + rotate_half(x) * sin``).

The prompt (2 sequences of 8 random tokens) is prefilled in eager mode; then 32 tokens are
generated greedily: by the fused model in eager mode, by the fused model's decode step compiled in
nn.Graph, and by the plain-op model in eager mode, all with the same weights. The script prints the
tokens and the time per generated token, and exits non-zero unless all three agree token for token
(and their logits to 1e-4).

Run it with::

    .venv/bin/python examples/generate_llama.py [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, List, Sequence, Tuple

import oneflow_rope  # before oneflow: makes the CUDA libraries OneFlow needs loadable

import numpy as np
import oneflow as flow
import oneflow.nn as nn

from llama_attention import rotate_half
from train_tiny_llama import RMSNorm, SwiGLU

VOCAB_SIZE = 128
HIDDEN_SIZE = 64
NUM_HEADS = 4  # query heads
NUM_KV_HEADS = 2  # key/value heads (GQA: 2 query heads per key/value head)
HEAD_SIZE = 16
MLP_SIZE = 128
NUM_LAYERS = 2
MAX_POSITION_EMBEDDINGS = 256
ROPE_BASE = 10000.0
# Llama 3.1's rope_scaling, with the original context shrunk to 32 so that this small head size
# has all three bands: wavelength 6.3 (< 32 / 4, kept), 19.9 (blended), >= 62.8 (> 32, divided by 8).
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
BATCH_SIZE = 2
PROMPT_LEN = 8
NEW_TOKENS = 32
CACHE_LEN = PROMPT_LEN + NEW_TOKENS
LOGITS_TOLERANCE = 1e-4  # float32; fused and plain RoPE round differently

Caches = Tuple[flow.Tensor, ...]  # per layer: keys, values, each (B, NUM_KV_HEADS, CACHE_LEN, HEAD_SIZE)
# A RoPE takes q (B, M, NUM_HEADS, K), k (B, M, NUM_KV_HEADS, K) and the position of each sequence's
# first token, offsets (B,) int64; it returns them rotated, as (B, H, M, K).
RopeFn = Callable[[flow.Tensor, flow.Tensor, flow.Tensor], Tuple[flow.Tensor, flow.Tensor]]


class FusedRope(nn.Module):
    """RoPE with ``oneflow_rope.RotaryEmbedding``: one module, the op does the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.rotary = oneflow_rope.RotaryEmbedding(HEAD_SIZE, MAX_POSITION_EMBEDDINGS, ROPE_BASE,
                                                   rope_scaling=ROPE_SCALING)

    def forward(self, q: flow.Tensor, k: flow.Tensor, offsets: flow.Tensor) -> Tuple[flow.Tensor, flow.Tensor]:
        return self.rotary(q, k, seqlen_offsets=offsets, layout="BMHK", output_layout="BHMK")


def llama3_inverse_frequencies() -> flow.Tensor:
    """Llama 3.1's scaled inverse frequencies (HEAD_SIZE / 2,), float32, from the formula: keep
    short wavelengths, divide long ones by factor, blend the band between."""
    factor = ROPE_SCALING["factor"]
    low, high = ROPE_SCALING["low_freq_factor"], ROPE_SCALING["high_freq_factor"]
    original = ROPE_SCALING["original_max_position_embeddings"]
    exponent = flow.arange(0, HEAD_SIZE, 2, dtype=flow.float32) / HEAD_SIZE
    inverse = 1.0 / flow.pow(flow.tensor(ROPE_BASE, dtype=flow.float32), exponent)
    wavelength = 2 * math.pi / inverse
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inverse / factor + smooth * inverse
    scaled = flow.where(wavelength > original / low, inverse / factor, blended)
    return flow.where(wavelength < original / high, inverse, scaled)


class PlainRope(nn.Module):
    """The same RoPE in plain OneFlow ops: a (CACHE_LEN, HEAD_SIZE) cos/sin table in float32,
    rows picked with index_select, then x * cos + rotate_half(x) * sin."""

    def __init__(self) -> None:
        super().__init__()
        angle = flow.arange(CACHE_LEN, dtype=flow.float32).unsqueeze(1) * llama3_inverse_frequencies().unsqueeze(0)
        angle = flow.cat([angle, angle], dim=-1)  # "plane" mode: dim j uses frequency j mod K/2
        self.register_buffer("cos_table", flow.cos(angle), persistent=False)
        self.register_buffer("sin_table", flow.sin(angle), persistent=False)

    def forward(self, q: flow.Tensor, k: flow.Tensor, offsets: flow.Tensor) -> Tuple[flow.Tensor, flow.Tensor]:
        batch, seq_len = q.shape[0], q.shape[1]
        steps = flow.arange(seq_len, dtype=flow.int64, device=q.device)
        rows = (offsets.unsqueeze(1) + steps.unsqueeze(0)).reshape(-1)  # (B * M,) positions
        cos = flow.index_select(self.cos_table, 0, rows).reshape(batch, seq_len, 1, HEAD_SIZE)
        sin = flow.index_select(self.sin_table, 0, rows).reshape(batch, seq_len, 1, HEAD_SIZE)

        def rotate(x: flow.Tensor) -> flow.Tensor:
            return flow.add(flow.mul(x, cos), flow.mul(rotate_half(x), sin)).permute(0, 2, 1, 3)

        return rotate(q), rotate(k)


class CachedAttention(nn.Module):
    """Causal grouped-query self-attention over a preallocated KV cache.

    The keys and values of the new tokens go to cache slots offsets[b] .. offsets[b] + M - 1; the
    query at position p attends to slots 0 .. p. Shapes stay fixed, so a step traces into nn.Graph.
    """

    def __init__(self, rope: RopeFn) -> None:
        super().__init__()
        self.rope = rope
        self.q_proj = nn.Linear(HIDDEN_SIZE, NUM_HEADS * HEAD_SIZE, bias=False)
        self.k_proj = nn.Linear(HIDDEN_SIZE, NUM_KV_HEADS * HEAD_SIZE, bias=False)
        self.v_proj = nn.Linear(HIDDEN_SIZE, NUM_KV_HEADS * HEAD_SIZE, bias=False)
        self.o_proj = nn.Linear(NUM_HEADS * HEAD_SIZE, HIDDEN_SIZE, bias=False)

    def forward(self, hidden: flow.Tensor, offsets: flow.Tensor, key_cache: flow.Tensor,
                value_cache: flow.Tensor) -> Tuple[flow.Tensor, flow.Tensor, flow.Tensor]:
        batch, seq_len, _ = hidden.shape
        query = self.q_proj(hidden).reshape(batch, seq_len, NUM_HEADS, HEAD_SIZE)
        key = self.k_proj(hidden).reshape(batch, seq_len, NUM_KV_HEADS, HEAD_SIZE)
        value = self.v_proj(hidden).reshape(batch, seq_len, NUM_KV_HEADS, HEAD_SIZE).permute(0, 2, 1, 3)
        query, key = self.rope(query, key, offsets)  # (B, H, M, K), (B, H_kv, M, K)

        # Cache slot s of sequence b receives new token m = s - offsets[b] when 0 <= m < M: a
        # one-hot (B, 1, CACHE_LEN, M) matrix moves the new rows to their slots (exactly).
        slots = flow.arange(CACHE_LEN, dtype=flow.int64, device=hidden.device)
        steps = flow.arange(seq_len, dtype=flow.int64, device=hidden.device)
        token_of_slot = slots.unsqueeze(0) - offsets.unsqueeze(1)  # (B, CACHE_LEN)
        one_hot = (token_of_slot.unsqueeze(2) == steps.reshape(1, 1, seq_len)).to(hidden.dtype).unsqueeze(1)
        written = (one_hot.sum(dim=-1, keepdim=True) > 0).expand(batch, NUM_KV_HEADS, CACHE_LEN, HEAD_SIZE)
        key_cache = flow.where(written, flow.matmul(one_hot, key), key_cache)
        value_cache = flow.where(written, flow.matmul(one_hot, value), value_cache)

        group = NUM_HEADS // NUM_KV_HEADS  # each key/value head serves `group` query heads
        keys = key_cache.unsqueeze(2).expand(batch, NUM_KV_HEADS, group, CACHE_LEN, HEAD_SIZE)
        values = value_cache.unsqueeze(2).expand(batch, NUM_KV_HEADS, group, CACHE_LEN, HEAD_SIZE)
        keys = keys.reshape(batch, NUM_HEADS, CACHE_LEN, HEAD_SIZE)
        values = values.reshape(batch, NUM_HEADS, CACHE_LEN, HEAD_SIZE)

        scores = flow.matmul(query, keys.transpose(-2, -1)) / math.sqrt(HEAD_SIZE)  # (B, H, M, CACHE_LEN)
        query_position = offsets.unsqueeze(1) + steps.unsqueeze(0)  # (B, M)
        future = slots.reshape(1, 1, CACHE_LEN) > query_position.unsqueeze(2)  # (B, M, CACHE_LEN)
        scores = scores.masked_fill(future.unsqueeze(1), float("-inf"))
        context = flow.matmul(flow.softmax(scores, dim=-1), values)  # (B, H, M, K)
        context = context.permute(0, 2, 1, 3).reshape(batch, seq_len, NUM_HEADS * HEAD_SIZE)
        return self.o_proj(context), key_cache, value_cache


class DecoderLayer(nn.Module):
    """Pre-norm LLaMA decoder layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, rope: RopeFn) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(HIDDEN_SIZE)
        self.attention = CachedAttention(rope)
        self.mlp_norm = RMSNorm(HIDDEN_SIZE)
        self.mlp = SwiGLU(HIDDEN_SIZE, MLP_SIZE)

    def forward(self, x, offsets, key_cache, value_cache):
        attended, key_cache, value_cache = self.attention(self.attention_norm(x), offsets, key_cache, value_cache)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), key_cache, value_cache


class TinyLlama(nn.Module):
    """Token ids (B, M) at positions offsets[b] + m, and the caches -> the greedy next token of
    each sequence (B, 1), the last token's logits (B, 1, vocab) and the updated caches."""

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope  # shared by the layers; holds no parameters
        self.embedding = nn.Embedding(VOCAB_SIZE, HIDDEN_SIZE)
        self.layers = nn.ModuleList([DecoderLayer(rope) for _ in range(NUM_LAYERS)])
        self.final_norm = RMSNorm(HIDDEN_SIZE)
        self.lm_head = nn.Linear(HIDDEN_SIZE, VOCAB_SIZE, bias=False)

    def forward(self, token_ids: flow.Tensor, offsets: flow.Tensor, *caches: flow.Tensor):
        hidden = self.embedding(token_ids)
        new_caches = []
        for index, layer in enumerate(self.layers):
            hidden, key_cache, value_cache = layer(hidden, offsets, caches[2 * index], caches[2 * index + 1])
            new_caches += [key_cache, value_cache]
        logits = self.lm_head(self.final_norm(hidden[:, -1:]))  # the last token's: (B, 1, vocab)
        return (flow.argmax(logits, dim=-1), logits) + tuple(new_caches)


class DecodeStepGraph(nn.Graph):
    """One decode step (one token per sequence) of the model, compiled once."""

    def __init__(self, model: TinyLlama) -> None:
        super().__init__()
        self.model = model

    def build(self, token_ids, offsets, *caches):
        return self.model(token_ids, offsets, *caches)


def empty_caches(device: flow.device) -> Caches:
    shape = (BATCH_SIZE, NUM_KV_HEADS, CACHE_LEN, HEAD_SIZE)
    return tuple(flow.zeros(*shape, device=device) for _ in range(2 * NUM_LAYERS))


def generate(prefill: Callable, decode_step: Callable, prompt: flow.Tensor,
             device: flow.device) -> Tuple[np.ndarray, np.ndarray, List[float]]:
    """Prefill the prompt, then NEW_TOKENS - 1 decode steps. Returns the NEW_TOKENS generated
    tokens (B, NEW_TOKENS), the logits they were picked from (B, NEW_TOKENS, vocab) and the
    seconds of each decode step."""
    with flow.no_grad():
        next_token, step_logits, *caches = prefill(
            prompt, flow.zeros(BATCH_SIZE, dtype=flow.int64, device=device), *empty_caches(device))
        tokens, logits, seconds = [next_token.numpy()], [step_logits.numpy()], []
        for step in range(NEW_TOKENS - 1):
            offsets = flow.full((BATCH_SIZE,), PROMPT_LEN + step, dtype=flow.int64, device=device)
            started = time.perf_counter()
            next_token, step_logits, *caches = decode_step(next_token, offsets, *caches)
            tokens.append(next_token.numpy())  # reading the token back waits for the step
            seconds.append(time.perf_counter() - started)
            logits.append(step_logits.numpy())
    return np.concatenate(tokens, axis=1), np.concatenate(logits, axis=1), seconds


def per_token_ms(seconds: Sequence[float]) -> float:
    """Mean milliseconds per decode step, leaving out the first (graph compilation, warm-up)."""
    return 1000.0 * float(np.mean(seconds[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = flow.device(args.device)
    flow.manual_seed(args.seed)

    fused_model = TinyLlama(FusedRope()).to(device).eval()
    plain_model = TinyLlama(PlainRope()).to(device).eval()
    plain_model.load_state_dict(fused_model.state_dict())  # identical weights
    prompt = flow.tensor(np.random.RandomState(args.seed).randint(0, VOCAB_SIZE, size=(BATCH_SIZE, PROMPT_LEN)),
                         dtype=flow.int64, device=device)
    rotary = fused_model.rope.rotary
    print(f"device: {device}, float32; {NUM_LAYERS} layers, hidden {HIDDEN_SIZE}, {NUM_HEADS} query heads / "
          f"{NUM_KV_HEADS} key-value heads of size {HEAD_SIZE}, vocab {VOCAB_SIZE}")
    print(f"rope: {rotary}")
    print(f"      rope_scaling {ROPE_SCALING}")
    print(f"      inv_freq {np.array2string(rotary.inv_freq.numpy(), precision=4)}")
    print(f"prompt: {BATCH_SIZE} x {PROMPT_LEN} tokens; cache of {CACHE_LEN} positions; "
          f"{NEW_TOKENS} tokens generated greedily (prefill, then {NEW_TOKENS - 1} decode steps)")

    eager_tokens, eager_logits, eager_seconds = generate(fused_model, fused_model, prompt, device)
    decode_graph = DecodeStepGraph(fused_model)
    graph_tokens, graph_logits, graph_seconds = generate(fused_model, decode_graph, prompt, device)
    plain_tokens, plain_logits, plain_seconds = generate(plain_model, plain_model, prompt, device)

    for name, tokens in (("eager, fused RoPE", eager_tokens), ("nn.Graph, fused RoPE", graph_tokens),
                         ("eager, plain-op RoPE", plain_tokens)):
        print(f"{name + ':':<22} {' '.join(f'{t:3d}' for t in tokens[0])}")
        print(f"{'':<22} {' '.join(f'{t:3d}' for t in tokens[1])}")
    print(f"per generated token (decode step, mean of {NEW_TOKENS - 2} after the first):")
    print(f"  eager fused RoPE:     {per_token_ms(eager_seconds):7.2f} ms")
    print(f"  nn.Graph fused RoPE:  {per_token_ms(graph_seconds):7.2f} ms  "
          f"(first step, compiling the graph: {graph_seconds[0]:.2f} s)")
    print(f"  eager plain-op RoPE:  {per_token_ms(plain_seconds):7.2f} ms")

    logit_differences = {name: float(np.abs(logits - plain_logits).max())
                         for name, logits in (("eager", eager_logits), ("nn.Graph", graph_logits))}
    print(f"max |logits - plain-op logits| over all steps: eager {logit_differences['eager']:.2e}, "
          f"nn.Graph {logit_differences['nn.Graph']:.2e} (logits of order {np.abs(plain_logits).max():.2f})")

    mismatches = {name: int((tokens != plain_tokens).sum())
                  for name, tokens in (("eager", eager_tokens), ("nn.Graph", graph_tokens))}
    if any(mismatches.values()):
        print(f"MISMATCH: tokens differing from the plain-op model: {mismatches}")
        sys.exit(1)
    if max(logit_differences.values()) > LOGITS_TOLERANCE:
        print(f"MISMATCH: logits differ from the plain-op model's by more than {LOGITS_TOLERANCE:g}")
        sys.exit(1)
    print(f"tokens match: eager and nn.Graph generation with RotaryEmbedding equal the plain-op model's "
          f"{BATCH_SIZE} x {NEW_TOKENS} tokens")
    print("OK")


if __name__ == "__main__":
    main()
