"""Crash-resume: a script killed with SIGKILL at several points (one of them mid-checkpoint-write) and resumed each
time ends with every adapter bit-for-bit equal to an uninterrupted run, with no duplicated or missing step in the
ledger or in MLflow; plus what a checkpoint holds, pruning, and the errors of a bad resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.checkpoint import latest_checkpoint
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger

TESTS = Path(__file__).parent

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from helpers import cpu_sft_config
    from peft import LoraConfig
    from transformers import set_seed
    from rf_callbacks import RFSFTTrainer
    from rf_callbacks.checkpoint import Checkpointer
    from rf_callbacks.demo import build_tiny_model, build_tokenizer, demo_datasets
    from rf_callbacks.policies import Explore

    if os.environ.get("KILL_IN_CHECKPOINT"):  # fault injection: die while the n-th run's files are being written
        write_run, calls = Checkpointer.write_run, []
        def dying_write_run(self, run, folder):
            write_run(self, run, folder)
            calls.append(run.name)
            if len(calls) == int(os.environ["KILL_IN_CHECKPOINT"]):
                os.kill(os.getpid(), signal.SIGKILL)
        Checkpointer.write_run = dying_write_run

    out = sys.argv[1]
    tokenizer = build_tokenizer()
    train, val = demo_datasets()
    set_seed(7)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_sft_config(out, max_steps=18, per_device_train_batch_size=8, logging_steps=2,
                            save_strategy="steps", save_steps=10000, report_to=["mlflow"]),
        train_dataset=train.select(range(96)),
        eval_dataset=val.select(range(8)),
        processing_class=tokenizer,
        configs=[
            {{"name": "a", "peft_config": LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])}},
            {{"name": "b", "peft_config": LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"),
             "learning_rate": 3e-3}},
            {{"name": "c", "peft_config": LoraConfig(r=8, lora_dropout=0.1, target_modules=["o_proj"]),
             "per_device_train_batch_size": 4}},
        ],
        num_chunks=4,
        policies=[Explore(top=1, interval=2, perturb={{"learning_rate": (0.5, 2.0)}})],
        control_socket=False,
    )
    trainer.train()
    trainer.close()
    """
)


def launch(script, out, env=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(script), str(out)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_after(process, ledger: Path, lines: int) -> None:
    """SIGKILL `process` once `ledger` has `lines` lines (or let it end)."""
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if ledger.exists() and ledger.read_bytes().count(b"\n") >= lines:
            process.kill()
            break
        time.sleep(0.01)
    process.wait()


def adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(p) for p in sorted(out.glob("runs/*/adapter_model.safetensors"))}


def logged(out: Path) -> list[tuple]:
    keys = ("loss", "grad_norm", "learning_rate", "eval_loss")
    return sorted(
        (r["run"], r["step"], k, r[k])
        for r in read_ledger(out / "ledger.jsonl")
        if r["event"] == "log"
        for k in keys
        if k in r
    )


