"""A RapidFire AI fine-tuning script, run by rf-callbacks: only the two import lines differ.

    python examples/rapidfire_style.py                       # embedded tiny model + bundled data, ~10 s on a CPU
    python examples/rapidfire_style.py --model HuggingFaceTB/SmolLM2-135M-Instruct --max-steps 64
    python examples/rapidfire_style.py --random 4            # 4 runs drawn by RFRandomSearch instead of the grid

It prints the per-step results DataFrame (the last evaluation of each run) and the runs table; adapters, ledgers and
`runs.json` are under `rf_experiments/<experiment_name>/`.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rf_callbacks import Experiment  # was: from rapidfireai import Experiment
from rf_callbacks.automl import (  # was: from rapidfireai.automl import ...
    List,
    Range,
    RFGridSearch,
    RFLoraConfig,
    RFModelConfig,
    RFRandomSearch,
    RFSFTConfig,
)
from rf_callbacks.demo import build_tiny_model, build_tokenizer, load_instructions

TINY = "rf-callbacks/embedded-tiny-llama"  # a name our create_model understands; any hub id or path works too


def to_prompt_completion(row):
    return {
        "prompt": [{"role": "user", "content": row["instruction"]}],
        "completion": [{"role": "assistant", "content": row["response"]}],
    }


def exact_match(eval_preds):
    """RapidFire AI's generation-metrics contract: decoded predictions and references, as two lists of strings."""
    predictions, references = eval_preds
    return {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)}


def create_model(model_config):
    """Called once per distinct base with a dict holding model_name, model_type, model_kwargs, tokenizer, ..."""
    name = model_config["model_name"]
    if name == TINY:
        tokenizer = build_tokenizer()
        return build_tiny_model(tokenizer, hidden_size=128), tokenizer
    model = AutoModelForCausalLM.from_pretrained(name, **model_config["model_kwargs"])
    return model, AutoTokenizer.from_pretrained(model_config["tokenizer"] or name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY, help="hub id or local path (default: the embedded tiny Llama)")
    parser.add_argument("--max-steps", type=int, default=32)
    parser.add_argument("--random", type=int, default=0, help="draw this many runs with RFRandomSearch")
    args = parser.parse_args()

    data = load_instructions().shuffle(seed=0)
    train_dataset, eval_dataset = data.select(range(256)), data.select(range(256, 272))
    on_gpu = torch.cuda.is_available()  # on a CPU the experiment turns fp16/bf16 off anyway

    if args.random:
        configs = RFModelConfig(
            model_name=args.model,
            peft_config=RFLoraConfig(r=List([4, 8, 16]), lora_alpha=16, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=Range(1e-4, 1e-2, log=True), max_steps=args.max_steps, fp16=on_gpu
            ),
            formatting_func=to_prompt_completion,
        )
        config_group = RFRandomSearch(configs, trainer_type="SFT", num_runs=args.random, seed=2)
    else:
        configs = List(
            [
                RFModelConfig(
                    model_name=args.model,
                    peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                    training_args=RFSFTConfig(learning_rate=1e-3, max_steps=args.max_steps, fp16=on_gpu),
                    formatting_func=to_prompt_completion,
                    compute_metrics=exact_match,
                    generation_config={"max_new_tokens": 16, "do_sample": False},
                ),
                RFModelConfig(
                    model_name=args.model,
                    peft_config=RFLoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"]),
                    training_args=RFSFTConfig(learning_rate=List([1e-4, 1e-3]), max_steps=args.max_steps),
                    formatting_func=to_prompt_completion,
                ),
            ]
        )
        config_group = RFGridSearch(configs=configs, trainer_type="SFT")

    experiment = Experiment(experiment_name="sft-comparison")
    experiment.run_fit(config_group, create_model, train_dataset, eval_dataset=eval_dataset, num_chunks=4, seed=42)
    results = experiment.get_results()
    last_eval = results.dropna(subset=["eval_loss"]).groupby("run_id").last()
    columns = [
        c for c in ("step", "config.r", "config.learning_rate", "eval_loss", "eval_exact_match") if c in last_eval
    ]
    print(last_eval[columns].to_string(), end="\n\n")
    info = experiment.get_runs_info()
    print(info[["run_id", "status", "global_step", "chunks_done", "eval_loss", "output_dir"]].to_string(index=False))
    experiment.end()


if __name__ == "__main__":
    main()
