"""Per-run checks of `RFGRPOTrainer`: values `GRPOTrainer` would refuse (or fail on) only later, refused before any
work with the run and the field named."""

from __future__ import annotations

import math
from typing import Any

from ..configs import RunSpec

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
