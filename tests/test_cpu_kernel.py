"""The CPU kernel's threads, instruction-set builds and rounding.

- Through the raw module (built here with CMake, no CUDA, into build/cpu-raw), for each
  instruction set this CPU has (baseline, AVX2, AVX-512, AVX-512 with BF16; one process each,
  ONEFLOW_ROPE_CPU_ISA): tests/cpu_kernel_driver.py runs a grid of calls (every layout, views,
  modes, dtypes, tables, float32 tables with 16-bit x, computed angles, inv_freq,
  attention_scaling, position_ids, seqlen offsets, cu_seqlens, positions outside the table, q and k
  in one call, packed gradients with zero slots, in place, odd head sizes) on 1 thread and on 2, 3
  and 5: every output bit and NaN-row count must be equal, and within the reference's bounds;
  16-bit rounding bit for bit against numpy; angles at positions up to 2^24. The builds for the
  different instruction sets must also give the same values for every call.
- Through the OneFlow op: forward and backward on 1 and 2 intra-op threads (flow.set_num_threads),
  bitwise equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import oneflow as flow
import pybind11
import pytest

import oneflow_rope
from tests.cases import layout_shape, round_to_dtype
from tests.flow_helpers import to_flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cpu-raw")
ISAS = ("baseline", "avx2", "avx512", "avx512bf16")


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def raw_build():
    run(["cmake", "-S", ROOT, "-B", BUILD, "-DONEFLOW_ROPE_BUILD_ONEFLOW_OPS=OFF", "-DONEFLOW_ROPE_BUILD_RAW=ON",
         "-DONEFLOW_ROPE_WITH_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"])
    run(["cmake", "--build", BUILD, "-j", "2"])
    return BUILD


@pytest.fixture(scope="module")
def digests():
    return {}


@pytest.mark.parametrize("isa", ISAS)
def test_threads_rounding_and_angles(raw_build, digests, isa, tmp_path):
    out = tmp_path / "digests.json"
    env = dict(os.environ, ONEFLOW_ROPE_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-m", "tests.cpu_kernel_driver", raw_build, str(out)], env=env,
                            capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " 0 failed" in result.stdout, result.stdout[-4000:]
    ran = json.loads(out.read_text())
    if ran["isa"] != isa:
        pytest.skip(f"this CPU lacks {isa} (ran {ran['isa']}, checked under that name)")
    digests[isa] = ran["digests"]


def test_instruction_sets_agree(digests):
    """Every build computes the same operations (no fused multiply-add the source does not write,
    exact conversions): the same values for every call, whatever the CPU."""
    if len(digests) < 2:
        pytest.skip("fewer than two instruction sets ran")
    first, *others = sorted(digests)
    for isa in others:
        differ = [name for name in digests[first] if digests[isa].get(name) != digests[first][name]]
        assert not differ, f"{isa} and {first} differ on {len(differ)} calls, e.g. {differ[:5]}"


def _call(x, mode, layout, threads, dy):
    flow.set_num_threads(threads)
    x = x.detach().clone().requires_grad_(True)
    kwargs = {"layout": layout, "mode": mode}
    if "(" in layout:
        kwargs["k_size"] = 128
    y = oneflow_rope.fused_apply_rotary_emb(x, **kwargs)
    y.backward(dy)
    return y.to(flow.float64).numpy(), x.grad.to(flow.float64).numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["BMHK", "BM(H3K)"])
def test_op_same_bits_on_1_and_2_threads(dtype, layout):
    """Forward and backward of the op, OneFlow's intra-op setting 1 then 2 (calls large enough for
    two threads: over 2 MiB moved)."""
    B, M, H, K = 2, 256, 8, 128
    rng = np.random.default_rng(3)
    x = to_flow(round_to_dtype(rng.uniform(-1, 1, layout_shape(layout, B, M, H, K)), dtype), dtype)
    dy = to_flow(round_to_dtype(rng.uniform(-1, 1, (B, M, H * K) if "(" in layout else (B, M, H, K)), dtype), dtype)
    try:
        for mode in ("plane", "interval"):
            y1, dx1 = _call(x, mode, layout, 1, dy)
            y2, dx2 = _call(x, mode, layout, 2, dy)
            assert np.array_equal(y1.view(np.uint64), y2.view(np.uint64)), f"forward {mode}"
            assert np.array_equal(dx1.view(np.uint64), dx2.view(np.uint64)), f"backward {mode}"
    finally:
        flow.set_num_threads(1)
