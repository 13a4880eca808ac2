#!/usr/bin/env bash
# Everything a GPU session needs, on the GPU machine (the device tool runs it from the repo root): build with the
# CUDA kernels, run every test (pytest on CPU and CUDA, ctest), run the benchmarks, and leave the logs and the
# recorded results under $OUT (at most 8 files come back: versions, build, pytest, ctest, bench logs + results).
#
#   device run:  STAGE=test  bash scripts/gpu_check.sh     build + pytest + ctest
#                             TEST_FILES="python_tests/test_a.py ..." narrows pytest (e.g. the files a run
#                             that hit its limit did not reach: pytest.log lists every test as it finishes)
#                STAGE=bench bash scripts/gpu_check.sh     build (kept if the machine is warm) + bench/; carry
#                             [".whl"] (scripts/fetch_bench_wheels.sh) for the QuantizedCache quanto/hqq baselines.
#                             quanto JIT-compiles its CUDA extension (marlin, AWQ kernels) at its first CUDA
#                             dequantize, during bench_generate's untimed prefill but within this call's budget:
#                             give BENCH_FILES=bench/bench_generate.py a call of its own when the baselines run
#                             BENCH_FILES="bench/bench_decode_attention.py" narrows the benchmarks
#
# One device command may run 10 minutes, so the stages are separate calls; make them back to back (the machine
# goes back after 30 s idle and a cold one rebuilds). Every step has its own time limit, and the steps together
# stay within BUDGET seconds (default 560), so a step that hangs or runs long still leaves every log.
#
# The GPU machine has torch with CUDA, triton, transformers, scikit-build-core, cmake and ninja already; this
# script installs nothing from a registry (there is none there) and builds against the torch it finds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvprec-gpu-out}
STAGE=${STAGE:-test}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  nvcc --version | tail -1
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

status=0
step() {  # step SECONDS LOG COMMAND...: run with a time limit, log to $OUT/LOG, show the tail
  local limit=$1 log=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$log" 2>&1 || { echo "FAILED (rc $?): $*" | tee -a "$OUT/$log"; status=1; }
  tail -5 "$OUT/$log"
}

# --no-deps: never let pip look for packages on a machine with no registry. Incremental when the build dir is kept.
BUDGET=${BUDGET:-560}
left() {  # seconds left in the budget, keeping $1 for the steps after (at least 5: timeout 0 would never stop)
  local s=$((BUDGET - SECONDS - $1))
  echo $((s > 5 ? s : 5))
}
step "$(left 200)" build.log env KVPREC_CUDA=ON "$PY" -m pip install -v --no-build-isolation --no-deps -e .
"$PY" -c "import kvprec; assert kvprec.cuda_kernels_available(), 'CUDA kernels not built'; print('CUDA kernels loaded')" \
  || status=1

if [ "$STAGE" = "test" ]; then
  # shellcheck disable=SC2086
  step "$(left 40)" pytest.log "$PY" -m pytest ${TEST_FILES:-python_tests} -v -p no:cacheprovider -rs --durations=25
  step "$(left 0)" ctest.log ctest --test-dir build/python --output-on-failure
fi

if [ "$STAGE" = "bench" ]; then
  # the QuantizedCache baselines' wheels, when carried (scripts/fetch_bench_wheels.sh; device run carry [".whl"])
  # (into /tmp/site on PYTHONPATH, as the device README advises: the image's site-packages stays as it is)
  if ls .whl/*.whl > /dev/null 2>&1; then
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >> "$OUT/versions.txt" 2>&1 \
      || { echo "FAILED: wheels" >> "$OUT/versions.txt"; status=1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # shellcheck disable=SC2086
  step "$(left 0)" bench.log "$PY" -m pytest ${BENCH_FILES:-bench} -q -p no:cacheprovider --benchmark-disable-gc
  for f in $(ls -t bench/results/*.json 2>/dev/null | head -5); do cp "$f" "$OUT/"; done
fi
exit $status
