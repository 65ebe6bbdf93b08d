#!/usr/bin/env bash
# Builds the raw (OneFlow-free) binding with the CUDA kernels and runs, in one go, on a GPU machine
# with PyTorch: the GPU test bench, compute-sanitizer memcheck and racecheck over a subset, the
# launch sweep and the benchmark. Results go to $OUT (default bench/results/latest). Used through
# the device tool as
#   bash bench/run_gpu.sh            (carry .whl for liger-kernel / torchtune wheels, if present)
# Steps can be chosen: STEPS="check memcheck racecheck sweep variants pdl ncuheads profilesmall morph probe probetable probedecode ncudecode ncu profile flushab sass bench"
# (default: check
# memcheck racecheck bench); BENCH_ARGS passes options to bench_gpu.py. VARIANTS="name=-DFLAG=1 ..."
# builds alternatives of the kernel (its compile-time knobs) next to the main build; the step
# "variants" times each on the sweep's calls with the built-in launch rule. CUDA_FLAGS="-DA=1 ..." builds
# the main build (the one every other step uses) with other knobs. VARIANT_SETTINGS="items,threads;..." gives the
# launch settings the step "variants" times (default "0,0", the built-in rule); SWEEP_SETTINGS the step "sweep"'s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/latest}
STEPS=${STEPS:-"check memcheck racecheck bench"}
ARCH=${ARCH:-90}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# torch.compile's caches from an earlier run (bench/results/.../inductor_cache.tgz, carried in) save
# minutes of compiling the peers; SAVE_INDUCTOR_CACHE=1 writes this run's to $OUT.
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache TRITON_CACHE_DIR=/tmp/inductor_cache/triton
if [ -n "${INDUCTOR_CACHE_IN:-}" ] && [ -f "$INDUCTOR_CACHE_IN" ]; then
  mkdir -p /tmp/inductor_cache && tar -xzf "$INDUCTOR_CACHE_IN" -C /tmp/inductor_cache && echo "inductor cache restored"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$OUT/build.log"
