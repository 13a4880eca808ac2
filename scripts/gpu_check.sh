#!/usr/bin/env bash
# Everything a GPU session needs, in one call on the GPU machine (the device tool runs it from the repo root):
# build with the CUDA kernels, run every test (pytest on CPU and CUDA, ctest), run the benchmarks, and leave
# the logs and the recorded results under $OUT (at most 8 files come back; keep it that way).
#
#   device run:  bash scripts/gpu_check.sh            (add BENCH=0 to skip the benchmarks)
#
# The GPU machine has torch with CUDA, triton, transformers, scikit-build-core, cmake and ninja already; this
# script installs nothing from a registry (there is none there) and builds against the torch it finds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvprec-gpu-out}
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
# --no-deps: never let pip look for packages on a machine with no registry. The build dir is fresh there.
KVPREC_CUDA=ON "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || status=1
tail -5 "$OUT/build.log"
"$PY" -c "import kvprec; assert kvprec.cuda_kernels_available(), 'CUDA kernels not built'; print('CUDA kernels loaded')" \
  || status=1

"$PY" -m pytest python_tests -q -p no:cacheprovider -rs > "$OUT/pytest.log" 2>&1 || status=1
tail -3 "$OUT/pytest.log"
ctest --test-dir build/python --output-on-failure > "$OUT/ctest.log" 2>&1 || status=1
tail -3 "$OUT/ctest.log"

if [ "${BENCH:-1}" = "1" ]; then
  "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-disable-gc > "$OUT/bench.log" 2>&1 || status=1
  tail -15 "$OUT/bench.log"
  # the newest recorded result of each benchmark module
  for f in $(ls -t bench/results/*.json 2>/dev/null | head -2); do cp "$f" "$OUT/"; done
fi
exit $status
