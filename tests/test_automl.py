"""RapidFire-style configs and searches: drop-in RF*Config classes, grid/random expansion, leaf checks; no training."""

from __future__ import annotations

import math
import random

import pytest
from peft import LoraConfig
from trl import DPOConfig, SFTConfig

from rf_callbacks.automl import (
    List,
    Range,
    RFDPOConfig,
    RFGridSearch,
    RFLoraConfig,
    RFModelConfig,
    RFRandomSearch,
    RFSFTConfig,
)
from rf_callbacks.automl.plan import leaf_args
from rf_callbacks.automl.space import has_space

LORA = {"target_modules": ["q_proj", "v_proj"]}


def model_config(**overrides):
    values = {
        "model_name": "tiny",
        "peft_config": RFLoraConfig(r=4, **LORA),
        "training_args": RFSFTConfig(max_steps=8, bf16=False),
    }
    values.update(overrides)
    return RFModelConfig(**values)


# ------------------------------------------------------------------------------------------------ drop-in configs
def test_concrete_rf_configs_are_their_parents():
    args = RFSFTConfig(output_dir="out", learning_rate=3e-4, max_steps=5, bf16=False)
    assert isinstance(args, SFTConfig) and not has_space(args)
    plain = SFTConfig(output_dir="out", learning_rate=3e-4, max_steps=5, bf16=False)
    assert args.to_dict() == plain.to_dict()  # same defaults and the same __post_init__ normalisation
    lora = RFLoraConfig(r=8, lora_alpha=16, **LORA)
    assert isinstance(lora, LoraConfig) and lora.target_modules == LoraConfig(r=8, **LORA).target_modules
    assert isinstance(RFDPOConfig(beta=0.2, bf16=False), DPOConfig)
    assert RFSFTConfig("positional", bf16=False).output_dir == "positional"


def test_parent_validation_runs_for_concrete_configs_and_for_each_leaf():
    with pytest.raises(ValueError) as parent:
        LoraConfig(r=4, use_dora=True, lora_bias=True, **LORA)
    with pytest.raises(ValueError) as ours:
        RFLoraConfig(r=4, use_dora=True, lora_bias=True, **LORA)
    assert str(ours.value) == str(parent.value)
    with pytest.raises(ValueError, match="lr_scheduler_type|is not a valid"):
        RFSFTConfig(lr_scheduler_type="bogus", bf16=False)
    # With a List the check waits for the leaves; the invalid combination then fails with the parent's message.
    template = RFLoraConfig(r=4, use_dora=List([False, True]), lora_bias=True, **LORA)
    assert isinstance(template.use_dora, List)
    with pytest.raises(ValueError, match="DoRA"):
        RFGridSearch(model_config(peft_config=template))
    with pytest.raises(TypeError, match="learing_rate"):
        RFSFTConfig(learing_rate=List([1e-3]), bf16=False)


def test_template_keeps_user_values_and_parent_defaults():
    template = RFSFTConfig(learning_rate=List([1e-3, 1e-4]), max_steps=8, bf16=False)
    assert isinstance(template.learning_rate, List) and template.max_steps == 8
    assert (
        template.per_device_train_batch_size == SFTConfig.__dataclass_fields__["per_device_train_batch_size"].default
    )
    assert "List([0.001, 0.0001])" in repr(template)
    template.max_steps = 5  # an edit after construction reaches the leaves
    assert {leaf.training_args.max_steps for leaf in RFGridSearch(model_config(training_args=template))} == {5}
    assert template.copy().user_params == template.user_params


