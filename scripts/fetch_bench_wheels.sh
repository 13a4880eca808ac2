#!/usr/bin/env bash
# Downloads, on a machine with a package registry, the wheels bench/bench_generate.py needs for its
# QuantizedCache(backend="quanto" | "hqq") baselines into .whl/ (git-ignored), so they can be carried to the GPU
# machine, which has no registry (device run with carry [".whl"]; scripts/gpu_check.sh installs .whl/*.whl with
# --no-deps). Pure-Python wheels, pinned; hqq ships only an sdist, built here into a wheel without its
# dependencies. hqq needs termcolor and einops at import, and a half-installed hqq breaks every
# `from transformers import ...` (transformers imports it once it is found), so all three travel together.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps -d .whl "optimum-quanto==0.2.7" "termcolor==3.3.0" "einops==0.8.2"
"$PY" -m pip download -q --no-deps --no-binary hqq -d .whl/sdist "hqq==0.2.8.post1"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .whl/sdist/hqq-*.tar.gz
rm -rf .whl/sdist
ls -l .whl
