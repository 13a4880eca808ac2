#!/usr/bin/env bash
# Runs every test: pytest (python_tests/) and CTest (csrc/tests/, plus the demos) against the build that
# scripts/setup.sh made. Triton kernels run under the interpreter on CPU (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=1
fi
"$PY" -m pytest python_tests -q -p no:cacheprovider
ctest --test-dir build/python --output-on-failure
