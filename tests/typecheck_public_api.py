"""The public API as a user's script uses it, for the type checker (`make lint` runs mypy on this file).

Nothing here runs in the test suite (the functions are never called): mypy checks that these calls agree with the
public signatures and return types, so a change that breaks a user's typed script fails `make lint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, GRPOConfig, SFTConfig

from rf_callbacks import Experiment, RFDPOTrainer, RFGRPOTrainer, RFSFTTrainer
from rf_callbacks.automl import List, Range, RFGridSearch, RFLoraConfig, RFModelConfig, RFRandomSearch, RFSFTConfig
from rf_callbacks.dashboard import Dashboard
from rf_callbacks.demo import demo_datasets, tiny_model_and_tokenizer
from rf_callbacks.ledger import format_leaderboard, read_ledger, results_from_dir
from rf_callbacks.ops import Op
from rf_callbacks.plotting import plot_ledger
from rf_callbacks.policies import DivergenceGuard, Explore, MedianStopping, SuccessiveHalving


def sft_script() -> str:
    model, tokenizer = tiny_model_and_tokenizer(hidden_size=128)
    train, val = demo_datasets()
    configs: list[dict[str, Any]] = [
        {"name": "a", "peft_config": LoraConfig(r=4, target_modules="all-linear"), "learning_rate": 1e-3},
        {"peft_config": LoraConfig(r=16, target_modules="all-linear"), "per_device_train_batch_size": 4},
    ]
    trainer = RFSFTTrainer(
        model=model,
        args=SFTConfig(output_dir="out", max_steps=20, bf16=False),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        configs=configs,
        num_chunks=4,
        policies=[SuccessiveHalving(metric="eval_loss", eta=2), DivergenceGuard(max_ratio=3.0)],
        boundary_eval=False,
        fused=True,
        max_fused="auto",
        oom_retry=False,
    )
    trainer.train()
    rows: list[dict[str, Any]] = trainer.results()
    trainer.select_run(rows[0]["name"])
    trainer.stop("a")
    trainer.resume("a")
    child: str = trainer.clone("a", {"learning_rate": 5e-4}, warm_start=True)
    trainer.delete(child)
    trainer.submit_op(Op("stop", "a", reason="by hand"))
    reply: dict[str, Any] = trainer.handle_request({"op": "ls"})
    assert reply["ok"]
    return format_leaderboard(rows, metric="eval_loss")


def dpo_and_grpo_scripts(model: Any, tokenizer: Any, pairs: Dataset, prompts: Dataset) -> None:
    RFDPOTrainer(
        model=model,
        args=DPOConfig(output_dir="dpo", max_steps=10),
        train_dataset=pairs,
        processing_class=tokenizer,
        configs=[{"peft_config": LoraConfig(r=8), "beta": 0.1}],
        num_chunks=2,
    ).train()

    def reward(completions: list[Any], **kwargs: Any) -> list[float]:
        return [float(len(str(c))) for c in completions]

    RFGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=GRPOConfig(output_dir="grpo", num_generations=4, max_steps=10),
        train_dataset=prompts,
        processing_class=tokenizer,
        configs=[{"peft_config": LoraConfig(r=8), "temperature": 0.7}],
        policies=[MedianStopping(metric="reward", mode="max"), Explore(top=1, interval=2)],
    ).train()


def mistyped_options(model: Any, train: Dataset) -> None:
    """The engine options are typed: mypy refuses a misspelt one and a wrong type (`warn_unused_ignores` fails
    `make lint` if it stops refusing them)."""
    RFSFTTrainer(model=model, train_dataset=train, configs=[{}], num_chunk=4)  # type: ignore[call-arg]
    RFDPOTrainer(model=model, train_dataset=train, fused="yes")  # type: ignore[arg-type]
    RFGRPOTrainer(model=model, reward_funcs=len, train_dataset=train, checkpoint_every="2")  # type: ignore[arg-type]


def rapidfire_script(train: Dataset, val: Dataset) -> None:
    configs = List(
        [
            RFModelConfig(
                model_name="some/model",
                peft_config=RFLoraConfig(r=List([4, 16]), lora_alpha=16),
                training_args=RFSFTConfig(learning_rate=Range(1e-4, 1e-3, log=True), max_steps=20),
            )
        ]
    )
    experiment = Experiment(experiment_name="typed", experiment_path="rf_experiments")
    experiment.run_fit(RFRandomSearch(configs=configs, trainer_type="SFT", num_runs=2, seed=0), None, train, val)
    experiment.run_fit(RFGridSearch(configs=List([1e-3, 1e-4]), trainer_type="SFT"), None, train, num_chunks=2)
    experiment.get_results()
    experiment.get_runs_info()
    experiment.end()


def output_folder_tools(folder: Path) -> None:
    entries: list[dict[str, Any]] = read_ledger(folder / "ledger.jsonl")
    assert entries
    print(format_leaderboard(results_from_dir(folder)))
    plot_ledger(folder / "ledger.jsonl", folder / "losses.png")
    dashboard = Dashboard(folder)
    url: str = dashboard.start()
    print(url)
    dashboard.stop()
