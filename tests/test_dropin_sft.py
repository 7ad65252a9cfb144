"""Drop-in: scripts written for `SFTTrainer` run unchanged on `RFSFTTrainer`, side by side, with the same weights,
logs, files and errors. Without `configs` the RF trainer is its parent; `configs=[{}]` runs the same script through
the engine, which must agree where an equal result exists (a user-built `PeftModel`, a stream)."""

from __future__ import annotations

import copy

import pytest
import side_by_side
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from side_by_side import build, compare, weights
from trl import SFTConfig, SFTTrainer

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.preference import load_preferences

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def script(tokenizer, chat_data):
    """A TRL-style script: `SFTConfig` fields and trainer keyword arguments as a user writes them."""

    def make(args=None, **kwargs):
        def make_kwargs(out):
            values = {
                "output_dir": str(out),
                "per_device_train_batch_size": 8,
                "learning_rate": 1e-3,
                "max_steps": 6,
                "logging_steps": 2,
                "report_to": "none",
                "use_cpu": True,
                "save_strategy": "no",
                "seed": 7,
                "disable_tqdm": True,
                **(args or {}),
            }
            given = {
                "model": build_tiny_model(tokenizer),
                "train_dataset": chat_data[0],
                "processing_class": tokenizer,
            }
            given.update(
                {k: (v(out) if callable(v) and k in {"model"} else copy.deepcopy(v)) for k, v in kwargs.items()}
            )
            return {"args": SFTConfig(**values), **given}

        return make_kwargs

    return make


def test_small_data_set_trains_as_sft_trainer(script, chat_data, tmp_path):
    # 17 rows at batch 8: 3 optimizer steps per epoch, fewer than the engine's default chunk count.
    small = chat_data[0].select(range(17))
    make_kwargs = script({"max_steps": -1, "num_train_epochs": 2}, train_dataset=small, peft_config=LORA)
    compare(SFTTrainer, RFSFTTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(make_kwargs, tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"packing": True, "max_length": 64},
        {"padding_free": True, "max_length": None},
        {"completion_only_loss": False},
        {"assistant_only_loss": True},
        {"gradient_checkpointing": True},
        {"gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine", "warmup_steps": 2},
    ],
    ids=["full", "packing", "padding_free", "no_completion_only", "assistant_only", "grad_ckpt", "accumulation"],
)
def test_full_fine_tuning_equals_sft_trainer(script, tmp_path, args):
    compare(SFTTrainer, RFSFTTrainer, script(args), tmp_path)


def test_messages_data_set_with_lora_and_checkpoints(script, chat_data, tmp_path):
    messages = chat_data[0].map(
        lambda row: {"messages": row["prompt"] + row["completion"]}, remove_columns=["prompt", "completion"]
    )
    compare(
        SFTTrainer,
        RFSFTTrainer,
        script({"save_strategy": "steps", "save_steps": 3}, train_dataset=messages, peft_config=LORA),
        tmp_path,
    )


def test_formatting_func_on_a_preference_data_set_from_a_local_path(script, tokenizer, tmp_path):
    path = tmp_path / "model"
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # A "prompt" column would make TRL read the formatted rows as prompt-completion ones: a question column here.
    prefs = load_preferences(conversational=False).select(range(24)).rename_column("prompt", "question")
    make_kwargs = script(
        {"model_init_kwargs": {"dtype": "float32"}},
        model=str(path),
        processing_class=None,
        train_dataset=prefs,
        formatting_func=lambda row: row["question"] + row["chosen"],
    )
    compare(SFTTrainer, RFSFTTrainer, make_kwargs, tmp_path / "drop-in")
    assert_engine_equals_parent(make_kwargs, tmp_path)


def test_eval_sets_compute_metrics_and_best_model(script, chat_data, tmp_path):
    def compute_metrics(prediction):
        return {"mean_logit": float(prediction.predictions.mean())}

    compare(
        SFTTrainer,
        RFSFTTrainer,
        script(
            {
                "eval_strategy": "steps",
                "eval_steps": 2,
                "save_strategy": "steps",
                "save_steps": 2,
                "load_best_model_at_end": True,
                "metric_for_best_model": "eval_first_loss",
                "per_device_eval_batch_size": 4,
            },
            eval_dataset={"first": chat_data[1].select(range(8)), "second": chat_data[1].select(range(8, 16))},
            compute_metrics=compute_metrics,
            peft_config=LORA,
        ),
        tmp_path,
    )


def test_streamed_train_and_eval_sets(script, chat_data, tmp_path):
    compare(
        SFTTrainer,
        RFSFTTrainer,
        script(
            {"eval_strategy": "steps", "eval_steps": 3},
            train_dataset=chat_data[0].to_iterable_dataset(num_shards=2).shuffle(seed=1, buffer_size=8),
            eval_dataset=chat_data[1].to_iterable_dataset(),
            peft_config=LORA,
        ),
        tmp_path,
    )


def peft_model(tokenizer, method: str):
    config = LORA if method == "lora" else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return get_peft_model(build_tiny_model(tokenizer), copy.deepcopy(config))


def engine(**kwargs):
    """The same script through the engine: one run, `configs=[{}]`."""
    return RFSFTTrainer(**kwargs, configs=[{}])