def mlflow_history(out: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    history = {}
    for run in client.search_runs([experiment.experiment_id]):
        for key in ("train/loss", "eval/loss"):
            points = client.get_metric_history(run.info.run_id, key)
            history[(run.info.run_name, key)] = sorted((m.step, m.value) for m in points)
    return history


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bit_identical(tmp_path):
    script = tmp_path / "experiment.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)), encoding="utf-8")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    process = launch(script, reference)
    assert process.wait() == 0, process.stderr.read().decode()[-3000:]

    # Killed mid-checkpoint-write, then at three later points; resumed each time with the same script.
    process = launch(script, killed, {"KILL_IN_CHECKPOINT": "5"})
    assert process.wait() == -9
    assert list((killed / "checkpoints").glob(".tmp-checkpoint-*")), "the kill should leave a half-written folder"
    resume = {"RF_CALLBACKS_RESUME": str(killed.resolve())}
    seed = int(os.environ.get("RF_KILL_SEED", time.time()))
    start = random.Random(seed).randrange(22, 34)
    # Random points among the ~92 lines an uninterrupted run writes; checkpoints are at most 12 lines apart, so 20
    # lines after a resume there is always a newer one.
    for lines in (start, start + 20, start + 40):
        before = latest_checkpoint(killed)
        process = launch(script, killed, resume)
        kill_after(process, killed / "ledger.jsonl", lines)
        assert process.returncode == -9, process.stderr.read().decode()[-3000:]
        assert latest_checkpoint(killed) != before, f"each resume should get further (RF_KILL_SEED={seed})"
    # The last resume goes through the CLI, which reruns the recorded script.
    done = subprocess.run(
        [sys.executable, "-m", "rf_callbacks.cli", "resume", "--dir", str(killed)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    expected, got = adapters(reference), adapters(killed)
    assert sorted(expected) == sorted(got) and sum("-clone-" in name for name in got) >= 1  # Explore cloned
    for name in expected:
        assert all(torch.equal(expected[name][k], got[name][k]) for k in expected[name]), name
    assert logged(killed) == logged(reference)  # nothing doubled, nothing missing
    assert mlflow_history(killed) == mlflow_history(reference)
    statuses = {r["name"]: r["status"] for r in json.loads((killed / "experiment.json").read_text())["runs"]}
    reference_statuses = {
        r["name"]: r["status"] for r in json.loads((reference / "experiment.json").read_text())["runs"]
    }
    assert statuses == reference_statuses
    assert len(list((killed / "checkpoints").glob("checkpoint-*"))) == 2  # save_total_limit default


def make_trainer(tokenizer, chat_data, sft_args, out, **kwargs):
    set_seed(7)
    settings = {"max_steps": 12, "per_device_train_batch_size": 8, "save_strategy": "steps", "save_steps": 10000}
    args = sft_args(output_dir=str(out), **{**settings, **kwargs.pop("args", {})})
    return RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=args,
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=[
            {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
            {"name": "b", "peft_config": LoraConfig(r=2, target_modules=["v_proj"]), "learning_rate": 3e-3},
        ],
        num_chunks=4,
        control_socket=False,
        **kwargs,
    )


def test_checkpoint_contents_interval_and_pruning(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path, checkpoint_every=3, args={"save_total_limit": 3})
    trainer.train()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]  # every 3 boundaries, the final one, 3 kept
    last = tmp_path / "checkpoints" / "checkpoint-8"
    manifest = json.loads((last / "checkpoint.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == ["a", "b"]
    assert all(r["status"] == "completed" and r["next_slice"] == 4 for r in manifest["runs"])
    files = sorted(p.name for p in (last / "runs" / "a").iterdir())
    assert files == ["optimizer.pt", "scheduler.pt", "state.json", "state.safetensors", "trainer_state.json"]
    torch.load(last / "runs" / "a" / "optimizer.pt", weights_only=True)  # loads without running code
    checkpoints = [r for r in read_ledger(tmp_path / "ledger.jsonl") if r["event"] == "checkpoint"]
    assert len(checkpoints) == 3

    # A resume of a finished experiment trains nothing and reports the same results.
    again = make_trainer(tokenizer, chat_data, sft_args, tmp_path, checkpoint_every=3, args={"save_total_limit": 3})
    again.train(resume_from_checkpoint=True)
    assert [r["global_step"] for r in again.results()] == [12, 12]
    assert [r["train_loss"] for r in again.results()] == [r["train_loss"] for r in trainer.results()]


def test_no_checkpoints_with_save_strategy_no_and_bad_resumes(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "off", args={"save_strategy": "no"})
    trainer.train()
    assert not (tmp_path / "off" / "checkpoints").exists()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        make_trainer(tokenizer, chat_data, sft_args, tmp_path / "off").train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="is not an rf-callbacks checkpoint"):
        make_trainer(tokenizer, chat_data, sft_args, tmp_path / "x").train(resume_from_checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1 or None, got 0"):
        make_trainer(tokenizer, chat_data, sft_args, tmp_path / "y", checkpoint_every=0)
    with pytest.raises(ValueError, match="needs a freshly built trainer"):
        trainer.train(resume_from_checkpoint=True)


def test_outside_ops_after_the_last_checkpoint_are_replayed(tokenizer, chat_data, sft_args, tmp_path):
    """A stop sent over the socket (by "cli") after the last checkpoint is not lost when the process dies."""
    from transformers import TrainerCallback

    from rf_callbacks.ops import Op

    class StopThenCrash(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if self.trainer.active_run.name == "a" and state.global_step == 7:  # after b's chunk-1 checkpoint
                self.trainer.submit_op(Op("stop", "b", source="cli"))
                self.trainer.submit_op(Op("clone", "a", {"learning_rate": 1e-4}, name="a2", source="dashboard"))
            if self.trainer.active_run.name == "a" and state.global_step == 8:
                raise KeyboardInterrupt  # the process dies before the next checkpoint

    crashed = make_trainer(tokenizer, chat_data, sft_args, tmp_path)
    crashed.add_callback(StopThenCrash(crashed))
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert crashed.runs["b"].status == "stopped"  # applied before the crash, after the checkpoint
    resumed = make_trainer(tokenizer, chat_data, sft_args, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    rows = {row["name"]: row for row in resumed.results()}
    assert (rows["b"]["status"], rows["b"]["global_step"]) == ("stopped", 6)  # at the checkpoint's boundary
    assert rows["a"]["status"] == rows["a2"]["status"] == "completed"
    records = read_ledger(tmp_path / "ledger.jsonl")
    (resumed_record,) = [r for r in records if r["event"] == "resumed"]
    assert resumed_record["replayed_ops"] == 2
    replayed = [(r["op"], r["by"]) for r in records[records.index(resumed_record) :] if r["event"] == "op"]
    assert replayed == [("stop", "cli"), ("clone", "dashboard")]


def test_a_resume_keeps_a_disabled_policy_off_and_each_policy_its_memory(tokenizer, chat_data, sft_args, tmp_path):
    """The checkpoint pairs each state with the policy it came from, also after an earlier policy was disabled."""
    from transformers import TrainerCallback

    class Broken:
        def on_boundary(self, view):
            raise RuntimeError("policy bug")

    class Counter:  # its memory: how many boundaries it has seen
        def __init__(self):
            self.seen = 0

        def on_boundary(self, view):
            self.seen += 1
            return []

        def state_dict(self):
            return {"seen": self.seen}

        def load_state_dict(self, state):
            self.seen = state["seen"]

    class Crash(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if self.trainer.active_run.name == "a" and state.global_step == 8:
                raise KeyboardInterrupt

    alone = Counter()
    make_trainer(tokenizer, chat_data, sft_args, tmp_path / "alone", policies=[Broken(), alone]).train()
    crashed = make_trainer(tokenizer, chat_data, sft_args, tmp_path, policies=[Broken(), Counter()])
    crashed.add_callback(Crash(crashed))
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    counter = Counter()
    resumed = make_trainer(tokenizer, chat_data, sft_args, tmp_path, policies=[Broken(), counter])
    resumed.train(resume_from_checkpoint=True)
    assert counter.seen == alone.seen == 8  # 2 runs x 4 chunks, counted on from the checkpoint's value
    assert list(resumed._rf_policies) == [counter]
    records = read_ledger(tmp_path / "ledger.jsonl")
    assert [r["policy"] for r in records if r["event"] == "policy_error"] == ["Broken"]  # not asked again
