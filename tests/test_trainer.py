"""Behaviour of a multi-run training: chunk-major order, boundary evals, artifacts, results, isolation, drop-in use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cpu_sft_config
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, TrainerCallback, set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger

CONFIGS = [
    {"name": "a", "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])},
    {
        "name": "b",
        "peft_config": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        "learning_rate": 3e-3,
        "max_length": 24,
    },
]


def cpu_args(output_dir, **overrides):
    return cpu_sft_config(output_dir, **{"logging_steps": 2, "seed": 3, **overrides})


@pytest.fixture(scope="module")
def trained(tokenizer, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-runs")
    set_seed(3)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_args(out),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=CONFIGS,
        num_chunks=3,
    )
    output = trainer.train()
    return trainer, output, out


def test_results(trained):
    trainer, output, _ = trained
    rows = {row["name"]: row for row in trainer.results()}
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        assert row["status"] == "completed"
        assert row["global_step"] == row["max_steps"] == 12
        assert row["parent"] is None and row["error"] is None
        assert isinstance(row["train_loss"], float) and isinstance(row["eval_loss"], float)
        assert row["chunks_done"] == trainer.runs[row["name"]].plan.num_slices
        assert row["wall_time"] > 0
    # 96 rows / batch 4 = 24 steps per epoch, 8 per chunk: 12 steps end inside the second chunk
    assert rows["a"]["chunks_done"] == 2
    assert rows["b"]["config"]["learning_rate"] == 3e-3
    assert rows["b"]["config"]["target_modules"] == "all-linear"
    assert output.global_step == 24
    assert set(output.metrics) == {"a/train_loss", "b/train_loss"}


def test_runs_maps_names_to_runs(trained):
    trainer, _, _ = trained
    runs = trainer.runs
    assert "a" in runs and "b" in runs and "zzz" not in runs
    assert runs["a"] in runs  # a Run object works too
    assert len(runs) == 2 and list(runs.keys()) == ["a", "b"]
    assert [(name, run.name) for name, run in runs.items()] == [("a", "a"), ("b", "b")]
    assert [run.name for run in runs] == [run.name for run in runs.values()] == ["a", "b"]  # iterating yields runs
    with pytest.raises(KeyError, match="unknown run 'zzz'; runs are"):
        runs["zzz"]
    # short, unlike the dataclass repr, which printed every parked tensor
    assert repr(runs["a"]) == "Run(name='a', status='completed', global_step=12/12, chunks_done=2)"
    assert repr(runs).startswith("Coordinator([Run(name='a', ") and len(repr(runs)) < 300


def test_each_run_is_evaluated_at_every_boundary(trained):
    trainer, _, _ = trained
    for run in trainer.runs:
        evals = [entry["step"] for entry in run.state.log_history if "eval_loss" in entry]
        chunk_ends = [run.plan.chunk_bounds(chunk)[1] for chunk in range(run.plan.num_slices - 1)]
        assert evals == [*chunk_ends, 12]


def test_ledger_shows_chunk_major_order(trained):
    trainer, _, out = trained
    records = read_ledger(out / "ledger.jsonl")
    assert all({"time", "run", "step", "chunk", "event"} <= record.keys() for record in records)
    times = [record["time"] for record in records]
    assert times == sorted(times)
    # the sequence of (run, chunk) slices, as the runs really trained
    slices = []
    for record in records:
        if record["event"] == "log" and "loss" in record:
            key = (record["run"], record["chunk"])
            if not slices or slices[-1] != key:
                slices.append(key)
    slices_of = {run.name: run.plan.num_slices for run in trainer.runs}
    expected = [(name, k) for k in range(3) for name in ("a", "b") if k < slices_of[name]]
    assert slices == expected
    statuses = [(record["run"], record["status"]) for record in records if record["event"] == "status"]
    assert statuses == [("a", "running"), ("b", "running"), ("a", "completed"), ("b", "completed")]
    assert sum(1 for record in records if "eval_loss" in record) == sum(slices_of.values())


def test_adapters_are_saved_in_peft_format(trained, tokenizer):
    trainer, _, out = trained
    experiment = json.loads((out / "experiment.json").read_text())
    assert experiment["num_chunks"] == 3 and [run["name"] for run in experiment["runs"]] == ["a", "b"]
    for name in ("a", "b"):
        run_dir = out / "runs" / name
        assert (run_dir / "adapter_config.json").exists() and (run_dir / "adapter_model.safetensors").exists()
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "completed" and info["global_step"] == 12 and info["name"] == name
        loaded = PeftModel.from_pretrained(build_tiny_model(tokenizer), str(run_dir))
        saved = get_peft_model_state_dict(loaded)
        trained_weights = get_peft_model_state_dict(trainer.model, adapter_name=name)
        assert saved.keys() == trained_weights.keys()
        assert all(torch.equal(saved[key], trained_weights[key]) for key in saved)


def test_per_run_max_length_gets_its_own_prepared_data(trained):
    trainer, _, _ = trained
    assert len(trainer._rf_datasets) == 2
    lengths = [len(ids) for ids in trainer._rf_datasets[trainer.runs["b"].data_key][0]["input_ids"]]
    assert max(lengths) <= 24
    assert max(len(ids) for ids in trainer._rf_datasets[trainer.runs["a"].data_key][0]["input_ids"]) > 24


def test_select_run_then_save_model(trained, tokenizer, tmp_path):
    trainer, _, _ = trained
    trainer.select_run("a")
    trainer.save_model(str(tmp_path / "export"))
    loaded = PeftModel.from_pretrained(build_tiny_model(tokenizer), str(tmp_path / "export"))
    expected = get_peft_model_state_dict(trainer.model, adapter_name="a")
    assert all(torch.equal(value, expected[key]) for key, value in get_peft_model_state_dict(loaded).items())
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(trainer.runs["a"].last_logged("eval_loss"), rel=1e-6)


def test_one_empty_config_trains_one_run_from_peft_config(tokenizer, chat_data, tmp_path):
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_args(tmp_path, max_steps=4),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        configs=[{}],
    )
    output = trainer.train()
    assert [row["name"] for row in trainer.results()] == ["run-1"]
    assert output.global_step == 4 and output.training_loss > 0 and "train_runtime" in output.metrics
    # after training the trainer is that run, as SFTTrainer would be
    assert trainer.state.global_step == 4
    assert (tmp_path / "runs" / "run-1" / "adapter_model.safetensors").exists()


def test_single_run_without_peft_is_full_fine_tuning(tokenizer, chat_data, tmp_path):
    model = build_tiny_model(tokenizer)
    before = model.model.embed_tokens.weight.detach().clone()
    trainer = RFSFTTrainer(
        model=model,
        args=cpu_args(tmp_path, max_steps=3),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        num_chunks=2,
    )
    trainer.train()
    assert not torch.equal(before, model.model.embed_tokens.weight)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "runs" / "run-1"))
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


class FailRun(TrainerCallback):
    def __init__(self, trainer, name):
        self.trainer, self.name = trainer, name

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer.active_run.name == self.name and state.global_step == 5:
            raise RuntimeError("injected fault")


def test_a_failing_run_does_not_stop_the_others(tokenizer, chat_data, tmp_path):
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_args(tmp_path),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=CONFIGS,
        num_chunks=3,
    )
    trainer.add_callback(FailRun(trainer, "b"))
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["a"]["status"] == "completed" and rows["a"]["global_step"] == 12
    assert rows["b"]["status"] == "failed" and rows["b"]["error"] == "RuntimeError: injected fault"
    info = json.loads((Path(tmp_path) / "runs" / "b" / "run.json").read_text())
    assert info["status"] == "failed" and "injected fault" in info["error"]
