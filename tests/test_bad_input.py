"""Bad input is refused before any training starts, with a message naming the field and the value."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import IA3Config, LoraConfig

from rf_callbacks import RFSFTTrainer


def lora(**kwargs):
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs)


@pytest.fixture
def build(make_model, tokenizer, chat_data, sft_args):
    def make(configs, num_chunks=2, train=None, **kwargs):
        return RFSFTTrainer(
            model=make_model(),
            args=kwargs.pop("args", None) or sft_args(),
            train_dataset=chat_data[0] if train is None else train,
            processing_class=tokenizer,
            configs=configs,
            num_chunks=num_chunks,
            **kwargs,
        )

    return make


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        ([], "configs is empty"),
        ({"peft_config": lora()}, "configs must be a list of dicts"),
        ([{"name": "a", "peft_config": lora()}, {"name": "a", "peft_config": lora()}], "duplicate run name 'a'"),
        ([{"name": "a/b", "peft_config": lora()}], "name='a/b' is invalid"),
        (
            [{"peft_config": lora(), "learing_rate": 1e-3}],
            "did you mean 'learning_rate'?",
        ),
        ([{"peft_config": lora(), "bf16": True}], "bf16=True cannot differ per run"),
        (
            [{"peft_config": lora(), "gradient_checkpointing": True}],
            "cannot differ per run",
        ),
        ([{"peft_config": lora(), "learning_rate": -1e-3}], "learning_rate=-0.001 is invalid"),
        ([{"peft_config": lora(), "learning_rate": "1e-3"}], "learning_rate must be a number, got '1e-3' (str)"),
        ([{"peft_config": lora(), "per_device_train_batch_size": 0}], "per_device_train_batch_size=0 is invalid"),
        ([{"peft_config": lora(), "max_steps": 0}], "max_steps=0 is invalid"),
        ([{"peft_config": lora(), "warmup_ratio": 1.5}], "warmup_ratio=1.5 is invalid"),
        ([{"peft_config": lora(), "num_train_epochs": 3}], "num_train_epochs=3 would be ignored"),
        ([{"peft_config": lora(), "lr_scheduler_type": "sideways"}], "configs[0] ('run-1'): "),
        ([{"peft_config": {"r": 8}}], "peft_config must be a peft.PeftConfig (e.g. LoraConfig), got dict"),
        ([{"name": "a"}, {"name": "b"}], "configs[0] ('a') has no peft_config and the trainer has none"),
        (
            [{"name": "a", "peft_config": lora()}, {"name": "b", "peft_config": IA3Config(target_modules=["q_proj"])}],
            "all runs must use the same PEFT method",
        ),
        (
            [{"name": "x", "peft_config": LoraConfig(target_modules=["query_key_value"])}],
            "run 'x': its peft_config cannot be applied to this model",
        ),
        ([{"peft_config": lora(), "loss_type": "foo"}], "loss_type='foo' is invalid; use 'nll' or 'dft'"),
        ([{"peft_config": lora(), "truncation_mode": "middle"}], "truncation_mode='middle' is invalid"),
        ([{"peft_config": lora(), "learning_rate": None}], "configs[0] ('run-1'): learning_rate=None is invalid"),
        ([{"peft_config": lora(), "logging_steps": None}], "logging_steps=None is invalid"),
        ([{"peft_config": lora(), "beta": 0.1}], "'beta' is a field of DPOConfig, not of SFTConfig"),
    ],
)
def test_bad_configs_are_refused(build, configs, message):
    with pytest.raises(ValueError) as error:
        build(configs)
    assert message in str(error.value)


def test_bad_num_chunks(build):
    with pytest.raises(ValueError, match=r"num_chunks=0 is invalid"):
        build([{"peft_config": lora()}], num_chunks=0)
    # 96 rows / batch 4 = 24 optimizer steps per epoch
    with pytest.raises(ValueError, match=r"num_chunks=25 is more than run 'run-1' has optimizer steps per epoch \(24"):
        build([{"peft_config": lora()}], num_chunks=25)


def test_dataset_without_the_needed_columns(build):
    with pytest.raises(ValueError, match=r"train_dataset has columns \['question'\], but SFT needs one of"):
        build([{"peft_config": lora()}], train=Dataset.from_dict({"question": ["a", "b"]}))
    with pytest.raises(ValueError, match="train_dataset is empty"):
        build([{"peft_config": lora()}], train=Dataset.from_dict({"text": []}))


def test_one_optimizer_for_several_runs_is_refused(build, make_model):
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="each of the 2 runs needs its own"):
        build([{"peft_config": lora()}, {"peft_config": lora()}], optimizers=(torch.optim.SGD(params, lr=0.1), None))


def test_a_peft_model_whose_adapter_no_run_trains_is_kept_inactive_with_a_warning(
    make_model, tokenizer, chat_data, sft_args, caplog
):
    from peft import get_peft_model

    model = get_peft_model(make_model(), lora())
    before = {k: v.clone() for k, v in model.state_dict().items() if ".default." in k}
    trainer = RFSFTTrainer(
        model=model,
        args=sft_args(max_steps=2),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=[{"name": "new", "peft_config": lora()}],
    )
    assert "no run trains its adapter 'default'" in caplog.text
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert trainer.results()[0]["status"] == "completed"


def test_a_refused_trainer_leaves_the_model_as_it_was(build, make_model, tokenizer, chat_data, sft_args):
    """PEFT injects LoRA layers into the caller's model in place: a refusal after that takes them out again, so the
    user can fix the value and build again with the same model."""
    model = make_model()
    names = [name for name, _ in model.named_modules()]
    kwargs = dict(args=sft_args(), train_dataset=chat_data[0], processing_class=tokenizer)
    missing = LoraConfig(r=4, target_modules=["nope"])
    for configs, num_chunks in (
        ([{"peft_config": lora()}], 25),
        ([{"peft_config": lora()}, {"peft_config": missing}], 2),
    ):
        with pytest.raises(ValueError):
            RFSFTTrainer(model=model, configs=configs, num_chunks=num_chunks, **kwargs)
        assert [name for name, _ in model.named_modules()] == names and not hasattr(model, "peft_config")
        assert all(param.requires_grad for param in model.parameters())
    RFSFTTrainer(model=model, configs=[{"peft_config": lora()}], num_chunks=2, **kwargs)


@pytest.mark.parametrize("model", [None, 42])
def test_a_model_that_is_not_a_model_is_refused(model, tokenizer, chat_data, sft_args):
    # engine mode names the problem; without configs the trainer is SFTTrainer and fails as it does
    # (tests/test_dropin_sft.py)
    with pytest.raises(ValueError, match="model must be a hub id, a local path or a transformers model, got"):
        RFSFTTrainer(
            model=model, args=sft_args(), train_dataset=chat_data[0], processing_class=tokenizer, configs=[{}]
        )
