"""`benchmarks/gpu_check.sh --device cpu --tiny`: the prepared GPU check runs every check end to end on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# ~70 s of CPU time on a 2-core machine (3-4 min of wall time when other jobs share the cores)
@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu", "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "results.json").read_text())
    results = summary["results"]
    assert list(results) == ["exactness", "offload", "throughput", "memory", "time_to_winner", "oom_retry", "pytest"]
    failed = {name: r["summary"] for name, r in results.items() if r["ok"] is False}
    assert not failed, failed
    assert results["exactness"]["ok"] is True  # rotation vs alone, bit-exact under full_determinism
    assert results["oom_retry"]["ok"] is None  # needs CUDA: recorded as skipped, not passed
    assert results["throughput"]["fused_vs_rotation/4"] > 0 and results["time_to_winner"]["halving_winner"]
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 8  # header + one row per check
