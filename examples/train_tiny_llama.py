"""Train a tiny LLaMA-style language model with the fused rotary embedding, eagerly and in nn.Graph.

What it shows:

* ``oneflow_rope.fused_apply_rotary_emb`` (BMHK input, "plane" mode) inside a trainable model:
  token embedding, 2 decoder layers (RMSNorm, causal self-attention with RoPE on q and k, RMSNorm,
  SwiGLU MLP, residual connections), a final RMSNorm and a language-model head;
* the gradient of the fused op in eager mode and inside a ``flow.nn.Graph`` training step
  (``add_optimizer`` with AdamW);
* both runs start from identical weights and see identical batches, so their loss curves agree.

The data is synthetic: a fixed random permutation of the vocabulary says which token follows
which, and every sequence follows that chain from a random start token. The model has to learn
the permutation, so the loss falls from about ln(vocab).

It exits non-zero unless the eager and graph losses agree to 1e-4 (relative) at every step and
the final loss is below the first. Run it with::

    .venv/bin/python examples/train_tiny_llama.py [--steps 50] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import List, Tuple

import oneflow_rope  # noqa: F401  (before oneflow: makes the CUDA libraries OneFlow needs loadable)

import numpy as np
import oneflow as flow
import oneflow.nn as nn
import oneflow.nn.functional as F

from llama_attention import CausalSelfAttention, fused_rope_bmhk_to_bhmk

VOCAB_SIZE = 64
HIDDEN_SIZE = 64
NUM_HEADS = 4  # head size 16
MLP_SIZE = 128
NUM_LAYERS = 2
SEQ_LEN = 32
BATCH_SIZE = 4
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.01
RELATIVE_TOLERANCE = 1e-4


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (no mean subtraction, no bias)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(flow.ones(size))

    def forward(self, x: flow.Tensor) -> flow.Tensor:
        mean_square = (x * x).mean(dim=-1, keepdim=True)
        return x * flow.rsqrt(mean_square + self.eps) * self.weight


class SwiGLU(nn.Module):
    """The LLaMA MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, mlp_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, mlp_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, mlp_size, bias=False)
        self.down_proj = nn.Linear(mlp_size, hidden_size, bias=False)

    def forward(self, x: flow.Tensor) -> flow.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm LLaMA decoder layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(hidden_size)
        self.attention = CausalSelfAttention(hidden_size, num_heads, max_seq_len, fused_rope_bmhk_to_bhmk)
        self.mlp_norm = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, mlp_size)

    def forward(self, x: flow.Tensor) -> flow.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    """Token ids (B, M) -> next-token logits (B, M, vocab)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, HIDDEN_SIZE)
        self.layers = nn.ModuleList(
            [DecoderLayer(HIDDEN_SIZE, NUM_HEADS, MLP_SIZE, SEQ_LEN) for _ in range(NUM_LAYERS)]
        )
        self.final_norm = RMSNorm(HIDDEN_SIZE)
        self.lm_head = nn.Linear(HIDDEN_SIZE, VOCAB_SIZE, bias=False)

    def forward(self, token_ids: flow.Tensor) -> flow.Tensor:
        hidden = self.embedding(token_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.lm_head(self.final_norm(hidden))


def language_model_loss(model: TinyLlama, inputs: flow.Tensor, targets: flow.Tensor) -> flow.Tensor:
    """Mean cross-entropy of predicting targets[b, m] (the token after inputs[b, m])."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


class TrainStepGraph(nn.Graph):
    """One training step (forward, backward, AdamW update) as a static OneFlow graph."""

    def __init__(self, model: TinyLlama, optimizer: flow.optim.Optimizer) -> None:
        super().__init__()
        self.model = model
        self.add_optimizer(optimizer)

    def build(self, inputs: flow.Tensor, targets: flow.Tensor) -> flow.Tensor:
        loss = language_model_loss(self.model, inputs, targets)
        loss.backward()
        return loss


