"""Drop-in: scripts written for `GRPOTrainer` run unchanged on `RFGRPOTrainer`, side by side, with the same weights,
logs, files and errors; `configs=[{}]` (the engine, one run) trains to the same weights and losses."""

from __future__ import annotations

import copy
import re

import pytest
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from side_by_side import assert_engine_equals_parent, compare
from trl import GRPOConfig, GRPOTrainer

from rf_callbacks import RFGRPOTrainer
from rf_callbacks.demo import build_tiny_model, load_instructions

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def correct(completions, answer, **kwargs):
    return [1.0 if expected in completion[0]["content"] else 0.0 for completion, expected in zip(completions, answer)]


def brevity(completions, **kwargs):
    return [-len(completion[0]["content"]) / 100 for completion in completions]


@pytest.fixture(scope="module")
def prompts():
    rows = [row for row in load_instructions() if re.search(r"\d", row["response"])][:8]
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": row["instruction"]}],
                "answer": re.findall(r"\d+", row["response"])[-1],
            }
            for row in rows
        ]
    )


@pytest.fixture
def script(tokenizer, prompts):
    def make(args=None, **kwargs):
        def make_kwargs(out):
            values = {
                "output_dir": str(out),
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "max_steps": 4,
                "logging_steps": 1,
                "report_to": "none",
                "use_cpu": True,
                "save_strategy": "no",
                "seed": 7,
                "disable_tqdm": True,
                "num_generations": 4,
                "max_completion_length": 8,
                **(args or {}),
            }
            given = {
                "model": build_tiny_model(tokenizer),
                "reward_funcs": [correct, brevity],
                "train_dataset": prompts,
                "processing_class": tokenizer,
            }
            given.update(
                {k: (v(out) if k == "model" and callable(v) else copy.deepcopy(v)) for k, v in kwargs.items()}
            )
            return {"args": GRPOConfig(**values), **given}

        return make_kwargs

    return make


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"beta": 0.04, "steps_per_generation": 2, "num_iterations": 2},
        {"loss_type": "dr_grpo", "scale_rewards": False, "reward_weights": [1.0, 0.5]},
        {"save_strategy": "steps", "save_steps": 2, "gradient_accumulation_steps": 2},
    ],
    ids=["lora", "beta_iterations", "dr_grpo", "checkpoints_accumulation"],
)
def test_lora_scripts_equal_grpo_trainer(script, tmp_path, args):
    make_kwargs = script(args, peft_config=LORA)
    compare(GRPOTrainer, RFGRPOTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(GRPOTrainer, RFGRPOTrainer, make_kwargs, tmp_path)


def test_full_fine_tuning_and_a_user_built_peft_model(script, tokenizer, tmp_path):
    compare(GRPOTrainer, RFGRPOTrainer, script(), tmp_path / "full")
    assert_engine_equals_parent(GRPOTrainer, RFGRPOTrainer, script(), tmp_path / "full-engine")
    peft = script(model=lambda out: get_peft_model(build_tiny_model(tokenizer), copy.deepcopy(LORA)))
    compare(GRPOTrainer, RFGRPOTrainer, peft, tmp_path / "peft")
    assert_engine_equals_parent(GRPOTrainer, RFGRPOTrainer, peft, tmp_path / "peft-engine")


def test_eval_set(script, prompts, tmp_path):
    make_kwargs = script(
        {"eval_strategy": "steps", "eval_steps": 2}, eval_dataset=prompts.select(range(4)), peft_config=LORA
    )
    compare(GRPOTrainer, RFGRPOTrainer, make_kwargs, tmp_path)


@pytest.mark.parametrize(
    "change",
    [{"model": None}, {"train_dataset": None}, {"peft_config": "lora"}],
    ids=["model_none", "no_train_dataset", "bad_peft_config"],
)
def test_errors_are_grpo_trainer_errors(script, tmp_path, change):
    compare(GRPOTrainer, RFGRPOTrainer, script(**change), tmp_path, fails=True)
