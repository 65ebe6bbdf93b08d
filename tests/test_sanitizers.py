"""The CPU kernel under AddressSanitizer and UndefinedBehaviorSanitizer: builds the framework-free
raw module with ONEFLOW_ROPE_SANITIZE=ON (CMake option) and runs tests/sanitize_driver.py under the
sanitizer runtime. Any out-of-bounds access or undefined behaviour aborts the run."""

from __future__ import annotations

import os
import subprocess
import sys

import pybind11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "sanitize")


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_cpu_kernel_is_clean_under_asan_and_ubsan():
    run(["cmake", "-S", ROOT, "-B", BUILD, "-DONEFLOW_ROPE_BUILD_ONEFLOW_OPS=OFF", "-DONEFLOW_ROPE_BUILD_RAW=ON",
         "-DONEFLOW_ROPE_WITH_CUDA=OFF", "-DONEFLOW_ROPE_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
         f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"])
    run(["cmake", "--build", BUILD, "-j", "2"])
    # The sanitizer runtime must come first; libstdc++ is preloaded with it so that ASan's
    # exception interceptor finds the real __cxa_throw.
    asan = run(["gcc", "-print-file-name=libasan.so"]).stdout.strip()
    libstdcxx = run(["gcc", "-print-file-name=libstdc++.so.6"]).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=f"{asan} {libstdcxx}", ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    result = run([sys.executable, "-m", "tests.sanitize_driver", BUILD], env=env, timeout=1200, cwd=ROOT)
    assert " 0 failed" in result.stdout, result.stdout[-3000:]
    assert "ERROR: AddressSanitizer" not in result.stderr and "runtime error" not in result.stderr, result.stderr[-3000:]