def make_batches(steps: int, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``steps`` batches of (inputs, targets), int64 (BATCH_SIZE, SEQ_LEN) each: sequences that
    follow one fixed random permutation of the vocabulary from random start tokens."""
    rng = np.random.RandomState(seed)
    next_token = rng.permutation(VOCAB_SIZE)
    batches = []
    for _ in range(steps):
        sequences = np.empty((BATCH_SIZE, SEQ_LEN + 1), dtype=np.int64)
        sequences[:, 0] = rng.randint(0, VOCAB_SIZE, size=BATCH_SIZE)
        for m in range(1, SEQ_LEN + 1):
            sequences[:, m] = next_token[sequences[:, m - 1]]
        batches.append((sequences[:, :-1], sequences[:, 1:]))
    return batches


def make_optimizer(model: TinyLlama) -> flow.optim.AdamW:
    return flow.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def train_eager(model: TinyLlama, batches, device: flow.device) -> List[float]:
    optimizer = make_optimizer(model)
    losses = []
    for inputs, targets in batches:
        loss = language_model_loss(model, flow.tensor(inputs, device=device), flow.tensor(targets, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.numpy()))
    return losses


def train_graph(model: TinyLlama, batches, device: flow.device) -> List[float]:
    train_step = TrainStepGraph(model, make_optimizer(model))
    losses = []
    for inputs, targets in batches:
        loss = train_step(flow.tensor(inputs, device=device), flow.tensor(targets, device=device))
        losses.append(float(loss.numpy()))
    return losses


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    flow.manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    parser.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: need at least 2 steps to see the loss fall")

    device = flow.device(args.device)
    seed_everything(args.seed)
    eager_model = TinyLlama().to(device)
    graph_model = TinyLlama().to(device)
    graph_model.load_state_dict(eager_model.state_dict())  # identical initial weights
    batches = make_batches(args.steps, args.seed)
    parameter_count = sum(p.numel() for p in eager_model.parameters())
    print(f"device: {device}, dtype: float32, parameters: {parameter_count}, vocab {VOCAB_SIZE}, "
          f"hidden {HIDDEN_SIZE}, {NUM_LAYERS} layers x {NUM_HEADS} heads, batch {BATCH_SIZE} x seq {SEQ_LEN}")
    print(f"AdamW lr {LEARNING_RATE}, weight decay {WEIGHT_DECAY}, {args.steps} steps; "
          f"loss of a uniform guess: ln({VOCAB_SIZE}) = {math.log(VOCAB_SIZE):.4f}")

    started = time.perf_counter()
    eager_losses = train_eager(eager_model, batches, device)
    eager_seconds = time.perf_counter() - started
    started = time.perf_counter()
    graph_losses = train_graph(graph_model, batches, device)
    graph_seconds = time.perf_counter() - started

    relative_differences = [abs(e - g) / max(abs(e), 1e-12) for e, g in zip(eager_losses, graph_losses)]
    print(f"{'step':>5}  {'eager loss':>11}  {'graph loss':>11}  {'rel. diff':>9}")
    shown_steps = sorted({0, args.steps - 1} | set(range(4, args.steps, 5)))
    for step in shown_steps:
        print(f"{step + 1:>5}  {eager_losses[step]:>11.6f}  {graph_losses[step]:>11.6f}  "
              f"{relative_differences[step]:>9.2e}")

    final_weights_difference = max(
        float(np.abs(eager_parameter.numpy() - graph_parameter.numpy()).max())
        for eager_parameter, graph_parameter in zip(eager_model.parameters(), graph_model.parameters())
    )
    worst_step = int(np.argmax(relative_differences))
    print(f"max relative |eager - graph| loss difference: {relative_differences[worst_step]:.2e} "
          f"(step {worst_step + 1}); max |eager - graph| final weight: {final_weights_difference:.2e}")
    print(f"time: eager {eager_seconds:.2f} s, graph {graph_seconds:.2f} s (graph includes compiling)")

    assert relative_differences[worst_step] <= RELATIVE_TOLERANCE, (
        f"eager and graph losses differ by {relative_differences[worst_step]:.2e} relative at step "
        f"{worst_step + 1}, above {RELATIVE_TOLERANCE:g}")
    for name, losses in (("eager", eager_losses), ("graph", graph_losses)):
        assert losses[-1] < losses[0], f"{name}: final loss {losses[-1]:.4f} is not below the first {losses[0]:.4f}"
    print(f"OK: loss fell from {eager_losses[0]:.4f} to {eager_losses[-1]:.4f}; "
          f"eager and nn.Graph training agree")


if __name__ == "__main__":
    main()
