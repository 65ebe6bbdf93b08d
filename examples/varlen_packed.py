"""Packed sequences of different lengths rotated in one call (the varlen layouts of ``oneflow_rope``).

What it shows:

* a batch of sequences of different lengths packed without padding, as variable-length attention
  kernels take them: q, k and v of all T tokens in one (T, H*3*K) tensor, layout "(BM)(H3K)", and
  ``cu_seqlens`` (S+1,) saying where each sequence starts (token t of sequence s is at position
  t - cu_seqlens[s]);
* the query and key of every sequence rotated by one call, ``fused_apply_rotary_emb_qk(qkv, None,
  layout="(BM)(H3K)", cu_seqlens=...)``, giving (T, H, K) tensors ("(BM)HK");
* each sequence checked against the op on that sequence alone (layout "BMHK", B = 1), which
  must agree bit for bit, in eager mode and inside ``flow.nn.Graph``; and the gradient of the
  packed call against the per-sequence gradients.

It exits non-zero on any mismatch.

    .venv/bin/python examples/varlen_packed.py [--device cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import sys

import oneflow_rope  # before oneflow: makes the CUDA libraries OneFlow needs loadable

import numpy as np
import oneflow as flow

HEADS, HEAD_SIZE = 4, 64


def rotate_packed(qkv: flow.Tensor, cu_seqlens: flow.Tensor):
    """Query and key of every packed sequence, rotated in one launch: two (T, H, K) tensors."""
    return oneflow_rope.fused_apply_rotary_emb_qk(qkv, None, layout="(BM)(H3K)", k_size=HEAD_SIZE,
                                                  output_layout="(BM)HK", cu_seqlens=cu_seqlens)


def rotate_one(qkv_one: flow.Tensor):
    """The same for one sequence alone, (1, M, H*3*K) -> two (1, M, H, K)."""
    return oneflow_rope.fused_apply_rotary_emb_qk(qkv_one, None, layout="BM(H3K)", k_size=HEAD_SIZE,
                                                  output_layout="BMHK")


def host(t: flow.Tensor) -> np.ndarray:
    return (t if t.dtype == flow.float64 else t.to(flow.float32)).numpy()  # exact for every dtype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(flow, args.dtype)

    rng = np.random.default_rng(0)
    lengths = [17, 1, 0, 64, 5, 33]  # an empty sequence and a one-token one among them
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    print(f"{len(lengths)} sequences of lengths {lengths}: T = {total} packed tokens")
    print(f"cu_seqlens = {cu.tolist()}")

    qkv_np = rng.standard_normal((total, HEADS * 3 * HEAD_SIZE))
    qkv = flow.tensor(qkv_np, dtype=dtype, device=args.device)

    def one_sequence(s: int, requires_grad: bool = False) -> flow.Tensor:
        """Sequence s alone, (1, M, H*3*K), from the same values (sliced on the host: OneFlow 0.9
        has no CPU bfloat16 slicing)."""
        one = flow.tensor(qkv_np[None, cu[s]:cu[s + 1]], dtype=dtype, device=args.device)
        return one.requires_grad_(True) if requires_grad else one
    cu_seqlens = flow.tensor(cu, device=args.device)

    class Packed(flow.nn.Graph):
        def build(self, qkv, cu_seqlens):
            return rotate_packed(qkv, cu_seqlens)

    runs = {"eager": rotate_packed(qkv, cu_seqlens), "nn.Graph": Packed()(qkv, cu_seqlens)}

    failures = []
    for run, (q_rot, k_rot) in runs.items():
        print(f"{run}: q_rot {tuple(q_rot.shape)}, k_rot {tuple(k_rot.shape)}")
        q_host, k_host = host(q_rot), host(k_rot)
        for s, length in enumerate(lengths):
            begin, end = int(cu[s]), int(cu[s + 1])
            q_one, k_one = rotate_one(one_sequence(s))
            same = all(np.array_equal(packed[begin:end], host(one)[0])
                       for packed, one in ((q_host, q_one), (k_host, k_one)))
            where = f"tokens {begin:3d}..{end - 1:3d}, positions 0..{length - 1}" if length else "empty"
            print(f"  sequence {s} ({where}): {'same as alone' if same else 'DIFFERS from alone'}")
            if not same:
                failures.append(f"{run}, sequence {s}")

    # the gradient of the packed call is the per-sequence gradients, packed
    qkv_grad = qkv.detach().clone().requires_grad_(True)
    q_rot, k_rot = rotate_packed(qkv_grad, cu_seqlens)
    weight_np = rng.standard_normal((2,) + tuple(q_rot.shape))
    weight_q, weight_k = (flow.tensor(w, dtype=dtype, device=args.device) for w in weight_np)
    flow.autograd.backward((q_rot, k_rot), (weight_q, weight_k))  # dL/dq_rot, dL/dk_rot: the weights
    packed_grad = host(qkv_grad.grad)
    grad_same = True
    for s in range(len(lengths)):
        begin, end = int(cu[s]), int(cu[s + 1])
        one = one_sequence(s, requires_grad=True)
        q_one, k_one = rotate_one(one)
        w_q, w_k = (flow.tensor(w[None, begin:end], dtype=dtype, device=args.device) for w in weight_np)
        flow.autograd.backward((q_one, k_one), (w_q, w_k))
        grad_same &= np.array_equal(packed_grad[begin:end], host(one.grad)[0])
    print(f"backward: gradient of the packed call {'equals' if grad_same else 'DIFFERS from'} "
          "the per-sequence gradients")
    if not grad_same:
        failures.append("backward")

    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("OK: every packed sequence is rotated as on its own, in eager mode and in nn.Graph")
    return 0


if __name__ == "__main__":
    sys.exit(main())