def assert_engine_equals_parent(make_kwargs, tmp_path):
    side_by_side.assert_engine_equals_parent(SFTTrainer, RFSFTTrainer, make_kwargs, tmp_path)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_user_built_peft_model(script, tokenizer, tmp_path, method):
    make_kwargs = script(model=lambda out: peft_model(tokenizer, method))
    compare(SFTTrainer, RFSFTTrainer, make_kwargs, tmp_path / "drop-in")
    # Through the engine, the one run trains the model's own adapter.
    assert_engine_equals_parent(make_kwargs, tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"gradient_accumulation_steps": 2, "packing": True, "max_length": 64},
        {"padding_free": True, "max_length": None},
        {"assistant_only_loss": True, "gradient_checkpointing": True},
    ],
    ids=["plain", "packing", "padding_free", "assistant_only"],
)
def test_full_fine_tuning_through_the_engine_equals_sft_trainer(script, tmp_path, args):
    assert_engine_equals_parent(script(args), tmp_path)


def test_peft_model_as_the_base_of_several_runs(script, tokenizer, tmp_path):
    alone = build(
        lambda **kw: RFSFTTrainer(**kw, configs=[{}]),
        script(model=lambda out: peft_model(tokenizer, "lora")),
        tmp_path / "a",
    )
    configs = [
        {},
        {"name": "wide", "peft_config": LoraConfig(r=8, target_modules=["q_proj", "k_proj"]), "learning_rate": 5e-4},
    ]
    both = build(
        lambda **kw: RFSFTTrainer(**kw, configs=configs, num_chunks=3),
        script(model=lambda out: peft_model(tokenizer, "lora")),
        tmp_path / "b",
    )
    assert [row["status"] for row in both.results()] == ["completed", "completed"]
    own = {k: v for k, v in weights(both.model).items() if ".default." in k}
    assert own and all(k in weights(alone.model) and weights(alone.model)[k].equal(v) for k, v in own.items())


def test_several_runs_that_cannot_share_a_peft_model_are_refused(script, tokenizer, tmp_path):
    model = peft_model(tokenizer, "prompt_tuning")
    before = set(model.peft_config)
    kwargs = script(model=lambda out: model)(tmp_path)
    with pytest.raises(ValueError, match="PEFT cannot hold adapters of different methods on one model"):
        RFSFTTrainer(**kwargs, configs=[{}, {"name": "b", "peft_config": LORA}])
    assert set(model.peft_config) == before
    with pytest.raises(ValueError, match="one run can train"):
        RFSFTTrainer(**kwargs, configs=[{}, {"name": "b"}])


@pytest.mark.parametrize(
    "change",
    [
        {"model": None},
        {"train_dataset": None},
        {"peft_config": "not a config"},
        {"train_dataset": Dataset.from_dict({"other": ["x"] * 8})},
    ],
    ids=["model_none", "no_train_dataset", "bad_peft_config", "bad_columns"],
)
def test_errors_are_sft_trainer_errors(script, tmp_path, change):
    compare(SFTTrainer, RFSFTTrainer, script(**change), tmp_path, fails=True)


def test_peft_model_with_peft_config_is_refused_with_trl_words(script, tokenizer, tmp_path):
    make = script(model=lambda out: peft_model(tokenizer, "lora"), peft_config=LORA)
    with pytest.raises(ValueError) as parent:
        SFTTrainer(**make(tmp_path / "p"))
    with pytest.raises(ValueError) as ours:
        RFSFTTrainer(**make(tmp_path / "o"), configs=[{}])
    assert str(ours.value) == str(parent.value)


def test_a_failed_build_removes_the_adapters_it_added_to_a_peft_model(script, tokenizer, tmp_path):
    model = peft_model(tokenizer, "lora")
    kwargs = script(model=lambda out: model)(tmp_path)
    with pytest.raises(ValueError, match="num_chunks=1000"):
        RFSFTTrainer(**kwargs, configs=[{}, {"name": "b", "peft_config": LORA}], num_chunks=1000)
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".b." in name for name, _ in model.named_parameters())


def test_signatures_extend_the_parents():
    """Positional calls and defaults written for TRL bind the same way: each RF signature starts with its parent's."""
    import inspect

    from trl import DPOTrainer, GRPOTrainer

    from rf_callbacks import RFDPOTrainer, RFGRPOTrainer

    for parent, ours in [(SFTTrainer, RFSFTTrainer), (DPOTrainer, RFDPOTrainer), (GRPOTrainer, RFGRPOTrainer)]:
        theirs = [(p.name, p.default, p.kind) for p in inspect.signature(parent.__init__).parameters.values()]
        mine = [(p.name, p.default, p.kind) for p in inspect.signature(ours.__init__).parameters.values()]
        assert mine[: len(theirs)] == theirs, parent.__name__
        assert all(kind is inspect.Parameter.KEYWORD_ONLY for _, _, kind in mine[len(theirs) :]), parent.__name__


def test_engine_api_of_a_drop_in_trainer_says_how_to_turn_the_engine_on(script, tmp_path):
    trainer = RFSFTTrainer(**script(peft_config=LORA)(tmp_path))
    for name in ("results", "select_run", "stop"):
        with pytest.raises(RuntimeError, match=r"built without configs.*configs=\[\{\}\]"):
            getattr(trainer, name)("run-1") if name != "results" else trainer.results()
    for name in ("runs", "active_run"):
        with pytest.raises(RuntimeError, match=rf"{name}\(\) is part of the rf-callbacks engine"):
            getattr(trainer, name)
    trainer.close()  # nothing to close: a plain SFTTrainer
    engine = RFSFTTrainer(**script(peft_config=LORA)(tmp_path / "engine"), configs=[{}])
    assert engine.active_run is None
    engine.train()
    assert engine.active_run is engine.runs["run-1"]
    engine.close()
