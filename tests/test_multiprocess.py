"""Several processes: `accelerate launch --multi_gpu --num_processes 2` on the CPU (the worker's arguments say
`use_cpu=True`, so accelerate joins the processes with gloo; accelerate 1.15's `--cpu --num_processes 2` starts one
process) against the same experiments in one process.

One launch runs the three experiments of `multiprocess_worker.py` (one import of TRL per process):
- `configs`: four runs spread over two processes, two of them ending after the first chunk so that a run moves from
  rank 1 to rank 0; every adapter and every logged value equals the one-process run's bit-for-bit.
- `ops`: while rank 0 trains run a, mid-chunk, a stop of run b (training on rank 1) and a warm-started clone of a are
  submitted; both ranks apply them at the round's end (no hang), the clone and the other runs equal one-process
  training, rank 0's ledger holds every run's records once and `results()` is the same on both ranks.
- `policy`: successive halving (asked on rank 0 at the end of each round) stops the same runs at the same boundaries
  as in one process, and every run ends bit-for-bit equal.
- `data`: two runs trained data-parallel (2 processes x 2 rows) equal one-process training with 4 rows per step
  within floating-point tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rf_callbacks.ledger import read_ledger

HERE = Path(__file__).parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
TIMING = ("runtime", "per_second", "wall_time")


def _steady(value):
    """Drop what depends on the clock."""
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    if shutil.which(str(ACCELERATE)) is None:
        pytest.skip("accelerate's launcher is not installed next to this python")
    out = tmp_path_factory.mktemp("multiprocess")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    command += [str(HERE / "multiprocess_worker.py"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    # A 2-process experiment killed mid-chunk (the process training run b exits), then resumed on 2 processes
    crashed = subprocess.run([*command, "crash"], env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode != 0
    resumed = subprocess.run([*command, "resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-8000:]
    return out


def _reference(scenario, tmp_path):
    from multiprocess_worker import build, summary

    # The launched processes run with one thread (OMP_NUM_THREADS=1); CPU matmuls sum in another order with another
    # thread count, so the reference must use one thread too to be comparable bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build(scenario, tmp_path / scenario)
        trainer.train()
        result = summary(trainer)
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    return result


def _ranks(out, scenario):
    return [json.loads((out / scenario / f"rank{r}.json").read_text()) for r in (0, 1)]


def _adapter(folder, name):
    return load_file(Path(folder) / "runs" / name / "adapter_model.safetensors")


@pytest.mark.slow  # the module\'s three 2-process launches take ~40 s together
def test_config_parallel_runs_equal_one_process_bit_for_bit(launched, tmp_path):
    rank0, rank1 = _ranks(launched, "configs")
    assert rank0["mode"] == "configs" and rank0["migrations"] >= 1
    assert _steady(rank0["results"]) == _steady(rank1["results"])  # the same answer on every rank
    reference = _reference("configs", tmp_path)
    assert _steady(rank0["logs"]) == _steady(json.loads(json.dumps(reference["logs"], default=str)))
    for row in rank0["results"]:
        assert row["status"] == "completed"
        one, two = _adapter(tmp_path / "configs", row["name"]), _adapter(launched / "configs", row["name"])
        assert all(torch.equal(one[key], two[key]) for key in one), row["name"]
    ledger = read_ledger(launched / "configs" / "ledger.jsonl")
    logged = {(r["run"], r["step"]) for r in ledger if r["event"] == "log" and "loss" in r}
    expected = {(name, e["step"]) for name, logs in rank0["logs"].items() for e in logs if "loss" in e}
    assert logged == expected
    assert {r.get("rank") for r in ledger if r["event"] == "log"} == {None, 1}  # rank 1's records, written by rank 0


@pytest.mark.slow  # the module\'s three 2-process launches take ~40 s together
def test_ic_op_mid_chunk_is_applied_by_every_rank(launched, tmp_path):
    rank0, rank1 = _ranks(launched, "ops")
    assert _steady(rank0["results"]) == _steady(rank1["results"])
    status = {row["name"]: row for row in rank0["results"]}
    assert status["b"]["status"] == "stopped" and status["a2"]["status"] == "completed"
    assert status["a2"]["parent"] == "a"
    assert status["b"]["global_step"] == 4  # on rank 1 it ended its chunk, then stopped at the round's end
    ledger = read_ledger(launched / "ops" / "ledger.jsonl")
    applied = [(r["run"], r["op"]) for r in ledger if r["event"] == "op_applied"]
    assert sorted(applied) == [("a", "clone"), ("b", "stop")]
    _reference("ops", tmp_path)
    for name in ("a", "a2", "c", "d"):  # b trained its chunk on rank 1 before the stop reached it: it differs
        one, two = _adapter(tmp_path / "ops", name), _adapter(launched / "ops", name)
        assert all(torch.equal(one[key], two[key]) for key in one), name
    assert not list((launched / "ops").glob("ledger-*.jsonl"))  # one ledger, rank 0's


@pytest.mark.slow  # the module\'s three 2-process launches take ~40 s together
def test_policy_decisions_on_rank_0_match_one_process(launched, tmp_path):
    rank0, rank1 = _ranks(launched, "policy")
    assert _steady(rank0["results"]) == _steady(rank1["results"])
    reference = _reference("policy", tmp_path)
    statuses = [(row["name"], row["status"], row["global_step"]) for row in rank0["results"]]
    assert statuses == [(row["name"], row["status"], row["global_step"]) for row in reference["results"]]
    assert sorted(status for _, status, _ in statuses) == ["completed", "stopped", "stopped", "stopped"]
    assert _steady(rank0["logs"]) == _steady(json.loads(json.dumps(reference["logs"], default=str)))
    for name, status, _ in statuses:
        saved = (launched / "policy" / "runs" / name / "adapter_model.safetensors").exists()
        assert saved == (status == "completed")  # stopped runs save no adapter
        if saved:
            one, two = _adapter(tmp_path / "policy", name), _adapter(launched / "policy", name)
            assert all(torch.equal(one[key], two[key]) for key in one), name


@pytest.mark.slow  # the module\'s three 2-process launches take ~40 s together
def test_killed_multi_process_experiment_resumes_bit_for_bit(launched):
    resumed, uninterrupted = _ranks(launched, "resume"), _ranks(launched, "configs")
    assert _steady(resumed[0]["results"]) == _steady(resumed[1]["results"])
    assert _steady(resumed[0]["results"]) == _steady(uninterrupted[0]["results"])
    assert _steady(resumed[0]["logs"]) == _steady(uninterrupted[0]["logs"])
    for row in resumed[0]["results"]:
        one, two = _adapter(launched / "configs", row["name"]), _adapter(launched / "resume", row["name"])
        assert all(torch.equal(one[key], two[key]) for key in one), row["name"]
    ledger = read_ledger(launched / "resume" / "ledger.jsonl")
    assert [r["event"] for r in ledger].count("resumed") == 1
    logged = [(r["run"], r["step"]) for r in ledger if r["event"] == "log" and "loss" in r]
    assert sorted(logged) == sorted(set(logged))  # each step once: what came after the checkpoint was cut


@pytest.mark.slow  # the module\'s three 2-process launches take ~40 s together
def test_data_parallel_equals_one_process_with_the_same_global_batch(launched, tmp_path):
    rank0, rank1 = _ranks(launched, "data")
    assert rank0["mode"] == "data"
    assert _steady(rank0["results"]) == _steady(rank1["results"])
    reference = _reference("data", tmp_path)
    for name in ("a", "b"):
        one, two = _adapter(tmp_path / "data", name), _adapter(launched / "data", name)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        losses = [e["loss"] for e in rank0["logs"][name] if "loss" in e]
        expected = [e["loss"] for e in reference["logs"][name] if "loss" in e]
        assert losses == pytest.approx(expected, rel=1e-4)
        evals = [e["eval_loss"] for e in rank0["logs"][name] if "eval_loss" in e]
        assert evals == pytest.approx([e["eval_loss"] for e in reference["logs"][name] if "eval_loss" in e], rel=1e-4)


@pytest.mark.slow  # the module\'s three 2-process launches take ~40 s together
def test_data_parallel_nan_on_one_rank_fails_the_run_on_every_rank(launched):
    """No hang: the rank whose loss is finite learns the other's is not, and fails the run too."""
    rank0, rank1 = _ranks(launched, "nan")
    assert _steady(rank0["results"]) == _steady(rank1["results"])
    rows = {row["name"]: row for row in rank0["results"]}
    assert (rows["b"]["status"], rows["b"]["error"]) == ("failed", "FloatingPointError: loss is nan at step 3")
    assert rows["a"]["status"] == "completed"


