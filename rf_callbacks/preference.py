"""Preference data and checks for `RFDPOTrainer`: the bundled preference pairs (`load_preferences`) and the per-run
DPO field checks. The reference model's helpers, shared with GRPO, are `trainers/reference.py`."""

from __future__ import annotations

import json
import math
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
