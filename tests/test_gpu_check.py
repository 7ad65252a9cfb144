"""The benchmark scripts as CPU dry runs: `gpu_check.sh --device cpu --tiny`, `real_model.py --quick --model tiny`."""

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


def _run_benchmark(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `benchmarks/<script>` on the CPU in `tmp_path`; `.json` is its last line parsed."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done.json = json.loads(done.stdout.strip().splitlines()[-1])
    return done


def test_real_model_benchmark_quick_run(tmp_path):
    """`real_model.py --quick --model tiny`: every measurement of the real-model benchmark runs and reports."""
    result = _run_benchmark(tmp_path, "real_model.py", "--quick", "--model", "tiny").json
    assert result["all_completed"] and result["time_to_winner"]["same_pick"]
    # both sides were profiled over the same number of optimizer steps (4 configs x 4 steps)
    assert result["profile"]["steps"] == result["profile"]["rotation_steps"] == 16
    assert result["fused_wall_ratio"] > 0 and result["peak_rss_4_configs_mib"] >= result["peak_rss_1_config_mib"] > 0
    assert [row["name"] for row in result["plain_per_config"]] == [
        "r4-lr0.0002",
        "r16-lr0.0002",
        "r4-lr0.001",
        "r16-lr0.001",
    ]


def test_fused_throughput_ceiling_quick_run(tmp_path):
    """`fused_throughput.py` with the ceiling: fused and rotation train, and the ceiling is rotation's measured seconds
    against a round that pays only the forward and backward over K copies (recomputed here from the raw numbers)."""
    args = ["--hidden", "32", "--layers", "1", "--ks", "2", "--steps", "3", "--threads", "1"]
    done = _run_benchmark(tmp_path, "fused_throughput.py", *args, "--methods", "rotation,fused,ceiling")
    assert "ceiling of fused / rotation on this machine" in done.stdout
    result = done.json
    row, (measured,) = result["summary"]["2"], result["results"]["ceiling/2"]
    assert row["fused_vs_rotation_cpu"] > 0 and measured["one_seconds"] > 0 and measured["cat_seconds"] > 0
    assert row["forward_backward_ceiling"] == round(2 * measured["one_seconds"] / measured["cat_seconds"], 3)
    spent = result["results"]["rotation/2"]["cpu_seconds"]  # one repeat: the median is that run's
    expected = spent / (spent - 2 * measured["one_seconds"] + measured["cat_seconds"])
    assert row["ceiling"] == round(expected, 3) and row["ceiling"] > 0
