"""Compare GRPO configs at once with `RFGRPOTrainer`: learning rate x temperature x KL weight x group size, with
verifiable rewards, one base model in memory.

The prompts are the arithmetic, counting and sorting questions of the bundled instruction set, each with its numeric
answer; two reward functions score every completion: `correct_answer` (1 when the last number in the completion is the
answer) and `says_a_number` (1 when the completion holds a number at all, a format reward a small model learns fast).
By default the model is the embedded tiny Llama (random weights, so expect the format reward to move, not the answers):

    python examples/grpo_compare.py
    python examples/grpo_compare.py --model HuggingFaceTB/SmolLM2-135M-Instruct --max-steps 100

Completions are generated with the active run's adapter; each run keeps its own generation buffer and metrics. It
prints a leaderboard ranked by the mean reward on 8 held-out prompts (evaluated at every chunk boundary), then each
run's last train reward, per-function rewards and completion length.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from math import nan

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, set_seed
from trl import GRPOConfig

from rf_callbacks import RFGRPOTrainer
from rf_callbacks.demo import load_instructions, tiny_model_and_tokenizer
from rf_callbacks.ledger import format_leaderboard

NUMBER = re.compile(r"-?\d+")


def numeric_prompts() -> Dataset:
    """Bundled questions whose answer is a number: conversational prompts with an `answer` column."""
    rows = []
    for row in load_instructions():
        numbers = NUMBER.findall(row["response"])
        if numbers and NUMBER.search(row["instruction"]):
            rows.append({"prompt": [{"role": "user", "content": row["instruction"]}], "answer": numbers[-1]})
    return Dataset.from_list(rows)


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct_answer(completions, answer, **kwargs) -> list[float]:
    found = [NUMBER.findall(_text(completion)) for completion in completions]
    return [1.0 if numbers and numbers[-1] == expected else 0.0 for numbers, expected in zip(found, answer)]


def says_a_number(completions, **kwargs) -> list[float]:
    return [1.0 if NUMBER.search(_text(completion)) else 0.0 for completion in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or local path (default: the embedded tiny Llama)")
    parser.add_argument("--output-dir", default="rf_grpo_out")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--num-chunks", type=int, default=4)
    args = parser.parse_args()

    shutil.rmtree(args.output_dir, ignore_errors=True)
    set_seed(42)
    if args.model:
        model, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = tiny_model_and_tokenizer(hidden_size=128, num_layers=2)
    prompts = numeric_prompts()
    # 48 prompts: with 4 completions each and one generation batch per 2 steps, an epoch is 24 optimizer steps.
    train, val = prompts.select(range(48)), prompts.select(range(48, 56))
    on_gpu = torch.cuda.is_available()

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    configs = [
        {"name": "lr1e-3", "peft_config": lora, "learning_rate": 1e-3},
        {"name": "lr5e-3", "peft_config": lora, "learning_rate": 5e-3},
        {"name": "lr5e-3-t0.7", "peft_config": lora, "learning_rate": 5e-3, "temperature": 0.7, "beta": 0.04},
        {"name": "lr5e-3-g8", "peft_config": lora, "learning_rate": 5e-3, "num_generations": 8},
    ]
    training_args = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        steps_per_generation=2,  # one generation batch (16 completions) serves 2 optimizer steps
        per_device_eval_batch_size=16,
        logging_steps=2,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),  # TRL's bf16 default is 10-30x slower on a CPU
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=42,
    )
    trainer = RFGRPOTrainer(
        model=model,
        reward_funcs=[correct_answer, says_a_number],
        args=training_args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        configs=configs,
        num_chunks=args.num_chunks,
    )
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started

    results = trainer.results()
    print(f"\n{len(configs)} GRPO configs x {args.max_steps} steps in {elapsed:.1f} s, one base model in memory\n")
    print(format_leaderboard(results, metric="eval_reward", greater_is_better=True))
    print("\nrun           reward  reward_std  correct_answer  says_a_number  completion length")
    for row in results:
        values = [row.get(key, nan) for key in ("reward", "reward_std", "rewards/correct_answer/mean")]
        values += [row.get("rewards/says_a_number/mean", nan), row.get("completions/mean_length", nan)]
        print(
            f"{row['name']:<12} "
            + "  ".join(f"{value:>{width}.3f}" for value, width in zip(values, (7, 10, 14, 13, 17)))
        )
    print(f"\nadapters: {args.output_dir}/runs/<run>/ (load with PeftModel.from_pretrained)")
    print(f"ledger:   {args.output_dir}/ledger.jsonl")
    trainer.close()


if __name__ == "__main__":
    main()
