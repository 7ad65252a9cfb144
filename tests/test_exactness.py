"""Exactness: one config equals plain `SFTTrainer`; a run trained in rotation equals the same run trained alone.

The negative controls break one piece of parked state at a time (optimizer, LR scheduler, RNG) and check that the
rotation test then fails, which shows the test can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import TrainerCallback, set_seed
from trl import SFTTrainer

from rf_callbacks import RFSFTTrainer
from rf_callbacks.engine import MultiConfigMixin


def adapter_weights(model, name: str) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model, adapter_name=name).items()}


def max_abs_diff(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys()
    return max((left[key] - right[key]).abs().max().item() for key in left)


def train_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


@pytest.mark.parametrize(("sampling", "dropout"), [("sequential", 0.0), ("random", 0.1)])
def test_one_config_equals_plain_sft_trainer(make_model, tokenizer, chat_data, sft_args, tmp_path, sampling, dropout):
    train, _ = chat_data
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    # 96 rows / batch 4 = 24 steps per epoch: 30 steps cross an epoch boundary (new shuffle, new dataloader seed draw).
    plain_args = sft_args(output_dir=str(tmp_path / "plain"), max_steps=30, train_sampling_strategy=sampling)
    set_seed(plain_args.seed)
    plain = SFTTrainer(
        model=make_model(),
        args=plain_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(lora),
    )
    plain.train()

    ours_args = sft_args(output_dir=str(tmp_path / "ours"), max_steps=30, train_sampling_strategy=sampling)
    set_seed(ours_args.seed)
    ours = RFSFTTrainer(
        model=make_model(),
        args=ours_args,
        train_dataset=train,
        processing_class=tokenizer,
        configs=[{"name": "a", "peft_config": lora}],
        num_chunks=4,
    )
    ours.train()

    diff = max_abs_diff(adapter_weights(plain.model, "default"), adapter_weights(ours.model, "a"))
    assert diff <= 1e-6, diff
    assert train_losses(ours.runs["a"].state.log_history) == train_losses(plain.state.log_history)
    assert ours.runs["a"].global_step == plain.state.global_step == 30


def rotation_configs(dropout: float = 0.1) -> list[dict]:
    return [
        {
            "name": "a",
            "peft_config": LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]),
        },
        {
            "name": "b",
            "peft_config": LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"),
            "learning_rate": 5e-4,
            "per_device_train_batch_size": 2,
        },
        {
            "name": "c",
            "peft_config": LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["k_proj", "o_proj"]),
            "learning_rate": 2e-3,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "lr_scheduler_type": "cosine",
        },
    ]


def train_rotation(make_model, tokenizer, train, args, configs, num_chunks):
    set_seed(args.seed)
    trainer = RFSFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        configs=configs,
        num_chunks=num_chunks,
    )
    trainer.train()
    return trainer


@pytest.fixture
def alone_a(make_model, tokenizer, chat_data, sft_args, tmp_path):
    args = sft_args(output_dir=str(tmp_path / "alone"), max_steps=20, warmup_steps=0.2)
    trainer = train_rotation(make_model, tokenizer, chat_data[0], args, rotation_configs()[:1], num_chunks=1)
    return adapter_weights(trainer.model, "a"), train_losses(trainer.runs["a"].state.log_history)


def test_run_in_rotation_equals_run_alone(alone_a, make_model, tokenizer, chat_data, sft_args, tmp_path):
    args = sft_args(output_dir=str(tmp_path / "mixed"), max_steps=20, warmup_steps=0.2)
    trainer = train_rotation(make_model, tokenizer, chat_data[0], args, rotation_configs(), num_chunks=3)
    assert [row["status"] for row in trainer.results()] == ["completed"] * 3
    assert max_abs_diff(alone_a[0], adapter_weights(trainer.model, "a")) == 0.0
    assert train_losses(trainer.runs["a"].state.log_history) == alone_a[1]


def _break_optimizer(trainer, run):
    trainer.optimizer.state.clear()


def _break_scheduler(trainer, run):
    trainer.lr_scheduler = None
    trainer.create_scheduler(num_training_steps=run.plan.max_steps, optimizer=trainer.optimizer)


@pytest.mark.parametrize("broken", ["optimizer", "scheduler", "rng"])
def test_negative_controls_make_rotation_test_fail(
    broken, alone_a, make_model, tokenizer, chat_data, sft_args, tmp_path, monkeypatch
):
    if broken == "rng":
        monkeypatch.setattr("rf_callbacks.loop.restore_rng", lambda state: None)
    else:
        original = MultiConfigMixin._activate
        breaker = _break_optimizer if broken == "optimizer" else _break_scheduler

        def activate_and_forget(self, run):
            resumed = bool(run.attributes) and self.active_run is not run
            original(self, run)
            if resumed:
                breaker(self, run)

        monkeypatch.setattr(MultiConfigMixin, "_activate", activate_and_forget)
    args = sft_args(output_dir=str(tmp_path / "broken"), max_steps=20, warmup_steps=0.2)
    trainer = train_rotation(make_model, tokenizer, chat_data[0], args, rotation_configs(), num_chunks=3)
    assert max_abs_diff(alone_a[0], adapter_weights(trainer.model, "a")) > 1e-4


class SnapshotCallback(TrainerCallback):
    """Records, at every optimizer step, the active run, what is trainable, and every adapter's weights."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.snapshots = []

    def on_step_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        active = self.trainer.active_run.name
        expected = {name for name, _ in model.named_parameters() if f".{active}." in name}
        assert trainable == expected, f"{active}: trainable parameters are not exactly its adapter's"

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.model
        weights = {name: adapter_weights(model, name) for name in self.trainer.runs.runs}
        self.snapshots.append((self.trainer.active_run.name, weights))


def test_only_the_active_adapter_changes(make_model, tokenizer, chat_data, sft_args):
    model = make_model()
    base_before = {name: param.detach().clone() for name, param in model.named_parameters()}
    set_seed(7)
    trainer = RFSFTTrainer(
        model=model,
        args=sft_args(max_steps=8),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=rotation_configs()[:2],
        num_chunks=4,
    )
    recorder = SnapshotCallback(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    for (_, before), (active, after) in zip(recorder.snapshots, recorder.snapshots[1:]):
        for name in before:
            diff = max_abs_diff(before[name], after[name])
            assert (diff > 0) == (name == active), (name, active, diff)
    base = trainer.model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(param, base_before[original]), name
