"""Drop-in: scripts written for `DPOTrainer` run unchanged on `RFDPOTrainer`, side by side, with the same weights,
logs, files and errors; `configs=[{}]` (the engine, one run) trains to the same weights and losses."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from side_by_side import assert_engine_equals_parent, compare
from trl import DPOConfig, DPOTrainer

from rf_callbacks import RFDPOTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.preference import load_preferences

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def pairs():
    data = load_preferences(conversational=True)
    return data.select(range(24)), data.select(range(24, 32))


@pytest.fixture
def script(tokenizer, pairs):
    def make(args=None, **kwargs):
        def make_kwargs(out):
            values = {
                "output_dir": str(out),
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "max_steps": 5,
                "max_length": 64,
                "logging_steps": 1,
                "report_to": "none",
                "use_cpu": True,
                "save_strategy": "no",
                "seed": 7,
                "disable_tqdm": True,
                **(args or {}),
            }
            given = {"model": build_tiny_model(tokenizer), "train_dataset": pairs[0], "processing_class": tokenizer}
            given.update({k: (v(out) if k in {"model", "ref_model"} and callable(v) else copy.deepcopy(v))
                          for k, v in kwargs.items()})  # fmt: skip
            return {"args": DPOConfig(**values), **given}

        return make_kwargs

    return make


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"precompute_ref_log_probs": True},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.3},
        {"padding_free": True},
        {"gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine", "save_strategy": "steps", "save_steps": 2},
    ],
    ids=["lora", "precompute_ref", "loss_mix", "padding_free", "accumulation_checkpoints"],
)
def test_lora_scripts_equal_dpo_trainer(script, tmp_path, args):
    make_kwargs = script(args, peft_config=LORA)
    compare(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path)


def test_small_data_set_and_eval_set(script, pairs, tmp_path):
    # 10 pairs at batch 4: 3 optimizer steps per epoch, fewer than the engine's default chunk count.
    make_kwargs = script(
        {"max_steps": -1, "num_train_epochs": 2, "eval_strategy": "epoch"},
        train_dataset=pairs[0].select(range(10)),
        eval_dataset=pairs[1],
        peft_config=LORA,
    )
    compare(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path)


def test_full_fine_tuning_with_a_ref_model(script, tokenizer, tmp_path):
    make_kwargs = script(ref_model=lambda out: build_tiny_model(tokenizer))
    compare(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path)


def test_full_fine_tuning_from_a_local_path_without_a_ref_model(script, tokenizer, tmp_path):
    # DPOTrainer loads its reference from the model's path, so the model is given as one.
    path = tmp_path / "model"
    build_tiny_model(tokenizer).save_pretrained(path)
    make_kwargs = script(model=str(path))
    compare(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path)


def test_user_built_peft_model(script, tokenizer, tmp_path):
    make_kwargs = script(model=lambda out: get_peft_model(build_tiny_model(tokenizer), copy.deepcopy(LORA)))
    compare(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path)


def test_streamed_train_set(script, pairs, tmp_path):
    make_kwargs = script(train_dataset=pairs[0].to_iterable_dataset(num_shards=2), peft_config=LORA)
    compare(DPOTrainer, RFDPOTrainer, make_kwargs, tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"model": None},
        {"train_dataset": None},
        {"train_dataset": Dataset.from_dict({"text": ["x"] * 8})},
        {"peft_config": "lora"},
    ],
    ids=["model_none", "no_train_dataset", "no_preference_columns", "bad_peft_config"],
)
def test_errors_are_dpo_trainer_errors(script, tmp_path, change):
    compare(DPOTrainer, RFDPOTrainer, script(**change), tmp_path, fails=True)
