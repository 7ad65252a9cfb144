"""Per-run tracking: one MLflow run per rf run in a real sqlite store, read back with MLflow's own client."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from peft import LoraConfig
from transformers import set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.reporting import read_ledger


def test_mlflow_gets_one_run_per_config(tokenizer, chat_data, sft_args, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rf-test")
    out = tmp_path / "out"
    set_seed(0)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), max_steps=6, report_to="mlflow"),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=[
            {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
            {"name": "b", "peft_config": LoraConfig(r=8, target_modules=["v_proj"]), "learning_rate": 5e-3},
        ],
        num_chunks=2,
    )
    trainer.train()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rf-test")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"a", "b"}
    ledger = read_ledger(out / "ledger.jsonl")
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["r"] == ("4" if name == "a" else "8")
        history = client.get_metric_history(run.info.run_id, "train/loss")
        expected = [(r["step"], r["loss"]) for r in ledger if r["run"] == name and "loss" in r]
        assert [m.step for m in history] == [step for step, _ in expected]
        assert [m.value for m in history] == pytest.approx([loss for _, loss in expected])
        assert client.get_metric_history(run.info.run_id, "eval/loss")
        assert {m.value for m in client.get_metric_history(run.info.run_id, "chunk")} == {0.0, 1.0}
    assert runs["b"].data.params["learning_rate"] == "0.005"
