"""The wheel's layout: the Triton kernel bodies (triton_kernels/ in the source tree) install as
kvprec/triton_kernels, so that kvprec never shadows or overwrites OpenAI's top-level ``triton_kernels`` package
(a vLLM dependency). Builds the wheel from the already configured build directory (seconds after
``pip install -e .``)."""
import glob
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "build" / "python" / "CMakeCache.txt").exists(),
                    reason="no configured build directory (run scripts/setup.sh): building from scratch takes minutes")
def test_wheel_installs_kernels_under_kvprec(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "kvprec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "triton_kernels" not in top_level
    sources = sorted(p.name for p in (ROOT / "triton_kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("kvprec/triton_kernels/")) == sources
    assert any(n.startswith("kvprec/_C") for n in names)