t0=$(date +%s)
build_variant() {  # name flags
  cmake -S . -B "build-gpu-$1" -DONEFLOW_ROPE_BUILD_ONEFLOW_OPS=OFF -DONEFLOW_ROPE_BUILD_RAW=ON \
    -DONEFLOW_ROPE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_FLAGS="$2" \
    -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
    -DCMAKE_BUILD_TYPE=Release >"$OUT/build-$1.log" 2>&1 && cmake --build "build-gpu-$1" -j 4 >>"$OUT/build-$1.log" 2>&1
}
for v in ${VARIANTS:-}; do flags=${v#*=}; build_variant "${v%%=*}" "${flags//,/ }" & done  # flags: comma-separated
{
  cmake -S . -B build-gpu -DONEFLOW_ROPE_BUILD_ONEFLOW_OPS=OFF -DONEFLOW_ROPE_BUILD_RAW=ON \
    -DONEFLOW_ROPE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DPython_EXECUTABLE="$(command -v python3)" \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS="${CUDA_FLAGS:-}" &&
  cmake --build build-gpu -j 16
} >>"$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
wait
echo "built in $(( $(date +%s) - t0 )) s: $(ls build-gpu*/_rope_raw*.so)"

for step in $STEPS; do
  t0=$(date +%s)
  case $step in
    check)
      python3 -m bench.gpu_check --build build-gpu --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt" | tail -n 30 || status=1
      grep -q " 0 failed" "$OUT/gpu_check.txt" || status=1 ;;
    memcheck)
      timeout ${SANITIZER_TIMEOUT:-240} compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
        python3 -m bench.gpu_check --build build-gpu --subset 37 --no-large >"$OUT/memcheck.txt" 2>&1 || status=1
      tail -n 4 "$OUT/memcheck.txt" ;;
    racecheck)
      timeout ${SANITIZER_TIMEOUT:-240} compute-sanitizer --tool racecheck --error-exitcode 3 \
        python3 -m bench.gpu_check --build build-gpu --subset 97 --no-large --only cases,extensions,launch >"$OUT/racecheck.txt" 2>&1 || status=1
      tail -n 4 "$OUT/racecheck.txt" ;;
    sweep)
      python3 -m bench.sweep_launch --build build-gpu ${SWEEP_SETTINGS:+--settings "$SWEEP_SETTINGS"} 2>&1 | tee "$OUT/sweep_launch.txt" || status=1 ;;
    variants)
      for v in ${VARIANTS:-}; do
        echo "== variant ${v%%=*}: ${v#*=}" | tee -a "$OUT/variants.txt"
        python3 -m bench.sweep_launch --build "build-gpu-${v%%=*}" --settings "${VARIANT_SETTINGS:-0,0}" 2>&1 | grep -v "^#" | tail -n +2 | tee -a "$OUT/variants.txt"
      done ;;
    probe)
      # stand-alone thread-mapping probe (no oneflow_rope code): what a plain kernel reaches here
      nvcc -O3 -std=c++17 -arch=sm_$ARCH bench/probe_mapping.cu -o /tmp/probe_mapping &&
        { /tmp/probe_mapping 4 4096 32 128; /tmp/probe_mapping 2 8192 8 128; } 2>&1 | tee "$OUT/probe_mapping.txt" || status=1 ;;
    pdl)
      # programmatic dependent launch of decode steps on and off (bench/pdl_decode.py)
      python3 -m bench.pdl_decode --build build-gpu 2>&1 | tee "$OUT/pdl_decode.txt" || status=1 ;;
    probetable)
      # stand-alone table + position_ids floors (bench/probe_table.cu)
      nvcc -O3 -std=c++17 -arch=sm_$ARCH bench/probe_table.cu -o /tmp/probe_table &&
        for s in "4 4096 32 128" "2 8192 8 128" "16 4096 4 128" "1 4096 32 128"; do /tmp/probe_table $s; done 2>&1 | tee "$OUT/probe_table.txt" || status=1 ;;
    probedecode)
      # stand-alone decode-step floors (copy, position_ids + table, offsets + angles)
      nvcc -O3 -std=c++17 -arch=sm_$ARCH bench/probe_decode.cu -o /tmp/probe_decode &&
        /tmp/probe_decode 2>&1 | tee "$OUT/probe_decode.txt" || status=1 ;;
    ncudecode)
      # decode under ncu: the stand-alone minimal kernels (bench/probe_decode.cu, once each) and
      # ours on the sweep's calls (once each; the decode ones are c9-c11, c17-c20), with kernel
      # duration, instructions and stall reasons side by side
      nvcc -O3 -std=c++17 -arch=sm_$ARCH bench/probe_decode.cu -o /tmp/probe_decode || status=1
      # (ours twice: the built-in rule, then with one-head calls kept off RopeSmallKernel)
      for prog in "/tmp/probe_decode once" "python3 -m bench.sweep_launch --build build-gpu --once --settings 0,0;0,0,-1,0"; do
        ncu --clock-control none --kernel-name regex:"CopyKernel|DecodeRope|RopeKernel|RopeSmallKernel" --section SpeedOfLight \
          --section LaunchStats --section WarpStateStats --section SourceCounters --warp-sampling-interval 0 \
          --metrics smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio \
          --import-source no $prog
      done >"$OUT/ncu_decode.txt" 2>&1 || status=1
      grep -E "^  [a-zA-Z_].*\(|Duration|smsp__inst_executed.sum|Registers Per|Grid Size|Warp Cycles Per Issued" \
        "$OUT/ncu_decode.txt" | grep -B1 -A5 "Decode\|Copy\|, 1, 0>\|RopeSmall" | head -150 ;;
    profile)
      # per-instruction stall samples of each sweep call's kernel (ncu source page, SASS) and details
      ncu --clock-control none --kernel-name regex:RopeKernel --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        --section SourceCounters --warp-sampling-interval 0 --import-source no -f -o /tmp/profile \
        python3 -m bench.sweep_launch --build build-gpu --once >"$OUT/profile_run.txt" 2>&1 || status=1
      ncu -i /tmp/profile.ncu-rep --page details >"$OUT/profile_details.txt" 2>&1
      ncu -i /tmp/profile.ncu-rep --page source --csv --print-source sass 2>&1 | gzip >"$OUT/profile_source.csv.gz"
      grep -E "RopeKernel|Duration|DRAM Throughput|Registers Per|Achieved Active Warps|Issue Slots Busy|No Eligible" \
        "$OUT/profile_details.txt" | head -80 ;;
    flushab)
      # ours vs torch's copy under three ways of emptying L2 (bench.flush_ab), then the same calls'
      # kernels (copy and ours, once each) under ncu: duration and DRAM bytes with ncu's own flush
      python3 -m bench.flush_ab --build build-gpu 2>&1 | tee "$OUT/flush_ab.txt" || status=1
      ncu --clock-control none --kernel-name-base demangled --kernel-name regex:"RopeKernel|neg_kernel" --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum \
        python3 -m bench.flush_ab --build build-gpu --once >"$OUT/flush_ab_ncu.txt" 2>&1 || status=1
      grep -E "^  [a-zA-Z_].*\(|gpu__time|dram__bytes|dram__thr|warps_active|inst_executed" "$OUT/flush_ab_ncu.txt" | grep -v distribution | head -120 ;;
    sass)
      # SASS of the bf16 vector instances (SASS_FILTER: an awk regex on the mangled kernel name)
      cuobjdump -sass build-gpu/_rope_raw*.so | awk -v pat="${SASS_FILTER:-RopeKernelI13__nv_bfloat16(S[0-9]*_|f)Li8ELb1}" \
        '/Function :/ {keep = ($0 ~ pat)} keep' | gzip >"$OUT/sass.txt.gz" || status=1
      ls -la "$OUT/sass.txt.gz" ;;
    profilesmall)
      # per-instruction stall samples (ncu source page, SASS) of RopeSmallKernel's 2-head instance on
      # sweep calls c0 (4, 4096, 32, 128) and c5 (2, 8192, 8, 128), and of the stand-alone probe's
      # first kernel (2 heads per thread, exact angle) on the same shapes: where each warp waits
      nvcc -O3 -std=c++17 -arch=sm_$ARCH -lineinfo bench/probe_mapping.cu -o /tmp/probe_mapping || status=1
      i=0
      for prog in "python3 -m bench.sweep_launch --build build-gpu --once --configs 0,5" "/tmp/probe_mapping 4 4096 32 128" "/tmp/probe_mapping 2 8192 8 128"; do
        i=$((i + 1))
        ncu --clock-control none --kernel-name regex:"RopeSmallKernel|RopeProbe" --launch-count 2 --section SpeedOfLight \
          --section WarpStateStats --section SourceCounters --warp-sampling-interval 0 --import-source no \
          -f -o /tmp/profile_small_$i $prog >>"$OUT/profile_small_run.txt" 2>&1 || status=1
        ncu -i /tmp/profile_small_$i.ncu-rep --page details >>"$OUT/profile_small_details.txt" 2>&1
        ncu -i /tmp/profile_small_$i.ncu-rep --page source --csv --print-source sass 2>&1 | gzip >"$OUT/profile_small_source_$i.csv.gz"
      done
      grep -E "^  [a-zA-Z_].*\(|Duration|Warp Cycles Per Issued|Stall" "$OUT/profile_small_details.txt" | head -60 ;;
    morph)
      # the mapping probe morphed one RopeSmallKernel trait at a time (bench/probe_morph.cu), timed in
      # the bench's harness against torch's copy and ours on the same tensors
      nvcc -O3 -std=c++17 -arch=sm_$ARCH -shared -Xcompiler -fPIC bench/probe_morph.cu -o /tmp/libmorph.so &&
        python3 -m bench.probe_morph --lib /tmp/libmorph.so --build build-gpu 2>&1 | tee "$OUT/probe_morph.txt" || status=1 ;;
    ncuheads)
      # 8 heads against 32 (sweep calls c5 and c0, bf16 base) under ncu, ours and the stand-alone
      # probe's first variant (2 heads per thread, exact angle) on the same shapes
      nvcc -O3 -std=c++17 -arch=sm_$ARCH bench/probe_mapping.cu -o /tmp/probe_mapping || status=1
      for prog in "python3 -m bench.sweep_launch --build build-gpu --once --configs 0,5" "/tmp/probe_mapping 4 4096 32 128" "/tmp/probe_mapping 2 8192 8 128"; do
        ncu --clock-control none --kernel-name regex:"RopeKernel|RopeSmallKernel|RopeProbe" --launch-count 1 --section SpeedOfLight --section Occupancy \
          --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
          --metrics smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum $prog
        if [ "${prog#python3}" != "$prog" ]; then  # ours: the second call (c5) too
          ncu --clock-control none --kernel-name regex:"RopeKernel|RopeSmallKernel" --launch-skip 1 --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
            --section MemoryWorkloadAnalysis --metrics smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum $prog
        fi
      done >"$OUT/ncu_heads.txt" 2>&1 || status=1
      grep -E "^  [A-Za-z].*\(|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Block Size|Grid Size|inst_executed|dram__bytes|Waves Per SM" "$OUT/ncu_heads.txt" | head -120 ;;
    ncu)
      ncu --clock-control none --kernel-name regex:RopeKernel --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 -m bench.sweep_launch --build build-gpu --once >"$OUT/ncu.txt" 2>&1 || status=1
      grep -E "RopeKernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Block Size|Grid Size" "$OUT/ncu.txt" | head -150 ;;
    bench)
      python3 -m bench.bench_gpu --build build-gpu ${BENCH_ARGS:-} --json "$OUT/bench.json" --plot "$OUT/bench.png" \
        >"$OUT/bench.txt" 2>&1 || status=1
      grep -A 20 "^# per regime" "$OUT/bench.txt"; grep "^# elapsed" "$OUT/bench.txt"
      if [ "${SAVE_INDUCTOR_CACHE:-0}" = 1 ]; then
        tar -czf "$OUT/inductor_cache.tgz" -C /tmp/inductor_cache . && ls -la "$OUT/inductor_cache.tgz"
      fi ;;
  esac
  echo "step $step: $(( $(date +%s) - t0 )) s"
done
exit $status
