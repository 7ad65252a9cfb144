"""Generation metrics at evaluation time: RapidFire AI's `compute_metrics` + `generation_config` contract.

When a run's `RFModelConfig` sets both, every evaluation of that run (each chunk boundary, plus any `eval_strategy`
evaluations) also generates a completion for every eval row with the run's adapter active, decodes the new tokens
(`skip_special_tokens=True`, stripped) and calls `compute_metrics((predictions, references))` with two lists of
strings. The returned `{name: number}` is logged as `eval_<name>` at the run's step, so it lands in the ledger, the
run's `log_history`, MLflow and `Experiment.get_results()`.

Prompts and references come from the formatted eval rows as in RapidFire AI: `prompt`+`completion` (a
conversational prompt goes through the chat template with `add_generation_prompt=True`; the reference is the last
completion message's content), `messages` (all but the last turn; the last turn's content), `input`+`output`,
`instruction`+`response`. `generation_config` holds `model.generate()` arguments, plus `max_input_length`,
`add_generation_prompt` and `truncation_side` for the prompt side. Generation runs under a forked RNG, so sampling
never shifts a run's dropout masks or data order. One callback serves all runs of a trainer; it picks the active
run from `args.output_dir` (`<output_dir>/runs/<name>`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_PROMPT_KEYS = ("max_input_length", "add_generation_prompt", "truncation_side")


def prompts_and_references(rows, tokenizer, add_generation_prompt: bool = True) -> tuple[list[str], list[str]]:
    """(prompt text, reference text) pairs from formatted rows; rows without a usable pair are skipped."""
    prompts, references = [], []
    for row in rows:
        prompt = reference = None
        if "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            reference = completion[-1]["content"] if isinstance(completion, list) else completion
        elif "messages" in row and len(row["messages"]) >= 2:
            prompt, reference = row["messages"][:-1], row["messages"][-1]["content"]
        elif "input" in row and "output" in row:
            prompt, reference = row["input"], row["output"]
        elif "instruction" in row and "response" in row:
            prompt, reference = row["instruction"], row["response"]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
        if isinstance(prompt, str) and prompt.strip() and isinstance(reference, str) and reference.strip():
            prompts.append(prompt)
            references.append(reference.strip())
    return prompts, references


@torch.no_grad()
def generate_predictions(model, tokenizer, prompts: list[str], generation_config: dict, batch_size: int) -> list[str]:
    """Greedy or sampled completions of `prompts`, left-padded in batches, new tokens only, decoded and stripped."""
    kwargs = dict(generation_config)
    max_input_length = kwargs.pop("max_input_length", None)
    truncation_side = kwargs.pop("truncation_side", "left")
    kwargs.pop("add_generation_prompt", None)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    device = next(model.parameters()).device
    saved = (tokenizer.padding_side, tokenizer.truncation_side)
    tokenizer.padding_side, tokenizer.truncation_side = "left", truncation_side
    predictions = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=max_input_length is not None,
                max_length=max_input_length,
                add_special_tokens=False,  # chat templates already hold the BOS token
            ).to(device)
            output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            predictions.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved
    return predictions


class GenerationMetricsCallback(TrainerCallback):
    """Generates on the eval rows and logs `compute_metrics((predictions, references))` for the runs that ask for it.

    Args:
        eval_rows (`datasets.Dataset` or `list[dict]`): The formatted (not tokenized) eval data.
        per_run (`dict[str, tuple[Callable, dict]]`): Run name -> (compute_metrics, generation_config).
    """

    def __init__(self, eval_rows, per_run: dict[str, tuple[Any, dict]]):
        self.eval_rows = eval_rows
        self.per_run = per_run
        self.trainer = None  # set by whoever adds the callback: metrics are logged through `trainer.log`
        self._pairs: dict[bool, tuple[list[str], list[str]]] = {}

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        entry = self.per_run.get(Path(args.output_dir).name)
        if entry is None or model is None or self.trainer is None:
            return
        compute_metrics, generation_config = entry
        tokenizer = processing_class if processing_class is not None else self.trainer.processing_class
        add_prompt = bool(generation_config.get("add_generation_prompt", True))
        if add_prompt not in self._pairs:
            self._pairs[add_prompt] = prompts_and_references(self.eval_rows, tokenizer, add_prompt)
        prompts, references = self._pairs[add_prompt]
        if not prompts:
            return
        was_training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(args.seed)
                predictions = generate_predictions(
                    model, tokenizer, prompts, generation_config, args.per_device_eval_batch_size
                )
            metrics = compute_metrics((predictions, references))
        except Exception:  # a metric bug must not kill the other runs; the evaluation's loss is already logged
            logger.exception("compute_metrics with generation failed for run %s", Path(args.output_dir).name)
            return
        finally:
            model.train(was_training)
        if not isinstance(metrics, dict):
            logger.warning("compute_metrics returned %s, not a dict; ignored", type(metrics).__name__)
            return
        logs = {(key if key.startswith("eval_") else f"eval_{key}"): value for key, value in metrics.items()}
        self.trainer.log(logs)
