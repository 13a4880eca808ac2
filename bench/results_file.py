"""Where the benchmarks record their GPU runs: one JSON per module run under bench/results/, named
<what>-<device>-<time>.json, the commit it measured, and the one summary of per-call times they report."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def quantiles(times) -> dict:
    """Median and p20 / p80 (linear interpolation) of per-call times given in microseconds."""
    t = torch.tensor(times)
    return {"median_us": t.median().item(), "p20_us": t.quantile(0.2).item(), "p80_us": t.quantile(0.8).item()}


def git_commit() -> str:
    """HEAD of the checkout the benchmark runs from ("" outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def write_results(what: str, results: dict) -> Path:
    """Write ``results`` as bench/results/<what>-<CUDA device name>-<YYYYmmdd-HHMMSS>.json; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name().replace(" ", "_")
    path = RESULTS_DIR / f"{what}-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