# ------------------------------------------------------------------------------------------------ grid search
def test_grid_counts_order_and_nesting():
    first = model_config(
        peft_config=RFLoraConfig(r=List([4, 8]), lora_alpha=List([8, 16]), **LORA),
        training_args=RFSFTConfig(learning_rate=List([1e-3, 1e-4]), max_steps=8, bf16=False),
    )
    second = model_config(peft_config=List([RFLoraConfig(r=2, **LORA), RFLoraConfig(r=List([16, 32]), **LORA)]))
    search = RFGridSearch(configs=List([first, second]), trainer_type="SFT")
    assert len(search) == 2 * 2 * 2 + 1 + 2 == len(list(search))
    leaves = list(search)
    assert all(isinstance(leaf, RFModelConfig) and not has_space(leaf) for leaf in leaves)
    assert all(
        isinstance(leaf.peft_config, LoraConfig) and isinstance(leaf.training_args, SFTConfig) for leaf in leaves
    )
    # Declaration order, first field slowest: peft_config (r, then lora_alpha) before training_args.
    combos = [(x.peft_config.r, x.peft_config.lora_alpha, x.training_args.learning_rate) for x in leaves[:8]]
    assert combos == [(r, a, lr) for r in (4, 8) for a in (8, 16) for lr in (1e-3, 1e-4)]
    assert [leaf.peft_config.r for leaf in leaves[8:]] == [2, 16, 32]
    assert search.trainer_type == "SFT" and len(RFGridSearch(first)) == 8  # a single config is accepted too


def test_grid_expands_lists_inside_dicts_and_lists():
    args = RFSFTConfig(
        lr_scheduler_type="cosine_with_restarts",
        lr_scheduler_kwargs={"num_cycles": List([1, 2, 3])},
        max_steps=8,
        bf16=False,
    )
    lora = RFLoraConfig(r=4, target_modules=["q_proj", List(["v_proj", "k_proj"])])
    search = RFGridSearch(
        model_config(peft_config=lora, training_args=args, model_kwargs={"revision": List(["a", "b"])})
    )
    assert len(search) == 2 * 3 * 2
    assert {leaf.training_args.lr_scheduler_kwargs["num_cycles"] for leaf in search} == {1, 2, 3}
    assert {frozenset(leaf.peft_config.target_modules) for leaf in search} == {
        frozenset({"q_proj", "v_proj"}),
        frozenset({"q_proj", "k_proj"}),
    }
    assert {leaf.model_kwargs["revision"] for leaf in search} == {"a", "b"}
    assert len(RFGridSearch(model_config(model_name=List(["m1", "m2"]), formatting_func=List([str, repr])))) == 4


def test_grid_refuses_range():
    config = model_config(training_args=RFSFTConfig(learning_rate=Range(1e-5, 1e-3, log=True), bf16=False))
    with pytest.raises(ValueError, match="RFRandomSearch"):
        RFGridSearch(config)


# ---------------------------------------------------------------------------------------------- random search
def random_space():
    return List(
        [
            model_config(
                peft_config=RFLoraConfig(r=List([4, 8, 16]), lora_dropout=Range(0.0, 0.2), **LORA),
                training_args=RFSFTConfig(
                    learning_rate=Range(1e-5, 1e-2, log=True),
                    per_device_train_batch_size=Range(2, 8),
                    max_steps=8,
                    bf16=False,
                ),
            ),
            model_config(model_name="other"),
        ]
    )


def describe(search):
    return [
        (leaf.model_name, leaf.peft_config.r, leaf.peft_config.lora_dropout, leaf.training_args.learning_rate)
        for leaf in search
    ]


def test_random_search_is_sized_concrete_and_reproducible():
    search = RFRandomSearch(configs=random_space(), trainer_type="SFT", num_runs=12, seed=3)
    assert len(search) == 12 and all(not has_space(leaf) for leaf in search)
    assert describe(search) == describe(RFRandomSearch(random_space(), "SFT", num_runs=12, seed=3))
    assert describe(search) != describe(RFRandomSearch(random_space(), "SFT", num_runs=12, seed=4))
    tuned = [leaf for leaf in search if leaf.model_name == "tiny"]
    assert tuned and all(1e-5 <= leaf.training_args.learning_rate <= 1e-2 for leaf in tuned)
    assert all(leaf.peft_config.r in (4, 8, 16) and 0.0 <= leaf.peft_config.lora_dropout <= 0.2 for leaf in tuned)
    batch_sizes = {leaf.training_args.per_device_train_batch_size for leaf in tuned}
    assert all(isinstance(size, int) and 2 <= size <= 8 for size in batch_sizes)


