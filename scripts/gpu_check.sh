#!/usr/bin/env bash
# GPU check for a lent H100/H200 (or any CUDA machine): build for the present
# GPU only, run the CUDA tests, run the GPU benchmarks; logs and result tables
# go under $OUT (default ./gpu_check_out). Meant to finish in ~6 minutes so
# it can run twice in a 15-minute device lease.
#
# Assumes what the device machines have: python3 with a CUDA build of torch,
# nvcc, cmake, ninja, pybind11, scikit-build-core, pytest, transformers
# (no internet: nothing is installed from an index).
#   usage: OUT=/some/dir scripts/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=${1:-}
status=0
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi >> "$OUT/summary.txt" 2>&1 || { log "nvidia-smi failed: no GPU?"; exit 1; }
cap=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}')")
arch=$cap
[ "$cap" = "90" ] && arch=90a   # Hopper: the arch-specific target
log "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); torch $($PY -c 'import torch; print(torch.__version__)'); building for sm_$arch"

# 1. build (present arch only; --no-build-isolation: compile against this torch)
export LLMEQ_CUDA=ON LLMEQ_CUDA_ARCHS=$arch CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
t0=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1; then
  log "BUILD FAILED (tail of build.log follows)"; tail -40 "$OUT/build.log"; exit 1
fi
log "build ok in $(( $(date +%s) - t0 )) s"
nvcc_bin=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
$nvcc_bin -O2 -std=c++20 -gencode=arch=compute_$arch,code=sm_$arch -Isrc/cpp/include benchmarks/cpp/bench_cuda.cu \
  src/cuda/gemm_s8.cu src/cuda/gemm_wo.cu src/cuda/quantize.cu -o /tmp/bench_cuda >> "$OUT/build.log" 2>&1 \
  || { log "bench_cuda build failed"; status=1; }

# 2. CUDA tests, from outside the source tree so the installed extension is
#    the one imported; with pytest-xdist a crashing test is reported by name
#    (its worker restarts) instead of ending the run.
t0=$(date +%s)
xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 4"
(cd tests && timeout 300 $PY -m pytest -q -ra --tb=short $xdist -m cuda -p no:cacheprovider . \
   > "$OUT/pytest_cuda.log" 2>&1)
rc=$?
log "pytest -m cuda: rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/pytest_cuda.log")"
if [ $rc -ne 0 ]; then
  status=1
  grep -E "^(FAILED|ERROR)|crashed|Fatal Python|Error:|error:" "$OUT/pytest_cuda.log" | cut -c1-220 | head -25
fi

# 3. benchmarks
if [ -x /tmp/bench_cuda ]; then
  timeout 120 /tmp/bench_cuda > "$OUT/bench_cuda.txt" 2>&1 || { log "bench_cuda rc=$?"; status=1; }
  log "bench_cuda: $(grep -E 'correctness|copy:' "$OUT/bench_cuda.txt" | tr '\n' ' ')"
fi
t0=$(date +%s)
timeout 200 $PY benchmarks/bench_gemm_cuda.py $QUICK --out "$OUT/bench_gemm_cuda.md" 2>&1 | grep -v '^{' \
  || { log "bench_gemm_cuda failed"; status=1; }
log "bench_gemm_cuda done in $(( $(date +%s) - t0 )) s"
# end to end (issue 16 item 5): a 1.1B random-weight LLaMA, bf16 / W8A8 / W4A16
if [ -z "$QUICK" ]; then
  t0=$(date +%s)
  timeout 240 $PY benchmarks/bench_e2e_cuda.py --model llama-1b --batches 1,8 --prefill 512 --decode 64 --reps 2 \
    --out "$OUT/bench_e2e_cuda.md" > "$OUT/bench_e2e_cuda.log" 2>&1 || { log "bench_e2e_cuda rc=$?"; status=1; }
  log "bench_e2e_cuda done in $(( $(date +%s) - t0 )) s"
fi
cat "$OUT/bench_cuda.txt" 2>/dev/null
cat "$OUT/bench_e2e_cuda.md" 2>/dev/null

# 4. optional: Nsight Compute on the prefill-sized int8 GEMM (GPU_CHECK_NCU=1)
if [ "${GPU_CHECK_NCU:-0}" = 1 ] && [ -x /tmp/bench_cuda ] && command -v ncu >/dev/null; then
  timeout 90 ncu --kernel-name regex:gemm_s8_mma --launch-skip 1 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis /tmp/bench_cuda --one 2048 4096 4096 \
    > "$OUT/ncu_gemm.txt" 2>&1 || log "ncu rc=$?"
  grep -E "Duration|Throughput|Warp Cycles|Stall|Achieved Occupancy|Issue Slot|Registers|Theoretical Occ|Executed Ipc|Pipe" \
    "$OUT/ncu_gemm.txt" | head -40
fi
log "gpu_check finished, status=$status"
exit $status