def test_assignment_keeps_runs_in_place_and_evens_the_load():
    from types import SimpleNamespace

    from rf_callbacks.distributed import Distributed

    coordination = object.__new__(Distributed)
    coordination.world = 2
    runs = [SimpleNamespace(name=name) for name in "abcd"]
    coordination.owner = {}
    assert coordination.assign(runs) == {"a": 0, "b": 1, "c": 0, "d": 1}  # nothing trained yet: round-robin
    coordination.owner = {"a": 0, "b": 1, "c": 0, "d": 1}
    assert coordination.assign(runs) == {"a": 0, "b": 1, "c": 0, "d": 1}  # nobody moves
    assert coordination.assign([runs[1], runs[3]]) == {"b": 1, "d": 0}  # a and c are done: d moves to rank 0
    coordination.owner["e"] = None
    assert coordination.assign([runs[0], runs[2], SimpleNamespace(name="e")]) == {"a": 0, "c": 0, "e": 1}


def test_parallel_modes_and_unjoined_processes(monkeypatch):
    from rf_callbacks.distributed import resolve_parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_parallel("auto", 1, 4) is None
    assert resolve_parallel("auto", 2, 4) == "configs" and resolve_parallel("auto", 4, 2) == "data"
    assert resolve_parallel("data", 2, 8) == "data"
    with pytest.raises(ValueError, match="parallel='both'"):
        resolve_parallel("both", 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="use_cpu=True"):
        resolve_parallel("auto", 1, 4)
