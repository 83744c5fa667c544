"""Smoke versions of the benchmark scripts: they run and print a table of real numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                         timeout=600, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_pipeline_benchmark_smoke(workdir):
    table = run_script("pipeline.py", "--smoke", "--dataset", "synthetic:600")
    values = dict(re.findall(r"^(\S.*?)\s{2,}([\d,]+) (?:images/s|MB)$", table, flags=re.M))
    assert len(values) == 5, table
    rates = {k: float(v.replace(",", "")) for k, v in values.items()}
    assert all(v > 0 for v in rates.values())
    # Ratios within one run, never absolute timings: the pipeline outpaces the model it feeds.
    assert rates["pipeline, augmentation off"] > rates["training (seed CNN, batch 128)"]