def test_range_log_sampling_is_log_uniform_within_bounds():
    rng = random.Random(0)
    values = [Range(1e-6, 1e-2, log=True).sample(rng) for _ in range(4000)]
    assert all(1e-6 <= value <= 1e-2 for value in values)
    # Log-uniform: each decade gets about a quarter of the draws (uniform would put 90% in the top one).
    for decade in range(4):
        share = sum(10 ** (-6 + decade) <= v < 10 ** (-5 + decade) for v in values) / len(values)
        assert abs(share - 0.25) < 0.04
    ints = [Range(1, 1000, log=True).sample(rng) for _ in range(2000)]
    assert all(isinstance(v, int) and 1 <= v <= 1000 for v in ints)
    assert sum(v < 32 for v in ints) / len(ints) > 0.4  # median near sqrt(1000) ~ 31.6
    stepped = {Range(0.0, 1.0, step=0.25).sample(rng) for _ in range(200)}
    assert stepped == {0.0, 0.25, 0.5, 0.75, 1.0}
    with pytest.raises(ValueError, match="start > 0"):
        Range(0, 1, log=True)
    assert math.isclose(Range(2, 2).sample(rng), 2)


def test_random_search_refuses_more_runs_than_the_space_holds():
    with pytest.raises(ValueError, match="distinct"):
        RFRandomSearch(model_config(peft_config=RFLoraConfig(r=List([4, 8]), **LORA)), num_runs=3, seed=0)


# ------------------------------------------------------------------------------------------------ leaf checks
def test_leaf_checks_name_the_problem():
    with pytest.raises(ValueError, match="no model_name"):
        RFGridSearch(model_config(model_name=None))
    with pytest.raises(ValueError, match="RFDPOConfig.*trainer_type='DPO'|trainer_type='DPO'.*DPOConfig"):
        RFGridSearch(model_config(), trainer_type="DPO")
    with pytest.raises(ValueError, match="trainer_type='SFT' needs an RFSFTConfig"):
        RFGridSearch(model_config(training_args=RFDPOConfig(bf16=False)), trainer_type="sft")
    with pytest.raises(ValueError, match="trainer_type='PPO' is invalid"):
        RFGridSearch(model_config(), trainer_type="PPO")
    with pytest.raises(ValueError, match="peft_config must be"):
        RFGridSearch(model_config(peft_config={"r": 4}))
    with pytest.raises(ValueError, match="configs\\[1\\] must be an RFModelConfig"):
        RFGridSearch([model_config(), {"model_name": "x"}])
    with pytest.raises(ValueError, match="num_runs"):
        RFRandomSearch(model_config(), num_runs=0)


def test_leaf_args_seed_save_and_cpu_precision():
    args = leaf_args(model_config(training_args=RFSFTConfig(fp16=True, max_steps=3)), "SFT", seed=7, on_cuda=False)
    assert (args.fp16, args.bf16, args.gradient_checkpointing, args.seed) == (False, False, False, 7)
    assert args.save_strategy == "no" and args.max_steps == 3 and isinstance(args, SFTConfig)
    explicit = RFSFTConfig(seed=3, save_strategy="steps", bf16=False)
    kept = leaf_args(model_config(training_args=explicit), "SFT", seed=7, on_cuda=False)
    assert kept.seed == 3 and kept.save_strategy == "steps"
    plain = leaf_args(model_config(training_args=SFTConfig(bf16=False, seed=5)), "SFT", seed=7, on_cuda=False)
    assert plain.seed == 5 and type(plain) is SFTConfig
    assert leaf_args(model_config(training_args=None), "SFT", seed=1, on_cuda=False).seed == 1
