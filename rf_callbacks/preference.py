"""Helpers for the preference and RL trainers (`RFDPOTrainer`): per-run DPO field checks, the reference model
(the shared base with adapters disabled) and the bundled preference pairs.

TRL's `DPOTrainer`, handed a `PeftModel` and no `ref_model`, copies the model's "default" adapter into a frozen "ref"
adapter and uses it as the reference. Every run here starts from a fresh LoRA (B = 0), whose model equals the base,
so the reference is the base with adapters disabled, computed once for all runs: `no_ref_adapter_copy` keeps TRL from
adding that copy (which would also fail: run adapters are named after the runs, not "default").
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from importlib import resources
from typing import Any

from .configs import RunSpec

DPO_LOSS_TYPES = frozenset(
    {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
        "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }
)  # fmt: skip
# Loss types built on the chosen-rejected reward difference: the only ones `f_divergence_type` may change.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Fields of `DPOConfig` that are shared by all runs, with the reason (used in the error for a per-run override).
DPO_PROCESS_WIDE_REASONS = {
    "precompute_ref_log_probs": "the reference log-probs are computed once from the shared base for all runs",
    "precompute_ref_batch_size": "the reference log-probs are computed once from the shared base for all runs",
    "use_weighting": "it changes the fused LM head patched on the shared base model",
    "sync_ref_model": "the reference is the shared base model (not supported with PEFT)",
    "disable_dropout": "dropout is switched off on the shared base model",
    "padding_free": "the collator setting is shared",
    "activation_offloading": "it wraps the shared base model",
}


def load_preferences(conversational: bool = False):
    """
    Load the bundled preference pairs (`rf_callbacks/data/preferences.jsonl`, see `make_preferences.py`).

    Args:
        conversational (`bool`, *optional*, defaults to `False`):
            Return TRL's conversational preference format (`prompt` a list with one user message, `chosen` and
            `rejected` lists with one assistant message) instead of plain strings.

    Returns:
        `datasets.Dataset`: 520 rows with columns `prompt`, `chosen`, `rejected`.
    """
    from datasets import Dataset

    path = resources.files("rf_callbacks") / "data" / "preferences.jsonl"
    with path.open("r", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if conversational:
        rows = [
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            for row in rows
        ]
    return Dataset.from_list(rows)


def validate_dpo_specs(specs: list[RunSpec]) -> None:
    """Refuse, before any work, per-run DPO values that `DPOTrainer` would refuse (or fail on) only later."""
    for index, spec in enumerate(specs):
        where = f"configs[{index}] ({spec.name!r})"
        args = spec.args

        def bad(key: str, value: Any, rule: str, where: str = where) -> ValueError:
            return ValueError(f"{where}: {key}={value!r} is invalid; {rule}")

        beta = args.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise bad("beta", beta, "it must be a finite number > 0")
        loss_types = args.loss_type
        if not loss_types or not all(isinstance(item, str) for item in loss_types):
            raise bad("loss_type", loss_types, "use a loss name or a non-empty list of names")
        unknown = [item for item in loss_types if item not in DPO_LOSS_TYPES]
        if unknown:
            raise bad("loss_type", spec.overrides.get("loss_type", loss_types), f"unknown {unknown[0]!r}; use one of "
                      f"{', '.join(sorted(DPO_LOSS_TYPES))}")  # fmt: skip
        weights = args.loss_weights
        if weights is not None and not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise bad("loss_weights", weights, "it must be a list of finite numbers, one per loss_type")
        smoothing = args.label_smoothing
        if not 0.0 <= smoothing < 1.0:
            raise bad("label_smoothing", smoothing, "it must be in [0, 1) (in [0, 0.5) for the 'robust' loss)")
        if "robust" in loss_types and not smoothing < 0.5:
            raise bad("label_smoothing", smoothing, "the 'robust' loss needs it in [0, 0.5)")
        if "exo_pair" in loss_types and smoothing == 0.0:
            raise bad("label_smoothing", smoothing, "the 'exo_pair' loss needs it > 0 (the EXO paper uses 1e-3)")
        if args.ld_alpha is not None and not 0.0 <= args.ld_alpha <= 1.0:
            raise bad("ld_alpha", args.ld_alpha, "it must be in [0, 1], or None")
        if args.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise bad("f_divergence_type", args.f_divergence_type, f"use one of {', '.join(F_DIVERGENCE_TYPES)}")
        if args.f_divergence_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
            raise bad(
                "f_divergence_type",
                args.f_divergence_type,
                f"loss_type {loss_types} supports only 'reverse_kl' (other divergences: "
                f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))})",
            )
        if args.max_length is not None and args.max_length < 1:
            raise bad("max_length", args.max_length, "it must be >= 1, or None for no truncation")
        if args.truncation_mode not in ("keep_start", "keep_end"):
            raise bad("truncation_mode", args.truncation_mode, "use 'keep_start' or 'keep_end'")


@contextlib.contextmanager
def no_ref_adapter_copy(model) -> Iterator[None]:
    """While a TRL preference or RL trainer is built around `model` (a `PeftModel` holding one fresh adapter per run),
    keep it from adding its frozen "ref" adapter copy, so the reference stays the shared base with adapters disabled.

    TRL reads `model.peft_config["default"]` and calls `model.add_adapter("ref", ...)`, then copies the "default"
    weights into it; the first is answered with the first run's config and the second is skipped. A run named
    "default" has weights TRL copies: its copy is made, then deleted. Everything is undone on exit.
    """
    configs = model.peft_config
    alias = "default" not in configs
    original = model.add_adapter
    if alias:
        configs["default"] = next(iter(configs.values()))

        def add_adapter(adapter_name, peft_config, *args, **kwargs):
            if adapter_name == "ref":
                return None
            return original(adapter_name, peft_config, *args, **kwargs)

        model.add_adapter = add_adapter
    try:
        yield
    finally:
        if alias:
            del model.add_adapter
            configs.pop("default", None)
        elif "ref" in model.peft_config:
            active = model.active_adapter
            model.delete_adapter("ref")
            model.set_adapter(active if active != "ref" else "default")
    if "ref" in model.peft_config:
        raise RuntimeError("TRL added a 'ref' adapter copy; the reference must be the shared base")


def refuse_ref_name(specs: list[RunSpec]) -> None:
    """TRL treats an adapter named "ref" as the reference model: no run may be called that."""
    for index, spec in enumerate(specs):
        if spec.adapter_name == "ref":
            raise ValueError(
                f"configs[{index}] ({spec.name!r}): name='ref' is reserved (TRL uses an adapter named 'ref' as the "
                "reference model); choose another name"
            )


# Fields of `GRPOConfig` that are shared by all runs, with the reason (used in the error for a per-run override).
GRPO_PROCESS_WIDE_REASONS = {
    "use_vllm": "the generation backend serves the shared base model",
    "vllm_mode": "the generation backend serves the shared base model",
    "use_transformers_continuous_batching": "the generation backend serves the shared base model",
    "shuffle_dataset": "all runs see the same prompts in the same order",
    "sync_ref_model": "the reference is the shared base model (not supported with PEFT)",
    "disable_dropout": "dropout is switched off on the shared base model",
    "cache_implementation": "the generation cache is set once for the shared base model",
}
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")


def validate_grpo_specs(specs: list[RunSpec], num_reward_funcs: int, evaluates: bool = False) -> None:
    """Refuse, before any work, per-run GRPO values that `GRPOTrainer` would refuse (or fail on) only later.
    `evaluates`: runs will be evaluated (an eval set is given: at chunk boundaries even with `eval_strategy="no"`,
    where `GRPOConfig` skips its own eval-batch check)."""
    for index, spec in enumerate(specs):
        where = f"configs[{index}] ({spec.name!r})"
        args = spec.args

        def bad(key: str, value: Any, rule: str, where: str = where) -> ValueError:
            return ValueError(f"{where}: {key}={value!r} is invalid; {rule}")

        if args.num_generations < 2:
            raise bad("num_generations", args.num_generations, "GRPO needs at least 2 completions per prompt")
        if args.generation_batch_size % args.num_generations:
            raise bad(
                "num_generations",
                args.num_generations,
                f"the run's generation batch ({args.generation_batch_size} = per_device_train_batch_size "
                f"{args.per_device_train_batch_size} x steps_per_generation {args.steps_per_generation}) must be "
                "divisible by it",
            )
        if args.max_completion_length is not None and args.max_completion_length < 1:
            raise bad("max_completion_length", args.max_completion_length, "it must be >= 1")
        if not args.temperature > 0:
            raise bad("temperature", args.temperature, "it must be > 0 (sampling needs a positive temperature)")
        if not 0 < args.top_p <= 1:
            raise bad("top_p", args.top_p, "it must be in (0, 1]")
        if args.top_k is not None and args.top_k < 0:
            raise bad("top_k", args.top_k, "it must be >= 0 (0 turns top-k filtering off)")
        if args.importance_sampling_level not in ("token", "sequence"):
            raise bad("importance_sampling_level", args.importance_sampling_level, "use 'token' or 'sequence'")
        eval_generations = args.num_generations_eval or args.num_generations
        if evaluates and (args.per_device_eval_batch_size * args.world_size) % eval_generations:
            raise bad(
                "num_generations_eval" if args.num_generations_eval else "num_generations",
                eval_generations,
                f"the run is evaluated (an eval_dataset is given) and its eval batch (per_device_eval_batch_size "
                f"{args.per_device_eval_batch_size} x {args.world_size} processes) must be divisible by it",
            )
        if args.num_iterations < 1:
            raise bad("num_iterations", args.num_iterations, "it must be >= 1")
        if args.beta < 0:
            raise bad("beta", args.beta, "it must be >= 0 (0 turns the KL term off)")
        if args.epsilon < 0:
            raise bad("epsilon", args.epsilon, "it must be >= 0")
        if args.loss_type not in GRPO_LOSS_TYPES:
            raise bad("loss_type", args.loss_type, f"use one of {', '.join(GRPO_LOSS_TYPES)}")
        if args.scale_rewards not in GRPO_SCALE_REWARDS:
            raise bad("scale_rewards", args.scale_rewards, f"use one of {', '.join(GRPO_SCALE_REWARDS)}, True, False")
        weights = args.reward_weights
        finite = weights is None or all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        )
        if weights is not None and (len(weights) != num_reward_funcs or not finite):
            raise bad("reward_weights", weights, f"give one finite number per reward function ({num_reward_funcs})")
